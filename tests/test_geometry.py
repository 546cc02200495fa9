"""One geometry: napari world = patient space for every medical reader and writer.

Checked against independent readers (SimpleITK's physical points, nibabel's affine), with
the files opened in a real napari viewer through the plugin as a user opens them:
a CT series at origin (-120, -80, 40) mm, spacing 2.5 x 0.7 x 0.9 mm, axial and 15°
oblique (the measurement in issue 10).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
nib = pytest.importorskip("nibabel")

from test_dicom import write_series  # noqa: E402

ORIGIN = (-120.0, -80.0, 40.0)
DZ, SPACING_RC = 2.5, (0.7, 0.9)
SHAPE = (6, 12, 10)


@pytest.fixture(params=[0.0, 15.0], ids=["axial", "oblique15"])
def series(request, tmp_path):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1500, SHAPE).astype(np.float64)
    hu -= hu % 2
    folder = tmp_path / "series"
    write_series(folder, hu, dz=DZ, spacing_rc=SPACING_RC, origin=ORIGIN, angle=request.param)
    return folder, hu, request.param


def corners_and_some():
    z, y, x = (s - 1 for s in SHAPE)
    return [(0, 0, 0), (z, 0, 0), (0, y, 0), (0, 0, x), (z, y, x), (2, 5, 7), (4, 1, 3)]


def sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def world(layer, zyx):
    return np.asarray(layer.data_to_world(np.asarray(zyx, float)), float)


def sitk_world(image, zyx):
    """SimpleITK's physical point (LPS x, y, z) of voxel (z, y, x), in napari's (z, y, x) order."""
    z, y, x = (int(v) for v in zyx)
    return np.asarray(image.TransformIndexToPhysicalPoint((x, y, z)))[::-1]


def open_layer(viewer, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # napari: non-orthogonal slicing (oblique)
        (layer,) = viewer.open(str(path), plugin="napari-sam-labeler")
    return layer


def test_dicom_layer_sits_at_simpleitk_physical_points(make_napari_viewer, series):
    folder, hu, angle = series
    viewer = make_napari_viewer()
    layer = open_layer(viewer, folder)
    ref = sitk_series(folder)
    np.testing.assert_array_equal(np.asarray(layer.data), sitk.GetArrayFromImage(ref))
    np.testing.assert_array_equal(np.asarray(layer.data), hu)
    for zyx in corners_and_some():
        np.testing.assert_allclose(world(layer, zyx), sitk_world(ref, zyx), atol=1e-4)
    if angle == 0.0:  # axial: plain scale + translate, nothing napari cannot slice exactly
        np.testing.assert_allclose(layer.scale, (DZ, *SPACING_RC))
        np.testing.assert_allclose(layer.translate, ORIGIN[::-1])
        np.testing.assert_allclose(layer.affine.affine_matrix, np.eye(4))


def test_nifti_written_by_simpleitk_overlays_the_series(make_napari_viewer, series, tmp_path):
    folder, hu, _ = series
    path = tmp_path / "from_sitk.nii.gz"
    sitk.WriteImage(sitk_series(folder), str(path))
    viewer = make_napari_viewer()
    image = open_layer(viewer, folder)
    other = open_layer(viewer, path)
    np.testing.assert_array_equal(np.asarray(other.data), np.asarray(image.data))
    for zyx in corners_and_some():
        np.testing.assert_allclose(world(other, zyx), world(image, zyx), atol=1e-3)


def test_nifti_with_flipped_rows_lands_on_the_same_points(make_napari_viewer, series, tmp_path):
    """dcm2niix-style files store rows flipped with a matching affine: same patient points."""
    folder, hu, _ = series
    ref = nib.load(_sitk_nifti(folder, tmp_path))
    flipped = np.asarray(ref.dataobj)[:, ::-1, :]
    ny = flipped.shape[1]
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, ny - 1
    path = tmp_path / "flipped.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), ref.affine @ flip), str(path))
    viewer = make_napari_viewer()
    image = open_layer(viewer, folder)
    other = open_layer(viewer, path)
    for z, y, x in corners_and_some():
        same = (z, ny - 1 - y, x)  # the voxel that holds image[z, y, x]
        assert np.asarray(other.data)[same] == np.asarray(image.data)[z, y, x]
        np.testing.assert_allclose(world(other, same), world(image, (z, y, x)), atol=1e-3)


def _sitk_nifti(folder, tmp_path):
    path = tmp_path / "ref.nii.gz"
    sitk.WriteImage(sitk_series(folder), str(path))
    return str(path)


@pytest.mark.parametrize("keep_metadata", [True, False], ids=["with-dicom-metadata", "placement-only"])
def test_labels_saved_as_nifti_sit_where_they_were_drawn(make_napari_viewer, series, tmp_path, keep_metadata):
    """Labels placed like the image (as the widget creates them) -> NIfTI -> SimpleITK,
    nibabel and napari agree on every labelled voxel's patient position."""
    from napari_sam._qt.placement import placement

    folder, hu, _ = series
    viewer = make_napari_viewer()
    image = open_layer(viewer, folder)
    labels = np.zeros(SHAPE, np.uint16)
    labels[1, 2:5, 3:6] = 3
    labels[4, 7, 8] = 9
    layer = viewer.add_labels(labels, name="drawn", **placement(image),
                              metadata=dict(image.metadata) if keep_metadata else {})
    out = tmp_path / "labels.nii.gz"
    viewer.layers.selection = {layer}
    viewer.layers.save(str(out), selected=True, plugin="napari-sam-labeler")
    ref = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), labels)
    nimg = nib.load(str(out))
    for zyx in [tuple(v) for v in np.argwhere(labels)] + corners_and_some():
        expected = world(layer, zyx)
        np.testing.assert_allclose(sitk_world(ref, zyx), expected, atol=1e-3)
        z, y, x = zyx
        ras = (nimg.affine @ [x, y, z, 1])[:3]
        np.testing.assert_allclose([-ras[0], -ras[1], ras[2]][::-1], expected, atol=1e-3)
    back = open_layer(viewer, out)
    np.testing.assert_array_equal(np.asarray(back.data), labels)
    for zyx in corners_and_some():
        np.testing.assert_allclose(world(back, zyx), world(image, zyx), atol=1e-3)


