"""Small Qt control helpers shared by the panels: narrow buttons and combos, rows."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QPushButton


def fit_width(button: QPushButton) -> None:
    """Let a button shrink to its text: napari's style sheet gives every button a wide minimum."""
    button.setMinimumWidth(button.fontMetrics().horizontalAdvance(button.text()) + 24)


def button(text: str, slot, *, enabled: bool = True, tooltip: str = "") -> QPushButton:
    widget = QPushButton(text)
    fit_width(widget)
    widget.clicked.connect(slot)
    widget.setEnabled(enabled)
    if tooltip:
        widget.setToolTip(tooltip)
    return widget


def combo(items=(), *, tooltip: str = "") -> QComboBox:
    """A combo box that does not widen the dock to its longest entry (full text in the popup)."""
    widget = QComboBox()
    widget.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    widget.setMinimumContentsLength(6)
    widget.addItems(list(items))
    if tooltip:
        widget.setToolTip(tooltip)
    return widget


def row(*widgets) -> QHBoxLayout:
    layout = QHBoxLayout()
    for widget in widgets:
        layout.addWidget(widget)
    return layout
