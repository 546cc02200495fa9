"""The "SAM Labeler" dock widget: four panels over one shared state, wired to the viewer.

=================  ============================================================
``state``          :class:`~.state.LabelerState`: engine, embeddings, prompts, signals
``model``          :class:`~.model_panel.ModelPanel`: image, model, SAM contrast, embedding
``prompts``        :class:`~.prompt_panel.PromptPanel`: prompt layers, decoding, candidates
``labels``         :class:`~.labels_panel.LabelsPanel`: commit, undo, refine
``stack``          :class:`~.stack_panel.StackPanel`: embed a stack, propagate (3D only)
``everything``     :class:`~.everything_panel.EverythingPanel`: automatic segmentation
``finetune``       :class:`~.finetune_panel.FinetunePanel`: train the decoder on a labels layer
=================  ============================================================

Work never runs on the GUI thread (workers with progress and Cancel); results are applied
to layers on the GUI thread, and commits go through napari's labels history so Ctrl+Z
restores the layer exactly. A new action (segment everything, fine-tune) is one more panel.
"""

from __future__ import annotations

from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from .autosave_panel import AutosavePanel
from .everything_panel import EverythingPanel
from .finetune_panel import FinetunePanel
from .labels_panel import LabelsPanel
from .model_panel import ModelPanel
from .prompt_panel import PromptPanel
from .stack_panel import StackPanel
from .state import LABELS_NAME, LabelerState

__all__ = ["LABELS_NAME", "SamLabelerWidget"]


def _unless_closed(func) -> None:
    """Run a viewer key's action; a dock that was closed (and deleted by Qt) does nothing."""
    try:
        func()
    except RuntimeError as exc:
        if "has been deleted" not in str(exc):
            raise


