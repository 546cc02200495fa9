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
    from napari_sam._fileio import LabelsWriteError

    with pytest.raises(LabelsWriteError, match="no DICOM source series"):
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


def test_seg_opens_alone_as_labels_in_patient_space(make_napari_viewer, series, labels, tmp_path):
    """A SEG file on its own (no source series next to it) opens as one labels layer with the
    series' shape, ids, names and placement; with the series in the same folder too."""
    import shutil

    alone = tmp_path / "alone"
    alone.mkdir()
    path = write_dicom_seg(alone / "seg.dcm", labels, series.files, names={4: "liver", 17: "kidney"})
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "dcm"), plugin="napari-sam-labeler")
    (layer,) = viewer.open(str(path), plugin="napari-sam-labeler")
    assert layer.__class__.__name__ == "Labels"
    np.testing.assert_array_equal(np.asarray(layer.data), labels)
    assert layer.metadata["segments"] == {4: "liver", 17: "kidney"}
    assert list(layer.features["segment"]) == ["background", "liver", "kidney"]
    for zyx in [(0, 0, 0), (4, 15, 11), (2, 10, 1)]:
        np.testing.assert_allclose(layer.data_to_world(zyx), image.data_to_world(zyx), atol=1e-4)
    # beside its series, the series' files become the layer's source (SEG export again)
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "dcm", both)
    shutil.copy(path, both / "seg.dcm")
    layers = viewer.open(str(both), plugin="napari-sam-labeler")
    kinds = sorted(type(lay).__name__ for lay in layers)
    assert kinds == ["Image", "Labels"]
    seg_layer = next(lay for lay in layers if type(lay).__name__ == "Labels")
    np.testing.assert_array_equal(np.asarray(seg_layer.data), labels)
    assert len(seg_layer.metadata["dicom"]["files"]) == labels.shape[0]


def test_seg_export_fills_missing_type2_attributes(tmp_path, labels):
    """Anonymised series often lack type-2 attributes (present, may be empty): fill them."""
    rng = np.random.default_rng(6)
    hu = rng.integers(-1000, 1000, labels.shape).astype(np.float64)
    hu -= hu % 2
    write_series(tmp_path / "anon", hu)
    for f in (tmp_path / "anon").iterdir():
        ds = pydicom.dcmread(f)
        for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "AccessionNumber", "StudyID"):
            delattr(ds, keyword)
        ds.save_as(f)
    vol = read_dicom_series(tmp_path / "anon")
    path = write_dicom_seg(tmp_path / "anon.dcm", labels, vol.files)
    ds = pydicom.dcmread(path)
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    back, _ = read_dicom_seg(path, vol.files)
    np.testing.assert_array_equal(back, labels)


def test_seg_without_empty_frames_still_lands_on_its_slices(make_napari_viewer, series, labels, tmp_path, monkeypatch):
    """Other tools omit empty frames: alone, the layer spans the frames it has, placed exactly."""
    original = hd.seg.Segmentation
    monkeypatch.setattr(hd.seg, "Segmentation", lambda *a, **k: original(*a, **{**k, "omit_empty_frames": True}))
    alone = tmp_path / "sparse"
    alone.mkdir()
    path = write_dicom_seg(alone / "seg.dcm", labels, series.files)
    assert pydicom.dcmread(path).NumberOfFrames < 2 * labels.shape[0]
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "dcm"), plugin="napari-sam-labeler")
    (layer,) = viewer.open(str(path), plugin="napari-sam-labeler")
    first = int(np.flatnonzero(labels.any(axis=(1, 2)))[0])  # slices 1..4 carry labels
    np.testing.assert_array_equal(np.asarray(layer.data), labels[first:])
    for zyx in [(0, 0, 0), (3, 15, 11)]:
        image_zyx = (zyx[0] + first, *zyx[1:])
        np.testing.assert_allclose(layer.data_to_world(zyx), image.data_to_world(image_zyx), atol=1e-4)


def test_missing_slice_series_image_and_seg_agree(make_napari_viewer, tmp_path):
    """A series with a missing slice: the image gets a blank slice there, so the image, its
    SEG alone, and its SEG beside the series put every label at the same patient point."""
    rng = np.random.default_rng(8)
    hu = rng.integers(-1000, 1000, (6, 16, 12)).astype(np.float64)
    hu -= hu % 2
    write_series(tmp_path / "gap", hu, skip=(3,))
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning):
        (image,) = viewer.open(str(tmp_path / "gap"), plugin="napari-sam-labeler")
    assert image.data.shape[0] == 6 and image.metadata["dicom"]["files"][3] == ""
    labels = np.zeros(image.data.shape, np.uint8)
    labels[2, 3:6, 3:6] = 1
    labels[4, 8:12, 2:6] = 2
    seg = write_dicom_seg(tmp_path / "gap.dcm", labels, image.metadata["dicom"]["files"])
    (alone,) = viewer.open(str(seg), plugin="napari-sam-labeler")
    for value in (1, 2):
        z, y, x = np.argwhere(np.asarray(alone.data) == value)[0]
        zi, yi, xi = np.argwhere(labels == value)[0]
        np.testing.assert_allclose(alone.data_to_world((z, y, x)), image.data_to_world((zi, yi, xi)), atol=1e-4)
    import shutil

    shutil.copy(seg, tmp_path / "gap" / "seg.dcm")
    layers = viewer.open(str(tmp_path / "gap"), plugin="napari-sam-labeler")
    beside = next(layer for layer in layers if type(layer).__name__ == "Labels")
    np.testing.assert_array_equal(np.asarray(beside.data), labels)
    bad = labels.copy()
    bad[3, 0, 0] = 1  # drawn on the inserted blank slice
    with pytest.raises(ValueError, match="does not have"):
        write_dicom_seg(tmp_path / "bad.dcm", bad, image.metadata["dicom"]["files"])


def test_labelmap_seg_opens(series, labels, tmp_path):
    """DICOM's label-map SEG (SOP class ...66.7, pixels are segment numbers), made by highdicom."""
    from pydicom.sr.codedict import codes

    from napari_sam.io.seg import read_seg

    sources = [pydicom.dcmread(f) for f in series.files]
    numbers = {4: 1, 17: 2}
    label_map = np.zeros(labels.shape, np.uint8)
    for label, number in numbers.items():
        label_map[labels == label] = number
    algorithm = hd.AlgorithmIdentificationSequence(name="test", version="1", family=codes.DCM.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"segment {label}", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for label, number in numbers.items()]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=label_map, segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1")
    seg.save_as(tmp_path / "labelmap.dcm")
    vol = read_seg(tmp_path / "labelmap.dcm", series.files)
    expected = np.zeros_like(labels)
    for label, number in numbers.items():
        expected[labels == label] = number  # not our file: segment numbers are the ids
    np.testing.assert_array_equal(vol.labels, expected)
    assert vol.names == {1: "segment 4", 2: "segment 17"}
