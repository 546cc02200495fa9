"""The "Prompts" panel: the points/boxes/preview layers, live decoding, multimask candidates.

Each prompt change decodes in a short worker from the kept embedding; a result is dropped
if newer prompts exist (a sequence number), so the preview always shows the latest prompts.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Points, Shapes
from napari.qt.threading import create_worker
from qtpy.QtWidgets import QCheckBox, QFormLayout, QGroupBox, QHBoxLayout, QPushButton

from .. import annotate
from .controls import fit_width
from .placement import drawn_placement
from .state import BOXES_NAME, NEGATIVE, OWN_MARK, POINTS_NAME, POSITIVE, PREVIEW_NAME, LabelerState

# A decode measured to take at most this long (per object, times the objects) runs on the
# GUI thread, before napari repaints the click: the two then do not share the CPU and point
# and mask appear together (docs/performance.md). Slower ones, and the first (unmeasured)
# one, run in a worker, so the event loop never waits longer than about this.
INLINE_DECODE_MS = 90.0

class _ImageExtent:
    """A prompt layer that, while empty, spans its image instead of napari's default
    512-pixel world: napari's *New labels layer* (sized from the active layer), *reset view*
    and the sliders then see exactly the image, as without the plugin."""

    image_extent = None  # (2, ndim) in the layer's data coordinates, set by PromptPanel

    @property
    def _extent_data(self) -> np.ndarray:
        extent = super()._extent_data
        if self.image_extent is not None and np.isnan(extent).all():
            return np.array(self.image_extent, float)
        return extent


class PromptPoints(_ImageExtent, Points):
    _type_string = "points"  # napari names types by class: icons, writers, as_layer_data_tuple


class PromptBoxes(_ImageExtent, Shapes):
    _type_string = "shapes"


class PromptPanel(QGroupBox):
    """Negative-point toggle, multimask and candidates; owns prompt decoding and the preview."""

    def __init__(self, state: LabelerState, host):
        super().__init__("Prompts")
        self.state, self.host = state, host
        self.ms_per_object: float | None = None  # the last decode's time, per prompt set
        form = QFormLayout(self)
        self.negative_check = QCheckBox("Negative points (Ctrl-click)")
        self.negative_check.toggled.connect(self._on_negative_toggled)
        form.addRow(self.negative_check)
        self.multimask_check = QCheckBox("Multimask (keys 1/2/3)")
        self.multimask_check.setToolTip("SAM returns 3 candidate masks; choose one with the buttons or keys 1/2/3")
        self.multimask_check.toggled.connect(lambda _checked: self.request_decode())
        form.addRow(self.multimask_check)
        cand_row = QHBoxLayout()
        self.candidate_buttons = []
        for i in range(3):
            candidate = QPushButton(f"{i + 1}")
            fit_width(candidate)
            candidate.setCheckable(True)
            candidate.setEnabled(False)
            candidate.clicked.connect(partial(self.choose_candidate, i))
            cand_row.addWidget(candidate)
            self.candidate_buttons.append(candidate)
        form.addRow("Candidates", cand_row)

    # --- the plugin's layers ------------------------------------------------------------

    def ensure_layers(self, image: Image) -> None:
        """Points, boxes and preview layers matching ``image`` (dimensions, shape, placement)."""
        state, viewer = self.state, self.state.viewer
        nd = image.ndim
        where = drawn_placement(image)  # the image as napari draws it (placement.py)
        spatial = state.spatial_shape(image)
        if state.points is None or state.points.ndim != nd:
            if state.points is not None:
                viewer.layers.remove(state.points)
            features = pd.DataFrame({"sign": pd.Categorical([], categories=[POSITIVE, NEGATIVE])})
            size = max(3.0, max(spatial[-2:]) / 80)
            state.points = PromptPoints(
                np.empty((0, nd)), ndim=nd, name=POINTS_NAME, features=features,
                feature_defaults={"sign": POSITIVE}, face_color="sign",
                face_color_cycle=["#33ff33", "#ff3333"], border_color="white", size=size, **where,
                metadata={OWN_MARK: "points"},
            )
            state.points.events.data.connect(self._on_prompts_changed)
            state.points.mouse_drag_callbacks.insert(0, self._on_points_press)
            viewer.add_layer(state.points)
        if state.boxes is None or state.boxes.ndim != nd:
            if state.boxes is not None:
                viewer.layers.remove(state.boxes)
            state.boxes = PromptBoxes(
                ndim=nd, name=BOXES_NAME, edge_color="yellow", face_color="transparent",
                edge_width=max(1.0, max(spatial[-2:]) / 300), **where, metadata={OWN_MARK: "boxes"},
            )
            state.boxes.events.data.connect(self._on_prompts_changed)
            viewer.add_layer(state.boxes)
            state.boxes.mode = "add_rectangle"
        if state.preview is None or state.preview.data.shape != spatial:
            if state.preview is not None:
                viewer.layers.remove(state.preview)
            state.preview = Labels(
                np.zeros(spatial, np.uint8), name=PREVIEW_NAME, opacity=0.55, **where,
                metadata={OWN_MARK: "preview"},
            )
            viewer.add_layer(state.preview)
        extent = np.array([[0] * nd, [n - 1 for n in spatial]], float)
        for layer in (state.points, state.boxes):
            layer.image_extent = extent
            layer.refresh()  # napari caches the extent
        labels = self.host.labels
        for layer in (state.points, state.boxes, state.preview):
            for name, value in where.items():  # the image may have moved since
                setattr(layer, name, value)
            # Ctrl+Z must undo the labels edit while the user is prompting, not only when
            # the labels layer is the active one (where napari binds it).
            for key, func in (("Enter", labels.commit), ("Escape", self.clear_prompts),
                              ("Control-Z", labels.undo), ("Control-Shift-Z", labels.redo)):
                layer.bind_key(key, lambda _layer, f=func: f(), overwrite=True)
            for i in range(3):
                layer.bind_key(str(i + 1), lambda _layer, i=i: self.choose_candidate(i), overwrite=True)
        viewer.layers.selection.active = state.points
        state.points.mode = "add"
        self._on_negative_toggled(self.negative_check.isChecked())

    def _on_points_press(self, layer, event):
        """Set the sign of the point this press may add: Ctrl-click or the toggle = negative.

        Set on every press because napari copies the features of the last added (and
        selected) point into ``feature_defaults``.
        """
        if layer.mode == "add":
            negative = self.negative_check.isChecked() or "Control" in event.modifiers
            layer.feature_defaults["sign"] = NEGATIVE if negative else POSITIVE

    def _on_negative_toggled(self, negative: bool) -> None:
        if self.state.points is not None:
            self.state.points.feature_defaults["sign"] = NEGATIVE if negative else POSITIVE

    def _on_prompts_changed(self, event=None) -> None:
        if getattr(event, "action", None) in ("adding", "removing", "changing"):
            return  # wait for the completed event
        self.request_decode()

    def on_slice_changed(self, event=None) -> None:
        image = self.state.image_layer
        if image is not None and image.ndim == 3:
            self.request_decode()

    # --- decoding and preview ---------------------------------------------------------

    def request_decode(self) -> None:
        """Decode the prompts on the current slice from the kept embedding (in a worker)."""
        state = self.state
        layer = state.image_layer
        if layer is None or state.unsupported(layer):
            return
        problem = state.view_problem(layer)
        if problem:
            self.invalidate_preview()
            state.set_status(problem)
            return
        state.decode_seq += 1
        seq = state.decode_seq
        z = state.current_slice(layer)
        pts, labels, boxes = state.prompts_on_slice(z)
        prompts = annotate.group_prompts(pts, labels, boxes)
        if state.refine_label is not None:
            prompts = self.host.labels.refine_prompts(z, pts, labels)
        if not prompts:
            self.show_preview(z, [], [])
            return
        embedding = state.current_embedding()
        if embedding is None:
            state.decode_after_embed = True
            self.host.model.compute_embedding()
            return
        multimask = self.multimask_check.isChecked()
        engine = state.engine
        if self.ms_per_object is not None and self.ms_per_object * len(prompts) <= INLINE_DECODE_MS:
            # Measured fast enough: decode now, before napari repaints the new point, so the
            # two do not share the CPU and point and mask appear in one frame.
            try:
                predictions = self._timed_decode(engine, embedding, prompts, multimask)
            except Exception as exc:  # noqa: BLE001 - reported like a worker's error
                state.report_error(exc)
                return
            self._on_decoded(seq, z, prompts, predictions)
            return
        create_worker(self._timed_decode, engine, embedding, prompts, multimask, _connect={
            "returned": partial(self._on_decoded, seq, z, prompts),
            "errored": state.report_error,
        })

    def _timed_decode(self, engine, embedding, prompts, multimask):
        start = time.perf_counter()
        predictions = engine.predict_batch(embedding, prompts, multimask=multimask)
        self.ms_per_object = 1000 * (time.perf_counter() - start) / len(prompts)
        return predictions

    def _on_decoded(self, seq, z, prompts, predictions) -> None:
        if seq != self.state.decode_seq:
            return  # newer prompts exist: this result is stale
        self.state.choice = None
        self.show_preview(z, prompts, predictions)
        self.state.preview_ready.emit(predictions)

    def _chosen(self, prediction) -> int:
        if self.multimask_check.isChecked() and len(prediction.scores) > 1:
            return self.state.choice if self.state.choice is not None else prediction.best
        return 0

    def chosen_masks(self) -> list[np.ndarray]:
        """The mask each object would commit now (after the candidate choice)."""
        return [p.masks[self._chosen(p)] for p in self.state.predictions]

    def show_preview(self, z, prompts, predictions) -> None:
        state = self.state
        previous = state.preview_slice
        state.objects, state.predictions, state.preview_slice = list(prompts), list(predictions), z
        if state.preview is not None:
            data = state.preview.data
            if previous is not None and previous != z and previous < data.shape[0]:
                data[previous] = 0  # the preview shows one slice at a time
            view = data if z is None else data[z]
            view[...] = 0
            for i, mask in enumerate(self.chosen_masks()):
                view[mask & (view == 0)] = i % 255 + 1  # colours only: any number of objects fits uint8
            state.preview.refresh()
        self._update_candidate_buttons()
        if predictions:
            scores = ", ".join(f"{p.scores[self._chosen(p)]:.2f}" for p in predictions)
            state.set_status(f"{len(predictions)} object(s), predicted IoU {scores}. Enter commits.")

    def _update_candidate_buttons(self) -> None:
        predictions = self.state.predictions
        single = len(predictions) == 1 and self.multimask_check.isChecked()
        scores = predictions[0].scores if single else []
        chosen = self._chosen(predictions[0]) if single else None
        for i, candidate in enumerate(self.candidate_buttons):
            enabled = single and i < len(scores)
            candidate.setEnabled(enabled)
            candidate.setChecked(enabled and i == chosen)
            candidate.setText(f"{i + 1}: IoU {scores[i]:.2f}" if enabled else f"{i + 1}")

    def choose_candidate(self, index: int) -> None:
        """Pick multimask candidate ``index`` (0-2) for the preview and the commit."""
        state = self.state
        if not state.predictions or not self.multimask_check.isChecked():
            return
        if index >= len(state.predictions[0].scores):
            return
        state.choice = index
        self.show_preview(state.preview_slice, state.objects, state.predictions)

    def invalidate_preview(self) -> None:
        state = self.state
        state.decode_seq += 1
        state.predictions, state.objects = [], []
        if state.preview is not None:
            state.preview.data[...] = 0
            state.preview.refresh()
        self._update_candidate_buttons()

    def clear_prompts(self) -> None:
        """Remove all points and boxes and the preview (Esc)."""
        state = self.state
        self.invalidate_preview()
        if state.points is not None and len(state.points.data):
            state.points.data = np.empty((0, state.points.ndim))
        if state.boxes is not None and len(state.boxes.data):
            state.boxes.data = []
        self.invalidate_preview()