class SamLabelerWidget(QWidget):
    """Click points / draw boxes → live SAM mask → commit into a Labels layer.

    Signals (the shared state's, also reachable here): ``embedding_ready``,
    ``preview_ready``, ``committed``, ``embedding_cancelled``, ``stack_embedded``,
    ``propagated`` (see :class:`~.state.LabelerState`).
    """

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = LabelerState(napari_viewer, parent=self)
        for name in LabelerState.PUBLIC_SIGNALS:
            setattr(self, name, getattr(self.state, name))
        # prompts before labels: the labels panel's Clear button is the prompts' action
        self.model = ModelPanel(self.state, self)
        self.prompts = PromptPanel(self.state, self)
        self.labels = LabelsPanel(self.state, self)
        self.stack = StackPanel(self.state, self)
        self.everything = EverythingPanel(self.state, self)
        self.finetune_panel = FinetunePanel(self.state, self)
        self.autosave = AutosavePanel(self.state, self)
        self._build_ui()
        self._connect_viewer()
        self.refresh_layer_choices()

    def _build_ui(self) -> None:
        # The controls scroll when the screen is shorter than they are, rather than
        # pushing napari's window past the bottom of the screen.
        content = QWidget()
        layout = QVBoxLayout(content)
        # the restore offer first: it only shows when there is something to restore
        for panel in (self.autosave, self.model, self.prompts, self.labels, self.stack, self.everything,
                      self.finetune_panel):
            layout.addWidget(panel)
        layout.addStretch(1)
        # The status line stays above the scrolling controls: on a laptop screen the bottom
        # of the panels is out of view, and progress (an encoder export) and errors with it.
        self.status = QLabel("Choose an image, then add points or boxes.")
        self.status.setWordWrap(True)
        self.status.setContentsMargins(6, 4, 6, 4)
        self.state.status_changed.connect(self.status.setText)
        self._scroll = QScrollArea()
        self._scroll.setWidgetResizable(True)
        self._scroll.setFrameShape(QFrame.Shape.NoFrame)
        self._scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self._scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.status)
        outer.addWidget(self._scroll)
        self._fit_scroll_width()

    def _fit_scroll_width(self) -> None:
        """As wide as the controls plus a vertical scroll bar: never a horizontal scroll bar."""
        content = self._scroll.widget()
        content.adjustSize()
        self._scroll.setMinimumWidth(
            content.minimumSizeHint().width() + self._scroll.verticalScrollBar().sizeHint().width())

    # --- viewer wiring ----------------------------------------------------------------

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(lambda event: self.state.forget_layer(event.value))
        layers.events.removed.connect(self.refresh_layer_choices)
        for layer in layers:
            self._watch(layer)
        self.viewer.dims.events.current_step.connect(self.prompts.on_slice_changed)
        self.state.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.state.labels_combo.activated.connect(lambda *_: self.state.remember_target(self.state.labels_layer))
        for key, func in (("Enter", self.labels.commit), ("Escape", self.prompts.clear_prompts)):
            self.viewer.bind_key(key, lambda _viewer, f=func: _unless_closed(f), overwrite=True)

    def _on_layer_inserted(self, event) -> None:
        self._watch(event.value)
        self.refresh_layer_choices()

    def _watch(self, layer) -> None:
        layer.events.name.connect(self.refresh_layer_choices)
        layer.events.data.connect(lambda _event, layer=layer: self._on_data_changed(layer))

    def _on_data_changed(self, layer) -> None:
        """New pixels (a filter, a reload, a new time point): the next prompt embeds them."""
        if layer in (self.state.points, self.state.boxes, self.state.preview):
            return
        self.state.data_changed(layer)
        if layer == self.state.image_layer:
            self.prompts.invalidate_preview()

    def refresh_layer_choices(self, event=None) -> None:
        """Offer the viewer's layers by name, keep the chosen ones by identity (a rename or
        a new layer changes nothing else); the plugin's own layers are never offered."""
        own = self.state.own_layer_ids()
        # a labels layer is written only when chosen (or made by the widget): when the chosen
        # one is deleted the choice falls back to "(new labels layer)", never to another layer
        self.state.labels_combo.refresh(self.viewer.layers, exclude=own)
        self.finetune_panel.refresh(self.viewer.layers, exclude=own)
        if self.state.image_combo.refresh(self.viewer.layers, exclude=own):
            self._on_image_changed()

    def _on_image_changed(self, *_args) -> None:
        self.prompts.invalidate_preview()
        self.state.labels_for_image()  # each image keeps its own labels target
        layer = self.state.image_layer
        if layer is None:
            return
        problem = self.state.unsupported(layer)
        if problem:
            self.state.set_status(problem)
            return
        self.prompts.ensure_layers(layer)
        self.stack.show_for(layer)
        self.everything.show_for(layer)
        self.autosave.offer(layer)
        self._fit_scroll_width()
        self.model.window_for(layer)
        self.state.set_status(f"{layer.name}: add points (click) or boxes, or press Compute embedding.")

    # --- the actions, for scripts and notebooks ---------------------------------------

    @property
    def engine(self):
        """The loaded :class:`~napari_sam.engine.SamEngine`, or None before the first embedding."""
        return self.state.engine

    @property
    def cache(self):
        """The persistent :class:`~napari_sam.api.EmbeddingCache` this widget embeds through."""
        return self.state.cache

    @property
    def image_layer(self) -> Image | None:
        return self.state.image_layer

    @property
    def labels_layer(self) -> Labels | None:
        return self.state.labels_layer

    def set_engine(self, engine) -> None:
        """Use an already loaded :class:`~napari_sam.engine.SamEngine` (e.g. from a notebook)."""
        self.model.set_engine(engine)

    def current_slice(self, layer: Image | None = None) -> int | None:
        """Index along the stack axis of the slice on screen (None for 2D)."""
        return self.state.current_slice(layer)

    def current_embedding(self):
        """The kept embedding for the image and slice on screen, or None."""
        return self.state.current_embedding()

    def compute_embedding(self) -> None:
        """Embed the image (or the slice on screen) in a worker; no-op if cached."""
        self.model.compute_embedding()

    def cancel_embedding(self) -> None:
        self.model.cancel_embedding()

    def request_decode(self) -> None:
        self.prompts.request_decode()

    def choose_candidate(self, index: int) -> None:
        """Pick multimask candidate ``index`` (0-2) for the preview and the commit."""
        self.prompts.choose_candidate(index)

    def chosen_masks(self):
        return self.prompts.chosen_masks()

    def clear_prompts(self) -> None:
        self.prompts.clear_prompts()

    def commit(self) -> None:
        """Write the preview into the labels layer as one undoable edit, then clear prompts."""
        self.labels.commit()

    def undo(self) -> None:
        self.labels.undo()

    def redo(self) -> None:
        self.labels.redo()

    def refine_label(self, label: int) -> None:
        """Use ``label`` of the labels layer as the prompt (mask + box); points correct it."""
        self.labels.refine_label(label)

    def stop_refining(self) -> None:
        self.labels.stop_refining()

    def embed_stack(self) -> None:
        self.stack.embed_stack()

    def propagate(self) -> None:
        self.stack.propagate()

    def cancel_stack_work(self) -> None:
        self.stack.cancel()

    def segment_everything(self) -> None:
        """Automatic segmentation of the image / slice / 3D range into a new labels layer (worker)."""
        self.everything.run()

    def cancel_everything(self) -> None:
        self.everything.cancel()

    def finetune(self) -> None:
        """Fine-tune the mask decoder on the labels layer chosen in the Fine-tune panel (worker)."""
        self.finetune_panel.run()

    def cancel_finetune(self) -> None:
        self.finetune_panel.cancel()
