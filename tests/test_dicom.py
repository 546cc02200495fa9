"""DICOM series reading: real bundled files and synthetic series with known geometry."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from napari_sam.io.dicom import DicomSeriesWarning, list_series, read_dicom_series  # noqa: E402
from napari_sam.io.study import napari_get_reader  # noqa: E402


def oblique_axes(angle_deg=30.0):
    """Row/column direction cosines of a plane tilted about the patient's x axis."""
    a = np.deg2rad(angle_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(a), np.sin(a)])
    return row, col


def make_slice(hu2d, position, row, col, spacing_rc, slope, intercept, series_uid, instance, modality="CT"):
    stored = np.round((hu2d - intercept) / slope).astype(np.int16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesDescription = "synthetic"
    # patient/study/equipment modules, as real series have them (DICOM-SEG export needs them)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "P001", "", "O"
    ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20260101", "120000", ""
    ds.ReferringPhysicianName, ds.SeriesNumber = "", 3
    ds.FrameOfReferenceUID = "1.2.3.4.5"
    ds.Manufacturer = "test"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.PixelSpacing = [float(spacing_rc[0]), float(spacing_rc[1])]
    ds.SliceThickness = 99.0  # deliberately wrong: spacing must come from positions
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.tobytes()
    return ds


def write_series(folder, hu, *, dz=2.5, spacing_rc=(0.7, 0.9), origin=(-50.0, 20.0, 100.0),
                 angle=30.0, skip=(), seed=0, series_uid=None, modality="CT"):
    """Write ``hu`` (Z, Y, X) as one file per slice, shuffled names, per-slice rescale."""
    folder.mkdir(parents=True, exist_ok=True)
    row, col = oblique_axes(angle)
    normal = np.cross(row, col)
    uid = series_uid or generate_uid()
    rng = random.Random(seed)
    order = list(range(len(hu)))
    rng.shuffle(order)
    for n, z in enumerate(order):
        if z in skip:
            continue
        slope, intercept = [(1.0, -1024.0), (0.5, -1000.0), (2.0, -2048.0)][z % 3]
        pos = np.asarray(origin) + z * dz * normal
        ds = make_slice(hu[z], pos, row, col, spacing_rc, slope, intercept, uid,
                        instance=rng.randint(1, 999), modality=modality)
        ds.save_as(folder / f"IM{rng.randint(0, 10**6):07d}_{n}", enforce_file_format=True)
    return uid, row, col, normal


@pytest.fixture
def hu_volume():
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1500, (6, 12, 10)).astype(np.float64)
    return vol - vol % 2  # even values survive a slope of 2 exactly


def test_bundled_ct_and_mr():
    ct = read_dicom_series(get_testdata_file("CT_small.dcm"))
    assert ct.data.shape == (128, 128) and ct.data.dtype == np.int16 and ct.modality == "CT"
    raw = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(ct.data, raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept))
    assert ct.spacing[1:] == tuple(float(v) for v in raw.PixelSpacing)
    meta = ct.layer_metadata()
    assert meta["contrast_limits"] == (-160.0, 240.0)  # no window in the file: CT abdomen preset
    mr = read_dicom_series(get_testdata_file("MR_small.dcm"))
    assert mr.window == (600.0, 1600.0)  # from WindowCenter/WindowWidth
    assert mr.layer_metadata()["contrast_limits"] == (-200.0, 1400.0)


