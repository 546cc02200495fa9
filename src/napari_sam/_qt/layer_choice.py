"""A combo box that chooses a napari layer by identity, showing its name.

Layers are held by ``unique_id``, never by display name: renaming the image, the labels
layer or the plugin's own layers changes nothing but the text shown (micro-sam users
filed bugs about the name-keyed alternative). napari hands plugins a proxy viewer whose
layers are fresh wrappers on every access, so layers are found again by ``unique_id``.
"""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox


class LayerChoice(QComboBox):
    """Layers of one type (``kind``), optionally after a fixed first entry (``extra``)."""

    def __init__(self, kind, extra: str | None = None):
        super().__init__()
        self.kind, self.extra = kind, extra
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(6)

    def refresh(self, layers, exclude=(), prefer_last: bool = False) -> bool:
        """Rebuild the entries from ``layers`` keeping the chosen layer; True if it changed.

        ``exclude``: unique ids not offered (the plugin's own layers). ``prefer_last``: when
        the chosen layer is gone, choose the newest layer rather than the first entry.
        """
        keep = self.currentData()
        kept_extra = self.count() > 0 and self.extra is not None and keep is None
        exclude = {str(uid) for uid in exclude}
        entries = [(layer.name, str(layer.unique_id)) for layer in layers
                   if isinstance(layer, self.kind) and str(layer.unique_id) not in exclude]
        self.blockSignals(True)
        self.clear()
        if self.extra is not None:
            self.addItem(self.extra, None)
        for name, uid in entries:
            self.addItem(name, uid)
        index = self.findData(keep) if keep is not None else (0 if kept_extra else -1)
        if index < 0 and prefer_last and entries:
            index = self.count() - 1
        self.setCurrentIndex(max(index, 0) if self.count() else -1)
        self.blockSignals(False)
        return self.currentData() != keep

    def layer(self, layers):
        """The chosen layer, found again by ``unique_id`` (None for ``extra`` or if gone)."""
        uid = self.currentData()
        if uid is None:
            return None
        for layer in layers:
            if str(layer.unique_id) == uid:
                return layer
        return None

    def select(self, layer) -> None:
        index = self.findData(str(layer.unique_id))
        if index >= 0:
            self.setCurrentIndex(index)
