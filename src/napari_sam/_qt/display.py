"""Can Qt open a window here? Asked before napari starts, so a missing display is one clear line.

Without a display, or without the X libraries Qt's ``xcb`` platform plugin loads, Qt
prints "could not load the Qt platform plugin" and *aborts* the process (a core dump):
no exception reaches Python. So the question is asked in a short child process (the same
interpreter and environment), and its output is turned into what is missing and what to do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

# Debian/Ubuntu packages for the libraries Qt 6's xcb plugin and napari's OpenGL canvas load.
DEBIAN_PACKAGES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb.so.1": "libxcb1",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libOpenGL.so.0": "libopengl0",
    "libGLX.so.0": "libglx0",
    "libfontconfig.so.1": "libfontconfig1",
    "libdbus-1.so.3": "libdbus-1-3",
}
# What scripts/test.sh installs: enough for napari on a bare Debian/Ubuntu.
ALL_PACKAGES = (
    "libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxkbcommon-x11-0 libxcb-image0 "
    "libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-xfixes0 libgl1 libegl1 libfontconfig1 libdbus-1-3"
)
ALTERNATIVES = "or label without a window: the Python API in a notebook, or `napari-sam segment` (see README)"

# Creates the application and loads Qt's OpenGL module, as napari does first.
_PROBE = (
    "import sys\n"
    "from qtpy.QtWidgets import QApplication\n"
    "app = QApplication(sys.argv[:1])\n"
    "from qtpy import QtOpenGL\n"
    "print('napari-sam: display ok', flush=True)\n"
)
_MISSING_LIB = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file")


def _needs_display() -> bool:
    """Linux/BSD Qt draws through X11 or Wayland; macOS and Windows always have a screen."""
    if sys.platform.startswith(("win", "darwin")):
        return False
    platform = os.environ.get("QT_QPA_PLATFORM", "").split(":")[0].split(";")[0].strip().lower()
    return platform in ("", "xcb", "wayland", "wayland-egl")


def explain(output: str, returncode: int | None) -> str:
    """Turn a failed probe's output into one line: what is missing and what to do."""
    missing = list(dict.fromkeys(_MISSING_LIB.findall(output)))
    connect = re.search(r"could not connect to display\s*(\S*)", output)
    # Qt prints this hint whenever the xcb plugin fails, also for a display it cannot reach
    if "xcb-cursor0 or libxcb-cursor0 is needed" in output and not connect and not missing:
        missing.append("libxcb-cursor.so.0")
    if missing:
        known = [DEBIAN_PACKAGES[lib] for lib in missing if lib in DEBIAN_PACKAGES]
        install = f"sudo apt-get install {' '.join(dict.fromkeys(known))} " if known else ""
        return (f"Qt cannot open a window: missing {', '.join(missing)}. On Debian/Ubuntu: "
                f"{install}(all napari needs: {ALL_PACKAGES}); {ALTERNATIVES}")
    if connect:
        where = connect.group(1) or os.environ.get("DISPLAY", "")
        return (f"cannot connect to the X display {where!r} (DISPLAY): is the X server running, and is "
                f"this user allowed to use it? On a machine without a screen run `xvfb-run -a napari-sam demo` "
                f"(apt-get install xvfb); {ALTERNATIVES}")
    if returncode is None:
        return f"Qt did not start within the time limit (display {os.environ.get('DISPLAY', '')!r}); {ALTERNATIVES}"
    last = [ln.strip() for ln in output.splitlines() if ln.strip()]
    detail = next((ln for ln in last if "qt.qpa" in ln or "Error" in ln or "platform plugin" in ln),
                  last[0] if last else "no output")
    if os.environ.get("QT_QPA_PLATFORM"):
        detail += f" (QT_QPA_PLATFORM={os.environ['QT_QPA_PLATFORM']!r}: unset it to let Qt choose)"
    return (f"Qt cannot open a window (exit code {returncode}): {detail}. The Qt libraries napari needs on "
            f"Debian/Ubuntu: sudo apt-get install {ALL_PACKAGES}; {ALTERNATIVES}")


def display_problem(timeout: float = 60.0) -> str | None:
    """``None`` when napari can open a window here, else one line saying what is missing."""
    if sys.platform.startswith(("win", "darwin")):
        return None
    if _needs_display() and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return ("no display to open napari's window on (neither DISPLAY nor WAYLAND_DISPLAY is set). "
                "On a desktop, run it from the desktop's terminal; over SSH use `ssh -X`; on a server run "
                f"`xvfb-run -a napari-sam demo` (apt-get install xvfb); {ALTERNATIVES}")
    env = dict(os.environ, QT_DEBUG_PLUGINS="1")  # makes Qt name the library it could not load
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return explain("", None)
    if proc.returncode == 0 and "napari-sam: display ok" in proc.stdout:
        return None
    return explain(proc.stdout + proc.stderr, proc.returncode)
