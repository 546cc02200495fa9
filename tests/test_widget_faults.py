"""The widget never loses, splits or misplaces work (issue 18): each fault users of other
SAM plugins hit, tried in a real viewer with the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qtpy")

from test_widget import TIMEOUT, add_point, embed  # noqa: E402


def test_renaming_any_layer_changes_only_the_name(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    image = viewer.layers["img"]
    image.name = "cells"
    assert widget.state.image_combo.currentText() == "cells"
    preds = add_point(qtbot, widget, [60, 70])  # before: nothing happened
    assert preds and widget.state.preview.data.any()
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    labels = widget.state.labels_layer
    labels.name = "my labels"
    for layer in (widget.state.points, widget.state.boxes, widget.state.preview):
        layer.name = f"renamed {layer.name}"
    offered = [widget.state.labels_combo.itemText(i) for i in range(widget.state.labels_combo.count())]
    assert offered == ["(new labels layer)", "my labels"]  # the plugin's own layers are never offered
    add_point(qtbot, widget, [120, 170])
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    assert set(np.unique(viewer.layers["my labels"].data)) == {0, 1, 2}


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16])
def test_label_ids_beyond_the_layers_dtype_widen_it_and_undo_still_works(labeler, qtbot, blob_image, dtype):
    """napari's own "New labels layer" is uint8; id 255 used; a new object gets 256."""
    viewer, widget = labeler(blob_image)
    top = int(np.iinfo(dtype).max)
    existing = np.zeros(blob_image.shape, dtype)
    existing[5:10, 5:10] = top
    target = viewer.add_labels(existing.copy(), name="napari labels")
    widget.state.labels_combo.select(target)
    viewer.layers.selection.active = widget.state.points
    embed(qtbot, widget)
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        widget.state.boxes.add_rectangles(np.array([[30.0, 30.0], [90.0, 110.0]]))
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT) as blocker:
        widget.commit()
    assert blocker.args[0].ids == [top + 1]
    assert (target.data == top + 1).any() and (target.data[5:10, 5:10] == top).all()
    assert np.iinfo(target.data.dtype).max > top and "widened" in widget.status.text()
    widget.undo()
    np.testing.assert_array_equal(target.data, existing)  # one undo step restores it exactly


def test_many_objects_fit_the_preview(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    corners = [np.array([[r, c], [r + 8.0, c + 8.0]]) for r in range(0, 170, 10) for c in range(0, 160, 10)]
    assert len(corners) > 255
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT) as blocker:
        widget.state.boxes.add_rectangles(corners)
    assert len(blocker.args[0]) == len(corners)
    assert widget.state.preview.data.max() <= 255


@pytest.mark.parametrize("how", ["replace data", "edit in place"])
def test_new_pixels_are_never_decoded_from_an_old_embedding(labeler, qtbot, blob_image, tiny_engine, how):
    """Issue 18.3: replace layer.data with another image of the same shape (a filter, a reload)
    or change its pixels in place; the next prompt uses an embedding of the pixels on screen."""
    original = blob_image.copy()
    viewer, widget = labeler(blob_image.copy())
    embed(qtbot, widget)
    other = np.ascontiguousarray(np.flipud(np.fliplr(original)))
    image = viewer.layers["img"]
    if how == "replace data":
        image.data = other
    else:
        image.data[...] = other
        image.refresh()
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT) as blocker:
        widget.state.points.add(np.array([60.0, 70.0]))
    fresh = tiny_engine.predict(tiny_engine.embed(other), points=[[60, 70]], point_labels=[1])
    stale = tiny_engine.predict(tiny_engine.embed(original), points=[[60, 70]], point_labels=[1])
    assert not np.array_equal(fresh.masks, stale.masks)  # the test can tell them apart
    np.testing.assert_array_equal(blocker.args[0][0].masks, fresh.masks)


