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


def advance(bar, done, total, description: str | None = None) -> None:
    """Move a napari progress bar to ``done`` of ``total`` (no-op once it was closed: updating
    a bar can process events, and the worker may finish meanwhile)."""
    if bar is None:
        return
    if bar.total != total:
        bar.total = total
    if description is not None:
        bar.set_description(description)
    bar.n = done
    bar.refresh()


class WorkerTask:
    """For a panel that runs one worker at a time with a napari progress bar and Run/Cancel
    buttons (``run_button``, ``cancel_button``, ``state``): the bar and buttons follow it.
    The worker yields ``(status text, done, total)``."""

    worker = None
    _progress = None

    def _busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def _on_progress(self, value) -> None:
        text, done, total = value
        advance(self._progress, done, total)
        self.state.set_status(text)

    def _on_finished(self) -> None:
        self.worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._busy(False)
