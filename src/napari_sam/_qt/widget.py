"""The "SAM Labeler" dock widget: a thin Qt layer over the Python API.

Work never runs on the GUI thread: model loading and encoding run in a napari
generator worker that yields after every encoder block (progress bar, Cancel), and each
prompt change decodes in a short worker whose result is dropped if newer prompts exist.
Results are applied to layers on the GUI thread, and commits go through napari's labels
history so Ctrl+Z restores the layer exactly.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from functools import partial

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Points, Shapes
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .. import annotate
from .._types import Prompt
from ..cache import EmbeddingCache
from ..checkpoints import DEFAULT_MODEL, MODEL_ENV
from ..preprocess import CT_PRESETS, resolve_intensity

POINTS_NAME = "SAM points"
BOXES_NAME = "SAM boxes"
PREVIEW_NAME = "SAM preview"
NEW_LABELS = "(new labels layer)"
LABELS_NAME = "SAM labels"
POSITIVE, NEGATIVE = "positive", "negative"
AUTO_CONTRAST = "auto: percentiles 0.5-99.5 (MR, microscopy)"
CUSTOM_CONTRAST = "custom window"
MAX_CACHED_EMBEDDINGS = 16  # per widget, in memory; the persistent cache is cache.py's job


def _fit_width(button: QPushButton) -> None:
    """Let a button shrink to its text: napari's style sheet gives every button a wide minimum."""
    button.setMinimumWidth(button.fontMetrics().horizontalAdvance(button.text()) + 24)


def _button(text: str, slot, *, enabled: bool = True, tooltip: str = "") -> QPushButton:
    button = QPushButton(text)
    _fit_width(button)
    button.clicked.connect(slot)
    button.setEnabled(enabled)
    if tooltip:
        button.setToolTip(tooltip)
    return button


def _combo(items=(), *, tooltip: str = "") -> QComboBox:
    """A combo box that does not widen the dock to its longest entry (full text in the popup)."""
    combo = QComboBox()
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(6)
    combo.addItems(list(items))
    if tooltip:
        combo.setToolTip(tooltip)
    return combo


def _row(*widgets) -> QHBoxLayout:
    row = QHBoxLayout()
    for widget in widgets:
        row.addWidget(widget)
    return row


