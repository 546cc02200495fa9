"""Committed labels survive a crash: saved as they are made, offered back on reopening.

After every commit, propagation, undo or redo through the SAM Labeler, the touched slices
of the labels layer are written next to the embedding cache, keyed by the image's content
(:mod:`napari_sam.autosave`). When an image with saved labels is chosen again (after napari
died, or any time later), this panel appears and offers them as a new labels layer. A cache
folder that cannot be written costs one warning, never a commit.
"""

from __future__ import annotations

import time

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QGroupBox, QLabel, QVBoxLayout

from ..api import Autosave, image_key
from .controls import button, row
from .placement import placement
from .state import LABELS_NAME, LabelerState


class AutosavePanel(QGroupBox):
    """Hidden until the chosen image has autosaved labels: Restore / Discard."""

    def __init__(self, state: LabelerState, host):
        super().__init__("Autosaved labels")
        self.state, self.host = state, host
        self.store = Autosave()
        self._keys: dict = {}  # layer uid -> (data object id, key)
        self._sessions: dict = {}  # labels layer uid -> this napari session's autosave entry
        self._handled: set = set()  # sessions restored or discarded here: not offered again
        self._offered = None  # (key, session) shown in the panel
        self._warned = False
        layout = QVBoxLayout(self)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        layout.addWidget(self.note)
        self.restore_button = button("Restore", self.restore, tooltip="Open them as a new labels layer")
        self.discard_button = button("Discard", self.discard, tooltip="Delete these autosaved labels")
        layout.addLayout(row(self.restore_button, self.discard_button))
        self.setVisible(False)

    def key(self, image) -> str:
        """The image's content key, computed once per data array."""
        cached = self._keys.get(image.unique_id)
        if cached is None or cached[0] != id(image.data):
            cached = (id(image.data), image_key(image.data))
            self._keys[image.unique_id] = cached
        return cached[1]

    def offer(self, image) -> None:
        """Show the panel when ``image`` has labels kept by an earlier session (the newest;
        this session's own entries and those already restored or discarded are not offered)."""
        key = None if image is None else self.key(image)
        info = None if key is None else self.store.available(key, exclude={*self._sessions.values(), *self._handled})
        self._offered = None if info is None else (key, info["session"])
        self.setVisible(info is not None)
        if info is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["time"]))
            self.note.setText(f"Labels committed on this image ({info['labels'] or 'labels'}, {when}, "
                              f"{info['slices']} slice(s)) were kept safe.")
            show_info(f"SAM Labeler: autosaved labels of {info['image'] or image.name} from {when}: "
                      "Restore or Discard them at the top of the SAM Labeler.")

    def saved(self, target: Labels, slices) -> None:
        """Keep ``slices`` of ``target`` (None: the whole 2D layer; "known": every saved slice)."""
        image = self.state.image_layer
        if image is None:
            return
        try:
            key = self.key(image)
            session = self._sessions.setdefault(target.unique_id, self.store.new_session())
            if slices == "known":
                slices = None if np.ndim(target.data) == 2 else self.store.saved_slices(key, session)
            self.store.record(key, session, target.data, slices, image_name=image.name, labels_name=target.name)
        except OSError as exc:  # the autosave is a safety net: its failure never blocks work
            if not self._warned:
                show_warning(f"SAM Labeler: cannot autosave labels to {self.store.root} ({exc})")
                self._warned = True

    def restore(self) -> None:
        image = self.state.image_layer
        if image is None or self._offered is None:
            return
        key, session = self._offered
        labels = self.store.restore(key, session)
        if labels is None or labels.shape != self.state.spatial_shape(image):
            self.state.set_status("Nothing to restore for this image.")
            return
        layer = Labels(labels, name=f"{LABELS_NAME} (restored)", **placement(image), metadata=dict(image.metadata))
        viewer = self.state.viewer
        viewer.layers.insert(viewer.layers.index(image) + 1, layer)
        self._handled.add(session)  # kept on disk until discarded; the restored layer autosaves anew
        self.host.refresh_layer_choices()
        self.state.labels_combo.select(layer)
        if self.state.points is not None:
            viewer.layers.selection.active = self.state.points
        self.state.set_status(f"Restored autosaved labels into {layer.name!r}.")
        self.offer(image)  # an older session, if any

    def discard(self) -> None:
        if self._offered is not None:
            key, session = self._offered
            self.store.discard(key, session)
            self._handled.add(session)
        self.offer(self.state.image_layer)
