"""``napari-sam demo``: napari with a bundled sample and the plugin's dock widget."""

from __future__ import annotations

PLUGIN = "napari-sam-labeler"


def dock_plugin(viewer, model=None) -> list:
    """Dock the plugin's widgets; ``model`` goes into the labeler's Model field."""
    docks = []
    for name in _plugin_widgets():
        dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        docks.append((dock, widget))
        model_edit = getattr(getattr(widget, "model", None), "model_edit", None)
        if model is not None and model_edit is not None:
            model_edit.setText(str(model))
    return docks


def _plugin_widgets() -> list[str]:
    from npe2 import PluginManager

    manifest = PluginManager.instance().get_manifest(PLUGIN)
    return [w.display_name for w in (manifest.contributions.widgets or [])]


def run_demo(sample: str = "cell", model=None, status=None, screenshot: str | None = None) -> int:
    """Open napari with ``sample`` and every widget the plugin contributes.

    With ``screenshot``, the window is drawn, saved to that PNG and closed instead of
    entering the event loop (used for docs and tests).
    """
    import napari
    from napari.utils.notifications import show_info, show_warning

    viewer = napari.Viewer(title="napari-sam-labeler demo")
    viewer.open_sample(PLUGIN, sample)
    docks = dock_plugin(viewer, model)
    fit_window(viewer, docks)
    if status is not None:
        if status.available:
            show_info(f"SAM model: {status.requested} ({status.detail})")
        else:
            first = status.detail.splitlines()[0]
            show_warning(f"SAM model {status.requested} is not available: {first} "
                         "See the terminal or `napari-sam info` for how to provide weights.")
    if screenshot:
        viewer.screenshot(screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0


def fit_window(viewer, docks) -> None:
    """Maximise the window and give the docks their minimum width, so the image gets the rest.

    At napari's default window size (about 2/3 of the screen) the layer controls and this
    dock leave the canvas a sliver; the demo is about seeing the image, so it takes the
    screen and the canvas everything the docks do not need.
    """
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    window = viewer.window._qt_window
    screen = window.screen()
    if screen is not None:
        window.setGeometry(screen.availableGeometry())  # for window managers that ignore maximise
    window.showMaximized()
    QApplication.processEvents()
    if docks:
        window.resizeDocks([d for d, _ in docks], [w.minimumSizeHint().width() + 16 for _, w in docks],
                           Qt.Orientation.Horizontal)
    QApplication.processEvents()
    viewer.reset_view()
