"""Every integer or bool labels dtype saves to every labels format (issue 19.4), read back
by independent readers; what cannot be stored is refused with the id named, in napari too."""

from __future__ import annotations

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("highdicom")

from napari_sam._fileio import LabelsWriteError, storable_labels  # noqa: E402
from napari_sam.api import write_labels_tiff  # noqa: E402
from napari_sam.io.dicom import read_dicom_series  # noqa: E402
from napari_sam.io.seg import read_dicom_seg  # noqa: E402

from test_dicom import write_series  # noqa: E402

DTYPES = [bool, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def labels_of(dtype, shape=(4, 16, 12)):
    lab = np.zeros(shape, dtype)
    lab[1, 2:6, 3:8] = 1
    if dtype is not bool:
        lab[2, 8:12, 1:4] = 7
    return lab


@pytest.fixture(scope="module")
def viewer_and_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series")
    write_series(folder / "s", np.zeros((4, 16, 12)), angle=0.0)
    return read_dicom_series(folder / "s")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_to_every_format_in_napari(make_napari_viewer, tmp_path, dtype, viewer_and_series):
    series = viewer_and_series
    labels = labels_of(dtype)
    viewer = make_napari_viewer()
    layer = viewer.add_labels(labels, **{k: v for k, v in series.layer_metadata().items()
                                         if k in ("scale", "translate", "metadata")})
    viewer.layers.selection = {layer}
    expected = labels.astype(np.int64)
    nii = viewer.layers.save(str(tmp_path / "l.nii.gz"), selected=True, plugin="napari-sam-labeler")
    np.testing.assert_array_equal(np.asarray(nib.load(nii[0]).dataobj).transpose(2, 1, 0), expected)
    ome = viewer.layers.save(str(tmp_path / "l.ome.tif"), selected=True, plugin="napari-sam-labeler")
    np.testing.assert_array_equal(tifffile.imread(ome[0]), expected)
    seg = viewer.layers.save(str(tmp_path / "l.dcm"), selected=True, plugin="napari-sam-labeler")
    back, _names = read_dicom_seg(seg[0], series.files)
    np.testing.assert_array_equal(back, expected)
    tif = write_labels_tiff(tmp_path / "l.tif", labels)
    np.testing.assert_array_equal(tifffile.imread(tif), expected)


def test_smallest_type_and_refusals():
    assert storable_labels(np.array([0, 255], np.int64), "x").dtype == np.uint8
    assert storable_labels(np.array([0, 256], np.int64), "x").dtype == np.uint16
    assert storable_labels(np.array([0, 70000], np.int64), "x").dtype == np.uint32
    assert storable_labels(np.array([0.0, 3.0]), "x").dtype == np.uint8
    with pytest.raises(ValueError, match="label id -3 is negative"):
        storable_labels(np.array([0, -3]), "x")
    with pytest.raises(ValueError, match=f"label id {2**40} does not fit"):
        storable_labels(np.array([0, 2**40]), "x")
    with pytest.raises(ValueError, match="must be integers"):
        storable_labels(np.array([0, 0.5]), "x")


@pytest.mark.parametrize("suffix", [".nii.gz", ".ome.tif"])
def test_napari_shows_the_writers_reason(make_napari_viewer, tmp_path, suffix):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.array([[[0, -3], [1, 2]]], np.int64))
    viewer.layers.selection = {layer}
    with pytest.raises(LabelsWriteError, match="label id -3 is negative"):
        viewer.layers.save(str(tmp_path / f"neg{suffix}"), selected=True, plugin="napari-sam-labeler")
    assert not list(tmp_path.iterdir())  # nothing half-written