def test_synthetic_series_order_rescale_spacing_orientation(tmp_path, hu_volume):
    uid, row, col, normal = write_series(tmp_path / "s", hu_volume)
    vol = read_dicom_series(tmp_path / "s")
    assert vol.series_uid == uid
    np.testing.assert_array_equal(vol.data, hu_volume)  # HU, in position order
    assert vol.data.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, (2.5, 0.7, 0.9))  # not SliceThickness (99)
    np.testing.assert_allclose(vol.row_direction, row)
    np.testing.assert_allclose(vol.column_direction, col)
    np.testing.assert_allclose(vol.origin, (-50.0, 20.0, 100.0))
    # the affine maps voxel (z, y, x) to the position it was written at
    z, y, x = 4, 3, 7
    expected = np.array([-50.0, 20.0, 100.0]) + z * 2.5 * normal + y * 0.7 * col + x * 0.9 * row
    np.testing.assert_allclose((vol.affine @ [z, y, x, 1])[:3], expected, atol=1e-6)
    meta = vol.layer_metadata()
    np.testing.assert_allclose(meta["scale"], (2.5, 0.7, 0.9))
    assert meta["metadata"]["dicom"]["series_uid"] == uid


def test_float_rescale_gives_float(tmp_path, hu_volume):
    folder = tmp_path / "f"
    uid, row, col, normal = write_series(folder, hu_volume)
    for f in folder.iterdir():  # one slice with a fractional slope
        ds = pydicom.dcmread(f)
        if ds.RescaleSlope == 0.5:
            ds.RescaleSlope = 0.1
            ds.save_as(f)
            break
    vol = read_dicom_series(folder)
    assert vol.data.dtype == np.float32


def test_gap_warns_and_keeps_going(tmp_path, hu_volume):
    write_series(tmp_path / "g", hu_volume, skip=(3,))
    with pytest.warns(DicomSeriesWarning, match="missing slice"):
        vol = read_dicom_series(tmp_path / "g")
    assert vol.data.shape[0] == 6 and vol.warnings  # the missing slice is inserted blank...
    np.testing.assert_array_equal(vol.data[[0, 1, 2, 4, 5]], hu_volume[[0, 1, 2, 4, 5]])
    assert (vol.data[3] == vol.data.min()).all() and vol.files[3] == ""  # ...without a file
    normal = np.cross(*oblique_axes())  # ...so every slice keeps its position
    for z in (0, 4, 5):
        expected = np.array([-50.0, 20.0, 100.0]) + z * 2.5 * normal
        np.testing.assert_allclose((vol.affine @ [z, 0, 0, 1])[:3], expected, atol=1e-6)


def test_several_series_need_a_choice(tmp_path, hu_volume):
    a, *_ = write_series(tmp_path / "mix", hu_volume, seed=1)
    b, *_ = write_series(tmp_path / "mix", hu_volume[:3] + 10, seed=2, angle=0.0)
    assert set(list_series(tmp_path / "mix")) == {a, b}
    with pytest.raises(ValueError, match="2 DICOM series"):
        read_dicom_series(tmp_path / "mix")
    vol = read_dicom_series(tmp_path / "mix", series_uid=b)
    np.testing.assert_array_equal(vol.data, hu_volume[:3] + 10)
    with pytest.raises(ValueError, match="not in"):
        read_dicom_series(tmp_path / "mix", series_uid="9.9.9")


def test_duplicate_positions_are_an_error(tmp_path, hu_volume):
    uid, *_ = write_series(tmp_path / "d", hu_volume[:2])
    extra = next((tmp_path / "d").iterdir())
    ds = pydicom.dcmread(extra)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "d" / "copy")
    with pytest.raises(ValueError, match="share a position"):
        read_dicom_series(tmp_path / "d")


