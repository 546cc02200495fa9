#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine and run it
# under a virtual X server. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Xvfb and the X/GL libraries Qt 6 needs to open napari's window.
APT_PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 \
libxkbcommon-x11-0 libxcb-image0 libxcb-render-util0 libxcb-randr0 libxcb-shape0 \
libxcb-xfixes0 libgl1 libegl1 libfontconfig1 libdbus-1-3"
missing=""
for pkg in $APT_PACKAGES; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

PY="${PYTHON:-python3}"
# A torch already present is kept; otherwise take the pinned release (a CPU build where
# the machine provides one) rather than whatever the resolver would pick.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# A regular (non-editable) install: the tests exercise the package as users get it,
# including the npe2 manifest shipped inside the wheel.
"$PY" -m pip install -q ".[test]"

# Tests must never reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m pytest -ra "$@"
