"""DICOM as scanners write it: colour, palette, multi-frame, no positions, compressed, damaged.

Runs over every file in pydicom's test set (and pydicom-data, from the test extra): each one
pydicom decodes must open, each other one must fail with one line naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file, get_testdata_files  # noqa: E402
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array  # noqa: E402

from napari_sam.io.dicom import read_dicom_series  # noqa: E402
from napari_sam.io.study import _read_layers, napari_get_reader  # noqa: E402


def _layers(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_layers(path)


def test_rgb_and_ybr_open_as_rgb(make_napari_viewer):
    viewer = make_napari_viewer()
    (rgb,) = viewer.open(get_testdata_file("SC_rgb.dcm"), plugin="napari-sam-labeler")
    assert rgb.rgb and rgb.data.shape == (100, 100, 3)
    np.testing.assert_array_equal(rgb.data, pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array)
    path = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    ((data, meta, kind),) = _layers(path)
    raw = pixel_array(pydicom.dcmread(path), as_rgb=False)  # YBR as stored
    expected = convert_color_space(raw, "YBR_FULL", "RGB")
    assert kind == "image" and meta["rgb"] and "contrast_limits" not in meta
    np.testing.assert_array_equal(data, expected)
    assert np.abs(data.astype(int) - raw.astype(int)).max() > 50  # really converted
    # the same picture stored as RGB: the colours SAM was trained on
    np.testing.assert_allclose(data, pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array, atol=8)


def test_palette_colour_uses_its_lookup_table():
    path = get_testdata_file("gdcm-US-ALOKA-16.dcm")
    ((data, meta, _),) = _layers(path)
    ds = pydicom.dcmread(path)
    assert meta["rgb"] and data.shape == (*ds.pixel_array.shape, 3)
    np.testing.assert_array_equal(data, apply_color_lut(ds.pixel_array, ds))


def test_multiframe_colour_is_a_frame_stack(make_napari_viewer):
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (layer,) = viewer.open(get_testdata_file("SC_rgb_rle_2frame.dcm"), plugin="napari-sam-labeler")
    assert layer.rgb and layer.data.shape == (2, 100, 100, 3) and layer.ndim == 3
    note = " ".join(layer.metadata["dicom"]["warnings"])
    assert "stack of 2 frames" in note


def test_multiframe_without_positions_opens_with_a_warning():
    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    with pytest.warns(UserWarning, match="no positions"):
        vol = read_dicom_series(path)
    assert vol.data.shape == (10, 64, 64)
    np.testing.assert_array_equal(vol.data, ds.pixel_array)
    declared = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 1)
    assert vol.spacing[0] == pytest.approx(declared)
    assert any("stack of 10 frames" in w for w in vol.layer_metadata()["metadata"]["dicom"]["warnings"])


def test_malformed_number_is_one_line_naming_the_file():
    path = get_testdata_file("badVR.dcm")
    with pytest.raises(ValueError) as info:
        _layers(path)
    message = str(info.value)
    assert "\n" not in message and "badVR.dcm" in message and "NumberOfFrames" in message


def _all_test_files():
    return [f for f in sorted(set(get_testdata_files("**/*"))) if Path(f).is_file()]


def test_every_file_pydicom_decodes_opens_and_the_rest_fail_in_one_line():
    opened, decodable, failures = 0, 0, []
    for f in _all_test_files():
        if napari_get_reader(f) is None:
            continue
        try:
            ds = pydicom.dcmread(f)
            ds.pixel_array
            decodes = True
        except Exception:
            decodes = False
        decodable += decodes
        try:
            layers = _layers(f)
        except ValueError as exc:
            message = str(exc)
            if decodes or "\n" in message or Path(f).name not in message:
                failures.append(f"{Path(f).name}: {message[:200]!r} (pydicom decodes it: {decodes})")
            continue
        assert layers, f
        for _data, meta, _kind in layers:  # what napari would refuse to build
            assert all(v > 0 for v in meta.get("scale", (1,))), (f, meta.get("scale"))
        opened += 1
    assert not failures, "\n".join(failures)
    assert decodable >= 100 and opened >= decodable, (opened, decodable)


def test_zero_pixel_spacing_falls_back(make_napari_viewer):
    """Real CR files (RG1_*) carry PixelSpacing [0, 0]: they open with spacing 1 and a warning."""
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match="PixelSpacing is"):
        (layer,) = viewer.open(get_testdata_file("RG1_UNCI.dcm"), plugin="napari-sam-labeler")
    assert all(s > 0 for s in layer.scale)
