"""Physical units (issue 19.3): one unit per layer from the file's own units, written back
as the layer really is; checked with tifffile's OME metadata and nibabel's header."""

from __future__ import annotations

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
nib = pytest.importorskip("nibabel")

from napari_sam.io.tiff import read_tiff  # noqa: E402

from test_dicom import write_series  # noqa: E402


def ome_pixels(path):
    with tifffile.TiffFile(path) as tif:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        return (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]


def write_mixed_units(path):
    data = np.zeros((3, 20, 30), np.uint16)
    data[1, 5:10, 5:12] = 900
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 65.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 65.0,
        "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.2, "PhysicalSizeZUnit": "µm"})
    return data


def test_mixed_ome_units_become_one_unit(make_napari_viewer, tmp_path):
    path = tmp_path / "cells.ome.tif"
    write_mixed_units(path)
    _data, axes, scale, unit = read_tiff(path)
    assert axes == "ZYX" and unit == "µm"
    np.testing.assert_allclose(scale, (0.2, 0.065, 0.065))  # was (0.2, 65, 65): XY 1000x too large
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-sam-labeler")
    np.testing.assert_allclose(layer.scale, (0.2, 0.065, 0.065))
    assert {str(u) for u in layer.units} == {"micrometer"}


def test_labels_are_written_in_the_layers_unit(make_napari_viewer, tmp_path):
    from napari_sam._qt.placement import placement

    path = tmp_path / "cells.ome.tif"
    write_mixed_units(path)
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(path), plugin="napari-sam-labeler")
    labels = np.zeros(image.data.shape, np.uint8)
    labels[1, 5:10, 5:12] = 1
    layer = viewer.add_labels(labels, **placement(image))  # as the widget creates them
    viewer.layers.selection = {layer}
    (ome,) = viewer.layers.save(str(tmp_path / "labels.ome.tif"), selected=True, plugin="napari-sam-labeler")
    pixels = ome_pixels(ome)
    assert pixels["PhysicalSizeXUnit"] == "µm" and float(pixels["PhysicalSizeX"]) == pytest.approx(0.065)
    assert float(pixels["PhysicalSizeZ"]) == pytest.approx(0.2)
    (nii,) = viewer.layers.save(str(tmp_path / "labels.nii.gz"), selected=True, plugin="napari-sam-labeler")
    header = nib.load(nii).header
    assert header.get_xyzt_units()[0] == "micron"
    np.testing.assert_allclose(header.get_zooms(), (0.065, 0.065, 0.2), rtol=1e-5)
    (back,) = viewer.open(nii, plugin="napari-sam-labeler")  # read back in µm, same place
    np.testing.assert_allclose(np.abs(back.scale), (0.2, 0.065, 0.065), rtol=1e-5)


def test_medical_layers_are_millimetres_and_say_so(make_napari_viewer, tmp_path):
    from napari_sam._qt.placement import placement

    write_series(tmp_path / "ct", np.zeros((3, 8, 10)), angle=0.0, spacing_rc=(0.7, 0.9))
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "ct"), plugin="napari-sam-labeler")
    assert {str(u) for u in image.units} == {"millimeter"}
    layer = viewer.add_labels(np.ones(image.data.shape, np.uint8), **placement(image))
    viewer.layers.selection = {layer}
    (ome,) = viewer.layers.save(str(tmp_path / "ct_labels.ome.tif"), selected=True, plugin="napari-sam-labeler")
    pixels = ome_pixels(ome)
    assert pixels["PhysicalSizeXUnit"] == "mm" and float(pixels["PhysicalSizeX"]) == pytest.approx(0.9)


def test_tiff_resolution_unit_and_imagej_unit(tmp_path):
    plain = tmp_path / "res.tif"  # no OME XML: the TIFF resolution tags decide
    tifffile.imwrite(plain, np.zeros((8, 8), np.uint8), resolution=(10000.0, 10000.0), resolutionunit="CENTIMETER")
    _d, _axes, scale, unit = read_tiff(plain)
    assert unit == "cm"
    np.testing.assert_allclose(scale, (1e-4, 1e-4))
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, np.zeros((2, 8, 8), np.uint8), imagej=True, resolution=(1 / 65.0, 1 / 65.0),
                     metadata={"unit": "nm", "spacing": 200.0, "axes": "ZYX"})
    _d, _axes, scale, unit = read_tiff(ij)
    assert unit == "nm"
    np.testing.assert_allclose(scale, (200.0, 65.0, 65.0))