def test_the_plugins_layers_leave_naparis_world_alone(labeler, qtbot):
    """Issue 18.4: with the dock open on a 120x160 image, napari's New labels layer made a
    513x513 layer (the empty prompt layers fell back to napari's default 512-pixel world)."""
    image = np.zeros((120, 160), np.uint8)
    viewer, widget = labeler(image)
    assert viewer.layers.selection.active is not None
    viewer._new_labels()  # what the layer list's "New labels layer" button calls
    assert viewer.layers[-1].data.shape == (120, 160)
    np.testing.assert_allclose(viewer.layers.extent.world, [[0, 0], [119, 159]])
    viewer.layers.remove(viewer.layers[-1])
    volume = np.zeros((7, 50, 60), np.uint8)
    viewer3, _widget3 = labeler(volume, scale=(2.0, 0.5, 0.5))
    viewer3._new_labels()
    assert viewer3.layers[-1].data.shape == (7, 50, 60)
    assert viewer3.dims.range[0].stop == pytest.approx(12.0)


def test_kill_9_right_after_a_commit_loses_nothing(make_napari_viewer, qtbot, tmp_path, blob_image, tiny_sam_dir,
                                                   tiny_engine):
    """Issue 18.5: napari killed right after a commit; reopening the image offers the labels."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (pytest-xvfb provides one)")
    np.save(tmp_path / "cells.npy", blob_image)
    script = Path(__file__).with_name("crash_after_commit.py")
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "cells.npy"), str(tiny_sam_dir)],
                         capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    expected = tiny_engine.predict(tiny_engine.embed(blob_image), points=[[60, 70]], point_labels=[1]).masks[0]
    viewer = make_napari_viewer()
    viewer.add_image(np.load(tmp_path / "cells.npy"), name="opened again")  # same pixels, new array
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    assert widget.autosave.isVisibleTo(widget) and "kept safe" in widget.autosave.note.text()
    widget.autosave.restore()
    restored = widget.state.labels_layer
    assert restored is not None and restored.name == "SAM labels (restored)"
    np.testing.assert_array_equal(np.asarray(restored.data) == 1, expected)
    assert set(np.unique(restored.data)) == {0, 1}
    widget.autosave.discard()
    widget.autosave.offer(widget.state.image_layer)
    assert not widget.autosave.isVisibleTo(widget)


def test_a_new_session_never_overwrites_what_an_earlier_one_kept(labeler, qtbot, blob_image):
    """Found by a tester: reopening the image, ignoring the offer and committing replaced the
    earlier session's autosave. Each session (and each labels layer) keeps its own."""
    _viewer, first = labeler(blob_image.copy())
    embed(qtbot, first)
    for point in ([60, 70], [120, 170]):
        add_point(qtbot, first, point)
        with qtbot.waitSignal(first.committed, timeout=TIMEOUT):
            first.commit()
    kept = np.asarray(first.state.labels_layer.data).copy()
    _viewer2, second = labeler(blob_image.copy())
    assert second.autosave.isVisibleTo(second)
    embed(qtbot, second)
    add_point(qtbot, second, [20, 20])
    with qtbot.waitSignal(second.committed, timeout=TIMEOUT):
        second.commit()  # the offer ignored
    second.autosave.offer(second.state.image_layer)
    assert second.autosave.isVisibleTo(second)  # still the first session's
    second.autosave.restore()
    np.testing.assert_array_equal(np.asarray(second.state.labels_layer.data), kept)


def test_each_image_keeps_its_labels_and_a_deleted_target_is_never_replaced(labeler, qtbot, blob_image):
    """Found by a tester: switching the image kept the other image's labels layer; deleting the
    target made the choice jump to another labels layer (a user's ground truth)."""
    viewer, widget = labeler(blob_image)
    truth = viewer.add_labels(np.zeros(blob_image.shape, np.int32), name="ground truth")
    viewer.layers.selection.active = widget.state.points
    assert widget.state.labels_combo.currentText() == "(new labels layer)"  # not the user's layer
    embed(qtbot, widget)
    add_point(qtbot, widget, [60, 70])
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    first = widget.state.labels_layer
    viewer.add_image(blob_image[::-1].copy(), name="img2")
    widget.state.image_combo.setCurrentIndex(widget.state.image_combo.findText("img2"))
    assert widget.state.labels_layer is None  # img2 starts with a new labels layer
    widget.state.image_combo.setCurrentIndex(widget.state.image_combo.findText("img"))
    assert widget.state.labels_layer == first  # and img gets its own back
    viewer.layers.remove(first)
    assert widget.state.labels_layer is None and widget.state.labels_combo.currentText() == "(new labels layer)"
    assert not np.asarray(truth.data).any()


