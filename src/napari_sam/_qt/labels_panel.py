"""The "Labels" panel: commit the preview into a labels layer, undo/redo, refine a label.

Commits go through napari's labels history (``data_setitem``), so Ctrl+Z or Undo restores
the layer exactly; which pixels are written is decided by :func:`annotate.plan_commit`.
"""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QCheckBox, QFormLayout, QGroupBox, QSpinBox

from .. import annotate
from .._types import Prompt
from .controls import button, row
from .placement import placement
from .state import LABELS_NAME, NEW_LABELS, LabelerState


class LabelsPanel(QGroupBox):
    """Target layer, label id, overwrite; Refine / Stop; Commit / Clear / Undo."""

    def __init__(self, state: LabelerState, host):
        super().__init__("Labels")
        self.state, self.host = state, host
        form = QFormLayout(self)
        form.addRow("Layer", state.labels_combo)
        self.label_id_spin = QSpinBox()
        self.label_id_spin.setRange(0, 2**31 - 1)
        self.label_id_spin.setSpecialValueText("next free")
        form.addRow("Label id", self.label_id_spin)
        self.overwrite_check = QCheckBox("Overwrite other labels")
        form.addRow(self.overwrite_check)
        self.refine_button = button(
            "Refine selected", self._refine_selected,
            tooltip="Use the labels layer's selected label as the prompt; add points to correct it")
        self.stop_refine_button = button("Stop refining", self.stop_refining, enabled=False)
        self.stop_refine_button.setToolTip("Leave refine mode without changing the label")
        form.addRow(row(self.refine_button, self.stop_refine_button))
        self.commit_button = button("Commit (Enter)", self.commit)
        self.clear_button = button("Clear (Esc)", host.prompts.clear_prompts)
        self.undo_button = button("Undo", self.undo)
        form.addRow(row(self.commit_button, self.clear_button, self.undo_button))

    def target_labels(self, image: Image) -> Labels:
        """The chosen labels layer, or a new one placed like ``image``; refuses another shape."""
        state = self.state
        layer = state.labels_layer
        spatial = state.spatial_shape(image)
        if layer is None:
            layer = Labels(
                np.zeros(spatial, np.uint32), name=LABELS_NAME,
                **placement(image),  # exactly the image's (patient-space) placement
                # the source geometry (DICOM affine, files) travels with the labels, so
                # File > Save can write NIfTI or DICOM-SEG aligned with the image
                metadata=dict(image.metadata),
            )
            # Just above the image, under the prompt and preview layers.
            state.viewer.layers.insert(state.viewer.layers.index(image) + 1, layer)
            self.host.refresh_layer_choices()
            state.labels_combo.select(layer)
            if state.points is not None:  # keep clicking = prompting, not painting
                state.viewer.layers.selection.active = state.points
        elif tuple(layer.data.shape) != spatial:
            raise ValueError(
                f"labels layer {layer.name!r} has shape {tuple(layer.data.shape)}, the image "
                f"{image.name!r} has {spatial}; choose a matching layer or {NEW_LABELS}"
            )
        return layer

    def commit(self) -> None:
        """Write the preview into the labels layer as one undoable edit, then clear prompts.

        Nothing escapes: a refusal or an unexpected error is one notification and the
        status line, and the layer is either fully written or untouched."""
        try:
            self._commit()
        except Exception as exc:  # keys call this from napari's keymap: never crash the viewer
            self.state.report_error(exc)

    def _commit(self) -> None:
        state = self.state
        image = state.image_layer
        if image is None or not state.predictions:
            state.set_status("Nothing to commit: add points or boxes first.")
            return
        try:
            target = self.target_labels(image)
        except ValueError as exc:
            state.report_error(exc)
            return
        state.remember_target(target)
        z = state.preview_slice
        current = np.asarray(target.data if z is None else target.data[z])
        masks = self.host.prompts.chosen_masks()
        if state.refine_label is not None:
            ids, replace = [state.refine_label], state.refine_label
        else:
            first = self.label_id_spin.value() or annotate.next_label_id(target.data)
            after = max(first, annotate.next_label_id(target.data) - 1)
            ids, replace = [first] + list(range(after + 1, after + len(masks))), None
        widened = self._hold(target, max(ids, default=0))
        current = np.asarray(target.data if z is None else target.data[z])
        plan = annotate.plan_commit(current, masks, ids, overwrite=self.overwrite_check.isChecked(), replace=replace)
        if plan.size:
            indices = plan.indices if z is None else (np.full(plan.indices[0].shape, z),) + plan.indices
            target.data_setitem(indices, plan.values)
        self.host.autosave.saved(target, None if z is None else [z])  # survives a crash from here on
        if z is not None:  # the user's own slices bound later propagation
            seeds = state.seed_slices.setdefault(target.unique_id, {})
            for label in plan.ids:
                seeds.setdefault(label, set()).add(z)
        if plan.kept:
            show_info(f"SAM Labeler: kept {plan.kept} pixels of other labels (Overwrite other labels is off).")
        where = "" if z is None else f" on slice {z}"
        state.set_status(f"Committed label(s) {', '.join(map(str, plan.ids))}{where}{widened}. "
                         "Ctrl+Z or Undo reverts.")
        state.committed.emit(plan)
        self.label_id_spin.setValue(0)
        self.stop_refining(decode=False)
        self.host.prompts.clear_prompts()

    @staticmethod
    def _hold(target: Labels, label: int) -> str:
        """Widen ``target``'s dtype when ``label`` does not fit (napari's own "New labels
        layer" is uint8); its undo history is kept. Returns a note for the status line."""
        dtype = np.dtype(target.data.dtype)
        if dtype.kind not in "iu":
            raise ValueError(f"labels layer {target.name!r} holds {dtype} values, not integer label ids")
        if label <= np.iinfo(dtype).max:
            return ""
        wider = np.promote_types(dtype, np.min_scalar_type(int(label)))
        if wider.kind not in "iu":
            raise ValueError(f"label {label} does not fit in any integer type of layer {target.name!r}")
        target.data = np.asarray(target.data).astype(wider)
        return f" (layer widened from {dtype} to {wider} to hold label {label})"

    def undo(self) -> None:
        """Undo the last edit of the labels layer (napari's own history, same as Ctrl+Z)."""
        layer = self.state.labels_layer
        if layer is not None:
            layer.undo()
            self.host.autosave.saved(layer, "known")

    def redo(self) -> None:
        """Redo the last undone edit of the labels layer."""
        layer = self.state.labels_layer
        if layer is not None:
            layer.redo()
            self.host.autosave.saved(layer, "known")

    # --- refine -------------------------------------------------------------------------

    def _refine_selected(self) -> None:
        layer = self.state.labels_layer
        if layer is None:
            show_warning("SAM Labeler: choose a labels layer to refine a label from.")
            return
        self.refine_label(int(layer.selected_label))

    def refine_label(self, label: int) -> None:
        """Use ``label`` of the labels layer as the prompt (mask + box); points correct it."""
        self.state.refine_label = int(label)
        self.stop_refine_button.setEnabled(True)
        self.state.set_status(f"Refining label {label}: add points to correct it, Enter replaces it.")
        self.host.prompts.request_decode()

    def stop_refining(self, decode: bool = True) -> None:
        self.state.refine_label = None
        self.stop_refine_button.setEnabled(False)
        if decode:
            self.host.prompts.request_decode()

    def refine_prompts(self, z, pts, labels) -> list[Prompt]:
        """The refined label on slice ``z`` as one prompt (mask, its box, and the points)."""
        target = self.state.labels_layer
        if target is None:
            return []
        label = self.state.refine_label
        current = np.asarray(target.data if z is None else target.data[z])
        mask = current == label
        box = annotate.box_of_mask(mask)
        if box is None:
            show_warning(f"SAM Labeler: label {label} is not on this slice.")
            return []
        return [Prompt(
            points=pts if len(pts) else None,
            point_labels=labels if len(pts) else None,
            box=box,
            mask_input=mask,
        )]
