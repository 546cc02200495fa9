"""Packaging contracts: light import, manifest, samples, demo (layering: test_architecture.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import napari_sam

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui")


def test_import_is_light():
    code = (
        "import sys, napari_sam, napari_sam.api, napari_sam.cli, napari_sam.engine, napari_sam.preprocess\n"
        "import napari_sam.cache, napari_sam.volume, napari_sam.propagate\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"importing napari_sam pulled in: {res.stdout.strip()}"


def test_public_names_resolve_lazily():
    for name in napari_sam.__all__:
        assert getattr(napari_sam, name) is not None
    assert callable(napari_sam.load_model)
    with pytest.raises(AttributeError):
        napari_sam.no_such_name  # noqa: B018


# The import layering is checked with import-linter: tests/test_architecture.py.


def test_manifest_shipped_in_package_matches_root():
    shipped = resources.files("napari_sam").joinpath("napari.yaml").read_text()
    root = REPO / "napari.yaml"
    if root.is_file():  # running from a checkout
        assert shipped == root.read_text()
    assert "name: napari-sam-labeler" in shipped


def test_npe2_finds_and_validates_plugin():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-sam-labeler")
    assert manifest.display_name == "SAM Labeler"
    res = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-sam-labeler"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0 and "valid" in (res.stdout + res.stderr), res.stdout + res.stderr


def test_sample_data_contributions_load():
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest("napari-sam-labeler")
    keys = {s.key for s in manifest.contributions.sample_data}
    assert keys == {"cell", "ct_phantom", "ct_phantom_dicom"}
    from napari_sam import samples

    (cell, meta, kind), = samples.cell_2d()
    assert kind == "image" and cell.shape == (660, 550) and cell.dtype == np.uint8
    (vol, meta, kind), = samples.phantom_3d()
    assert vol.ndim == 3 and vol.dtype == np.int16 and vol.min() < -900 and vol.max() > 600
    assert len(meta["scale"]) == 3
    (dvol, dmeta, kind), = samples.ct_phantom_dicom()
    np.testing.assert_array_equal(dvol, vol)  # HU survive the DICOM round trip
    np.testing.assert_allclose(dmeta["scale"], (2.5, 1.5, 1.5))
    assert dmeta["contrast_limits"] == (-160.0, 240.0) and len(dmeta["metadata"]["dicom"]["files"]) == len(vol)


def test_demo_opens_napari_with_sample_and_saves_screenshot(tmp_path, tiny_sam_dir):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (pytest-xvfb provides one)")
    png = tmp_path / "demo.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "napari_sam.cli", "demo", "--model", str(tiny_sam_dir), "--screenshot", str(png)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr
    from skimage import io

    shot = io.imread(png)
    assert shot.ndim == 3 and shot.shape[0] > 300 and shot.shape[1] > 300
    assert shot[..., :3].std() > 10  # not a blank window


def test_demo_without_weights_explains_how_to_get_them(tmp_path):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (pytest-xvfb provides one)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NAPARI_SAM_MODEL", None)
    res = subprocess.run(
        [sys.executable, "-m", "napari_sam.cli", "demo", "--screenshot", str(tmp_path / "d.png")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr
    assert "not available" in res.stderr and "huggingface-cli download" in res.stderr
    assert (tmp_path / "d.png").is_file()