def test_multiframe_enhanced(tmp_path, hu_volume):
    row, col = oblique_axes(0.0)
    ds = make_slice(hu_volume[0], (0, 0, 0), row, col, (0.5, 0.5), 1.0, 0.0, generate_uid(), 1)
    n = len(hu_volume)
    order = [3, 0, 5, 1, 4, 2]  # frames stored out of order
    frames, per_frame = [], []
    for z in order:
        slope, intercept = (2.0, -2048.0) if z % 2 else (1.0, -1024.0)
        frames.append(np.round((hu_volume[z] - intercept) / slope).astype(np.int16))
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 1.5 * z]
        item.PlanePositionSequence = [pos]
        tr = Dataset()
        tr.RescaleSlope, tr.RescaleIntercept = slope, intercept
        item.PixelValueTransformationSequence = [tr]
        per_frame.append(item)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    shared.PlaneOrientationSequence = [orient]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.NumberOfFrames = n
    del ds.RescaleSlope, ds.RescaleIntercept, ds.ImagePositionPatient
    ds.PixelData = np.stack(frames).tobytes()
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    vol = read_dicom_series(path)
    np.testing.assert_array_equal(vol.data, hu_volume)
    np.testing.assert_allclose(vol.spacing, (1.5, 0.5, 0.5))


def test_compressed_without_decoder_names_the_package():
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    try:
        pydicom.dcmread(path).pixel_array
        pytest.skip("a JPEG-LS decoder is installed here")
    except Exception:
        pass
    with pytest.raises(ValueError, match="pip install pylibjpeg"):
        read_dicom_series(path)


def test_bad_input(tmp_path, hu_volume):
    with pytest.raises(FileNotFoundError, match="no DICOM"):
        read_dicom_series(tmp_path)
    (tmp_path / "notes.txt").write_text("not dicom")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None
    write_series(tmp_path / "t", hu_volume)
    victim = sorted((tmp_path / "t").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: 128 + 4 + 200])  # truncated: header start only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DicomSeriesWarning)
        with pytest.raises((ValueError, FileNotFoundError)):
            read_dicom_series(victim)


def test_npe2_reader_returns_layer_data(tmp_path, hu_volume):
    write_series(tmp_path / "r", hu_volume)
    reader = napari_get_reader(str(tmp_path / "r"))
    assert reader is not None
    (data, meta, kind), = reader(str(tmp_path / "r"))
    assert kind == "image" and data.shape == hu_volume.shape
    np.testing.assert_allclose(meta["scale"], (2.5, 0.7, 0.9))
    assert napari_get_reader(get_testdata_file("CT_small.dcm")) is not None


def test_napari_opens_a_dicom_folder_through_the_manifest(make_napari_viewer, tmp_path, hu_volume):
    write_series(tmp_path / "viewer", hu_volume)
    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "viewer"), plugin="napari-sam-labeler")
    (layer,) = layers
    np.testing.assert_array_equal(layer.data, hu_volume)
    np.testing.assert_allclose(layer.scale, (2.5, 0.7, 0.9))
    assert layer.metadata["dicom"]["modality"] == "CT"
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)


def test_missing_decoder_message_for_each_compressed_syntax(monkeypatch):
    """Where a decoder happens to be installed, simulate pydicom's missing-plugin error."""
    ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))

    def no_plugin(self):
        raise RuntimeError("Unable to decompress pixel data because all plugins are missing dependencies")

    monkeypatch.setattr(type(ds), "pixel_array", property(no_plugin))
    from napari_sam.io._dicom_pixels import decode

    with pytest.raises(ValueError, match=r"JPEG-LS.*\n?.*|pip install pylibjpeg") as info:
        decode(ds, "mr.dcm")
    assert "1.2.840.10008.1.2.4.80" in str(info.value) and "pip install pylibjpeg" in str(info.value)


def test_corrupt_series_in_napari_is_a_clear_error_not_a_crash(make_napari_viewer, tmp_path, hu_volume):
    write_series(tmp_path / "bad", hu_volume)
    victim = sorted((tmp_path / "bad").iterdir())[2]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:100]  # pixel data cut short
    ds.save_as(victim)
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="cannot read pixel data") as info:
        viewer.open(str(tmp_path / "bad"), plugin="napari-sam-labeler")
    assert str(victim) in str(info.value) or victim.name in str(info.value.__cause__ or info.value)
    assert len(viewer.layers) == 0
    viewer.add_image(np.zeros((4, 4)))  # the viewer is still usable
