"""The "Segment everything" panel: SAM's automatic mask generation into a new labels layer.

A grid of point prompts is decoded from the cached embedding of the image, of the slice
on screen or of every slice in the 3D panel's range (objects linked across slices), in a
worker with progress and Cancel, over :func:`napari_sam.api.segment_everything_steps` /
:func:`~napari_sam.api.segment_everything_volume_steps`. The result never touches an
existing layer: it lands in a new labels layer placed like the image, written as one
napari edit (Ctrl+Z on that layer empties it; deleting the layer removes it).
"""

from __future__ import annotations

import numpy as np
from napari.layers import Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QFormLayout, QGroupBox, QSpinBox

from ..api import EverythingParams, Stack, segment_everything_steps, segment_everything_volume_steps
from .controls import WorkerTask, button, row
from .placement import placement
from .state import LabelerState, load_engine

EVERYTHING_SUFFIX = "everything"


def _spin(low, high, value, tip, step=None, decimals=None):
    spin = QDoubleSpinBox() if decimals is not None else QSpinBox()
    spin.setRange(low, high)
    if decimals is not None:
        spin.setDecimals(decimals)
        spin.setSingleStep(step)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


class EverythingPanel(WorkerTask, QGroupBox):
    """Grid density and filters (Meta's defaults); Segment everything / Cancel."""

    def __init__(self, state: LabelerState, host):
        super().__init__("Segment everything")
        self.state, self.host = state, host
        self._progress = None
        self.worker = None
        self.last_layer: Labels | None = None
        defaults = EverythingParams()
        form = QFormLayout(self)
        self.points_spin = _spin(1, 128, defaults.points_per_side,
                                 "Grid points per side: 32 decodes 32 x 32 = 1024 prompts")
        self.iou_spin = _spin(0.0, 1.0, defaults.pred_iou_thresh, "Keep masks whose predicted IoU is above this",
                              0.01, 2)
        self.stability_spin = _spin(0.0, 1.0, defaults.stability_score_thresh,
                                    "Keep masks whose stability score is at least this", 0.01, 2)
        self.min_area_spin = _spin(0, 10**7, defaults.min_mask_region_area,
                                   "Fill holes and remove islands smaller than this many pixels (0: off)")
        self.crop_spin = _spin(0, 3, defaults.crop_n_layers,
                               "Crop layers: also segment 2x2 (4x4, ...) overlapping crops, each embedded "
                               "on its own (finds small objects; one encoder run per crop)")
        form.addRow("Points per side", self.points_spin)
        form.addRow("min predicted IoU", self.iou_spin)
        form.addRow("min stability", self.stability_spin)
        form.addRow("min region (px)", self.min_area_spin)
        form.addRow("Crop layers", self.crop_spin)
        self.range_check = QCheckBox("All slices of the 3D range")
        self.range_check.setToolTip("Segment every slice from/to (3D stack panel) and link objects across "
                                    "slices; otherwise only the slice on screen")
        form.addRow(self.range_check)
        self.run_button = button("Segment everything", self.run)
        self.cancel_button = button("Cancel", self.cancel, enabled=False)
        form.addRow(row(self.run_button, self.cancel_button))

    def params(self) -> EverythingParams:
        return EverythingParams(
            points_per_side=self.points_spin.value(), pred_iou_thresh=round(self.iou_spin.value(), 4),
            stability_score_thresh=round(self.stability_spin.value(), 4),
            min_mask_region_area=self.min_area_spin.value(), crop_n_layers=self.crop_spin.value(),
        )

    def show_for(self, layer) -> None:
        self.range_check.setVisible(layer is not None and layer.ndim == 3 and not layer.rgb)

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()

    def run(self) -> None:
        """Segment the image (2D), the slice on screen or the 3D range, in a worker."""
        state = self.state
        layer = state.image_layer
        if layer is None:
            show_warning("SAM Labeler: choose an image layer first.")
            return
        problem = state.unsupported(layer)
        if problem:
            show_warning(f"SAM Labeler: {problem}")
            return
        if self.worker is not None or state.embed_worker is not None or state.stack_worker is not None:
            show_info("SAM Labeler: wait for the running task (or cancel it).")
            return
        params = self.params()
        requested = self.host.model.requested_engine()
        data, uid, rgb = layer.data, layer.unique_id, layer.rgb
        mapping = state.mappings.get(uid)
        options = state.intensity_options(layer)
        cache = state.cache
        is_stack = layer.ndim == 3 and not rgb
        if is_stack:
            if self.range_check.isChecked():
                lo, hi = self.host.stack.z_from.value(), self.host.stack.z_to.value()
                if lo > hi:
                    show_warning(f"SAM Labeler: slice range {lo} to {hi} is empty.")
                    return
            else:
                problem = state.view_problem(layer)  # "the slice on screen" must be a (row, col) slice
                if problem:
                    show_warning(f"{problem} (or tick 'All slices of the 3D range')")
                    return
                lo = hi = state.current_slice(layer)
            z_range = (lo, hi + 1)
            where = f"slice {lo}" if lo == hi else f"slices {lo}-{hi}"
        else:
            z_range, where = None, "the image"

        loaded = state.engine

        def work():
            from ..api import resolve_intensity

            engine = loaded
            if engine is None:
                yield ("Loading model …", 0, 1)
                engine = load_engine(requested, state.set_status)
            used = mapping
            if is_stack:
                stack = Stack(data, mapping=used, **({} if used is not None else options))
                used = stack.mapping
                steps = segment_everything_volume_steps(engine, stack, z_range=z_range, params=params, cache=cache)
                n = z_range[1] - z_range[0]
            else:
                if used is None:
                    used = resolve_intensity(data, multichannel=rgb, **options)
                steps = segment_everything_steps(engine, np.asarray(data), params=params, cache=cache, mapping=used)
                n = 1
            while True:
                try:
                    p = next(steps)
                except StopIteration as stop:
                    result = stop.value
                    # where the labels are, found here: the GUI thread only writes them
                    return engine, used, result, np.nonzero(result.labels)
                done = 0 if p.z is None else p.z - z_range[0]
                frac = p.done / max(p.total, 1)
                if p.stage == "linking":
                    done, frac = p.done, 0.0
                text = {"embedding": "embedding", "decoding": "decoding prompts", "linking": "linking"}[p.stage]
                at = "" if p.z is None else f" slice {p.z}:"
                yield (f"Segment everything:{at} {text} {p.done}/{p.total}", done + frac, n)

        def returned(value):
            engine, used, result, filled = value
            state.use_engine(engine, requested)
            state.mappings[uid] = used
            self._show(layer, result, filled, where)

        self._busy(True)
        self._progress = progress(total=0, desc=f"SAM: segment everything ({where})")
        self.worker = create_worker(work, _connect={
            "yielded": self._on_progress,
            "returned": returned,
            "errored": state.report_error,
            "aborted": lambda: state.set_status("Segment everything stopped; no layer was added."),
            "finished": self._on_finished,
        })

    def _show(self, image, result, filled, where: str) -> None:
        """A new labels layer above the image, filled as one undoable edit."""
        state = self.state
        layer = Labels(
            np.zeros(result.labels.shape, np.uint32), name=f"{image.name} {EVERYTHING_SUFFIX}",
            **placement(image), metadata={**dict(image.metadata),
                                          "everything": [r.as_dict() for r in result.records]},
        )
        if result.records:
            import pandas as pd

            layer.features = pd.DataFrame({
                "index": [0] + [r.id for r in result.records],
                "area": [0] + [r.area for r in result.records],
                "predicted_iou": [np.nan] + [r.predicted_iou for r in result.records],
                "stability": [np.nan] + [r.stability for r in result.records],
            })
        layers = state.viewer.layers
        # above the image; at the top when the image was removed meanwhile (the result is kept)
        layers.insert(layers.index(image) + 1 if image in layers else len(layers), layer)
        if filled[0].size:
            layer.data_setitem(filled, result.labels[filled])
        self.last_layer = layer
        if state.points is not None:  # keep clicking = prompting
            state.viewer.layers.selection.active = state.points
        state.set_status(f"Segment everything: {len(result.records)} object(s) in {where} → layer "
                         f"{layer.name!r} (Ctrl+Z on it empties it).")
        state.everything_done.emit(layer)