def test_widget_on_an_oblique_series_prompts_what_is_on_screen(make_napari_viewer, qtbot, tmp_path, tiny_sam_dir):
    """napari draws an oblique stack slice by slice without the tilt; a click must prompt the
    pixel under the cursor on the slice shown, and the labels keep the series' placement."""
    from napari_sam._qt.placement import drawn_matrix

    rng = np.random.default_rng(2)
    hu = rng.integers(-200, 200, (6, 40, 48)).astype(np.float64)
    hu[:, 10:25, 12:30] = 900
    hu -= hu % 2
    write_series(tmp_path / "obl", hu, dz=DZ, spacing_rc=SPACING_RC, origin=ORIGIN, angle=15.0)
    viewer = make_napari_viewer()
    image = open_layer(viewer, tmp_path / "obl")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    widget.model.model_edit.setText(str(tiny_sam_dir))
    widget.model.device_combo.setCurrentText("cpu")
    k, r, c = 4, 17.0, 20.0
    drawn = drawn_matrix(image)
    z_world, y_world, x_world = (drawn @ [k, r, c, 1.0])[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        viewer.dims.set_point(0, z_world)
        assert widget.current_slice() == k
        # napari's full inverse would put this click on another slice: the case that matters
        assert abs(image.world_to_data((z_world, y_world, x_world))[0] - k) > 0.5
        points = widget.state.points
        with qtbot.waitSignal(widget.preview_ready, timeout=60_000):
            points.add(points.world_to_data((z_world, y_world, x_world)))  # napari's click
    np.testing.assert_allclose(points.data[0], (k, r, c), atol=1e-6)  # drawn on slice k
    prompt = widget.state.objects[0]
    np.testing.assert_allclose(prompt.points, [[r, c]], atol=1e-6)
    assert widget.state.preview_slice == k
    with qtbot.waitSignal(widget.committed, timeout=60_000):
        widget.commit()
    labels = widget.state.labels_layer
    assert set(np.flatnonzero(np.asarray(labels.data).reshape(len(hu), -1).any(axis=1))) == {k}
    for zyx in [(0, 0, 0), (5, 39, 47), (k, r, c)]:
        np.testing.assert_allclose(world(labels, zyx), world(image, zyx), atol=1e-6)


def write_tilted_ct(folder, n=5, tilt_deg=15.0):
    """5 CT slices with gantry tilt: the table steps 5 mm along z, the images are tilted."""
    from pydicom.uid import generate_uid

    from test_dicom import make_slice

    folder.mkdir(parents=True, exist_ok=True)
    t = np.deg2rad(tilt_deg)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), -np.sin(t)])
    uid = generate_uid()
    rng = np.random.default_rng(4)
    hu = rng.integers(-1000, 1000, (n, 10, 12)).astype(float)
    hu -= hu % 2
    for k in range(n):
        ds = make_slice(hu[k], (-20.0, -16.0, 5.0 * k), row, col, (0.8, 0.6), 1.0, -1024.0, uid, instance=k + 1)
        ds.save_as(folder / f"T{k}", enforce_file_format=True)
    return hu


