"""docs/tutorial.ipynb runs as a user runs it: a fresh Jupyter kernel, napari imported
first, the model from $NAPARI_SAM_MODEL (the tiny checkpoint), a real viewer under Xvfb."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


def test_tutorial_notebook_executes(tiny_sam_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from PIL import Image

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a kernel of this interpreter, whatever "python3" kernels the machine has installed
    spec = tmp_path / "jupyter" / "kernels" / "napari-sam-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "napari-sam test", "language": "python"}))
    env = {"NAPARI_SAM_MODEL": str(tiny_sam_dir), "NAPARI_SAM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "JUPYTER_PATH": str(tmp_path / "jupyter")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment (and the Xvfb display)
    try:
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="napari-sam-test",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "tutorial.executed.ipynb")  # what ran, to look at (also on failure)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    pictures = [out["data"]["image/png"] for cell in nb.cells if cell.cell_type == "code"
                for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(pictures) == 2, "two nbscreenshot pictures"
    for i, data in enumerate(pictures):
        png = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        png.save(tmp_path / f"screenshot{i}.png")
        pixels = np.asarray(png)
        assert min(png.size) > 200 and pixels.std() > 5, "a real picture of the canvas"
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors

    cell_labels = tifffile.imread(tmp_path / "cell_labels.tif")
    assert cell_labels.shape == (660, 550)
    ct_labels = tifffile.imread(tmp_path / "ct_labels.tif")
    assert ct_labels.shape == (24, 128, 128)
    nib = pytest.importorskip("nibabel")
    nifti = nib.load(tmp_path / "ct_labels.nii.gz")
    assert nifti.shape == (128, 128, 24)
    np.testing.assert_allclose(nifti.header.get_zooms(), (1.5, 1.5, 2.5))
    assert np.array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), ct_labels)
