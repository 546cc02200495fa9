"""The "Segment everything" panel in a real napari viewer (Xvfb) with the tiny checkpoint."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("qtpy")

from napari_sam import api  # noqa: E402

TIMEOUT = 60_000
# the random tiny model's scores hover around 0: open filters let its masks through
TINY = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0)


def _set(widget, points=6):
    panel = widget.everything
    panel.points_spin.setValue(points)
    panel.iou_spin.setValue(0.0)
    panel.stability_spin.setValue(0.0)
    return panel


def test_segment_everything_2d_into_a_new_undoable_layer(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image, scale=(0.5, 2.0), translate=(10.0, -4.0))
    widget.set_engine(tiny_engine)
    mine = viewer.add_labels(np.full(blob_image.shape, 7, np.uint8), name="my labels")
    _set(widget)
    with qtbot.waitSignal(widget.everything_done, timeout=TIMEOUT) as blocker:
        widget.segment_everything()
    qtbot.waitUntil(lambda: widget.everything.worker is None, timeout=TIMEOUT)
    layer = blocker.args[0]
    assert layer.name == "img everything" and layer in viewer.layers
    assert layer.data.dtype == np.uint32 and layer.data.shape == blob_image.shape
    # the same labels as the API on the same image and mapping
    expected = api.segment_everything(tiny_engine, blob_image, mapping=widget.state.mappings[viewer.layers["img"].unique_id],
                                      **TINY)
    np.testing.assert_array_equal(layer.data, expected.labels)
    assert len(layer.metadata["everything"]) == len(expected.records) >= 1
    assert list(layer.features["index"])[1:] == [r.id for r in expected.records]
    # placed like the image; the user's labels untouched
    np.testing.assert_allclose(layer.scale, (0.5, 2.0))
    np.testing.assert_allclose(layer.translate, (10.0, -4.0))
    assert (mine.data == 7).all()
    assert "object(s)" in widget.status.text()
    # one napari edit: undo empties the new layer, redo brings it back
    layer.undo()
    assert not layer.data.any()
    layer.redo()
    np.testing.assert_array_equal(layer.data, expected.labels)


def test_segment_everything_3d_range_links_slices(labeler, qtbot, blob_volume, tiny_engine):
    viewer, widget = labeler(blob_volume)
    widget.set_engine(tiny_engine)
    panel = _set(widget)
    assert panel.range_check.isVisibleTo(widget)
    widget.stack.z_from.setValue(1)
    widget.stack.z_to.setValue(3)
    panel.range_check.setChecked(True)
    with qtbot.waitSignal(widget.everything_done, timeout=TIMEOUT) as blocker:
        widget.segment_everything()
    layer = blocker.args[0]
    qtbot.waitUntil(lambda: widget.everything.worker is None, timeout=TIMEOUT)
    expected = api.segment_everything_volume(
        tiny_engine, api.Stack(blob_volume, mapping=widget.state.mappings[viewer.layers["img"].unique_id]),
        z_range=(1, 4), **TINY)
    np.testing.assert_array_equal(layer.data, expected.labels)
    assert not layer.data[0].any() and not layer.data[4].any()
    # the slice on screen only, when the range is not asked for
    panel.range_check.setChecked(False)
    viewer.dims.set_current_step(0, 2)
    with qtbot.waitSignal(widget.everything_done, timeout=TIMEOUT) as blocker:
        widget.segment_everything()
    one = blocker.args[0]
    assert one is not layer and one.data[2].any() and not np.delete(one.data, 2, axis=0).any()


class SlowDecoder:
    """The tiny engine with each decoder batch stretched in time."""

    def __init__(self, engine, delay=0.2):
        self._engine, self.delay = engine, delay

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def point_candidates(self, *args, **kwargs):
        time.sleep(self.delay)
        return self._engine.point_candidates(*args, **kwargs)


def test_segment_everything_cancel_adds_nothing(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image)
    widget.set_engine(SlowDecoder(tiny_engine))
    panel = _set(widget, points=64)  # 64 batches of 64 prompts, 0.2 s each
    n_layers = len(viewer.layers)
    widget.segment_everything()
    assert panel.cancel_button.isEnabled() and not panel.run_button.isEnabled()
    qtbot.wait(500)
    widget.cancel_everything()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    assert len(viewer.layers) == n_layers
    assert "stopped" in widget.status.text().lower()
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_image_removed_while_running_keeps_the_result(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image, scale=(2.0, 3.0))
    widget.set_engine(SlowDecoder(tiny_engine, delay=0.1))
    _set(widget, points=16)  # 4 batches
    image = viewer.layers["img"]
    with qtbot.waitSignal(widget.everything_done, timeout=TIMEOUT) as blocker:
        widget.segment_everything()
        qtbot.wait(150)
        viewer.layers.remove(image)
    layer = blocker.args[0]
    assert layer in viewer.layers and viewer.layers[-1] is layer
    np.testing.assert_allclose(layer.scale, (2.0, 3.0))
    assert layer.data.shape == blob_image.shape


def test_slice_on_screen_needs_a_row_column_view(labeler, qtbot, blob_volume, tiny_engine):
    viewer, widget = labeler(blob_volume)
    widget.set_engine(tiny_engine)
    _set(widget)
    n_layers = len(viewer.layers)
    viewer.dims.order = (1, 0, 2)  # napari shows another plane: "the slice on screen" is not a SAM slice
    widget.segment_everything()
    assert widget.everything.worker is None and len(viewer.layers) == n_layers
