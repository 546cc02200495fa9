"""`napari-sam demo` where no window can open: one line naming what is missing, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("qtpy")

from napari_sam._qt.display import ALL_PACKAGES, display_problem, explain  # noqa: E402

# What Qt 6.11 printed here (QT_DEBUG_PLUGINS=1) with libxcb-cursor0 removed by dpkg.
QT_MISSING_CURSOR = (
    'qt.core.library: "/venv/PyQt6/Qt6/plugins/platforms/libqxcb.so" cannot load: Cannot load library '
    "/venv/PyQt6/Qt6/plugins/platforms/libqxcb.so: libxcb-cursor.so.0: cannot open shared object file: "
    "No such file or directory\n"
    "qt.qpa.plugin: From 6.5.0, xcb-cursor0 or libxcb-cursor0 is needed to load the Qt xcb platform plugin.\n"
    'qt.qpa.plugin: Could not load the Qt platform plugin "xcb" in "" even though it was found.\n'
    "This application failed to start because no Qt platform plugin could be initialized.\n"
)
# ... and with the libraries present but DISPLAY naming no server (Qt prints the cursor hint anyway).
QT_NO_SERVER = (
    "qt.qpa.xcb: could not connect to display :77\n"
    "qt.qpa.plugin: From 6.5.0, xcb-cursor0 or libxcb-cursor0 is needed to load the Qt xcb platform plugin.\n"
    'qt.qpa.plugin: Could not load the Qt platform plugin "xcb" in "" even though it was found.\n'
)
PY_NO_EGL = "ImportError: libEGL.so.1: cannot open shared object file: No such file or directory\n"


def run_demo(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_sam.cli", "demo"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_library_names_the_debian_package():
    msg = explain(QT_MISSING_CURSOR, -6)
    assert "missing libxcb-cursor.so.0" in msg and "apt-get install libxcb-cursor0 " in msg
    assert ALL_PACKAGES in msg and "\n" not in msg
    msg = explain(PY_NO_EGL, 1)
    assert "missing libEGL.so.1" in msg and "apt-get install libegl1 " in msg


def test_unreachable_display_is_not_blamed_on_libraries():
    msg = explain(QT_NO_SERVER, -6)
    assert msg.startswith("cannot connect to the X display ':77'") and "xvfb-run -a napari-sam demo" in msg
    assert "missing" not in msg


def test_unknown_library_gets_no_wrong_package():
    msg = explain("libwayland-cursor.so.0: cannot open shared object file: No such file\n", -6)
    assert "missing libwayland-cursor.so.0" in msg and "sudo apt-get install" not in msg
    assert msg.count(ALL_PACKAGES) == 1


def test_unknown_or_uppercase_platform_is_probed_not_aborted():
    for platform in ("bogus", "XCB"):
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        env["QT_QPA_PLATFORM"] = platform
        res = run_demo(env)
        assert res.returncode == 2, (platform, res.returncode, res.stderr[-2000:])
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_bad_triton_setting_fails_at_start():
    res = run_demo({**os.environ, "NAPARI_SAM_TRITON": "garbage"})
    assert res.returncode == 2 and "NAPARI_SAM_TRITON='garbage'" in res.stderr


def test_unknown_failure_still_says_what_to_do():
    msg = explain("qt.qpa.plugin: something new went wrong\n", -6)
    assert "something new went wrong" in msg and ALL_PACKAGES in msg and "notebook" in msg


def test_demo_without_any_display_exits_2_with_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    res = run_demo(env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-sam: error: demo: no display"), res.stderr
    assert "xvfb-run -a napari-sam demo" in lines[0] and "core dumped" not in res.stderr


def test_demo_with_an_unreachable_display_exits_2_with_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env["DISPLAY"] = ":987"  # no X server there
    res = run_demo(env)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to the X display ':987'" in lines[0], res.stderr


def test_the_test_display_passes_the_check():
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (pytest-xvfb provides one)")
    assert display_problem() is None
