"""One labeling session's shared state: what every panel of the dock reads and writes.

One state object per dock widget (not a process-wide singleton): the loaded engine, the
in-session embeddings and intensity mappings, the persistent cache, the prompt and preview
layers, the current preview, and the signals tests and notebooks listen to. Panels hold a
reference to it; the helpers here need no Qt controls beyond the two layer choosers.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from ..api import EmbeddingCache, embedding_key, load_model
from .layer_choice import LayerChoice
from .placement import world_to_drawn_data

POINTS_NAME = "SAM points"
BOXES_NAME = "SAM boxes"
PREVIEW_NAME = "SAM preview"
NEW_LABELS = "(new labels layer)"
LABELS_NAME = "SAM labels"
POSITIVE, NEGATIVE = "positive", "negative"
OWN_MARK = "napari_sam_labeler_layer"  # metadata key of the plugin's own layers
MAX_CACHED_EMBEDDINGS = 16  # per widget, in memory; the persistent cache is cache.py's job


class LabelerState(QObject):
    """Engine, embeddings, prompts and preview of one dock widget."""

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
    #: "Segment everything" finished: the new labels layer
    everything_done = Signal(object)
    #: "Fine-tune" finished or stopped: FinetuneResult
    finetuned = Signal(object)
    #: one line for the dock's status label
    status_changed = Signal(str)
    #: the signals the dock widget offers scripts and tests
    PUBLIC_SIGNALS = ("embedding_ready", "preview_ready", "committed", "embedding_cancelled",
                      "stack_embedded", "propagated", "everything_done", "finetuned")

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        # model: the engine and the (model, device, dtype, backend) it was loaded for
        self.engine = None
        self.engine_key = None
        # in-session embeddings {content key: ImageEmbedding} (pixels + model + mapping, as
        # the persistent cache: replaced or edited pixels never meet an old embedding) and
        # SAM intensity mappings {layer uid: IntensityMapping}
        self.embeddings: OrderedDict = OrderedDict()
        self.mappings: dict = {}
        self.cache = EmbeddingCache()  # $NAPARI_SAM_CACHE or the user cache folder
        # per labels layer: {label id: slices the user committed it on} (propagation seeds)
        self.seed_slices: dict = {}
        # per image layer: the labels layer chosen or made for it
        self.labels_target: dict = {}
        # the plugin's own layers
        self.points = None
        self.boxes = None
        self.preview = None
        # the preview on screen: prompts per object, their predictions, slice, chosen candidate
        self.objects: list = []
        self.predictions: list = []
        self.preview_slice = None
        self.choice: int | None = None
        self.refine_label: int | None = None
        # workers and decode bookkeeping
        self.embed_worker = None
        self.stack_worker = None
        self.decode_after_embed = False
        self.decode_seq = 0
        # which image is prompted and which labels layer receives commits (held by identity)
        self.image_combo = LayerChoice(Image)
        self.labels_combo = LayerChoice(Labels, extra=NEW_LABELS)

    # --- status and errors ------------------------------------------------------------

    def set_status(self, text: str) -> None:
        self.status_changed.emit(text)

    def report_error(self, exc: Exception) -> None:
        """A worker's or an action's error: one notification line, the whole text in the status."""
        self.decode_after_embed = False
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        show_error(f"SAM Labeler: {first}")
        self.set_status(f"Error: {exc}")

    # --- layers -----------------------------------------------------------------------

    @property
    def image_layer(self) -> Image | None:
        return self.image_combo.layer(self.viewer.layers)

    @property
    def labels_layer(self) -> Labels | None:
        return self.labels_combo.layer(self.viewer.layers)

    def own_layer_ids(self) -> set:
        """unique ids of the plugin's layers, this dock's and any left by a closed one (marked in
        their metadata): never offered as image or labels."""
        own = {layer.unique_id for layer in (self.points, self.boxes, self.preview) if layer is not None}
        return own | {layer.unique_id for layer in self.viewer.layers if (layer.metadata or {}).get(OWN_MARK)}

    def labels_for_image(self) -> None:
        """Choose the labels layer last used with the chosen image ("(new labels layer)" if
        none): committing on another image never writes into this one's labels."""
        image = self.image_layer
        if image is None:
            return
        target = self.labels_target.get(image.unique_id)
        layer = None if target is None else next(
            (lay for lay in self.viewer.layers if lay.unique_id == target), None)
        if layer is not None:
            self.labels_combo.select(layer)
        else:
            self.labels_combo.setCurrentIndex(0)

    def remember_target(self, labels) -> None:
        image = self.image_layer
        if image is not None:
            self.labels_target[image.unique_id] = None if labels is None else labels.unique_id

    @staticmethod
    def unsupported(layer: Image) -> str | None:
        if layer.multiscale:
            return f"{layer.name}: multiscale images are not supported yet; open the full-resolution level."
        if layer.ndim not in (2, 3):
            return (f"{layer.name}: SAM Labeler works on 2D images and 3D stacks (Z, Y, X); "
                    f"this layer has {layer.ndim} spatial dimensions.")
        return None

    def view_problem(self, layer: Image) -> str | None:
        """Prompts are read on the stack's (row, column) planes as napari shows them: refuse
        (with the way out) when napari shows another plane or a 3D rendering."""
        dims = self.viewer.dims
        if layer.ndim == 3 and dims.ndisplay == 3:
            return "SAM Labeler prompts on 2D slices: switch napari to the 2D view to add points or boxes."
        if layer.ndim == 3 and tuple(dims.order[-2:]) != (dims.ndim - 2, dims.ndim - 1):
            return ("SAM Labeler prompts on the stack's (row, column) slices: napari shows another plane; "
                    "reset the dims order (the transpose button, or View > Reset dims order).")
        return None

    @staticmethod
    def intensity_options(layer: Image) -> dict:
        """What the layer's source says about SAM's input: MONOCHROME1 radiographs are
        inverted (bone bright, air dark), as the reader shows them."""
        dicom = (layer.metadata or {}).get("dicom") or {}
        return {"invert": True} if str(dicom.get("photometric", "")).upper() == "MONOCHROME1" else {}

    @staticmethod
    def spatial_shape(layer: Image) -> tuple[int, ...]:
        shape = tuple(layer.data.shape)
        return shape[:-1] if layer.rgb else shape

    def forget_layer(self, layer) -> None:
        """Drop what was kept for a removed layer (napari's proxy layers: compare with ==)."""
        if layer == self.points:
            self.points = None
        elif layer == self.boxes:
            self.boxes = None
        elif layer == self.preview:
            self.preview = None
        self.mappings.pop(layer.unique_id, None)

    def data_changed(self, layer) -> None:
        """New pixels in ``layer``: a contrast computed from the old ones is dropped (a chosen
        window stays); embeddings need nothing, they are keyed by content."""
        mapping = self.mappings.get(layer.unique_id)
        if mapping is not None and mapping.mode != "window":
            self.mappings.pop(layer.unique_id, None)

    # --- coordinates ------------------------------------------------------------------

    def current_slice(self, layer: Image | None = None) -> int | None:
        """Index along the stack axis of the slice on screen (None for 2D)."""
        layer = layer or self.image_layer
        if layer is None or layer.ndim == 2:
            return None
        point = np.asarray(self.viewer.dims.point)[-layer.ndim:]
        z = int(np.round(world_to_drawn_data(layer, point)[0, 0]))  # the slice napari shows
        return int(np.clip(z, 0, layer.data.shape[0] - 1))

    def to_image_data(self, layer, coords: np.ndarray) -> np.ndarray:
        """Coordinates in ``layer``'s data space → the image's data space as napari draws it
        (via world; for an oblique stack, the pixel under the cursor on the slice shown)."""
        image = self.image_layer
        coords = np.atleast_2d(np.asarray(coords, float))
        if len(coords) == 0:
            return coords.reshape(0, image.ndim)
        world = np.array([layer.data_to_world(c) for c in coords])
        return world_to_drawn_data(image, world)

    def prompts_on_slice(self, z: int | None):
        """Points (row, col), labels and boxes lying on the slice ``z`` of the image."""
        pts = np.empty((0, 2))
        labels = np.empty(0, np.int64)
        boxes = []
        if self.points is not None and len(self.points.data):
            data = self.to_image_data(self.points, self.points.data)
            signs = np.asarray(self.points.features["sign"].astype(str))
            keep = np.ones(len(data), bool) if z is None else np.round(data[:, 0]).astype(int) == z
            pts = data[keep][:, -2:]
            labels = (signs[keep] == POSITIVE).astype(np.int64)
        if self.boxes is not None:
            for verts, kind in zip(self.boxes.data, self.boxes.shape_type):
                if kind not in ("rectangle", "polygon"):
                    continue
                v = self.to_image_data(self.boxes, verts)
                if z is not None and int(np.round(v[:, 0].mean())) != z:
                    continue
                rc = v[:, -2:]
                boxes.append([rc[:, 0].min(), rc[:, 1].min(), rc[:, 0].max(), rc[:, 1].max()])
        return pts, labels, boxes

    # --- engine and embeddings --------------------------------------------------------

    def use_engine(self, engine, key) -> None:
        """Keep ``engine`` as the one loaded for ``key`` = (model, device, dtype, backend)."""
        self.engine, self.engine_key = engine, key

    def drop_engine_unless(self, key) -> None:
        """Forget the loaded engine (and its embeddings) if it was loaded for another choice."""
        if self.engine is not None and key != self.engine_key:
            self.engine = None
            self.embeddings.clear()

    def current_embedding(self):
        """The kept embedding of the pixels on screen (image, slice, contrast, model), or None."""
        layer = self.image_layer
        mapping = None if layer is None else self.mappings.get(layer.unique_id)
        if mapping is None or self.engine is None:
            return None
        z = self.current_slice(layer)
        image = np.asarray(layer.data if z is None else layer.data[z])
        return self.embeddings.get(embedding_key(self.engine, image, mapping))

    def remember_embedding(self, key, embedding) -> None:
        self.embeddings[key] = embedding
        while len(self.embeddings) > MAX_CACHED_EMBEDDINGS:
            self.embeddings.popitem(last=False)



def load_engine(requested, say=None, cancelled=None):
    """Load the engine for ``requested`` = (model, device, dtype, backend); runs in a worker.

    ``say`` receives messages of slow one-time steps (the encoder export, which runs in a
    child process so that it never holds the interpreter lock the GUI needs)."""
    backend = requested[3] if len(requested) > 3 else "auto"
    return load_model(requested[0] or None, device=requested[1], dtype=requested[2], backend=backend,
                      on_progress=say, export_in_subprocess=True, cancelled=cancelled)
