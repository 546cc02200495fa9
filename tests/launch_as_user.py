"""Drive napari the way a user does, in a fresh process: window first, then the plugin, then a click.

Run by tests/test_launch.py in a subprocess (never imported by pytest), with the model in
``NAPARI_SAM_MODEL``. Modes:

``plugin``  ``napari`` then Plugins ▸ SAM Labeler: a viewer, the sample opened through the
            plugin's sample contribution, the dock added through the manifest.
``demo``    ``napari-sam demo``: the CLI's own entry point, untouched.

Once the window is drawn (so the GL context exists and, under Mesa, libLLVM is mapped),
it checks that torch and transformers are not imported yet, clicks the image through Qt
(vispy -> napari's mouse dispatch -> the SAM points layer), waits for the preview and
prints one JSON line with what it saw. A crash shows as a negative return code.
"""

from __future__ import annotations

import json
import os
import sys
import time

MODE = sys.argv[1]
CLICK = (60.0, 80.0)  # (row, col) on the sample image
TIMEOUT_S = float(os.environ.get("LAUNCH_TIMEOUT_S", "240"))
report: dict = {"mode": MODE}


def finish(code: int) -> None:
    print("RESULT " + json.dumps(report), flush=True)
    os._exit(code)  # skip teardown: what matters has been reported


def llvm_mapped() -> list[str]:
    with open("/proc/self/maps") as fh:
        return sorted({ln.split()[-1] for ln in fh if "libLLVM" in ln and "/triton/" not in ln})


def click_canvas(viewer, row: float, col: float) -> None:
    """A left click at data pixel (row, col) through Qt's event system, as a mouse gives it."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest

    vispy_canvas = viewer.window._qt_viewer.canvas
    # vispy's scene -> canvas transform (world x=col, y=row in 2D), in logical pixels
    x, y = vispy_canvas.view.scene.transform.map([col, row, 0, 1])[:2]
    ratio = vispy_canvas.native.devicePixelRatioF()
    canvas = vispy_canvas.native
    x, y = x / ratio, y / ratio
    QTest.mouseClick(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(round(x), round(y)))


def find_widget(viewer):
    from napari_sam._qt.widget import SamLabelerWidget

    for dock in viewer.window._qt_window.findChildren(SamLabelerWidget):
        return dock
    return None


def step(viewer) -> None:
    """Runs inside the event loop once the window is up."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    report["llvm_before_click"] = llvm_mapped()
    report["torch_before_click"] = "torch" in sys.modules
    report["transformers_before_click"] = "transformers" in sys.modules
    widget = find_widget(viewer)
    if widget is None:
        report["error"] = "no SAM Labeler widget docked"
        finish(3)
    report["active_layer"] = viewer.layers.selection.active.name if viewer.layers.selection.active else None
    got = {}
    widget.preview_ready.connect(lambda preds: got.setdefault("preds", preds))
    widget.embedding_ready.connect(lambda emb: got.setdefault("emb", True))
    viewer.reset_view()
    app.processEvents()
    canvas = viewer.window._qt_viewer.canvas.native
    report["window_size"] = [viewer.window._qt_window.width(), viewer.window._qt_window.height()]
    report["canvas_size"] = [canvas.width(), canvas.height()]
    report["zoom"] = viewer.camera.zoom
    click_canvas(viewer, *CLICK)
    report["points_after_click"] = widget.state.points.data.tolist() if widget.state.points is not None else None
    start = time.monotonic()
    while "preds" not in got and time.monotonic() - start < TIMEOUT_S:
        app.processEvents()
        time.sleep(0.01)
    report["seconds_to_preview"] = round(time.monotonic() - start, 2)
    report["triton_in_process"] = (
        "absent" if "triton" not in sys.modules else "hidden" if sys.modules["triton"] is None else "imported"
    )
    if "preds" not in got:
        report["error"] = f"no preview within {TIMEOUT_S} s; status: {widget.status.text()!r}"
        finish(4)
    preds = got["preds"]
    report["objects"] = len(preds)
    report["mask_shape"] = list(preds[0].masks.shape)
    report["preview_pixels"] = int((widget.state.preview.data > 0).sum())
    report["mask_pixels"] = int(preds[0].masks[0].sum())
    report["status"] = widget.status.text()
    if MODE == "plugin":
        segment_everything(viewer, widget, app)
        fine_tune(viewer, widget, app)
    finish(0)


