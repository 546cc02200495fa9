"""DICOM-SEG: labels -> SEG referencing the source series -> the same labels back."""

from __future__ import annotations

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
import pydicom  # noqa: E402

from napari_sam.io.dicom import read_dicom_series  # noqa: E402
from napari_sam.io.seg import napari_write_labels, read_dicom_seg, write_dicom_seg  # noqa: E402

from test_dicom import write_series  # noqa: E402


@pytest.fixture
def series(tmp_path):
    rng = np.random.default_rng(5)
    hu = rng.integers(-1000, 1000, (5, 16, 12)).astype(np.float64)
    hu -= hu % 2
    write_series(tmp_path / "dcm", hu)
    return read_dicom_series(tmp_path / "dcm")


@pytest.fixture
def labels(series):
    lab = np.zeros(series.data.shape, np.uint16)
    lab[1, 2:6, 3:9] = 4  # non-consecutive ids on some slices only
    lab[2, 2:7, 3:8] = 4
    lab[2, 10:14, 1:5] = 17
    lab[4, 0:3, 0:3] = 17
    return lab


def test_round_trip_same_labels_on_same_slices(series, labels, tmp_path):
    path = write_dicom_seg(tmp_path / "seg.dcm", labels, series.files, names={4: "liver", 17: "kidney"})
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "kidney"]
    referenced = {r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    source_uids = {pydicom.dcmread(f).SOPInstanceUID for f in series.files}
    assert referenced == source_uids and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    back, names = read_dicom_seg(path, series.files)
    np.testing.assert_array_equal(back, labels)
    assert names == {4: "liver", 17: "kidney"}


def test_npe2_writer_uses_the_layer_source(series, labels, tmp_path):
    meta = series.layer_metadata()
    (path,) = napari_write_labels(str(tmp_path / "w.dcm"), labels, meta)
    back, names = read_dicom_seg(path, series.files)
    np.testing.assert_array_equal(back, labels)
    assert names == {4: "label 4", 17: "label 17"}
    with pytest.raises(ValueError, match="no DICOM source series"):
        napari_write_labels(str(tmp_path / "x.dcm"), labels, {"name": "plain"})


def test_bad_exports(series, labels, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_dicom_seg(tmp_path / "e.dcm", np.zeros_like(labels), series.files)
    with pytest.raises(ValueError, match="slices but the source series"):
        write_dicom_seg(tmp_path / "e.dcm", labels[:3], series.files)
    assert not (tmp_path / "e.dcm").exists()


def test_napari_opens_series_and_saves_seg(make_napari_viewer, series, labels, tmp_path):
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "dcm"), plugin="napari-sam-labeler")
    layer = viewer.add_labels(labels, scale=image.scale, metadata=dict(image.metadata))
    viewer.layers.selection = {layer}
    out = tmp_path / "from_napari.dcm"
    viewer.layers.save(str(out), selected=True, plugin="napari-sam-labeler")
    back, _ = read_dicom_seg(out, image.metadata["dicom"]["files"])
    np.testing.assert_array_equal(back, labels)
