"""The widget never loses, splits or misplaces work (issue 18): each fault users of other
SAM plugins hit, tried in a real viewer with the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qtpy")

from test_widget import TIMEOUT, add_point, embed, labeler  # noqa: E402,F401  (fixture)


def test_renaming_any_layer_changes_only_the_name(labeler, qtbot, blob_image):
    viewer, widget = labeler(blob_image)
    embed(qtbot, widget)
    image = viewer.layers["img"]
    image.name = "cells"
    assert widget.state.image_combo.currentText() == "cells"
    preds = add_point(qtbot, widget, [60, 70])  # before: nothing happened
    assert preds and widget.state.preview.data.any()
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    labels = widget.state.labels_layer
    labels.name = "my labels"
    for layer in (widget.state.points, widget.state.boxes, widget.state.preview):
        layer.name = f"renamed {layer.name}"
    offered = [widget.state.labels_combo.itemText(i) for i in range(widget.state.labels_combo.count())]
    assert offered == ["(new labels layer)", "my labels"]  # the plugin's own layers are never offered
    add_point(qtbot, widget, [120, 170])
    with qtbot.waitSignal(widget.committed, timeout=TIMEOUT):
        widget.commit()
    assert set(np.unique(viewer.layers["my labels"].data)) == {0, 1, 2}
