"""The "3D stack" panel: embed a slice range into the cache, propagate labels through it.

Both run in one worker at a time (progress bar, Cancel) over the public API
(:class:`napari_sam.api.Stack`, :func:`napari_sam.api.propagate_labels`); propagation
writes into a copy and lands in the labels layer as one undo step.
"""

from __future__ import annotations

import numpy as np
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel, QPushButton, QSpinBox

from ..api import Stack, StopRule, propagate_labels
from .controls import advance, button, combo, fit_width, row
from .state import LabelerState, load_engine


class StackPanel(QGroupBox):
    """Slice range, Embed stack / Cancel, cached count; direction, min IoU, Propagate."""

    def __init__(self, state: LabelerState, host):
        super().__init__("3D stack")
        self.state, self.host = state, host
        self._progress = None
        form = QFormLayout(self)
        self.z_from = QSpinBox()
        self.z_to = QSpinBox()
        form.addRow("From slice", self.z_from)
        form.addRow("to slice", self.z_to)
        self.embed_stack_button = button(
            "Embed stack", self.embed_stack, tooltip="Embed the slice range into the cache (resumable)")
        self.cancel_button = button("Cancel", self.cancel, enabled=False)
        form.addRow(row(self.embed_stack_button, self.cancel_button))
        self.cached_label = QLabel("cached: –")
        self.cached_label.setWordWrap(True)
        form.addRow(self.cached_label)
        self.direction_combo = combo(["both", "up", "down"], tooltip="'up' is increasing slice index")
        self.min_iou_spin = QDoubleSpinBox()
        self.min_iou_spin.setRange(0.0, 1.0)
        self.min_iou_spin.setSingleStep(0.05)
        self.min_iou_spin.setValue(0.5)
        self.min_iou_spin.setToolTip("Stop an object when SAM's predicted IoU falls below this")
        form.addRow("Direction", self.direction_combo)
        form.addRow("min IoU", self.min_iou_spin)
        self.selected_only_check = QCheckBox("Only the selected label")
        form.addRow(self.selected_only_check)
        self.propagate_button = QPushButton("Propagate from this slice")
        fit_width(self.propagate_button)
        self.propagate_button.clicked.connect(self.propagate)
        form.addRow(self.propagate_button)
        self.show_for(None)

    def show_for(self, layer) -> None:
        """Shown for 3D layers only (keeps the dock short for 2D); the range is the whole stack."""
        is_stack = layer is not None and layer.ndim == 3
        self.setEnabled(is_stack)
        self.setVisible(is_stack)
        if is_stack:
            last = int(layer.data.shape[0]) - 1
            for spin in (self.z_from, self.z_to):
                spin.setRange(0, last)
            self.z_from.setValue(0)
            self.z_to.setValue(last)
            self.cached_label.setText("cached: press Embed stack to embed and count")

    def _busy(self, busy: bool) -> None:
        self.embed_stack_button.setEnabled(not busy)
        self.propagate_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def _start_worker(self, layer, requested, body, on_done, desc: str) -> None:
        """Run ``body(engine, stack)`` (a generator of (text, done, total)) in a worker.

        The worker loads the model if needed and builds the Stack (one intensity mapping
        for the volume); on success the engine and mapping are kept for later work.
        """
        state = self.state
        engine, mapping = state.engine, state.mappings.get(layer.unique_id)
        data, uid = layer.data, layer.unique_id
        options = state.intensity_options(layer)

        def work():
            loaded = engine
            if loaded is None:
                yield ("Loading model …", 0, 1)
                loaded = load_engine(requested, state.set_status)
            stack = Stack(data, mapping=mapping, **({} if mapping is not None else options))
            result = yield from body(loaded, stack)
            return loaded, stack.mapping, result

        def returned(value):
            loaded, used_mapping, result = value
            state.use_engine(loaded, requested)
            state.mappings[uid] = used_mapping
            on_done(result)

        self._busy(True)
        self._progress = progress(total=0, desc=desc)
        state.stack_worker = create_worker(work, _connect={
            "yielded": self._on_progress,
            "returned": returned,
            "errored": state.report_error,
            "aborted": lambda: state.set_status("Stopped; nothing was written (embedded slices stay cached)."),
            "finished": self._on_finished,
        })

    def _on_progress(self, value) -> None:
        text, done, total = value
        if self._progress is None:
            return
        advance(self._progress, done, total)
        self.state.set_status(text)

    def _on_finished(self) -> None:
        self.state.stack_worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._busy(False)

    def cancel(self) -> None:
        """Stop "Embed stack" or "Propagate" at the next step."""
        if self.state.stack_worker is not None:
            self.state.stack_worker.quit()

    def _inputs(self):
        state = self.state
        layer = state.image_layer
        if layer is None or layer.ndim != 3 or state.unsupported(layer):
            show_warning("SAM Labeler: choose a 3D image layer (Z, Y, X).")
            return None
        if state.stack_worker is not None or state.embed_worker is not None:
            show_info("SAM Labeler: wait for the running task (or cancel it).")
            return None
        requested = self.host.model.requested_engine()
        lo, hi = self.z_from.value(), self.z_to.value()
        if lo > hi:
            show_warning(f"SAM Labeler: slice range {lo} to {hi} is empty.")
            return None
        return layer, requested, (lo, hi)

    def embed_stack(self) -> None:
        """Embed the chosen slice range into the cache in a worker (progress, Cancel)."""
        inputs = self._inputs()
        if inputs is None:
            return
        layer, requested, (lo, hi) = inputs
        state = self.state
        cache = state.cache

        def body(engine, stack):
            n = hi - lo + 1
            for step in stack.encode(engine, cache, range(lo, hi + 1)):
                status = "cached" if step.cached else "embedded"
                value = step.done if step.fraction == 1.0 else step.done + step.fraction
                yield (f"Slice {step.index}: {status} ({step.done}/{n})", value, n)
            return sum(cache.contains(stack.key(z, engine)) for z in range(len(stack))), len(stack)

        def done(result):
            cached, total = result
            self.cached_label.setText(f"cached: {cached}/{total} slices")
            state.set_status(f"Slices {lo}-{hi} embedded; {cached} of {total} slices are in the cache.")
            state.stack_embedded.emit((cached, total))

        self._start_worker(layer, requested, body, done, f"SAM: embedding slices {lo}-{hi}")

    def propagate(self) -> None:
        """Propagate the labels on this slice through the slice range (one undo step)."""
        inputs = self._inputs()
        if inputs is None:
            return
        layer, requested, z_range = inputs
        state = self.state
        target = state.labels_layer
        if target is None or tuple(target.data.shape) != state.spatial_shape(layer):
            show_warning("SAM Labeler: choose a labels layer with the image's shape (commit a label first).")
            return
        z = state.current_slice(layer)
        current = np.asarray(target.data[z])
        if self.selected_only_check.isChecked():
            ids = [int(target.selected_label)]
        else:
            ids = [int(i) for i in np.unique(current) if i != 0]
        ids = [i for i in ids if (current == i).any()]
        if not ids:
            show_warning(f"SAM Labeler: no labels on slice {z} to propagate.")
            return
        seeds = state.seed_slices.get(target.unique_id, {})
        seed_slices = sorted({z} | {s for i in ids for s in seeds.get(i, ())})
        original = np.array(target.data)
        work_labels = original.copy()
        cache = state.cache
        direction = self.direction_combo.currentText()
        rule = StopRule(min_iou=self.min_iou_spin.value())
        overwrite = self.host.labels.overwrite_check.isChecked()

        def body(engine, stack):
            steps = propagate_labels(
                engine, stack, work_labels, seed_slices=seed_slices, ids=ids, cache=cache, start=z,
                direction=direction, z_range=z_range, rule=rule, overwrite=overwrite,
            )
            span = max(z - z_range[0], z_range[1] - z, 1)
            n = 0
            while True:
                try:
                    step = next(steps)
                except StopIteration as stop:
                    return stop.value
                n += 1
                yield (f"Propagating: slice {step.z} ({len(step.masks)} object(s))", min(n, span), span)

        def done(summary):
            # pixels changed meanwhile (a commit while propagating) are the user's: kept
            changed = np.nonzero((work_labels != original) & (np.asarray(target.data) == original))
            if changed[0].size:
                target.data_setitem(changed, work_labels[changed])  # one undo step
                self.host.autosave.saved(target, np.unique(changed[0]).tolist())
            reached = sorted({zz for zs in summary.slices.values() for zz in zs})
            where = f"slices {reached[0]}-{reached[-1]}" if reached else "no other slice"
            state.set_status(f"Propagated label(s) {', '.join(map(str, ids))} to {where}. Ctrl+Z reverts.")
            state.propagated.emit(summary)

        self._start_worker(layer, requested, body, done, f"SAM: propagating from slice {z}")
