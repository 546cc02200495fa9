"""The "Fine-tune" panel: train SAM's mask decoder on a labels layer, then use the new model.

The image chosen above and a labels layer of its shape (2D, or a stack whose labelled slices
are used) go to :func:`napari_sam.api.finetune_steps` in a worker: embedding (through the
dock's cache and SAM contrast, so slices embedded before are reused), then training with a
progress bar; Cancel writes a checkpoint that "Continue" resumes. The result line shows the
validation Dice before and after; "Use it" makes the new folder the dock's model (the
Model field's ▾ menu lists every fine-tuned model in the models folder).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from napari.layers import Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QCheckBox, QFormLayout, QGroupBox, QLabel, QLineEdit, QSpinBox

from ..api import (CheckpointError, FinetuneConfig, Stack, check_finetune_output, finetune_steps, models_folder,
                   resolve_intensity)
from .controls import WorkerTask, button, row
from .layer_choice import LayerChoice
from .state import LabelerState, load_engine


class FinetunePanel(WorkerTask, QGroupBox):
    """Labels layer, epochs, output folder; Fine-tune / Cancel; before/after Dice; Use it."""

    def __init__(self, state: LabelerState, host):
        super().__init__("Fine-tune")
        self.state, self.host = state, host
        self.worker = None
        self.result = None
        self._progress = None
        self._stop = False
        form = QFormLayout(self)
        self.labels_choice = LayerChoice(Labels)
        self.labels_choice.setToolTip("Labels of the image above to learn from: each label id is one object "
                                      "(a stack: its labelled slices)")
        form.addRow("Labels", self.labels_choice)
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 10000)
        self.epochs_spin.setValue(FinetuneConfig().epochs)
        self.epochs_spin.setToolTip("Passes over the objects at most; training stops earlier when the "
                                    "validation Dice stops rising")
        form.addRow("Epochs", self.epochs_spin)
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("(new folder in the models folder)")
        self.output_edit.setToolTip(f"The new model's folder; empty: a new folder in {models_folder()}")
        form.addRow("Save to", self.output_edit)
        self.resume_check = QCheckBox("Continue the stopped run in this folder")
        self.resume_check.setVisible(False)
        # unticked: the next run starts afresh in a new folder (the stopped run's checkpoint stays);
        # ticked again: back to the stopped run's folder
        self._stopped_in = ""
        self._generated = False  # "Save to" was filled by the widget, not typed
        self.resume_check.toggled.connect(
            lambda on: self.output_edit.setText(self._stopped_in) if on else self.output_edit.clear())
        form.addRow(self.resume_check)
        self.run_button = button("Fine-tune on this labels layer", self.run,
                                 tooltip="Train the mask decoder on these labels (the encoder stays frozen)")
        self.cancel_button = button("Cancel", self.cancel, enabled=False)
        form.addRow(row(self.run_button, self.cancel_button))
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        form.addRow(self.result_label)
        self.use_button = button("Use the fine-tuned model", self.use_model, enabled=False)
        form.addRow(self.use_button)

    def refresh(self, layers, exclude) -> None:
        self.labels_choice.refresh(layers, exclude=exclude)

    def cancel(self) -> None:
        """Stop after the current step; the checkpoint is kept for Continue."""
        if self.worker is not None:
            self._stop = True
            self.state.set_status("Fine-tune: stopping after this step …")

    def _output(self, image_name: str) -> Path:
        text = self.output_edit.text().strip()
        if text:
            return Path(text).expanduser()
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in image_name).strip("-") or "model"
        return models_folder() / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"

    def run(self) -> None:
        state = self.state
        image = state.image_layer
        labels = self.labels_choice.layer(state.viewer.layers)
        if image is None or labels is None:
            show_warning("SAM Labeler: choose an image and a labels layer to fine-tune on.")
            return
        problem = state.unsupported(image)
        if problem:
            show_warning(f"SAM Labeler: {problem}")
            return
        spatial = tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
        if tuple(labels.data.shape) != spatial:
            show_warning(f"SAM Labeler: labels {labels.name!r} {tuple(labels.data.shape)} do not cover image "
                         f"{image.name!r} {spatial} pixel for pixel.")
            return
        if self.worker is not None:
            show_info("SAM Labeler: a fine-tune is running (Cancel stops it).")
            return
        resume = not self.resume_check.isHidden() and self.resume_check.isChecked()
        self._generated = not self.output_edit.text().strip()
        output = self._output(image.name)
        try:
            check_finetune_output(output, resume=resume)
        except ValueError as exc:
            self._refuse(output, exc, resume)
            return
        self.output_edit.setText(str(output))
        config = FinetuneConfig(epochs=self.epochs_spin.value())
        requested = self.host.model.requested_engine()
        loaded, cache = state.engine, state.cache
        data, rgb, uid, name = image.data, image.rgb, image.unique_id, image.name
        target = np.array(labels.data)  # a copy: editing the layer meanwhile changes nothing here
        mapping, options = state.mappings.get(uid), state.intensity_options(image)
        is_stack = image.ndim == 3 and not rgb
        self._stop = False

        def work():
            engine = loaded
            if engine is None:
                yield ("Loading model …", 0, 1)
                engine = load_engine(requested, state.set_status)
            used = mapping
            if used is None:  # the dock's own SAM contrast: embeddings made before are reused
                used = (Stack(data, **options).mapping if is_stack
                        else resolve_intensity(data, multichannel=rgb, **options))
            images = data if is_stack else np.asarray(data)
            steps = finetune_steps(engine, images, target, output, config=config, cache=cache, mapping=used,
                                   resume=resume, cancelled=lambda: self._stop, names=[name])
            while True:
                try:
                    p = next(steps)
                except StopIteration as done:
                    return engine, used, done.value
                yield (f"Fine-tune: {p.message}", p.done, p.total)

        def returned(value):
            engine, used, result = value
            state.use_engine(engine, requested)
            state.mappings[uid] = used
            self._show(result)

        self._busy(True)
        self.result_label.setText("")
        self._progress = progress(total=0, desc="SAM: fine-tune")
        self.worker = create_worker(work, _connect={
            "yielded": self._on_progress, "returned": returned, "errored": self._failed,
            "finished": self._on_finished})

    def _refuse(self, output, exc, resume) -> None:
        """The folder cannot take this run: say why in the widget's words."""
        text = str(exc)
        if "is not a folder" in text:
            why = "it is a file, not a folder."
        elif "cannot write" in text:
            why = text.split(": ", 1)[-1]
        elif resume:
            why = "it holds no stopped run to continue (untick 'Continue')."
        elif "not empty" in text:
            why = "it holds other files (choose a new folder, or leave 'Save to' empty)."
        else:
            why = "it holds a fine-tune already (choose a new folder, or leave 'Save to' empty)."
        message = f"Fine-tune: {output} cannot take this run: {why}"
        show_warning(f"SAM Labeler: {message}")
        self.state.set_status(message)

    def _failed(self, exc) -> None:
        if self._generated and not self._stopped_in:
            self.output_edit.clear()  # the next run gets a fresh name of its own
        if isinstance(exc, CheckpointError) and "other" in str(exc):
            detail = str(exc).split("was made with ", 1)[-1].split(";", 1)[0]
            exc = ValueError(f"the stopped run was made with {detail}: untick 'Continue the stopped run' to start "
                             "a new run in a new folder.")
        self.state.report_error(exc)

    def _show(self, result) -> None:
        self.result = result
        stopped = result.stopped == "cancelled"
        resumable = stopped and result.steps > 0
        self._stopped_in = result.model_dir if resumable else ""
        self.resume_check.setVisible(resumable)
        self.resume_check.blockSignals(True)
        self.resume_check.setChecked(resumable)
        self.resume_check.blockSignals(False)
        if not resumable and self._generated:
            self.output_edit.clear()  # a name the widget made for a run that made nothing
        if stopped and not resumable:
            text = "Stopped before training; nothing was saved (what was embedded stays cached)."
        elif stopped:
            text = (f"Stopped after {result.steps} steps; the checkpoint is in {result.model_dir}. "
                    "Press Fine-tune again to continue.")
        elif result.dice_before is None:
            text = f"Trained {result.steps} steps (no validation split); saved to {result.model_dir}."
        else:
            by = result.dice_by_prompt
            text = (f"Validation Dice {result.dice_before:.3f} → {result.dice_after:.3f} "
                    f"(box {by['box'][0]:.2f} → {by['box'][1]:.2f}, click {by['point'][0]:.2f} → "
                    f"{by['point'][1]:.2f}); {result.steps} steps, stopped by {result.stopped}. "
                    f"Saved to {result.model_dir}.")
        if result.notes:
            text += " Note: " + "; ".join(result.notes) + "."
        self.result_label.setText(text)
        self.use_button.setEnabled(not stopped)
        if not stopped:
            self.output_edit.clear()  # the next run makes a new folder; this one is a finished model
        self.state.set_status(f"Fine-tune: {text}")
        self.state.finetuned.emit(result)

    def use_model(self) -> None:
        """Make the fine-tuned folder the dock's model (it loads with the next embedding)."""
        if self.result is None or self.result.stopped == "cancelled":
            return
        self.host.model.choose_model(self.result.model_dir)