def test_a_closed_dock_leaves_no_target_and_no_dead_keys(make_napari_viewer, qtbot, blob_image):
    from napari.utils.key_bindings import KeyBinding

    viewer = make_napari_viewer()
    viewer.add_image(blob_image, name="img")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    viewer.window.remove_dock_widget(dock)
    _dock2, widget2 = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    offered = [widget2.state.labels_combo.itemText(i) for i in range(widget2.state.labels_combo.count())]
    assert offered == ["(new labels layer)"]  # the first dock's SAM preview is never a target
    viewer.window.remove_dock_widget(_dock2)
    widget2.deleteLater()
    qtbot.wait(50)  # Qt deletes the closed dock's widgets
    enter = viewer.keymap[KeyBinding.from_str("Enter")]
    enter(viewer)  # before: RuntimeError, wrapped C/C++ object ... has been deleted


def test_a_transposed_view_is_refused_not_misread(labeler, qtbot, blob_volume):
    viewer, widget = labeler(blob_volume)
    viewer.dims.order = (1, 0, 2)  # napari shows (Z, X) planes
    widget.state.points.add(np.array([2.0, 60.0, 70.0]))
    qtbot.wait(200)
    assert "dims order" in widget.status.text() and not widget.state.preview.data.any()
    viewer.dims.order = (0, 1, 2)
    viewer.dims.ndisplay = 3
    widget.request_decode()
    assert "2D view" in widget.status.text()


def test_a_commit_made_while_propagating_is_kept(labeler, qtbot, blob_volume, monkeypatch):
    """Found by a tester: labels committed during a propagation were overwritten when it ended."""
    import time

    from napari_sam._qt import stack_panel
    from napari_sam.propagate import PropagationStep, PropagationSummary

    def slow_propagation(engine, stack, labels, *, seed_slices, ids, **_kw):
        for z in range(len(labels)):
            time.sleep(0.2)
            labels[z][:50, :50] = ids[0]  # propagation writes the same corner everywhere
            yield PropagationStep(z, {ids[0]: labels[z] == ids[0]}, {ids[0]: 0.9})
        return PropagationSummary()

    monkeypatch.setattr(stack_panel, "propagate_labels", slow_propagation)
    viewer, widget = labeler(blob_volume)
    embed(qtbot, widget)
    add_point(qtbot, widget, [widget.current_slice(), 60, 70])
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    target = widget.state.labels_layer
    with qtbot.waitSignal(widget.propagated, timeout=TIMEOUT):
        widget.propagate()
        target.data_setitem((np.full(100, 4), np.arange(100) // 10, np.arange(100) % 10), 9)  # meanwhile
    assert (np.asarray(target.data)[4, :10, :10] == 9).all()  # the user's commit survived
    assert (np.asarray(target.data)[3, :50, :50] != 0).all()  # and the propagation landed elsewhere


def test_a_cache_folder_that_cannot_be_written_costs_a_warning_not_the_work(labeler, qtbot, blob_image, tmp_path,
                                                                             monkeypatch):
    """Found by a tester: with an unwritable cache folder no preview ever came."""
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(blocker / "cache"))
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    add_point(qtbot, widget, [60, 70])
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    assert (np.asarray(widget.state.labels_layer.data) == 1).any()


def test_the_prompt_layers_are_points_and_shapes_to_napari(labeler, blob_image):
    """Their icons, writers and layer-data tuples are napari's Points and Shapes."""
    _viewer, widget = labeler(blob_image)
    assert widget.state.points.as_layer_data_tuple()[2] == "points"
    assert widget.state.boxes.as_layer_data_tuple()[2] == "shapes"
