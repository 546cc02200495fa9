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
