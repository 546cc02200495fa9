"""Run as a user would: napari, the SAM Labeler, one point, Enter... then napari dies (kill -9).

Usage: python crash_after_commit.py IMAGE.npy MODEL_DIR
"""

import os
import signal
import sys

import numpy as np


def main() -> None:
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer()
    viewer.add_image(np.load(sys.argv[1]), name="cells")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    widget.model.model_edit.setText(sys.argv[2])
    widget.model.device_combo.setCurrentText("cpu")
    widget.preview_ready.connect(lambda _predictions: widget.commit())
    # the moment the commit is written, the process dies without any cleanup
    widget.committed.connect(lambda _plan: os.kill(os.getpid(), signal.SIGKILL))
    QTimer.singleShot(0, lambda: widget.state.points.add(np.array([60.0, 70.0])))
    QTimer.singleShot(120_000, lambda: sys.exit(3))  # never hang the test
    napari.run()


if __name__ == "__main__":
    main()
