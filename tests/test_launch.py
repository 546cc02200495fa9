"""Launch the app as users do, each in a fresh process: window first, plugin, then a click.

A pytest process has usually imported torch and transformers long before any viewer
exists, which hides import-order crashes: the default torch on Linux brings triton, and
importing triton after Mesa's OpenGL has loaded its LLVM kills the process (issue 9).
These tests run tests/launch_as_user.py in a subprocess with the dependencies users get
(triton included on Linux x86_64, through the ``test`` extra).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from test_modelstack import triton_installed

pytest.importorskip("qtpy")

SCRIPT = Path(__file__).with_name("launch_as_user.py")
CLICK = (60.0, 80.0)  # must match launch_as_user.CLICK



def run_as_user(mode: str, model_dir, tmp_path, timeout: float = 400) -> tuple[dict, subprocess.CompletedProcess]:
    env = dict(os.environ)
    env.update(NAPARI_SAM_MODEL=str(model_dir), NAPARI_SAM_CACHE=str(tmp_path / "cache"),
               NAPARI_SAM_MODELS=str(tmp_path / "models"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONFAULTHANDLER="1")
    env.pop("NAPARI_SAM_TRITON", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), mode], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0 and lines, f"{mode}: exit code {proc.returncode}\n{tail}"
    return json.loads(lines[-1][len("RESULT "):]), proc


def test_users_get_triton_in_the_test_environment():
    """CI must see what `pip install napari-sam-labeler` gives users: torch's triton."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the default torch wheel ships triton on Linux x86_64 only")
    assert triton_installed(), "install the test extra: triton is missing"


@pytest.mark.parametrize("mode", ["plugin", "demo"])
def test_first_click_gives_a_preview_in_a_fresh_process(mode, tiny_sam_dir, tmp_path):
    result, _proc = run_as_user(mode, tiny_sam_dir, tmp_path)
    # the user's order: the window (and its GL context) exists before any model import
    assert not result["torch_before_click"] and not result["transformers_before_click"], result
    assert result["active_layer"] == "SAM points"
    # the click went through Qt and napari to the SAM points layer, on the pixel clicked
    (row, col), = result["points_after_click"]
    tolerance = max(1.0, 1.0 / result["zoom"])
    assert abs(row - CLICK[0]) <= tolerance and abs(col - CLICK[1]) <= tolerance, result
    # and SAM answered with a preview of the sample image's size
    assert result["objects"] == 1 and result["mask_shape"][1:] == [660, 550], result
    assert result["preview_pixels"] == result["mask_pixels"], result
    if mode == "plugin":
        # then "Segment everything" pressed in the same session: a new uint32 labels layer
        assert result["everything_layer"].endswith(" everything"), result
        assert result["everything_dtype"] == "uint32", result
        assert result["everything_objects"] == result["everything_ids"] >= 1, result
        # and "Fine-tune on this labels layer" on two painted labels: a model folder, Dice shown
        assert result["finetune_stopped"] == "epochs", result
        assert "model.safetensors" in result["finetune_folder_files"], result
        assert result["finetune_text"].startswith("Validation Dice"), result
    if mode == "demo":
        # the image is visible beside the dock: the demo maximises and narrows the docks
        window_w, _ = result["window_size"]
        canvas_w, canvas_h = result["canvas_size"]
        assert canvas_w >= 0.4 * window_w and min(canvas_w, canvas_h) >= 400, result
    if result["llvm_before_click"] and triton_installed():
        assert result["triton_in_process"] == "hidden", result
