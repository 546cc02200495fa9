"""The triton guard: decided before the first model import, in processes of their own."""

from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import os
import subprocess
import sys

import pytest

from napari_sam._modelstack import foreign_llvm



def triton_installed() -> bool:
    """Installed, whether or not this process has hidden it (find_spec says no once hidden)."""
    try:
        importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HAS_TRITON = triton_installed()


def run_py(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("NAPARI_SAM_TRITON", None)
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


def test_foreign_llvm_reads_the_process_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f0000000000-7f0000001000 r-xp 00000000 fd:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n"
        "7f0000001000-7f0000002000 r-xp 00000000 fd:01 2 /usr/lib64/libLLVM.so.19.1\n"
        "7f0000002000-7f0000003000 r-xp 00000000 fd:01 3 /venv/site-packages/triton/_C/libLLVM-x.so\n"
        "7f0000003000-7f0000004000 r-xp 00000000 fd:01 4 /venv/site-packages/llvmlite/binding/libllvmlite.so\n"
        "7f0000004000-7f0000005000 r-xp 00000000 fd:01 5 /usr/lib/libGL.so.1\n"
        "7f0000005000-7f0000006000 rw-p 00000000 00:00 0 \n"
    )
    assert foreign_llvm(str(maps)) == [
        "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1",
        "/usr/lib64/libLLVM.so.19.1",
        "/venv/site-packages/llvmlite/binding/libllvmlite.so",
    ]
    assert foreign_llvm(str(tmp_path / "missing")) == []


def test_bad_setting_is_refused_by_name():
    proc = run_py("from napari_sam._modelstack import guard_triton; guard_triton()", NAPARI_SAM_TRITON="sometimes")
    assert proc.returncode != 0 and "NAPARI_SAM_TRITON='sometimes'" in proc.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_plain_process_keeps_triton():
    """No OpenGL, no foreign LLVM: nothing is hidden (the CLI, scripts, a GPU server)."""
    proc = run_py(
        "import sys\n"
        "from napari_sam._modelstack import guard_triton\n"
        "print(guard_triton())\n"
        "from transformers import SamModel\n"
        "print(sys.modules['triton'] is not None)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["allowed", "True"]


def _system_llvm() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/libLLVM-*.so*") + glob.glob("/usr/lib*/libLLVM*.so*"))
    return found[0] if found else ctypes.util.find_library("LLVM")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(_system_llvm() is None, reason="no system libLLVM (Mesa) here")
def test_loaded_llvm_hides_triton_and_sam_still_loads(tiny_sam_dir):
    """Mesa's LLVM loaded globally, as a GL context does: triton is hidden, SAM loads and runs."""
    proc = run_py(
        "import ctypes, sys\n"
        f"ctypes.CDLL({_system_llvm()!r}, mode=ctypes.RTLD_GLOBAL)\n"
        "import numpy as np, napari_sam\n"
        f"engine = napari_sam.load_model({str(tiny_sam_dir)!r}, device='cpu')\n"
        "from napari_sam import _modelstack\n"
        "print(_modelstack.decision, sys.modules['triton'])\n"
        "emb = engine.embed(np.zeros((32, 32), np.uint8))\n"
        "print(engine.predict(emb, points=[[5, 5]], point_labels=[1]).masks.shape)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["blocked None", "(1, 32, 32)"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_block_and_allow_settings():
    code = "from napari_sam._modelstack import guard_triton; print(guard_triton())"
    assert run_py(code, NAPARI_SAM_TRITON="block").stdout.strip() == "blocked"
    assert run_py(code, NAPARI_SAM_TRITON="allow").stdout.strip() == "allowed"
    # once triton is in the process, the guard leaves it alone
    assert run_py("import triton; " + code).stdout.strip() == "imported"


def test_allocator_tuning_is_applied_once_and_can_be_declined():
    code = ("import napari_sam._modelstack as m; a = m.tune_allocator(); b = m.tune_allocator(); "
            "print(a, b)")
    env = {k: v for k, v in os.environ.items() if k != "NAPARI_SAM_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    expected = "True True" if sys.platform.startswith("linux") else "False False"
    assert out.stdout.split() == expected.split()
    for value in ("default", "off", "0"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**env, "NAPARI_SAM_MALLOC": value})
        assert out.stdout.split() == ["False", "False"]