def test_gantry_tilt_every_slice_at_its_own_position(make_napari_viewer, tmp_path):
    """Issue 19.2: slice 4 belongs at (-20, -16, 20), not (-20, -11, 18.66); spacing 5.0, not 4.83;
    in napari, in the NIfTI export (nibabel) and in the SEG export reopened alone."""
    from napari_sam._qt.placement import placement
    from napari_sam.io.dicom import DicomSeriesWarning
    from napari_sam.io.seg import write_dicom_seg

    hu = write_tilted_ct(tmp_path / "tilt")
    viewer = make_napari_viewer()
    with pytest.warns(DicomSeriesWarning, match="15.00 degrees"):
        (layer,) = viewer.open(str(tmp_path / "tilt"), plugin="napari-sam-labeler")
    np.testing.assert_array_equal(np.asarray(layer.data), hu)
    assert layer.metadata["dicom"]["spacing_zyx"][0] == pytest.approx(5.0)
    for k in range(5):
        np.testing.assert_allclose(world(layer, (k, 0, 0)), (5.0 * k, -16.0, -20.0), atol=0.01)
    labels = np.zeros(hu.shape, np.uint8)
    labels[1:4, 2:6, 3:8] = 1
    labels_layer = viewer.add_labels(labels, **placement(layer), metadata=dict(layer.metadata))
    viewer.layers.selection = {labels_layer}
    nii = tmp_path / "tilt_labels.nii.gz"
    viewer.layers.save(str(nii), selected=True, plugin="napari-sam-labeler")
    img = nib.load(str(nii))
    for k in range(5):
        ras = img.affine @ [0, 0, k, 1]
        np.testing.assert_allclose([-ras[0], -ras[1], ras[2]], (-20.0, -16.0, 5.0 * k), atol=0.01)
    seg_dir = tmp_path / "seg_alone"
    seg_dir.mkdir()
    seg = write_dicom_seg(seg_dir / "tilt_seg.dcm", labels, layer.metadata["dicom"]["files"])
    (back,) = viewer.open(seg, plugin="napari-sam-labeler")
    np.testing.assert_array_equal(np.asarray(back.data), labels)
    for k in range(5):
        np.testing.assert_allclose(world(back, (k, 0, 0)), (5.0 * k, -16.0, -20.0), atol=0.01)


PLANES = {  # row (column index) and column (row index) direction cosines, LPS
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal_reversed": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal_tilted10": ((1.0, 0.0, 0.0), (0.0, np.sin(np.deg2rad(10)), -np.cos(np.deg2rad(10)))),
    "oblique_sagittal30": ((np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30)), 0.0), (0.0, 0.0, -1.0)),
}


def write_plane_series(folder, hu, row, col, origin=(-40.0, 30.0, 80.0), dz=2.0):
    from pydicom.uid import generate_uid

    from test_dicom import make_slice

    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(row), np.asarray(col)
    normal = np.cross(row, col)
    uid = generate_uid()
    for z in range(len(hu)):
        ds = make_slice(hu[z], np.asarray(origin) + z * dz * normal, row, col, (0.8, 0.6), 1.0, -1024.0, uid,
                        instance=z + 1)
        ds.save_as(folder / f"S{z}", enforce_file_format=True)


