"""A study folder as scanners write it: several series, a localizer, non-image objects."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from napari_sam.io.dicom import DicomSeriesWarning  # noqa: E402
from napari_sam.io.study import _read_layers  # noqa: E402

from test_dicom import make_slice, write_series  # noqa: E402

PLANES = {  # row, column direction cosines
    "axial": ((1.0, 0, 0), (0, 1.0, 0)),
    "coronal": ((1.0, 0, 0), (0, 0, -1.0)),
    "sagittal": ((0, 1.0, 0), (0, 0, -1.0)),
}


def write_localizer(folder, uid):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (plane, (row, col)) in enumerate(PLANES.items()):
        ds = make_slice(np.full((16, 16), 100.0 * (i + 1)), (0.0, 0.0, 0.0), np.array(row), np.array(col),
                        (1.0, 1.0), 1.0, 0.0, uid, instance=i + 1, modality="MR")
        ds.SeriesDescription = "3-plane localizer"
        ds.save_as(folder / f"LOC{i}", enforce_file_format=True)


def write_structured_report(path, study_uid="1.2.3.4"):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "SR", generate_uid(), study_uid
    ds.save_as(path, enforce_file_format=True)


def test_study_folder_opens_every_series_it_can(tmp_path):
    study = tmp_path / "study"
    rng = np.random.default_rng(3)
    mr = rng.integers(0, 1000, (6, 12, 10)).astype(float)
    mr -= mr % 2
    write_series(study / "axial", mr, angle=0.0, modality="MR")
    write_localizer(study / "scout", generate_uid())
    write_structured_report(study / "report.dcm")
    (study / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # routed around, never read as an image
    broken = rng.integers(0, 1000, (3, 12, 10)).astype(float)
    write_series(study / "broken", broken, angle=0.0, modality="MR", series_uid=generate_uid())
    victim = sorted((study / "broken").iterdir())[1]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:50]
    ds.save_as(victim)
    with pytest.warns(DicomSeriesWarning, match="not opened: .*cannot read pixel data"):
        layers = _read_layers(str(study))
    names = sorted(meta["name"] for _data, meta, _kind in layers)
    assert names == ["3-plane localizer (axial 1/3)", "3-plane localizer (coronal 2/3)",
                     "3-plane localizer (sagittal 3/3)", "synthetic"], names
    axial = next(data for data, meta, _ in layers if meta["name"] == "synthetic")
    np.testing.assert_array_equal(axial, mr)
    notes = [w for _d, meta, _k in layers for w in meta["metadata"]["dicom"]["warnings"]]
    assert any("localizer?" in n for n in notes)
    assert [meta.get("visible", True) for _d, meta, _k in sorted(layers, key=lambda t: t[1]["name"])] == [
        False, False, False, True]  # the scout parts open hidden


def test_study_folder_in_napari(make_napari_viewer, tmp_path):
    study = tmp_path / "study"
    write_series(study / "ct", np.zeros((4, 8, 8)), angle=0.0)
    write_localizer(study / "scout", generate_uid())
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = viewer.open(str(study), plugin="napari-sam-labeler")
    assert len(layers) == 4 and all(type(layer).__name__ == "Image" for layer in layers)


def test_nothing_readable_is_one_clear_error(tmp_path):
    folder = tmp_path / "bad"
    write_series(folder, np.zeros((3, 8, 8)), angle=0.0)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PixelData = ds.PixelData[:10]
        ds.save_as(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="cannot read pixel data") as info:
            _read_layers(str(folder))
    assert "\n" not in str(info.value)


def write_cr_monochrome1(path):
    """A CR radiograph stored as MONOCHROME1: low values are white (bone 500, air 3000)."""
    ds = make_slice(np.where(np.arange(32)[None, :] < 16, 500.0, 3000.0).repeat(24, axis=0),
                    (0.0, 0.0, 0.0), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), (0.2, 0.2), 1.0, 0.0,
                    generate_uid(), instance=1, modality="CR")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 1750.0, 3000.0
    ds.save_as(path, enforce_file_format=True)


def test_monochrome1_is_shown_and_given_to_sam_as_read(make_napari_viewer, qtbot, tmp_path, tiny_sam_dir):
    """Issue 19.5: stored values unchanged; display inverted (gray_r); SAM's input is bright on
    bone and dark on air (before: bone 21, air 234)."""
    from napari_sam.preprocess import to_rgb_uint8

    write_cr_monochrome1(tmp_path / "cr.dcm")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "cr.dcm"), plugin="napari-sam-labeler")
    assert layer.data[0, 0] == 500 and layer.data[0, -1] == 3000  # values as stored
    assert layer.colormap.name == "gray_r"
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    widget.model.model_edit.setText(str(tiny_sam_dir))
    widget.model.device_combo.setCurrentText("cpu")
    with qtbot.waitSignal(widget.embedding_ready, timeout=60_000):
        widget.compute_embedding()
    sam_input = to_rgb_uint8(np.asarray(layer.data), widget.state.mappings[layer.unique_id])
    assert sam_input[0, 0, 0] > 200 and sam_input[0, -1, 0] < 60, (sam_input[0, 0], sam_input[0, -1])
    widget.model.contrast_combo.setCurrentText("custom window")  # a chosen window is inverted too
    widget.model.center_spin.setValue(1750.0)
    widget.model.width_spin.setValue(3000.0)
    widget.model.on_contrast_changed()
    sam_input = to_rgb_uint8(np.asarray(layer.data), widget.state.mappings[layer.unique_id])
    assert sam_input[0, 0, 0] > 200 and sam_input[0, -1, 0] < 60