def test_micron_nifti_labels_stay_in_micrometres(make_napari_viewer, tmp_path):
    from napari_sam._qt.placement import placement

    img = nib.Nifti1Image(np.zeros((10, 8, 4), np.int16), np.diag([0.1, 0.1, 0.5, 1.0]))
    img.header.set_xyzt_units("micron")
    nib.save(img, str(tmp_path / "micro.nii.gz"))
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "micro.nii.gz"), plugin="napari-sam-labeler")
    assert {str(u) for u in image.units} == {"micrometer"}
    layer = viewer.add_labels(np.ones(image.data.shape, np.uint8), **placement(image), metadata=dict(image.metadata))
    viewer.layers.selection = {layer}
    (path,) = viewer.layers.save(str(tmp_path / "lab.nii.gz"), selected=True, plugin="napari-sam-labeler")
    header = nib.load(path).header
    assert header.get_xyzt_units()[0] == "micron"  # was written as mm: 1000x off
    np.testing.assert_allclose(header.get_zooms(), (0.1, 0.1, 0.5))


def test_odd_ome_units_and_layouts(make_napari_viewer, tmp_path):
    angstrom = tmp_path / "a.ome.tif"
    tifffile.imwrite(angstrom, np.zeros((2, 8, 8), np.uint8), ome=True, metadata={
        "axes": "ZYX", "PhysicalSizeX": 10.0, "PhysicalSizeXUnit": "Å", "PhysicalSizeY": 10.0,
        "PhysicalSizeYUnit": "Å", "PhysicalSizeZ": 20.0, "PhysicalSizeZUnit": "Å"})
    _d, _a, scale, unit = read_tiff(angstrom)  # was KeyError: 'Å'
    assert unit == "å"
    np.testing.assert_allclose(scale, (20.0, 10.0, 10.0))
    planar = tmp_path / "planar.ome.tif"  # RGB stored as separate planes: tifffile axes SYX
    tifffile.imwrite(planar, np.zeros((3, 8, 10), np.uint8), ome=True, photometric="rgb", planarconfig="separate",
                     metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    viewer = make_napari_viewer()
    layers = viewer.open(str(planar), plugin="napari-sam-labeler")  # was: units length != ndim
    assert layers


def test_4d_labels_save_as_ome_and_refuse_nifti_clearly(make_napari_viewer, tmp_path):
    from napari_sam._fileio import LabelsWriteError

    viewer = make_napari_viewer()
    labels = np.zeros((3, 2, 8, 8), np.uint16)
    labels[1, 1, 2:5, 2:5] = 9
    layer = viewer.add_labels(labels, scale=(1.0, 0.5, 0.2, 0.2), units=("pixel", "µm", "µm", "µm"))
    viewer.layers.selection = {layer}
    (path,) = viewer.layers.save(str(tmp_path / "t.ome.tif"), selected=True, plugin="napari-sam-labeler")
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "TZYX"
    np.testing.assert_array_equal(tifffile.imread(path), labels)
    with pytest.raises(LabelsWriteError, match="NIfTI labels are 2D or 3D"):
        viewer.layers.save(str(tmp_path / "t.nii.gz"), selected=True, plugin="napari-sam-labeler")


def test_nifti_label_detection(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    mask = np.zeros((6, 6, 3), np.float32)
    mask[1:3, 1:3, 1] = 1.0
    img = nib.Nifti1Image(mask, np.eye(4))
    img.header.set_intent("label")
    nib.save(img, str(tmp_path / "float_mask.nii.gz"))
    (layer,) = viewer.open(str(tmp_path / "float_mask.nii.gz"), plugin="napari-sam-labeler")  # was TypeError
    assert type(layer).__name__ == "Labels" and layer.data.dtype.kind == "u" and layer.data.max() == 1
    ct = np.full((6, 6, 3), -1000, np.int16)
    ct[2:4, 2:4, :] = 300
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct_segmental_arteries.nii.gz"))
    (layer,) = viewer.open(str(tmp_path / "ct_segmental_arteries.nii.gz"), plugin="napari-sam-labeler")
    assert type(layer).__name__ == "Image"  # negative values: not label ids, whatever the name
    seg = np.zeros((6, 6, 3), np.uint8)
    seg[1:3, 1:3, :] = 2
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(tmp_path / "liver_seg.nii.gz"))
    (layer,) = viewer.open(str(tmp_path / "liver_seg.nii.gz"), plugin="napari-sam-labeler")
    assert type(layer).__name__ == "Labels"


def test_4d_nifti_opens_with_time_first(make_napari_viewer, tmp_path):
    bold = np.random.default_rng(0).normal(size=(10, 11, 12, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(bold, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "bold.nii.gz"))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "bold.nii.gz"), plugin="napari-sam-labeler")
    assert layer.data.shape == (5, 12, 11, 10)
    np.testing.assert_allclose(layer.scale, (1.0, 3.0, 2.0, 2.0))
    np.testing.assert_array_equal(np.asarray(layer.data)[2], bold[..., 2].transpose(2, 1, 0))