@pytest.mark.parametrize("plane", list(PLANES))
def test_coronal_and_sagittal_series_open_draw_and_sit_in_patient_space(make_napari_viewer, tmp_path, plane):
    """Helper-found crash: napari cannot draw a permuted transform (singular in-plane matrix).
    The layer takes the series' own orthogonal frame; world_frame maps it back to LPS."""
    row, col = PLANES[plane]
    rng = np.random.default_rng(5)
    hu = rng.integers(-1000, 1000, (8, 12, 10)).astype(float)
    hu -= hu % 2
    write_plane_series(tmp_path / plane, hu, row, col)
    viewer = make_napari_viewer()
    layer = open_layer(viewer, tmp_path / plane)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shot = viewer.screenshot(canvas_only=True)  # draws: crashed before
    assert shot.std() > 0  # something is drawn
    frame = np.asarray(layer.metadata["dicom"]["world_frame"])
    ref = sitk_series(tmp_path / plane)
    np.testing.assert_array_equal(np.asarray(layer.data), sitk.GetArrayFromImage(ref))
    for zyx in corners_and_some():
        z, y, x = zyx
        zyx = (min(z, 7), min(y, 11), min(x, 9))
        np.testing.assert_allclose(frame.T @ world(layer, zyx), sitk_world(ref, zyx), atol=1e-4)
    # labels saved from it land on the same patient points (nibabel), and reopen on the image
    from napari_sam._qt.placement import placement

    labels = viewer.add_labels(np.ones(hu.shape, np.uint8), **placement(layer), metadata=dict(layer.metadata))
    viewer.layers.selection = {labels}
    (path,) = viewer.layers.save(str(tmp_path / f"{plane}.nii.gz"), selected=True, plugin="napari-sam-labeler")
    back = open_layer(viewer, path)
    for zyx in [(0, 0, 0), (7, 11, 9), (3, 5, 2)]:
        np.testing.assert_allclose(world(back, zyx), world(layer, zyx), atol=1e-4)
        np.testing.assert_allclose(sitk_world(sitk.ReadImage(path), zyx), sitk_world(ref, zyx), atol=1e-3)


def test_tilted_nifti_opens_in_itk_tools_too(make_napari_viewer, tmp_path):
    """The sform keeps the tilt; the qform (rigid) lets SimpleITK read the file at all."""
    from napari_sam._qt.placement import placement

    write_tilted_ct(tmp_path / "tilt")
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (layer,) = viewer.open(str(tmp_path / "tilt"), plugin="napari-sam-labeler")
    labels = viewer.add_labels(np.ones(layer.data.shape, np.uint8), **placement(layer), metadata=dict(layer.metadata))
    viewer.layers.selection = {labels}
    (path,) = viewer.layers.save(str(tmp_path / "t.nii.gz"), selected=True, plugin="napari-sam-labeler")
    header = nib.load(path).header
    assert int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0
    ref = sitk.ReadImage(path)  # failed before: "ITK only supports orthonormal direction cosines"
    assert ref.GetSize() == tuple(reversed(layer.data.shape))
    np.testing.assert_allclose(ref.GetOrigin(), (-20.0, -16.0, 0.0), atol=1e-4)


def test_api_nifti_labels_overlay_the_series_in_simpleitk(series, tmp_path):
    """`napari_sam.write_labels_nifti(..., like=<the series' layer metadata>)` (what scripts
    and the tutorial call) lands every voxel on the series' own physical point."""
    import napari_sam
    from napari_sam.io.dicom import read_dicom_series

    folder, hu, _ = series
    vol = read_dicom_series(folder)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, 5, 7] = 3
    out = napari_sam.write_labels_nifti(tmp_path / "labels.nii.gz", labels, like=vol.layer_metadata())
    ref, written = sitk_series(folder), sitk.ReadImage(str(out))
    for zyx in corners_and_some():
        np.testing.assert_allclose(sitk_world(written, zyx), sitk_world(ref, zyx), atol=1e-3)
    assert sitk.GetArrayFromImage(written)[2, 5, 7] == 3
