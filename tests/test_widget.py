"""The SAM Labeler dock widget in a real napari viewer (under Xvfb) with a tiny checkpoint."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("qtpy")

from napari_sam._qt.widget import LABELS_NAME, SamLabelerWidget  # noqa: E402

TIMEOUT = 60_000


def embed(qtbot, widget):
    with qtbot.waitSignal(widget.embedding_ready, timeout=TIMEOUT):
        widget.compute_embedding()
    qtbot.waitUntil(lambda: widget.state.embed_worker is None, timeout=TIMEOUT)


def add_point(qtbot, widget, coords):
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT) as blocker:
        widget.state.points.add(np.asarray(coords, float))
    return blocker.args[0]


def test_widget_opens_from_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    assert isinstance(widget, SamLabelerWidget)


def test_points_preview_commit_equals_engine(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [60, 70])
    expected = tiny_engine.predict(tiny_engine.embed(blob_image), points=[[60, 70]], point_labels=[1])
    np.testing.assert_array_equal(preds[0].masks, expected.masks)
    np.testing.assert_array_equal(widget.state.preview.data > 0, expected.masks[0])
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    labels = viewer.layers[LABELS_NAME]
    assert labels.data.shape == blob_image.shape
    np.testing.assert_array_equal(labels.data == 1, expected.masks[0])
    assert set(np.unique(labels.data)) == {0, 1}
    # committing clears prompts and preview
    assert len(widget.state.points.data) == 0 and not widget.state.preview.data.any()


def test_fast_decodes_run_before_the_repaint_slow_ones_in_a_worker(labeler, qtbot, blob_image, tiny_engine):
    """Issue 15: a decode measured to be fast runs at once on the GUI thread (point and mask
    in one frame, no CPU shared with napari's repaint); the first one and slow ones in a
    worker, so the event loop never waits long."""
    from napari_sam._qt.prompt_panel import INLINE_DECODE_MS

    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    panel, seen = widget.prompts, []
    widget.preview_ready.connect(seen.append)
    assert panel.ms_per_object is None
    add_point(qtbot, widget, [60, 70])  # unmeasured: in a worker, measured there
    assert panel.ms_per_object is not None and panel.ms_per_object < INLINE_DECODE_MS
    seen.clear()
    widget.state.points.add(np.asarray([20, 30], float))
    assert len(seen) == 1  # already decoded when add() returns: no event loop turn needed
    expected = tiny_engine.predict(tiny_engine.embed(blob_image), points=[[60, 70], [20, 30]],
                                   point_labels=[1, 1])
    np.testing.assert_array_equal(seen[0][0].masks, expected.masks)
    panel.ms_per_object = 10 * INLINE_DECODE_MS  # as if this machine decoded slowly
    seen.clear()
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        widget.state.points.add(np.asarray([80, 90], float))
        assert seen == []  # not on the GUI thread
    assert panel.ms_per_object < INLINE_DECODE_MS  # re-measured in the worker


def test_box_prompt(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT) as blocker:
        widget.state.boxes.add_rectangles(np.array([[30.0, 30.0], [90.0, 110.0]]))
    expected = tiny_engine.predict(tiny_engine.embed(blob_image), box=(30, 30, 90, 110))
    np.testing.assert_array_equal(blocker.args[0][0].masks, expected.masks)


def test_negative_point_changes_mask(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    first = add_point(qtbot, widget, [60, 70])
    widget.prompts.negative_check.setChecked(True)
    second = add_point(qtbot, widget, [70, 90])
    assert list(widget.state.points.features["sign"].astype(str)) == ["positive", "negative"]
    expected = tiny_engine.predict(
        tiny_engine.embed(blob_image), points=[[60, 70], [70, 90]], point_labels=[1, 0]
    )
    np.testing.assert_array_equal(second[0].masks, expected.masks)
    assert not np.array_equal(first[0].masks, second[0].masks)
    # the negative point is drawn in another colour
    colors = widget.state.points.face_color
    assert not np.allclose(colors[0], colors[1])


def test_existing_labels_kept_and_undo_restores_exactly(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    original = np.zeros(blob_image.shape, np.uint32)
    original[50:70, 60:80] = 5  # someone's earlier work, under the new object
    viewer.add_labels(original.copy(), name="mine")
    widget.state.labels_combo.setCurrentText("mine")
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [60, 70])
    mask = preds[0].masks[0]
    assert (mask & (original == 5)).any()
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT) as blocker:
        widget.commit()
    plan = blocker.args[0]
    labels = viewer.layers["mine"]
    assert plan.ids == [6] and plan.kept == int((mask & (original == 5)).sum())
    np.testing.assert_array_equal(labels.data[original == 5], 5)  # kept
    np.testing.assert_array_equal(labels.data == 6, mask & (original != 5))
    widget.undo()
    np.testing.assert_array_equal(labels.data, original)
    # Ctrl+Z goes through the same napari history: redo then undo via the layer
    labels.redo()
    assert (labels.data == 6).any()
    labels.undo()
    np.testing.assert_array_equal(labels.data, original)


def test_overwrite_and_chosen_label_id(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    original = np.zeros(blob_image.shape, np.uint32)
    original[50:70, 60:80] = 5
    viewer.add_labels(original.copy(), name="mine")
    widget.state.labels_combo.setCurrentText("mine")
    widget.labels.overwrite_check.setChecked(True)
    widget.labels.label_id_spin.setValue(42)
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [60, 70])
    widget.commit()
    data = viewer.layers["mine"].data
    np.testing.assert_array_equal(data == 42, preds[0].masks[0])


def test_multimask_candidates_and_choice(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    widget.prompts.multimask_check.setChecked(True)
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [60, 70])
    assert preds[0].masks.shape[0] == 3
    texts = [b.text() for b in widget.prompts.candidate_buttons]
    assert all("IoU" in t for t in texts) and all(b.isEnabled() for b in widget.prompts.candidate_buttons)
    assert widget.prompts.candidate_buttons[preds[0].best].isChecked()
    widget.choose_candidate(2)
    assert widget.prompts.candidate_buttons[2].isChecked()
    np.testing.assert_array_equal(widget.state.preview.data > 0, preds[0].masks[2])
    widget.commit()
    np.testing.assert_array_equal(viewer.layers[LABELS_NAME].data == 1, preds[0].masks[2])


def test_refine_replaces_only_that_label(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    start = np.zeros(blob_image.shape, np.uint32)
    start[40:80, 40:100] = 1  # rough label to refine
    start[120:140, 160:180] = 2  # another label, must stay
    viewer.add_labels(start.copy(), name="mine")
    widget.state.labels_combo.setCurrentText("mine")
    embed(qtbot, widget)
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT) as blocker:
        widget.refine_label(1)
    refined = blocker.args[0][0].masks[0]
    emb = widget.current_embedding()
    expected = widget.engine.predict(emb, box=(40, 40, 79, 99), mask_input=start == 1)
    np.testing.assert_array_equal(refined, expected.masks[0])
    corrected = add_point(qtbot, widget, [45, 45])
    widget.commit()
    data = viewer.layers["mine"].data
    np.testing.assert_array_equal(data == 1, corrected[0].masks[0] & (start != 2))
    np.testing.assert_array_equal(data == 2, start == 2)


def test_stack_on_chosen_slice(labeler, qtbot, blob_volume, tiny_engine):
    from napari_sam.preprocess import resolve_intensity

    viewer, widget = labeler(blob_volume)
    viewer.dims.set_current_step(0, 3)
    assert widget.current_slice() == 3
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [3, 60, 75])
    mapping = resolve_intensity(blob_volume, multichannel=False)
    expected = tiny_engine.predict(tiny_engine.embed(blob_volume[3], mapping=mapping), points=[[60, 75]])
    np.testing.assert_array_equal(preds[0].masks, expected.masks)
    widget.commit()
    labels = viewer.layers[LABELS_NAME].data
    assert labels.shape == blob_volume.shape
    np.testing.assert_array_equal(labels[3] == 1, expected.masks[0])
    assert not labels[[0, 1, 2, 4]].any()
    # a point on another slice embeds that slice on demand
    viewer.dims.set_current_step(0, 1)
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        widget.state.points.add(np.array([1.0, 60, 70]))
    assert widget.state.preview_slice == 1


def test_scaled_translated_layer(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image, scale=(2.0, 0.5), translate=(10.0, -5.0),
                             metadata={"dicom": {"series_uid": "1.2.3"}})
    embed(qtbot, widget)
    world = np.array([10 + 60 * 2.0, -5 + 70 * 0.5])  # the pixel (60, 70) in world units
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT) as blocker:
        widget.state.points.add(widget.state.points.world_to_data(world))
    expected = tiny_engine.predict(tiny_engine.embed(blob_image), points=[[60, 70]])
    np.testing.assert_array_equal(blocker.args[0][0].masks, expected.masks)
    widget.commit()
    labels = viewer.layers[LABELS_NAME]
    np.testing.assert_allclose(labels.scale, (2.0, 0.5))
    np.testing.assert_allclose(labels.translate, (10.0, -5.0))
    assert labels.metadata["dicom"]["series_uid"] == "1.2.3"  # geometry travels to the labels
    np.testing.assert_array_equal(labels.data == 1, expected.masks[0])


class SlowEngine:
    """The real tiny engine, with each encoder step stretched in time (for cancel/liveness)."""

    def __init__(self, engine, delay=0.05, extra_steps=40):
        self._engine, self.delay, self.extra = engine, delay, extra_steps

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def embed_steps(self, image, **kwargs):
        for i in range(self.extra):
            time.sleep(self.delay)
            yield i, self.extra
        return (yield from self._engine.embed_steps(image, **kwargs))


def test_cancel_during_encoding(labeler, qtbot, blob_image, tiny_engine):
    viewer, widget = labeler(blob_image)
    widget.set_engine(SlowEngine(tiny_engine))
    widget.compute_embedding()
    assert widget.model.cancel_button.isEnabled() and not widget.model.embed_button.isEnabled()
    qtbot.wait(200)
    with qtbot.waitSignal(widget.embedding_cancelled, timeout=TIMEOUT):
        widget.cancel_embedding()
    qtbot.waitUntil(lambda: widget.state.embed_worker is None, timeout=TIMEOUT)
    assert widget.current_embedding() is None
    assert widget.model.embed_button.isEnabled() and not widget.model.cancel_button.isEnabled()
    assert "cancelled" in widget.status.text().lower()


def test_event_loop_keeps_running_while_encoding(labeler, qtbot, blob_image, tiny_engine):
    from qtpy.QtCore import QTimer

    viewer, widget = labeler(blob_image)
    widget.set_engine(SlowEngine(tiny_engine, delay=0.05, extra_steps=30))  # ~1.5 s encode
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    start = time.perf_counter()
    with qtbot.waitSignal(widget.embedding_ready, timeout=TIMEOUT):
        widget.compute_embedding()
    elapsed = time.perf_counter() - start
    timer.stop()
    assert elapsed > 1.0
    # a frozen GUI thread would deliver (almost) no ticks during the encode
    assert len(ticks) > 0.5 * elapsed / 0.02, (len(ticks), elapsed)
    assert max(np.diff(ticks)) < 0.5


def test_missing_weights_reported_and_widget_stays_usable(labeler, qtbot, blob_image, tiny_sam_dir):
    viewer, widget = labeler(blob_image)
    widget.model.model_edit.setText("/no/such/sam_vit_l.pth")
    widget.compute_embedding()
    qtbot.waitUntil(lambda: widget.state.embed_worker is None, timeout=TIMEOUT)
    assert "Error" in widget.status.text() and "sam_vit_l.pth" in widget.status.text()
    assert widget.model.embed_button.isEnabled()
    widget.model.model_edit.setText(str(tiny_sam_dir))
    embed(qtbot, widget)
    assert widget.current_embedding() is not None


def test_unsupported_layer_is_reported(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 3, 16, 16), np.uint8), name="4d")
    widget = SamLabelerWidget(viewer)
    assert "2D images and 3D stacks" in widget.status.text()
    widget.compute_embedding()  # a notification, no exception
    assert widget.state.embed_worker is None


def test_screenshot_with_committed_label(labeler, qtbot, tmp_path):
    from skimage import data, io

    cell = data.cell()
    viewer, widget = labeler(cell)
    embed(qtbot, widget)
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        widget.state.boxes.add_rectangles(np.array([[250.0, 300.0], [520.0, 540.0]]))
    widget.commit()
    assert viewer.layers[LABELS_NAME].data.any()
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        widget.state.points.add(np.array([200.0, 150.0]))
    viewer.window._qt_window.resize(1400, 900)
    qtbot.wait(200)
    out = os.environ.get("NAPARI_SAM_SCREENSHOT") or str(tmp_path / "labeler.png")
    viewer.screenshot(out, canvas_only=False)
    shot = io.imread(out)
    assert shot.shape[0] > 400 and shot.shape[1] > 600 and shot[..., :3].std() > 10
    # the committed label is visible: the labels colormap puts non-gray pixels on the canvas
    rgb = shot[..., :3].astype(int)
    colourful = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])) > 60
    assert colourful.sum() > 1000


def test_new_labels_layer_sits_under_prompts_and_points_stay_active(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    add_point(qtbot, widget, [60, 70])
    widget.commit()
    names = [layer.name for layer in viewer.layers]
    assert names.index(LABELS_NAME) == names.index("img") + 1
    assert viewer.layers.selection.active is widget.state.points
    assert widget.state.points.mode == "add"


def _click(layer, position, modifiers=()):
    """Press and release at ``position`` (world) through napari's own mouse dispatch."""
    from dataclasses import dataclass, field

    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    @dataclass
    class Event:
        type: str
        position: tuple
        modifiers: list = field(default_factory=list)
        is_dragging: bool = False
        button: int = 1
        pos: np.ndarray = field(default_factory=lambda: np.zeros(2))
        view_direction: object = None
        up_direction: object = None
        dims_displayed: list = field(default_factory=lambda: [0, 1])
        handled: bool = False

    for kind, dispatch in (("mouse_press", mouse_press_callbacks), ("mouse_release", mouse_release_callbacks)):
        event = Event(type=kind, position=tuple(position), modifiers=list(modifiers))
        dispatch(layer, ReadOnlyWrapper(event, exceptions=("handled",)))


def test_ctrl_click_adds_a_negative_point(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        _click(widget.state.points, (60, 70))
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        _click(widget.state.points, (70, 90), modifiers=["Control"])
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        _click(widget.state.points, (50, 60))
    assert list(widget.state.points.features["sign"].astype(str)) == ["positive", "negative", "positive"]


def test_keys_enter_and_1_2_3(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    widget.prompts.multimask_check.setChecked(True)
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [60, 70])
    def press(key):  # what pressing ``key`` with the points layer active runs
        binding = next(v for k, v in widget.state.points.keymap.items() if str(k) == key)
        binding(widget.state.points)

    press("2")
    assert widget.prompts.candidate_buttons[1].isChecked()
    press("Enter")
    np.testing.assert_array_equal(viewer.layers[LABELS_NAME].data == 1, preds[0].masks[1])
    press("Ctrl+Z")  # undo the commit while still prompting
    assert not viewer.layers[LABELS_NAME].data.any()
    press("Ctrl+Shift+Z")
    np.testing.assert_array_equal(viewer.layers[LABELS_NAME].data == 1, preds[0].masks[1])
    add_point(qtbot, widget, [60, 70])
    press("Escape")
    assert len(widget.state.points.data) == 0 and not widget.state.preview.data.any()


def test_stale_decode_results_are_dropped(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [60, 70])
    shown = widget.state.preview.data.copy()
    fake = [type(preds[0])(masks=~preds[0].masks, scores=preds[0].scores, logits=preds[0].logits)]
    with qtbot.assertNotEmitted(widget.preview_ready):
        widget.prompts._on_decoded(widget.state.decode_seq - 1, None, [], fake)  # an older request
    np.testing.assert_array_equal(widget.state.preview.data, shown)


def test_rgb_image(labeler, qtbot, blob_image, tiny_engine):
    rgb = np.stack([blob_image, blob_image // 2, 255 - blob_image], axis=-1)
    viewer, widget = labeler(rgb)
    assert viewer.layers["img"].rgb
    embed(qtbot, widget)
    preds = add_point(qtbot, widget, [60, 70])
    expected = tiny_engine.predict(tiny_engine.embed(rgb), points=[[60, 70]])
    np.testing.assert_array_equal(preds[0].masks, expected.masks)
    widget.commit()
    assert viewer.layers[LABELS_NAME].data.shape == blob_image.shape


def test_embed_stack_fills_the_cache_and_serves_slices(labeler, qtbot, blob_volume):
    viewer, widget = labeler(blob_volume)
    assert widget.stack.isEnabled() and widget.stack.z_to.value() == 4
    widget.stack.z_from.setValue(1)
    widget.stack.z_to.setValue(3)
    with qtbot.waitSignal(widget.stack_embedded, timeout=TIMEOUT) as blocker:
        widget.embed_stack()
    assert blocker.args[0] == (3, 5)
    assert widget.stack.cached_label.text() == "cached: 3/5 slices"
    qtbot.waitUntil(lambda: widget.state.stack_worker is None, timeout=TIMEOUT)
    assert widget.cache.stats().entries == 3
    hits = widget.cache.hits
    viewer.dims.set_current_step(0, 2)
    embed(qtbot, widget)  # slice 2 comes from the cache, not the encoder
    assert widget.cache.hits == hits + 1
    widget.stack.z_from.setValue(0)
    widget.stack.z_to.setValue(4)
    with qtbot.waitSignal(widget.stack_embedded, timeout=TIMEOUT) as blocker:
        widget.embed_stack()
    assert blocker.args[0] == (5, 5)


def test_cancel_embed_stack(labeler, qtbot, blob_volume, tiny_engine):
    viewer, widget = labeler(blob_volume)

    class SlowEncoder(SlowEngine):
        def encode_steps(self, images):
            for i in range(20):
                time.sleep(0.05)
                yield i, 40
            return (yield from self._engine.encode_steps(images))

    widget.set_engine(SlowEncoder(tiny_engine))
    widget.embed_stack()
    qtbot.wait(300)
    widget.cancel_stack_work()
    qtbot.waitUntil(lambda: widget.state.stack_worker is None, timeout=TIMEOUT)
    assert widget.cache.stats().entries < 5
    assert "Stopped" in widget.status.text() and widget.stack.embed_stack_button.isEnabled()


def test_propagate_through_the_stack_with_one_undo(labeler, qtbot, blob_volume, monkeypatch):
    from napari_sam.propagate import StopRule

    monkeypatch.setattr(StopRule, "check", lambda self, score, area, prev: None if area else "vanished")
    viewer, widget = labeler(blob_volume)
    viewer.dims.set_current_step(0, 2)
    embed(qtbot, widget)
    with qtbot.waitSignal(widget.preview_ready, timeout=TIMEOUT):
        widget.state.boxes.add_rectangles(np.array([[2, 30.0, 30], [2, 30, 110], [2, 90, 110], [2, 90, 30]]))
    widget.commit()
    labels = viewer.layers[LABELS_NAME]
    labels.data[0, :5, :5] = 9  # another label that must survive
    before = labels.data.copy()
    assert widget.state.seed_slices[labels.unique_id] == {1: {2}}
    with qtbot.waitSignal(widget.propagated, timeout=TIMEOUT) as blocker:
        widget.propagate()
    summary = blocker.args[0]
    assert sorted(summary.slices[1]) == [0, 1, 3, 4]
    assert all(labels.data[z].max() >= 1 for z in range(5))
    np.testing.assert_array_equal(labels.data[2], before[2])  # the seed slice is unchanged
    np.testing.assert_array_equal(labels.data[0, :5, :5], 9)
    widget.undo()  # one step undoes the whole propagation
    np.testing.assert_array_equal(labels.data, before)


def test_propagate_without_labels_is_reported(labeler, qtbot, blob_volume):
    viewer, widget = labeler(blob_volume)
    viewer.add_labels(np.zeros(blob_volume.shape, np.uint8), name="empty")
    widget.state.labels_combo.setCurrentText("empty")
    widget.propagate()
    assert widget.state.stack_worker is None


def test_sam_contrast_presets_and_custom_window(labeler, qtbot, tiny_engine):
    from napari_sam.preprocess import resolve_intensity
    from napari_sam.samples import ct_phantom

    vol = ct_phantom((4, 96, 96))
    original = vol.copy()
    viewer, widget = labeler(vol)
    layer = viewer.layers["img"]
    viewer.dims.set_current_step(0, 2)
    embed(qtbot, widget)
    auto = widget.current_embedding()
    assert auto.mapping.mode == "percentile"

    widget.model.contrast_combo.setCurrentIndex(widget.model.contrast_combo.findData("lung"))
    assert widget.current_embedding() is None  # another contrast: not reused
    assert tuple(layer.contrast_limits) == (-1350.0, 150.0)
    embed(qtbot, widget)
    lung = widget.current_embedding()
    assert lung.mapping == resolve_intensity(vol, preset="lung")
    expected = tiny_engine.embed(vol[2], mapping=resolve_intensity(vol, preset="lung"))
    np.testing.assert_allclose(lung.features.numpy(), expected.features.numpy(), atol=1e-3)
    assert not np.allclose(lung.features.numpy(), auto.features.numpy())

    widget.model.contrast_combo.setCurrentText("custom window")
    assert widget.model.center_spin.isEnabled()
    widget.model.center_spin.setValue(300.0)
    widget.model.width_spin.setValue(1000.0)
    widget.model.on_contrast_changed()
    assert tuple(layer.contrast_limits) == (-200.0, 800.0)
    assert widget.state.mappings[layer.unique_id].lows == (-200.0,)
    np.testing.assert_array_equal(layer.data, original)  # stored HU never change


def test_ct_from_dicom_starts_with_its_window(make_napari_viewer, qtbot, tmp_path):
    from napari_sam.io.dicom import read_dicom_series, write_dicom_series
    from napari_sam.samples import ct_phantom

    write_dicom_series(tmp_path / "ct", ct_phantom((3, 64, 64)))
    vol = read_dicom_series(tmp_path / "ct")
    viewer = make_napari_viewer()
    layer = viewer.add_image(vol.data, **vol.layer_metadata())
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    assert widget.model.contrast_combo.currentText() == "custom window"
    assert (widget.model.center_spin.value(), widget.model.width_spin.value()) == (40.0, 400.0)
    mapping = widget.state.mappings[layer.unique_id]
    assert mapping.mode == "window" and (mapping.lows, mapping.highs) == ((-160.0,), (240.0,))


def test_demo_puts_the_chosen_model_into_the_widget(make_napari_viewer, tiny_sam_dir):
    """`napari-sam demo --model PATH` docks the labeler with PATH as its model."""
    from napari_sam._qt.demo import dock_plugin

    viewer = make_napari_viewer()
    ((_dock, widget),) = dock_plugin(viewer, model=tiny_sam_dir)
    assert widget.model.model_edit.text() == str(tiny_sam_dir)


def test_cancel_while_the_encoder_is_exported_stops_the_export(labeler, qtbot, blob_image, tmp_path, monkeypatch):
    """The first load exports the encoder in a child process; Cancel stops that child."""
    pytest.importorskip("openvino")
    encoders = tmp_path / "encoders"
    monkeypatch.setenv("NAPARI_SAM_ENCODERS", str(encoders))
    viewer, widget = labeler(blob_image)
    widget.model.backend_combo.setCurrentText("openvino")
    widget.compute_embedding()
    qtbot.waitUntil(lambda: "Exporting" in widget.status.text(), timeout=TIMEOUT)
    with qtbot.waitSignal(widget.embedding_cancelled, timeout=TIMEOUT):
        widget.cancel_embedding()
    qtbot.waitUntil(lambda: widget.state.embed_worker is None, timeout=TIMEOUT)
    assert "cancelled" in widget.status.text().lower() and widget.current_embedding() is None
    assert not encoders.exists() or not any(encoders.iterdir())  # the child stopped before finishing
