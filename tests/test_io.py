"""NIfTI and OME-TIFF round trips, DICOM geometry carried into NIfTI, napari writers."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

nib = pytest.importorskip("nibabel")

from napari_sam.io.dicom import read_dicom_series  # noqa: E402
from napari_sam.io.nifti import napari_get_reader, napari_write_labels, read_nifti, write_nifti  # noqa: E402
from napari_sam.io.tiff import read_tiff, write_ome_tiff  # noqa: E402

from test_dicom import write_series  # noqa: E402


@pytest.fixture
def oblique_series(tmp_path):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 1000, (5, 12, 10)).astype(np.float64)
    hu -= hu % 2
    write_series(tmp_path / "dcm", hu)
    return read_dicom_series(tmp_path / "dcm")


def test_dicom_to_nifti_keeps_the_affine(oblique_series, tmp_path):
    vol = oblique_series
    labels = (vol.data > 0).astype(np.uint8)
    path = write_nifti(tmp_path / "seg.nii.gz", labels, vol.affine, labels=True)
    img = nib.load(path)
    assert img.shape == (10, 12, 5)  # NIfTI order (X, Y, Z)
    assert img.header.get_intent()[0] == "label"
    # every voxel lands where DICOM says it is (RAS = LPS with x, y negated)
    for z, y, x in [(0, 0, 0), (4, 11, 9), (2, 5, 3)]:
        lps = (vol.affine @ [z, y, x, 1])[:3]
        ras = (img.affine @ [x, y, z, 1])[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-5)
        assert img.get_fdata()[x, y, z] == labels[z, y, x]
    data, affine, is_labels = read_nifti(path)
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(affine, vol.affine, atol=1e-6)
    assert is_labels


def test_npe2_nifti_writer_and_reader(oblique_series, tmp_path):
    vol = oblique_series
    meta = vol.layer_metadata()
    labels = (vol.data > 100).astype(np.uint16) * 3
    (written,) = napari_write_labels(str(tmp_path / "out.nii.gz"), labels, meta)
    reader = napari_get_reader(written)
    (data, layer_meta, kind), = reader(written)
    assert kind == "labels"
    np.testing.assert_array_equal(data, labels)
    np.testing.assert_allclose(layer_meta["scale"], vol.spacing, atol=1e-6)
    assert napari_get_reader(str(tmp_path / "x.tif")) is None


def test_layer_without_dicom_geometry_uses_scale_and_translate(tmp_path):
    """napari world (z, y, x) is patient LPS: the voxel lands where the layer showed it (nibabel)."""
    nib = pytest.importorskip("nibabel")
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 2, 3] = 7
    meta = {"scale": (2.0, 0.5, 0.25), "translate": (10.0, 20.0, 30.0)}
    (path,) = napari_write_labels(str(tmp_path / "plain.nii"), labels, meta)
    data, affine, _ = read_nifti(path)
    np.testing.assert_array_equal(data, labels)
    world_zyx = np.array([10.0 + 2.0 * 1, 20.0 + 0.5 * 2, 30.0 + 0.25 * 3])  # voxel (1, 2, 3) in napari
    img = nib.load(path)
    ras = (img.affine @ [3, 2, 1, 1])[:3]  # NIfTI indexes (i, j, k) = (x, y, z)
    np.testing.assert_allclose(ras, [-world_zyx[2], -world_zyx[1], world_zyx[0]])  # LPS -> RAS
    assert np.asarray(img.dataobj)[3, 2, 1] == 7


def test_ome_tiff_round_trip_with_physical_sizes(tmp_path):
    labels = np.zeros((4, 30, 20), np.uint16)
    labels[2, 5:9, 3:7] = 12
    path = write_ome_tiff(tmp_path / "labels.ome.tif", labels, spacing_zyx=(2.0, 0.5, 0.25))
    data, axes, scale, _unit = read_tiff(path)
    assert axes == "ZYX" and scale == (2.0, 0.5, 0.25)
    np.testing.assert_array_equal(np.asarray(data), labels)
    assert isinstance(data, np.memmap) or hasattr(data, "chunks")  # lazy: a memmap or a zarr view


def test_imagej_tiff_scale_and_lazy_reading(tmp_path):
    vol = np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, vol, imagej=True, resolution=(1 / 0.4, 1 / 0.4), metadata={"spacing": 3.0, "axes": "ZYX"})
    data, axes, scale, _unit = read_tiff(path)
    assert axes == "ZYX"
    np.testing.assert_allclose(scale, (3.0, 0.4, 0.4), rtol=1e-6)
    assert isinstance(data, np.memmap)  # not loaded
    compressed = tmp_path / "c.tif"
    tifffile.imwrite(compressed, vol, compression="zlib", photometric="minisblack")
    data, _, _, _ = read_tiff(compressed)
    assert not isinstance(data, np.ndarray)  # a lazy zarr view over the file
    np.testing.assert_array_equal(np.asarray(data[1]), vol[1])


def test_napari_saves_labels_through_the_writers(make_napari_viewer, tmp_path, oblique_series):
    viewer = make_napari_viewer()
    vol = oblique_series
    image = viewer.add_image(vol.data, **{k: v for k, v in vol.layer_metadata().items()})
    labels = viewer.add_labels((vol.data > 0).astype(np.uint8), scale=image.scale, metadata=image.metadata)
    viewer.layers.selection = {labels}
    out = tmp_path / "from_napari.nii.gz"
    viewer.layers.save(str(out), selected=True, plugin="napari-sam-labeler")
    data, affine, is_labels = read_nifti(out)
    np.testing.assert_array_equal(data, labels.data)
    np.testing.assert_allclose(affine, vol.affine, atol=1e-6)
    ome = tmp_path / "from_napari.ome.tif"
    viewer.layers.save(str(ome), selected=True, plugin="napari-sam-labeler")
    data, axes, scale, _unit = read_tiff(ome)
    np.testing.assert_allclose(scale, vol.spacing, rtol=1e-6)


def test_ome_tiff_reader_keeps_scale_channels_and_time(make_napari_viewer, tmp_path):
    from napari_sam.io.tiff import napari_get_reader as tiff_reader

    tczyx = np.random.default_rng(0).integers(0, 1000, (3, 2, 4, 16, 12)).astype(np.uint16)
    path = tmp_path / "movie.ome.tif"
    tifffile.imwrite(path, tczyx, ome=True, metadata={
        "axes": "TCZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.5})
    assert tiff_reader(str(tmp_path / "plain.tif")) is None
    (data, meta, kind), = tiff_reader(str(path))(str(path))
    assert meta["channel_axis"] == 1 and meta["scale"] == (1.0, 1.5, 0.25, 0.2)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-sam-labeler")
    assert len(layers) == 2  # one layer per channel
    assert layers[0].data.shape == (3, 4, 16, 12)  # time and Z kept
    np.testing.assert_allclose(layers[0].scale, (1.0, 1.5, 0.25, 0.2))
    np.testing.assert_array_equal(np.asarray(layers[1].data[2, 1]), tczyx[2, 1, 1])