def segment_everything(viewer, widget, app) -> None:
    """Press "Segment everything" (a coarse grid; filters open for the random tiny model) and wait."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    panel = widget.everything
    panel.points_spin.setValue(4)
    panel.iou_spin.setValue(0.0)
    panel.stability_spin.setValue(0.0)
    done = {}
    widget.everything_done.connect(lambda layer: done.setdefault("layer", layer))
    QTest.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
    start = time.monotonic()
    while "layer" not in done and time.monotonic() - start < TIMEOUT_S:
        app.processEvents()
        time.sleep(0.01)
    if "layer" not in done:
        report["error"] = f"no segment-everything layer within {TIMEOUT_S} s; status: {widget.status.text()!r}"
        finish(5)
    layer = done["layer"]
    report["everything_layer"] = layer.name
    report["everything_dtype"] = str(layer.data.dtype)
    report["everything_objects"] = len(layer.metadata.get("everything", []))
    report["everything_ids"] = int(len(set(layer.data.ravel().tolist()) - {0}))


def fine_tune(viewer, widget, app) -> None:
    """Paint two labels on the image, press "Fine-tune on this labels layer" for one epoch, wait."""
    import numpy as np
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    image = widget.state.image_layer
    labels = np.zeros(image.data.shape[:2], np.uint8)
    labels[40:90, 50:110] = 1
    labels[300:380, 200:260] = 2
    viewer.add_labels(labels, name="painted")
    panel = widget.finetune_panel
    panel.labels_choice.select(viewer.layers["painted"])
    panel.epochs_spin.setValue(1)
    done = {}
    widget.finetuned.connect(lambda result: done.setdefault("result", result))
    QTest.mouseClick(panel.run_button, Qt.MouseButton.LeftButton)
    start = time.monotonic()
    while "result" not in done and time.monotonic() - start < TIMEOUT_S:
        app.processEvents()
        time.sleep(0.01)
    if "result" not in done:
        report["error"] = f"no fine-tune within {TIMEOUT_S} s; status: {widget.status.text()!r}"
        finish(6)
    result = done["result"]
    report["finetune_stopped"] = result.stopped
    report["finetune_dice"] = [result.dice_before, result.dice_after]
    report["finetune_folder_files"] = sorted(p.name for p in __import__("pathlib").Path(result.model_dir).iterdir())
    report["finetune_text"] = panel.result_label.text()


def main() -> None:
    from qtpy.QtCore import QTimer

    if MODE == "plugin":
        import napari

        viewer = napari.Viewer()
        viewer.open_sample("napari-sam-labeler", "cell")
        viewer.window.add_plugin_dock_widget("napari-sam-labeler", "SAM Labeler")
        QTimer.singleShot(500, lambda: step(viewer))
        napari.run()
    elif MODE == "demo":
        from napari._qt.qt_event_loop import get_qapp

        get_qapp()  # so that a timer can be armed before the demo builds its viewer

        def later():
            import napari

            viewer = napari.current_viewer()
            if viewer is None or find_widget(viewer) is None:
                QTimer.singleShot(200, later)  # the demo is still building its window
                return
            step(viewer)

        QTimer.singleShot(1500, later)
        from napari_sam.cli import main as cli_main

        sys.exit(cli_main(["demo"]))
    else:
        raise SystemExit(f"unknown mode {MODE!r}")


if __name__ == "__main__":
    main()