class SamLabelerWidget(QWidget):
    """Click points / draw boxes → live SAM mask → commit into a Labels layer."""

    #: an ImageEmbedding is ready for the current image/slice
    embedding_ready = Signal(object)
    #: a preview was decoded: list of Prediction, one per object
    preview_ready = Signal(object)
    #: a commit was written: annotate.CommitPlan
    committed = Signal(object)
    #: encoding stopped by the user
    embedding_cancelled = Signal()
    #: "Embed stack" finished: (slices cached, slices in the stack)
    stack_embedded = Signal(object)
    #: "Propagate" finished and was written: PropagationSummary
    propagated = Signal(object)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.engine = None
        self._engine_key = None
        self._embeddings: OrderedDict = OrderedDict()
        self._mappings: dict = {}
        self._embed_worker = None
        self._embed_progress = None
        self._decode_after_embed = False
        self._decode_seq = 0
        self._predictions: list = []
        self._objects: list = []  # prompts behind the current preview
        self._preview_slice = None
        self._choice: int | None = None
        self._refine_label: int | None = None
        self.cache = EmbeddingCache()  # $NAPARI_SAM_CACHE or the user cache folder
        self._stack_worker = None
        self._stack_progress = None
        # per labels layer: {label id: slices the user committed it on} (propagation seeds)
        self._seed_slices: dict = {}
        self._points: Points | None = None
        self._boxes: Shapes | None = None
        self._preview: Labels | None = None
        self._build_ui()
        self._connect_viewer()
        self._refresh_layer_choices()

    # --- UI ---------------------------------------------------------------------------

    def _build_ui(self) -> None:
        # The controls scroll when the screen is shorter than they are, rather than
        # pushing napari's window past the bottom of the screen.
        content = QWidget()
        layout = QVBoxLayout(content)
        self._scroll = QScrollArea()
        self._scroll.setWidgetResizable(True)
        self._scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._scroll)

        setup = QGroupBox("Image and model")
        form = QFormLayout(setup)
        self.image_combo = _combo()
        form.addRow("Image", self.image_combo)
        model_row = QHBoxLayout()
        self.model_edit = QLineEdit(os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
        self.model_edit.setToolTip("Hugging Face id, save_pretrained folder, or Meta .pth checkpoint")
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.setToolTip("Choose a checkpoint file (.pth/.pt) or, with Cancel then a folder, a model folder")
        browse.clicked.connect(self._browse_model)
        model_row.addWidget(self.model_edit)
        model_row.addWidget(browse)
        form.addRow("Model", model_row)
        self.device_combo = _combo(["auto", "cpu", "cuda", "mps"])
        self.dtype_combo = _combo(["auto", "fp32", "bf16", "fp16"])
        form.addRow("Device", self.device_combo)
        form.addRow("dtype", self.dtype_combo)
        self.dtype_combo.setToolTip("Precision: auto is bf16 on CUDA that supports it, else fp32")
        self.contrast_combo = _combo()
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
        self.contrast_combo.currentIndexChanged.connect(self._on_contrast_changed)
        self.center_spin.editingFinished.connect(self._on_contrast_changed)
        self.width_spin.editingFinished.connect(self._on_contrast_changed)
        self.embed_button = _button("Compute embedding", self.compute_embedding)
        self.cancel_button = _button("Cancel", self.cancel_embedding, enabled=False)
        form.addRow(_row(self.embed_button, self.cancel_button))
        layout.addWidget(setup)

        prompts = QGroupBox("Prompts")
        pform = QFormLayout(prompts)
        self.negative_check = QCheckBox("Negative points (Ctrl-click)")
        self.negative_check.toggled.connect(self._on_negative_toggled)
        pform.addRow(self.negative_check)
        self.multimask_check = QCheckBox("Multimask (keys 1/2/3)")
        self.multimask_check.setToolTip("SAM returns 3 candidate masks; choose one with the buttons or keys 1/2/3")
        self.multimask_check.toggled.connect(self._on_multimask_toggled)
        pform.addRow(self.multimask_check)
        cand_row = QHBoxLayout()
        self.candidate_buttons = []
        for i in range(3):
            button = QPushButton(f"{i + 1}")
            _fit_width(button)
            button.setCheckable(True)
            button.setEnabled(False)
            button.clicked.connect(partial(self.choose_candidate, i))
            cand_row.addWidget(button)
            self.candidate_buttons.append(button)
        pform.addRow("Candidates", cand_row)
        layout.addWidget(prompts)

        out = QGroupBox("Labels")
        oform = QFormLayout(out)
        self.labels_combo = _combo()
        oform.addRow("Layer", self.labels_combo)
        self.label_id_spin = QSpinBox()
        self.label_id_spin.setRange(0, 2**31 - 1)
        self.label_id_spin.setSpecialValueText("next free")
        oform.addRow("Label id", self.label_id_spin)
        self.overwrite_check = QCheckBox("Overwrite other labels")
        oform.addRow(self.overwrite_check)
        self.refine_button = _button(
            "Refine selected", self._refine_selected,
            tooltip="Use the labels layer's selected label as the prompt; add points to correct it")
        self.stop_refine_button = _button("Stop refining", self.stop_refining, enabled=False)
        self.stop_refine_button.setToolTip("Leave refine mode without changing the label")
        oform.addRow(_row(self.refine_button, self.stop_refine_button))
        self.commit_button = _button("Commit (Enter)", self.commit)
        self.clear_button = _button("Clear (Esc)", self.clear_prompts)
        self.undo_button = _button("Undo", self.undo)
        oform.addRow(_row(self.commit_button, self.clear_button, self.undo_button))
        layout.addWidget(out)

        self.stack_box = QGroupBox("3D stack")
        sform = QFormLayout(self.stack_box)
        self.z_from = QSpinBox()
        self.z_to = QSpinBox()
        sform.addRow("From slice", self.z_from)
        sform.addRow("to slice", self.z_to)
        self.embed_stack_button = _button(
            "Embed stack", self.embed_stack, tooltip="Embed the slice range into the cache (resumable)")
        self.stack_cancel_button = _button("Cancel", self.cancel_stack_work, enabled=False)
        sform.addRow(_row(self.embed_stack_button, self.stack_cancel_button))
        self.cached_label = QLabel("cached: –")
        self.cached_label.setWordWrap(True)
        sform.addRow(self.cached_label)
        self.direction_combo = _combo(["both", "up", "down"])
        self.direction_combo.setToolTip("'up' is increasing slice index")
        self.min_iou_spin = QDoubleSpinBox()
        self.min_iou_spin.setRange(0.0, 1.0)
        self.min_iou_spin.setSingleStep(0.05)
        self.min_iou_spin.setValue(0.5)
        self.min_iou_spin.setToolTip("Stop an object when SAM's predicted IoU falls below this")
        sform.addRow("Direction", self.direction_combo)
        sform.addRow("min IoU", self.min_iou_spin)
        self.selected_only_check = QCheckBox("Only the selected label")
        sform.addRow(self.selected_only_check)
        self.propagate_button = QPushButton("Propagate from this slice")
        _fit_width(self.propagate_button)
        self.propagate_button.clicked.connect(self.propagate)
        sform.addRow(self.propagate_button)
        self.stack_box.setEnabled(False)
        self.stack_box.setVisible(False)  # shown for 3D layers only: keeps the dock short for 2D
        layout.addWidget(self.stack_box)

        self.status = QLabel("Choose an image, then add points or boxes.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._scroll.setWidget(content)
        self._fit_scroll_width()

    def _fit_scroll_width(self) -> None:
        """As wide as the controls plus a vertical scroll bar: never a horizontal scroll bar."""
        content = self._scroll.widget()
        content.adjustSize()
        self._scroll.setMinimumWidth(
            content.minimumSizeHint().width() + self._scroll.verticalScrollBar().sizeHint().width())

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.ckpt *.bin)")
        if not path:
            path = QFileDialog.getExistingDirectory(self, "SAM save_pretrained folder")
        if path:
            self.model_edit.setText(path)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    # --- viewer wiring ----------------------------------------------------------------

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_layer_choices)
        layers.events.removed.connect(self._refresh_layer_choices)
        layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_slice_changed)
        self.image_combo.currentTextChanged.connect(self._on_image_changed)
        for key, func in (("Enter", self.commit), ("Escape", self.clear_prompts)):
            self.viewer.bind_key(key, lambda _viewer, f=func: f(), overwrite=True)

    def _refresh_layer_choices(self, event=None) -> None:
        keep_img = self.image_combo.currentText()
        keep_lab = self.labels_combo.currentText()
        ours = {POINTS_NAME, BOXES_NAME, PREVIEW_NAME}
        images = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        labels = [layer.name for layer in self.viewer.layers
                  if isinstance(layer, Labels) and layer.name not in ours]
        for combo, names, keep, extra in (
            (self.image_combo, images, keep_img, []),
            (self.labels_combo, labels, keep_lab, [NEW_LABELS]),
        ):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(extra + names)
            if keep in extra + names:
                combo.setCurrentText(keep)
            elif names and combo is self.labels_combo:
                combo.setCurrentText(names[-1])
            combo.blockSignals(False)
        if self.image_combo.currentText() != keep_img:
            self._on_image_changed(self.image_combo.currentText())

    def _on_layer_removed(self, event) -> None:
        # napari hands plugins a proxy viewer whose layers are fresh wrappers on every
        # access: compare with == and key by unique_id, never by identity.
        layer = event.value
        if layer == self._points:
            self._points = None
        elif layer == self._boxes:
            self._boxes = None
        elif layer == self._preview:
            self._preview = None
        self._embeddings = OrderedDict(
            (k, v) for k, v in self._embeddings.items() if k[0] != layer.unique_id
        )
        self._mappings.pop(layer.unique_id, None)

    def _on_image_changed(self, name: str) -> None:
        self._invalidate_preview()
        layer = self.image_layer
        if layer is None:
            return
        problem = self._unsupported(layer)
        if problem:
            self._set_status(problem)
            return
        self._ensure_prompt_layers(layer)
        is_stack = layer.ndim == 3
        self.stack_box.setEnabled(is_stack)
        self.stack_box.setVisible(is_stack)
        self._fit_scroll_width()
        if is_stack:
            last = int(layer.data.shape[0]) - 1
            for spin in (self.z_from, self.z_to):
                spin.setRange(0, last)
            self.z_from.setValue(0)
            self.z_to.setValue(last)
            self.cached_label.setText("cached: press Embed stack to embed and count")
        dicom = (layer.metadata or {}).get("dicom") or {}
        if self._window_choice() is None and str(dicom.get("modality", "")).upper() == "CT" and not layer.rgb:
            # CT from DICOM: give SAM the window the reader chose (WindowCenter/Width or the
            # abdomen preset), i.e. what the radiologist sees, rather than percentiles.
            low, high = (float(v) for v in layer.contrast_limits)
            self.center_spin.setValue((low + high) / 2.0)
            self.width_spin.setValue(max(high - low, 1e-3))
            self.contrast_combo.setCurrentText(CUSTOM_CONTRAST)  # applies it
        elif self._window_choice() is not None:
            self._on_contrast_changed()  # the chosen window applies to the new image too
        self._set_status(f"{layer.name}: add points (click) or boxes, or press Compute embedding.")

    # --- layers -----------------------------------------------------------------------

    @property
    def image_layer(self) -> Image | None:
        name = self.image_combo.currentText()
        if name and name in self.viewer.layers and isinstance(self.viewer.layers[name], Image):
            return self.viewer.layers[name]
        return None

    @staticmethod
    def _unsupported(layer: Image) -> str | None:
        if layer.multiscale:
            return f"{layer.name}: multiscale images are not supported yet; open the full-resolution level."
        if layer.ndim not in (2, 3):
            return (f"{layer.name}: SAM Labeler works on 2D images and 3D stacks (Z, Y, X); "
                    f"this layer has {layer.ndim} spatial dimensions.")
        return None

    def _spatial_shape(self, layer: Image) -> tuple[int, ...]:
        shape = tuple(layer.data.shape)
        return shape[:-1] if layer.rgb else shape

    def _ensure_prompt_layers(self, image: Image) -> None:
        nd = image.ndim
        scale, translate = tuple(image.scale), tuple(image.translate)
        if self._points is None or self._points.ndim != nd:
            if self._points is not None:
                self.viewer.layers.remove(self._points)
            features = pd.DataFrame({"sign": pd.Categorical([], categories=[POSITIVE, NEGATIVE])})
            size = max(3.0, max(self._spatial_shape(image)[-2:]) / 80)
            self._points = Points(
                np.empty((0, nd)), ndim=nd, name=POINTS_NAME, features=features,
                feature_defaults={"sign": POSITIVE}, face_color="sign",
                face_color_cycle=["#33ff33", "#ff3333"], border_color="white", size=size,
                scale=scale, translate=translate,
            )
            self._points.events.data.connect(self._on_prompts_changed)
            self._points.mouse_drag_callbacks.insert(0, self._on_points_press)
            self.viewer.add_layer(self._points)
        if self._boxes is None or self._boxes.ndim != nd:
            if self._boxes is not None:
                self.viewer.layers.remove(self._boxes)
            self._boxes = Shapes(
                ndim=nd, name=BOXES_NAME, edge_color="yellow", face_color="transparent",
                edge_width=max(1.0, max(self._spatial_shape(image)[-2:]) / 300),
                scale=scale, translate=translate,
            )
            self._boxes.events.data.connect(self._on_prompts_changed)
            self.viewer.add_layer(self._boxes)
            self._boxes.mode = "add_rectangle"
        spatial = self._spatial_shape(image)
        if self._preview is None or self._preview.data.shape != spatial:
            if self._preview is not None:
                self.viewer.layers.remove(self._preview)
            self._preview = Labels(
                np.zeros(spatial, np.uint8), name=PREVIEW_NAME, opacity=0.55,
                scale=scale, translate=translate,
            )
            self.viewer.add_layer(self._preview)
        for layer in (self._points, self._boxes, self._preview):
            layer.scale, layer.translate = scale, translate
            # Ctrl+Z must undo the labels edit while the user is prompting, not only when
            # the labels layer is the active one (where napari binds it).
            for key, func in (("Enter", self.commit), ("Escape", self.clear_prompts),
                              ("Control-Z", self.undo), ("Control-Shift-Z", self.redo)):
                layer.bind_key(key, lambda _layer, f=func: f(), overwrite=True)
            for i in range(3):
                layer.bind_key(str(i + 1), lambda _layer, i=i: self.choose_candidate(i), overwrite=True)
        self.viewer.layers.selection.active = self._points
        self._points.mode = "add"
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
        if self._points is not None:
            self._points.feature_defaults["sign"] = NEGATIVE if negative else POSITIVE

    # --- SAM contrast (windowing) -----------------------------------------------------

    def _window_choice(self) -> tuple[float, float] | None:
        """(center, width) chosen in the widget, or None for automatic percentiles."""
        text = self.contrast_combo.currentText()
        if text == CUSTOM_CONTRAST:
            return self.center_spin.value(), self.width_spin.value()
        preset = self.contrast_combo.currentData()
        return CT_PRESETS[preset] if preset else None

    def _on_contrast_changed(self, *_args) -> None:
        """Set the SAM intensity mapping (part of the cache key) and the display contrast.

        Stored intensities never change; embeddings made with another contrast are simply
        not reused (the disk cache keeps them for when that contrast comes back).
        """
        custom = self.contrast_combo.currentText() == CUSTOM_CONTRAST
        self.center_spin.setEnabled(custom)
        self.width_spin.setEnabled(custom)
        layer = self.image_layer
        if layer is None:
            return
        window = self._window_choice()
        uid = layer.unique_id
        self._embeddings = OrderedDict((k, v) for k, v in self._embeddings.items() if k[0] != uid)
        if window is None:
            self._mappings.pop(uid, None)  # resolved from the data in the next worker
        else:
            preset = self.contrast_combo.currentData()
            choice = {"preset": preset} if preset else {"window": window}
            self._mappings[uid] = resolve_intensity(layer.data, multichannel=layer.rgb, **choice)
            center, width = window
            if not layer.rgb:
                layer.contrast_limits = (center - width / 2.0, center + width / 2.0)
        self._invalidate_preview()
        self.request_decode()

    # --- coordinates ------------------------------------------------------------------

    def current_slice(self, layer: Image | None = None) -> int | None:
        """Index along the stack axis of the slice on screen (None for 2D)."""
        layer = layer or self.image_layer
        if layer is None or layer.ndim == 2:
            return None
        point = np.asarray(self.viewer.dims.point)[-layer.ndim:]
        z = int(np.round(layer.world_to_data(point)[0]))
        return int(np.clip(z, 0, layer.data.shape[0] - 1))

    def _to_image_data(self, layer, coords: np.ndarray) -> np.ndarray:
        """Coordinates in ``layer``'s data space → the image layer's data space (via world)."""
        image = self.image_layer
        coords = np.atleast_2d(np.asarray(coords, float))
        if len(coords) == 0:
            return coords.reshape(0, image.ndim)
        world = np.array([layer.data_to_world(c) for c in coords])
        return np.array([image.world_to_data(w) for w in world])

    def _prompts_on_slice(self, z: int | None):
        """Points (row, col), labels and boxes lying on the slice ``z`` of the image."""
        pts = np.empty((0, 2))
        labels = np.empty(0, np.int64)
        boxes = []
        if self._points is not None and len(self._points.data):
            data = self._to_image_data(self._points, self._points.data)
            signs = np.asarray(self._points.features["sign"].astype(str))
            keep = np.ones(len(data), bool) if z is None else np.round(data[:, 0]).astype(int) == z
            pts = data[keep][:, -2:]
            labels = (signs[keep] == POSITIVE).astype(np.int64)
        if self._boxes is not None:
            for verts, kind in zip(self._boxes.data, self._boxes.shape_type):
                if kind not in ("rectangle", "polygon"):
                    continue
                v = self._to_image_data(self._boxes, verts)
                if z is not None and int(np.round(v[:, 0].mean())) != z:
                    continue
                rc = v[:, -2:]
                boxes.append([rc[:, 0].min(), rc[:, 1].min(), rc[:, 0].max(), rc[:, 1].max()])
        return pts, labels, boxes

    # --- model and embedding ----------------------------------------------------------

    def set_engine(self, engine) -> None:
        """Use an already loaded :class:`~napari_sam.engine.SamEngine` (e.g. from a notebook)."""
        self.engine = engine
        self._engine_key = self._requested_engine_key()
        self._embeddings.clear()

    def _requested_engine(self):
        """The (model, device, dtype) chosen now; a loaded engine for another choice is dropped."""
        requested = self._requested_engine_key()
        if self.engine is not None and requested != self._engine_key:
            self.engine = None
            self._embeddings.clear()
        return requested

    def _requested_engine_key(self):
        return (self.model_edit.text().strip(), self.device_combo.currentText(), self.dtype_combo.currentText())

    @staticmethod
    def _embedding_key(layer: Image, z):
        return (layer.unique_id, z)

    def current_embedding(self):
        """The cached embedding for the image and slice on screen, or None."""
        layer = self.image_layer
        if layer is None:
            return None
        emb = self._embeddings.get(self._embedding_key(layer, self.current_slice(layer)))
        if emb is not None and self.engine is not None and emb.model_id != self.engine.model_id:
            return None
        return emb

    def compute_embedding(self) -> None:
        """Embed the image (or the slice on screen) in a worker; no-op if cached."""
        layer = self.image_layer
        if layer is None:
            show_warning("SAM Labeler: add an image layer first.")
            return
        problem = self._unsupported(layer)
        if problem:
            show_error(f"SAM Labeler: {problem}")
            return
        if self._embed_worker is not None:
            return  # already running; its result arrives by signal
        self._ensure_prompt_layers(layer)
        z = self.current_slice(layer)
        requested = self._requested_engine()
        cached = self.current_embedding()
        if cached is not None:
            self.embedding_ready.emit(cached)
            if self._decode_after_embed:
                self._decode_after_embed = False
                self.request_decode()
            return

        engine = self.engine
        mapping = self._mappings.get(layer.unique_id)
        data, rgb = layer.data, layer.rgb
        key = self._embedding_key(layer, z)
        cache = self.cache

        def work():
            nonlocal engine, mapping
            if engine is None:
                yield ("Loading model", 0, 1)
                engine = _load_engine(requested)
            if mapping is None:
                from ..preprocess import resolve_intensity

                # A volume gets one mapping over all slices: same contrast on every slice.
                mapping = resolve_intensity(data, multichannel=rgb)
            image = np.asarray(data if z is None else data[z])
            from ..api import embed_cached_steps

            steps = embed_cached_steps(engine, image, mapping=mapping, cache=cache)
            while True:
                try:
                    done, total = next(steps)
                except StopIteration as stop:
                    return engine, mapping, stop.value
                yield ("Embedding", done, total)

        where = "" if z is None else f" slice {z}"
        self._embed_progress = progress(total=0, desc=f"SAM: embedding {layer.name}{where}")
        self.embed_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._set_status(f"Embedding {layer.name}{where} …")
        # Handlers go through _connect: errors then reach _on_error (a notification)
        # instead of being re-raised in the event loop.
        self._embed_worker = create_worker(work, _connect={
            "yielded": self._on_embed_progress,
            "returned": partial(self._on_embedded, key, requested, layer.unique_id),
            "errored": self._on_error,
            "aborted": self._on_embed_aborted,
            "finished": self._on_embed_finished,
        })

    def cancel_embedding(self) -> None:
        """Stop the running encode between two encoder blocks; nothing is kept."""
        if self._embed_worker is not None:
            self._decode_after_embed = False
            self._embed_worker.quit()

    def _on_embed_progress(self, value) -> None:
        stage, done, total = value
        bar = self._embed_progress  # updating a bar can process events (and finish the worker)
        if bar is None:
            return
        if bar.total != total:
            bar.total = total
        bar.set_description(f"SAM: {stage.lower()}")
        bar.n = done
        bar.refresh()

    def _on_embedded(self, key, engine_key, layer_id, result) -> None:
        engine, mapping, embedding = result
        self.engine, self._engine_key = engine, engine_key
        self._mappings[layer_id] = mapping
        self._embeddings[key] = embedding
        while len(self._embeddings) > MAX_CACHED_EMBEDDINGS:
            self._embeddings.popitem(last=False)
        self._set_status("Embedding ready: add points or boxes; Enter commits, Esc clears.")
        self.embedding_ready.emit(embedding)
        if self._decode_after_embed:
            self._decode_after_embed = False
            self.request_decode()

    def _on_embed_aborted(self) -> None:
        self._set_status("Embedding cancelled.")
        self.embedding_cancelled.emit()

    def _on_embed_finished(self) -> None:
        self._embed_worker = None
        if self._embed_progress is not None:
            self._embed_progress.close()
            self._embed_progress = None
        self.embed_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_error(self, exc: Exception) -> None:
        self._decode_after_embed = False
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        show_error(f"SAM Labeler: {first}")
        self._set_status(f"Error: {exc}")

    # --- decoding and preview ---------------------------------------------------------

    def _on_prompts_changed(self, event=None) -> None:
        if getattr(event, "action", None) in ("adding", "removing", "changing"):
            return  # wait for the completed event
        self.request_decode()

    def _on_slice_changed(self, event=None) -> None:
        if self.image_layer is not None and self.image_layer.ndim == 3:
            self.request_decode()

    def request_decode(self) -> None:
        """Decode the prompts on the current slice from the cached embedding (in a worker)."""
        layer = self.image_layer
        if layer is None or self._unsupported(layer):
            return
        self._decode_seq += 1
        seq = self._decode_seq
        z = self.current_slice(layer)
        pts, labels, boxes = self._prompts_on_slice(z)
        prompts = annotate.group_prompts(pts, labels, boxes)
        if self._refine_label is not None:
            prompts = self._refine_prompts(z, pts, labels)
        if not prompts:
            self._show_preview(z, [], [])
            return
        embedding = self.current_embedding()
        if embedding is None:
            self._decode_after_embed = True
            self.compute_embedding()
            return
        engine = self.engine
        multimask = self.multimask_check.isChecked()
        create_worker(engine.predict_batch, embedding, prompts, multimask=multimask, _connect={
            "returned": partial(self._on_decoded, seq, z, prompts),
            "errored": self._on_error,
        })

    def _refine_prompts(self, z, pts, labels):
        target = self.labels_layer
        if target is None:
            return []
        current = np.asarray(target.data if z is None else target.data[z])
        mask = current == self._refine_label
        box = annotate.box_of_mask(mask)
        if box is None:
            show_warning(f"SAM Labeler: label {self._refine_label} is not on this slice.")
            return []
        return [Prompt(
            points=pts if len(pts) else None,
            point_labels=labels if len(pts) else None,
            box=box,
            mask_input=mask,
        )]

    def _on_decoded(self, seq, z, prompts, predictions) -> None:
        if seq != self._decode_seq:
            return  # newer prompts exist: this result is stale
        self._choice = None
        self._show_preview(z, prompts, predictions)
        self.preview_ready.emit(predictions)

    def _chosen(self, prediction) -> int:
        if self.multimask_check.isChecked() and len(prediction.scores) > 1:
            return self._choice if self._choice is not None else prediction.best
        return 0

    def chosen_masks(self) -> list[np.ndarray]:
        """The mask each object would commit now (after the candidate choice)."""
        return [p.masks[self._chosen(p)] for p in self._predictions]

    def _show_preview(self, z, prompts, predictions) -> None:
        previous = self._preview_slice
        self._objects, self._predictions, self._preview_slice = list(prompts), list(predictions), z
        if self._preview is not None:
            data = self._preview.data
            if previous is not None and previous != z and previous < data.shape[0]:
                data[previous] = 0  # the preview shows one slice at a time
            view = data if z is None else data[z]
            view[...] = 0
            for i, mask in enumerate(self.chosen_masks()):
                view[mask & (view == 0)] = i + 1
            self._preview.refresh()
        self._update_candidate_buttons()
        if predictions:
            scores = ", ".join(f"{p.scores[self._chosen(p)]:.2f}" for p in predictions)
            self._set_status(f"{len(predictions)} object(s), predicted IoU {scores}. Enter commits.")

    def _update_candidate_buttons(self) -> None:
        single = len(self._predictions) == 1 and self.multimask_check.isChecked()
        scores = self._predictions[0].scores if single else []
        chosen = self._chosen(self._predictions[0]) if single else None
        for i, button in enumerate(self.candidate_buttons):
            enabled = single and i < len(scores)
            button.setEnabled(enabled)
            button.setChecked(enabled and i == chosen)
            button.setText(f"{i + 1}: IoU {scores[i]:.2f}" if enabled else f"{i + 1}")

    def choose_candidate(self, index: int) -> None:
        """Pick multimask candidate ``index`` (0-2) for the preview and the commit."""
        if not self._predictions or not self.multimask_check.isChecked():
            return
        if index >= len(self._predictions[0].scores):
            return
        self._choice = index
        self._show_preview(self._preview_slice, self._objects, self._predictions)

    def _on_multimask_toggled(self, _checked: bool) -> None:
        self.request_decode()

    def _invalidate_preview(self) -> None:
        self._decode_seq += 1
        self._predictions, self._objects = [], []
        if self._preview is not None:
            self._preview.data[...] = 0
            self._preview.refresh()
        self._update_candidate_buttons()

    # --- labels -----------------------------------------------------------------------

    @property
    def labels_layer(self) -> Labels | None:
        name = self.labels_combo.currentText()
        if name and name != NEW_LABELS and name in self.viewer.layers:
            return self.viewer.layers[name]
        return None

    def _target_labels(self, image: Image) -> Labels:
        layer = self.labels_layer
        spatial = self._spatial_shape(image)
        if layer is None:
            layer = Labels(
                np.zeros(spatial, np.uint32), name=LABELS_NAME,
                scale=tuple(image.scale), translate=tuple(image.translate),
                # the source geometry (DICOM affine, files) travels with the labels, so
                # File > Save can write NIfTI or DICOM-SEG aligned with the image
                metadata=dict(image.metadata),
            )
            # Just above the image, under the prompt and preview layers.
            self.viewer.layers.insert(self.viewer.layers.index(image) + 1, layer)
            self.labels_combo.setCurrentText(layer.name)
            if self._points is not None:  # keep clicking = prompting, not painting
                self.viewer.layers.selection.active = self._points
        elif tuple(layer.data.shape) != spatial:
            raise ValueError(
                f"labels layer {layer.name!r} has shape {tuple(layer.data.shape)}, the image "
                f"{image.name!r} has {spatial}; choose a matching layer or {NEW_LABELS}"
            )
        return layer

    def commit(self) -> None:
        """Write the preview into the labels layer as one undoable edit, then clear prompts."""
        image = self.image_layer
        if image is None or not self._predictions:
            self._set_status("Nothing to commit: add points or boxes first.")
            return
        try:
            target = self._target_labels(image)
        except ValueError as exc:
            self._on_error(exc)
            return
        z = self._preview_slice
        current = np.asarray(target.data if z is None else target.data[z])
        masks = self.chosen_masks()
        if self._refine_label is not None:
            ids, replace = [self._refine_label], self._refine_label
        else:
            first = self.label_id_spin.value() or annotate.next_label_id(target.data)
            after = max(first, annotate.next_label_id(target.data) - 1)
            ids, replace = [first] + list(range(after + 1, after + len(masks))), None
        plan = annotate.plan_commit(current, masks, ids, overwrite=self.overwrite_check.isChecked(), replace=replace)
        if plan.size:
            indices = plan.indices if z is None else (np.full(plan.indices[0].shape, z),) + plan.indices
            target.data_setitem(indices, plan.values)
        if z is not None:  # the user's own slices bound later propagation
            seeds = self._seed_slices.setdefault(target.unique_id, {})
            for label in plan.ids:
                seeds.setdefault(label, set()).add(z)
        if plan.kept:
            show_info(f"SAM Labeler: kept {plan.kept} pixels of other labels (Overwrite other labels is off).")
        where = "" if z is None else f" on slice {z}"
        self._set_status(f"Committed label(s) {', '.join(map(str, plan.ids))}{where}. Ctrl+Z or Undo reverts.")
        self.committed.emit(plan)
        self.label_id_spin.setValue(0)
        self.stop_refining(decode=False)
        self.clear_prompts()

    def undo(self) -> None:
        """Undo the last edit of the labels layer (napari's own history, same as Ctrl+Z)."""
        layer = self.labels_layer
        if layer is not None:
            layer.undo()

    def redo(self) -> None:
        """Redo the last undone edit of the labels layer."""
        layer = self.labels_layer
        if layer is not None:
            layer.redo()

    def clear_prompts(self) -> None:
        """Remove all points and boxes and the preview (Esc)."""
        self._invalidate_preview()
        if self._points is not None and len(self._points.data):
            self._points.data = np.empty((0, self._points.ndim))
        if self._boxes is not None and len(self._boxes.data):
            self._boxes.data = []
        self._invalidate_preview()

    def _refine_selected(self) -> None:
        layer = self.labels_layer
        if layer is None:
            show_warning("SAM Labeler: choose a labels layer to refine a label from.")
            return
        self.refine_label(int(layer.selected_label))

    def refine_label(self, label: int) -> None:
        """Use ``label`` of the labels layer as the prompt (mask + box); points correct it."""
        self._refine_label = int(label)
        self.stop_refine_button.setEnabled(True)
        self._set_status(f"Refining label {label}: add points to correct it, Enter replaces it.")
        self.request_decode()

    def stop_refining(self, decode: bool = True) -> None:
        self._refine_label = None
        self.stop_refine_button.setEnabled(False)
        if decode:
            self.request_decode()

    # --- 3D stack: embed all slices, propagate ----------------------------------------

    def _stack_busy(self, busy: bool) -> None:
        self.embed_stack_button.setEnabled(not busy)
        self.propagate_button.setEnabled(not busy)
        self.stack_cancel_button.setEnabled(busy)

    def _start_stack_worker(self, layer, requested, body, on_done, desc: str) -> None:
        """Run ``body(engine, stack)`` (a generator of (text, done, total)) in a worker.

        The worker loads the model if needed and builds the Stack (one intensity mapping
        for the volume); on success the engine and mapping are kept for later work.
        """
        engine, mapping = self.engine, self._mappings.get(layer.unique_id)
        data, uid = layer.data, layer.unique_id

        def work():
            from ..volume import Stack

            loaded = engine
            if loaded is None:
                yield ("Loading model …", 0, 1)
                loaded = _load_engine(requested)
            stack = Stack(data, mapping=mapping)
            result = yield from body(loaded, stack)
            return loaded, stack.mapping, result

        def returned(value):
            loaded, used_mapping, result = value
            self.engine, self._engine_key = loaded, requested
            self._mappings[uid] = used_mapping
            on_done(result)

        self._stack_busy(True)
        self._stack_progress = progress(total=0, desc=desc)
        self._stack_worker = create_worker(work, _connect={
            "yielded": self._on_stack_progress,
            "returned": returned,
            "errored": self._on_error,
            "aborted": lambda: self._set_status("Stopped; nothing was written (embedded slices stay cached)."),
            "finished": self._on_stack_finished,
        })

    def _on_stack_progress(self, value) -> None:
        text, done, total = value
        bar = self._stack_progress
        if bar is None:
            return
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        self._set_status(text)

    def _on_stack_finished(self) -> None:
        self._stack_worker = None
        if self._stack_progress is not None:
            self._stack_progress.close()
            self._stack_progress = None
        self._stack_busy(False)

    def cancel_stack_work(self) -> None:
        """Stop "Embed stack" or "Propagate" at the next step."""
        if self._stack_worker is not None:
            self._stack_worker.quit()

    def _stack_inputs(self):
        layer = self.image_layer
        if layer is None or layer.ndim != 3 or self._unsupported(layer):
            show_warning("SAM Labeler: choose a 3D image layer (Z, Y, X).")
            return None
        if self._stack_worker is not None or self._embed_worker is not None:
            show_info("SAM Labeler: wait for the running task (or cancel it).")
            return None
        requested = self._requested_engine()
        lo, hi = self.z_from.value(), self.z_to.value()
        if lo > hi:
            show_warning(f"SAM Labeler: slice range {lo} to {hi} is empty.")
            return None
        return layer, requested, (lo, hi)

    def embed_stack(self) -> None:
        """Embed the chosen slice range into the cache in a worker (progress, Cancel)."""
        inputs = self._stack_inputs()
        if inputs is None:
            return
        layer, requested, (lo, hi) = inputs
        cache = self.cache

        def body(engine, stack):
            n = hi - lo + 1
            for step in stack.encode(engine, cache, range(lo, hi + 1)):
                state = "cached" if step.cached else "embedded"
                value = step.done if step.fraction == 1.0 else step.done + step.fraction
                yield (f"Slice {step.index}: {state} ({step.done}/{n})", value, n)
            return sum(cache.contains(stack.key(z, engine)) for z in range(len(stack))), len(stack)

        def done(result):
            cached, total = result
            self.cached_label.setText(f"cached: {cached}/{total} slices")
            self._set_status(f"Slices {lo}-{hi} embedded; {cached} of {total} slices are in the cache.")
            self.stack_embedded.emit((cached, total))

        self._start_stack_worker(layer, requested, body, done, f"SAM: embedding slices {lo}-{hi}")

    def propagate(self) -> None:
        """Propagate the labels on this slice through the slice range (one undo step)."""
        inputs = self._stack_inputs()
        if inputs is None:
            return
        layer, requested, z_range = inputs
        target = self.labels_layer
        if target is None or tuple(target.data.shape) != self._spatial_shape(layer):
            show_warning("SAM Labeler: choose a labels layer with the image's shape (commit a label first).")
            return
        z = self.current_slice(layer)
        current = np.asarray(target.data[z])
        if self.selected_only_check.isChecked():
            ids = [int(target.selected_label)]
        else:
            ids = [int(i) for i in np.unique(current) if i != 0]
        ids = [i for i in ids if (current == i).any()]
        if not ids:
            show_warning(f"SAM Labeler: no labels on slice {z} to propagate.")
            return
        seeds = self._seed_slices.get(target.unique_id, {})
        seed_slices = sorted({z} | {s for i in ids for s in seeds.get(i, ())})
        original = np.array(target.data)
        work_labels = original.copy()
        cache = self.cache
        direction = self.direction_combo.currentText()
        from ..propagate import StopRule

        rule = StopRule(min_iou=self.min_iou_spin.value())
        overwrite = self.overwrite_check.isChecked()

        def body(engine, stack):
            from ..api import propagate_labels

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
            changed = np.nonzero(work_labels != original)
            if changed[0].size:
                target.data_setitem(changed, work_labels[changed])  # one undo step
            reached = sorted({zz for zs in summary.slices.values() for zz in zs})
            where = f"slices {reached[0]}-{reached[-1]}" if reached else "no other slice"
            self._set_status(f"Propagated label(s) {', '.join(map(str, ids))} to {where}. Ctrl+Z reverts.")
            self.propagated.emit(summary)

        self._start_stack_worker(layer, requested, body, done, f"SAM: propagating from slice {z}")


def _load_engine(requested):
    from ..engine import load_model

    return load_model(requested[0] or None, device=requested[1], dtype=requested[2])
