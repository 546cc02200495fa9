"""The "Image and model" panel: which image, which model, SAM contrast, and its embedding.

Loading and encoding run in a napari generator worker that yields after every encoder
block (progress bar, Cancel); the result is kept in the shared state on the GUI thread.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import (QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLineEdit, QMenu,
                            QPushButton, QToolButton)

from ..api import DEFAULT_MODEL, MODEL_ENV, ExportCancelled, embed_cached_steps, embedding_key, finetuned_models
from ..preprocess import CT_PRESETS, resolve_intensity
from .controls import advance, button, combo, row
from .state import LabelerState, load_engine

AUTO_CONTRAST = "auto: percentiles 0.5-99.5 (MR, microscopy)"
CUSTOM_CONTRAST = "custom window"


class ModelPanel(QGroupBox):
    """Image chooser, model/device/dtype, SAM contrast, Compute embedding / Cancel."""

    def __init__(self, state: LabelerState, host):
        super().__init__("Image and model")
        self.state, self.host = state, host
        self._progress = None
        form = QFormLayout(self)
        form.addRow("Image", state.image_combo)
        model_row = QHBoxLayout()
        self.model_edit = QLineEdit(os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
        self.model_edit.setToolTip("Hugging Face id, save_pretrained folder, or Meta .pth checkpoint")
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.setToolTip("Choose a checkpoint file (.pth/.pt) or, with Cancel then a folder, a model folder")
        browse.clicked.connect(self._browse_model)
        self.models_button = QToolButton()
        self.models_button.setText("▾")
        self.models_button.setToolTip("Choose the default model or a fine-tuned one (from the models folder)")
        self.models_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.models_menu = QMenu(self.models_button)
        self.models_menu.aboutToShow.connect(self._fill_models_menu)
        self.models_button.setMenu(self.models_menu)
        model_row.addWidget(self.model_edit)
        model_row.addWidget(self.models_button)
        model_row.addWidget(browse)
        form.addRow("Model", model_row)
        self.device_combo = combo(["auto", "cpu", "cuda", "mps"])
        self.dtype_combo = combo(["auto", "fp32", "bf16", "fp16", "int8", "int8-weights"])
        self.backend_combo = combo(["auto", "torch", "openvino", "onnxruntime"])
        form.addRow("Device", self.device_combo)
        form.addRow("Encoder", self.backend_combo)
        form.addRow("dtype", self.dtype_combo)
        self.backend_combo.setToolTip(
            "Where the image encoder runs: auto is OpenVINO on CPU when installed (faster), else torch")
        self.dtype_combo.setToolTip(
            "Encoder precision: auto is bf16 on CUDA and on CPUs with bf16 instructions, else fp32; "
            "int8 (OpenVINO, ONNX Runtime) trades a little accuracy for speed (docs/performance.md)")
        self.contrast_combo = combo()
        self.contrast_combo.addItem(AUTO_CONTRAST)
        for name, (center, width) in CT_PRESETS.items():
            self.contrast_combo.addItem(f"CT {name} W{width:g}/L{center:g}", name)
        self.contrast_combo.addItem(CUSTOM_CONTRAST)
        self.contrast_combo.setToolTip(
            "How intensities are mapped for SAM (and shown); stored values never change")
        self.center_spin = QDoubleSpinBox()
        self.width_spin = QDoubleSpinBox()
        for spin, value in ((self.center_spin, 40.0), (self.width_spin, 400.0)):
            spin.setRange(-1e7, 1e7)
            spin.setDecimals(1)
            spin.setValue(value)
            spin.setEnabled(False)
        self.width_spin.setMinimum(1e-3)
        form.addRow("SAM contrast", self.contrast_combo)
        form.addRow("  center", self.center_spin)
        form.addRow("  width", self.width_spin)
        self.contrast_combo.currentIndexChanged.connect(self.on_contrast_changed)
        self.center_spin.editingFinished.connect(self.on_contrast_changed)
        self.width_spin.editingFinished.connect(self.on_contrast_changed)
        self.embed_button = button("Compute embedding", self.compute_embedding)
        self.cancel_button = button("Cancel", self.cancel_embedding, enabled=False)
        form.addRow(row(self.embed_button, self.cancel_button))

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.ckpt *.bin)")
        if not path:
            path = QFileDialog.getExistingDirectory(self, "SAM save_pretrained folder")
        if path:
            self.model_edit.setText(path)

    def _fill_models_menu(self) -> None:
        self.models_menu.clear()
        choices = [(DEFAULT_MODEL, DEFAULT_MODEL)]
        if os.environ.get(MODEL_ENV) and os.environ[MODEL_ENV] != DEFAULT_MODEL:
            choices.append((f"{os.environ[MODEL_ENV]}  (${MODEL_ENV})", os.environ[MODEL_ENV]))
        for m in finetuned_models():
            dice = "" if m["dice_after"] is None else f"  Dice {m['dice_before']:.2f} → {m['dice_after']:.2f}"
            choices.append((f"{m['name']}  (fine-tuned{dice})", m["path"]))
        for text, value in choices:
            action = self.models_menu.addAction(text)
            action.triggered.connect(partial(self.choose_model, value))

    def choose_model(self, model: str) -> None:
        """Make ``model`` the dock's model; it loads with the next embedding."""
        self.model_edit.setText(str(model))
        self.state.set_status(f"Model: {model} (loads with the next embedding).")

    # --- model choice -----------------------------------------------------------------

    def requested_key(self):
        return (self.model_edit.text().strip(), self.device_combo.currentText(), self.dtype_combo.currentText(),
                self.backend_combo.currentText())

    def requested_engine(self):
        """The (model, device, dtype, backend) chosen now; a loaded engine for another choice is dropped."""
        requested = self.requested_key()
        self.state.drop_engine_unless(requested)
        return requested

    def set_engine(self, engine) -> None:
        """Use an already loaded :class:`~napari_sam.engine.SamEngine` (e.g. from a notebook)."""
        self.state.use_engine(engine, self.requested_key())
        self.state.embeddings.clear()

    # --- SAM contrast (windowing) -----------------------------------------------------

    def window_choice(self) -> tuple[float, float] | None:
        """(center, width) chosen in the widget, or None for automatic percentiles."""
        text = self.contrast_combo.currentText()
        if text == CUSTOM_CONTRAST:
            return self.center_spin.value(), self.width_spin.value()
        preset = self.contrast_combo.currentData()
        return CT_PRESETS[preset] if preset else None

    def window_for(self, layer) -> None:
        """A new image gets the chosen window; CT from DICOM starts with the reader's window."""
        dicom = (layer.metadata or {}).get("dicom") or {}
        if self.window_choice() is None and str(dicom.get("modality", "")).upper() == "CT" and not layer.rgb:
            # CT from DICOM: give SAM the window the reader chose (WindowCenter/Width or the
            # abdomen preset), i.e. what the radiologist sees, rather than percentiles.
            low, high = (float(v) for v in layer.contrast_limits)
            self.center_spin.setValue((low + high) / 2.0)
            self.width_spin.setValue(max(high - low, 1e-3))
            self.contrast_combo.setCurrentText(CUSTOM_CONTRAST)  # applies it
        elif self.window_choice() is not None:
            self.on_contrast_changed()  # the chosen window applies to the new image too

    def on_contrast_changed(self, *_args) -> None:
        """Set the SAM intensity mapping (part of the cache key) and the display contrast.

        Stored intensities never change; embeddings made with another contrast are simply
        not reused (the disk cache keeps them for when that contrast comes back).
        """
        custom = self.contrast_combo.currentText() == CUSTOM_CONTRAST
        self.center_spin.setEnabled(custom)
        self.width_spin.setEnabled(custom)
        state = self.state
        layer = state.image_layer
        if layer is None:
            return
        window = self.window_choice()
        uid = layer.unique_id
        if window is None:
            state.mappings.pop(uid, None)  # resolved from the data in the next worker
        else:
            preset = self.contrast_combo.currentData()
            choice = {"preset": preset} if preset else {"window": window}
            state.mappings[uid] = resolve_intensity(layer.data, multichannel=layer.rgb, **choice,
                                                    **state.intensity_options(layer))
            center, width = window
            if not layer.rgb:
                layer.contrast_limits = (center - width / 2.0, center + width / 2.0)
        self.host.prompts.invalidate_preview()
        self.host.prompts.request_decode()

    # --- embedding ----------------------------------------------------------------------

    def compute_embedding(self) -> None:
        """Embed the image (or the slice on screen) in a worker; no-op if cached."""
        state = self.state
        layer = state.image_layer
        if layer is None:
            show_warning("SAM Labeler: add an image layer first.")
            return
        problem = state.unsupported(layer)
        if problem:
            show_error(f"SAM Labeler: {problem}")
            return
        if state.embed_worker is not None:
            return  # already running; its result arrives by signal
        self.host.prompts.ensure_layers(layer)
        z = state.current_slice(layer)
        requested = self.requested_engine()
        cached = state.current_embedding()
        if cached is not None:
            state.embedding_ready.emit(cached)
            if state.decode_after_embed:
                state.decode_after_embed = False
                self.host.prompts.request_decode()
            return

        engine = state.engine
        mapping = state.mappings.get(layer.unique_id)
        data, rgb = layer.data, layer.rgb
        options = state.intensity_options(layer)
        cache = state.cache

        def work():
            nonlocal engine, mapping
            if engine is None:
                yield ("Loading model", 0, 1)
                def cancelled():  # the user pressed Cancel while the encoder is being exported
                    worker = state.embed_worker
                    return worker is not None and worker.abort_requested

                try:
                    engine = load_engine(requested, state.set_status, cancelled=cancelled)
                except ExportCancelled:
                    yield ("Cancelled", 0, 1)  # the worker stops here: "aborted"
                    return None
            if mapping is None:
                # A volume gets one mapping over all slices: same contrast on every slice.
                mapping = resolve_intensity(data, multichannel=rgb, **options)
            image = np.asarray(data if z is None else data[z])
            steps = embed_cached_steps(engine, image, mapping=mapping, cache=cache)
            while True:
                try:
                    done, total = next(steps)
                except StopIteration as stop:
                    return engine, mapping, embedding_key(engine, image, mapping), stop.value
                yield ("Embedding", done, total)

        where = "" if z is None else f" slice {z}"
        self._progress = progress(total=0, desc=f"SAM: embedding {layer.name}{where}")
        self.embed_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        state.set_status(f"Embedding {layer.name}{where} …")
        # Handlers go through _connect: errors then reach report_error (a notification)
        # instead of being re-raised in the event loop.
        state.embed_worker = create_worker(work, _connect={
            "yielded": self._on_progress,
            "returned": partial(self._on_embedded, requested, layer.unique_id),
            "errored": state.report_error,
            "aborted": self._on_aborted,
            "finished": self._on_finished,
        })

    def cancel_embedding(self) -> None:
        """Stop the running encode between two encoder blocks; nothing is kept."""
        if self.state.embed_worker is not None:
            self.state.decode_after_embed = False
            self.state.embed_worker.quit()

    def _on_progress(self, value) -> None:
        stage, done, total = value
        advance(self._progress, done, total, f"SAM: {stage.lower()}")

    def _on_embedded(self, engine_key, layer_id, result) -> None:
        state = self.state
        engine, mapping, key, embedding = result
        state.use_engine(engine, engine_key)
        state.mappings[layer_id] = mapping
        state.remember_embedding(key, embedding)
        state.set_status("Embedding ready: add points or boxes; Enter commits, Esc clears.")
        state.embedding_ready.emit(embedding)
        if state.decode_after_embed:
            state.decode_after_embed = False
            self.host.prompts.request_decode()

    def _on_aborted(self) -> None:
        self.state.set_status("Embedding cancelled.")
        self.state.embedding_cancelled.emit()

    def _on_finished(self) -> None:
        self.state.embed_worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.embed_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
