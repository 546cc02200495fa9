"""The "Fine-tune" panel in a real napari viewer (Xvfb): train, show Dice, use the new model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qtpy")

from conftest import dataset  # noqa: E402
from napari_sam import api  # noqa: E402

TIMEOUT = 120_000


def test_finetune_a_labels_layer_then_use_the_model(labeler, qtbot, ft_engine):
    images, labels = dataset(1, n=5)
    viewer, widget = labeler(images[0])
    widget.set_engine(ft_engine)
    layer = viewer.add_labels(labels[0].astype(np.uint8), name="ground truth")
    before = layer.data.copy()
    panel = widget.finetune_panel
    assert panel.labels_choice.currentText() == "ground truth"
    panel.epochs_spin.setValue(2)
    with qtbot.waitSignal(widget.finetuned, timeout=TIMEOUT) as blocker:
        widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    result = blocker.args[0]
    assert result.stopped == "epochs" and result.val_objects == 1 and result.train_objects == 4
    folder = Path(result.model_dir)
    assert folder.parent == api.models_folder() and folder.name.startswith("img-")
    text = panel.result_label.text()
    assert f"Validation Dice {result.dice_before:.3f} → {result.dice_after:.3f}" in text and str(folder) in text
    np.testing.assert_array_equal(layer.data, before)  # the labels are only read
    assert panel.output_edit.text() == ""  # the next run makes a new folder
    # the new model is offered by the Model field's menu and taken with "Use"
    widget.model._fill_models_menu()
    entries = [a.text() for a in widget.model.models_menu.actions()]
    assert any(folder.name in e and "fine-tuned" in e for e in entries)
    assert panel.use_button.isEnabled()
    panel.use_button.click()
    assert widget.model.model_edit.text() == str(folder)
    # the next embedding loads it; the image's embedding is the base model's (same encoder)
    with qtbot.waitSignal(widget.embedding_ready, timeout=TIMEOUT):
        widget.compute_embedding()
    assert widget.engine.source.location == str(folder)
    assert widget.engine.model_id == ft_engine.model_id


def test_cancel_keeps_a_checkpoint_and_continue_finishes(labeler, qtbot, ft_engine, tmp_path):
    images, labels = dataset(6)
    viewer, widget = labeler(np.stack(images))
    widget.set_engine(ft_engine)
    viewer.add_labels(np.stack(labels), name="truth")
    panel = widget.finetune_panel
    panel.epochs_spin.setValue(1000)
    panel.output_edit.setText(str(tmp_path / "mine"))
    seen = []

    def on_status(text):
        seen.append(text)
        if "step 2," in text:
            widget.cancel_finetune()

    widget.state.status_changed.connect(on_status)
    with qtbot.waitSignal(widget.finetuned, timeout=TIMEOUT) as blocker:
        widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    stopped = blocker.args[0]
    assert stopped.stopped == "cancelled" and stopped.steps in (2, 3)
    assert panel.resume_check.isVisibleTo(widget) and panel.resume_check.isChecked()
    assert not panel.use_button.isEnabled() and "checkpoint" in panel.result_label.text()
    assert not (tmp_path / "mine" / "model.safetensors").exists()
    widget.state.status_changed.disconnect(on_status)
    panel.epochs_spin.setValue(2)
    with qtbot.waitSignal(widget.finetuned, timeout=TIMEOUT) as blocker:
        widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    done = blocker.args[0]
    assert done.stopped == "epochs" and done.steps == 2 * 2  # 5 training slices x 2 objects, 8 per step
    record = json.loads((tmp_path / "mine" / "napari_sam.json").read_text())["finetune"]
    assert record["slices"] == 6 and record["held_out"] == done.held_out


def test_labels_of_another_shape_are_refused(labeler, qtbot, ft_engine):
    images, labels = dataset(1)
    viewer, widget = labeler(images[0])
    widget.set_engine(ft_engine)
    viewer.add_labels(np.zeros((50, 50), np.uint8), name="small")
    widget.finetune()
    assert widget.finetune_panel.worker is None


def test_a_folder_holding_other_files_is_refused(labeler, qtbot, ft_engine, tmp_path):
    images, labels = dataset(1, n=4)
    viewer, widget = labeler(images[0])
    widget.set_engine(ft_engine)
    viewer.add_labels(labels[0], name="truth")
    (tmp_path / "thesis.txt").write_text("keep me")
    widget.finetune_panel.output_edit.setText(str(tmp_path))
    widget.finetune()
    assert widget.finetune_panel.worker is None
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.txt"]


def test_cancel_before_training_writes_nothing_and_runs_again(labeler, qtbot, ft_engine, tmp_path):
    images, labels = dataset(6)
    viewer, widget = labeler(np.stack(images))
    widget.set_engine(ft_engine)
    viewer.add_labels(np.stack(labels), name="truth")
    panel = widget.finetune_panel
    panel.epochs_spin.setValue(1)
    panel.output_edit.setText(str(tmp_path / "mine"))

    def on_status(text):
        if "embedded" in text:
            widget.cancel_finetune()

    widget.state.status_changed.connect(on_status)
    with qtbot.waitSignal(widget.finetuned, timeout=TIMEOUT) as blocker:
        widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    widget.state.status_changed.disconnect(on_status)
    assert blocker.args[0].stopped == "cancelled" and blocker.args[0].steps == 0
    assert not (tmp_path / "mine").exists()
    assert panel.resume_check.isHidden() and "before training" in panel.result_label.text()
    assert panel.output_edit.text() == str(tmp_path / "mine")  # typed by the user: kept
    with qtbot.waitSignal(widget.finetuned, timeout=TIMEOUT) as blocker:
        widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    assert blocker.args[0].stopped == "epochs"


def test_labels_edited_after_cancel_say_untick_continue_and_a_new_run_works(labeler, qtbot, ft_engine, tmp_path):
    images, labels = dataset(6)
    viewer, widget = labeler(np.stack(images))
    widget.set_engine(ft_engine)
    truth = viewer.add_labels(np.stack(labels), name="truth")
    panel = widget.finetune_panel
    panel.epochs_spin.setValue(1000)
    panel.output_edit.setText(str(tmp_path / "first"))

    def on_status(text):
        if "step 1," in text:
            widget.cancel_finetune()

    widget.state.status_changed.connect(on_status)
    with qtbot.waitSignal(widget.finetuned, timeout=TIMEOUT):
        widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    widget.state.status_changed.disconnect(on_status)
    assert panel.resume_check.isChecked()
    truth.data[0][truth.data[0] == 1] = 0  # the user corrects a label
    panel.epochs_spin.setValue(1)
    widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    assert "untick 'Continue the stopped run'" in widget.status.text()
    panel.resume_check.setChecked(False)
    assert panel.output_edit.text() == ""  # a new folder for the new run
    panel.resume_check.setChecked(True)  # changed my mind: back to the stopped run's folder
    assert panel.output_edit.text() == str(tmp_path / "first")
    panel.resume_check.setChecked(False)
    with qtbot.waitSignal(widget.finetuned, timeout=TIMEOUT) as blocker:
        widget.finetune()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=TIMEOUT)
    done = blocker.args[0]
    assert done.stopped == "epochs" and Path(done.model_dir).parent == api.models_folder()
    assert (tmp_path / "first" / ".finetune" / "state.json").is_file()  # the stopped run is kept


def test_save_to_a_file_says_so(labeler, qtbot, ft_engine, tmp_path):
    images, labels = dataset(1, n=4)
    viewer, widget = labeler(images[0])
    widget.set_engine(ft_engine)
    viewer.add_labels(labels[0], name="truth")
    (tmp_path / "notes.txt").write_text("keep")
    widget.finetune_panel.output_edit.setText(str(tmp_path / "notes.txt"))
    widget.finetune()
    assert widget.finetune_panel.worker is None
    assert "is a file, not a folder" in widget.status.text()
    assert (tmp_path / "notes.txt").read_text() == "keep"
