"""``napari-sam finetune`` as a user runs it: folders in, a model folder out, Ctrl-C and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import numpy as np
import tifffile
from skimage import io as skio

from conftest import dataset
from napari_sam.cli import main
from test_cli import run_cli


@pytest.fixture
def folders(tmp_path):
    images, labels = dataset(6)
    img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
    img_dir.mkdir()
    lab_dir.mkdir()
    for k, (image, lab) in enumerate(zip(images, labels)):
        if k % 2:
            skio.imsave(img_dir / f"cell_{k}.png", image, check_contrast=False)
        else:
            tifffile.imwrite(img_dir / f"cell_{k}.tif", image)
        tifffile.imwrite(lab_dir / f"cell_{k}_labels.tif", lab)
    return img_dir, lab_dir


def test_finetune_folders_then_segment_with_the_new_model(ft_dir, folders, tmp_path):
    img_dir, lab_dir = folders
    out = tmp_path / "my-model"
    res = run_cli("finetune", str(img_dir), str(lab_dir), "-o", str(out), "--model", str(ft_dir), "--backend",
                  "torch", "--device", "cpu", "--epochs", "5", "--lr", "1e-3", "--train-prompt-encoder")
    assert res.returncode == 0, res.stderr
    assert "validation Dice 0.0" in res.stdout and f"saved {out}" in res.stdout
    before, after = (float(v) for v in res.stdout.split("validation Dice ")[1].split(" (")[0].split(" -> "))
    assert after > before
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    seg = run_cli("segment", str(img_dir / "cell_0.tif"), "--box", "10,10,60,60", "--model", str(out),
                  "--backend", "torch", "--device", "cpu", "-o", str(tmp_path / "l.tif"))
    assert seg.returncode == 0, seg.stderr
    again = run_cli("finetune", str(img_dir), str(lab_dir), "-o", str(out), "--model", str(ft_dir), "--backend",
                    "torch", "--device", "cpu", "--epochs", "5", "--lr", "1e-3", "--train-prompt-encoder")
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr


def _zero_all(lab_dir):
    for path in lab_dir.iterdir():
        tifffile.imwrite(path, np.zeros_like(tifffile.imread(path)))


def _one_object(lab_dir):
    for path in sorted(lab_dir.iterdir())[1:]:
        path.unlink()
    for path in lab_dir.parent.joinpath("images").iterdir():
        if not path.name.startswith("cell_0."):
            path.unlink()
    lab = tifffile.imread(lab_dir / "cell_0_labels.tif")
    tifffile.imwrite(lab_dir / "cell_0_labels.tif", (lab == 1).astype(np.uint8))


@pytest.mark.parametrize("setup, args, message", [
    (lambda d, lab: (lab / "cell_0_labels.tif").unlink(), [], "no labels file in"),
    (lambda d, lab: None, ["--lr", "-1"], "learning_rate must be"),
    (lambda d, lab: None, ["--seed", "-5"], "seed must be"),
    (lambda d, lab: None, ["--resume"], "no fine-tune checkpoint"),
    (lambda d, lab: (d / "out").mkdir() or (d / "out" / "keep.txt").write_text("x"), [], "not a napari-sam fine-tune"),
    (lambda d, lab: _zero_all(lab), [], "hold no objects"),
    (lambda d, lab: _one_object(lab), [], "second labelled object"),
    (lambda d, lab: None, ["--min-area", "100000"], "min_area"),
    (lambda d, lab: None, ["--preset", "liverish"], "liverish"),
    (lambda d, lab: tifffile.imwrite(lab / "cell_0.tif", np.zeros((96, 96), np.uint8)), [], "2 labels files"),
    (lambda d, lab: (d / "out").write_text("a file"), [], "not a folder"),
    (lambda d, lab: None, ["-o", "/proc/napari-sam-finetune"], "cannot write into /proc"),
])
def test_user_errors_are_one_line_before_the_model_loads(folders, tmp_path, capsys, setup, args, message):
    img_dir, lab_dir = folders
    setup(tmp_path, lab_dir)
    code = main(["finetune", str(img_dir), str(lab_dir), "-o", str(tmp_path / "out"), "--model",
                 str(tmp_path / "no-such-model"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "loading model" not in err, err


def test_ctrl_c_keeps_a_checkpoint_and_resume_finishes(ft_dir, folders, tmp_path):
    img_dir, lab_dir = folders
    out = tmp_path / "m"
    args = ["finetune", str(img_dir), str(lab_dir), "-o", str(out), "--model", str(ft_dir), "--backend", "torch",
            "--device", "cpu", "--lr", "1e-3", "--patience", "100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "napari_sam.cli", *args, "--epochs", "100000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / ".finetune" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert state.exists(), proc.communicate()[1] if proc.poll() is not None else "no checkpoint in 120 s"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and not (out / "model.safetensors").exists()

    steps = json.loads(state.read_text())["loop"]["step"]
    assert steps >= 1
    done = run_cli(*args, "--epochs", "100000", "--resume", "--max-steps", str(steps + 1))
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file()
    record = json.loads((out / "napari_sam.json").read_text())["finetune"]
    assert record["steps"] == steps + 1 and record["stopped"] == "max_steps"


def test_nifti_pairs_on_one_grid_train_and_other_grids_are_refused(ft_dir, tmp_path, capsys):
    """A CT and its labels as NIfTI (what 3D Slicer and nnU-Net users have): read by the same
    reader, so both arrive in one orientation; labels on another grid are refused."""
    nib = pytest.importorskip("nibabel")
    images, labels = dataset(5)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    # NIfTI arrays are (x, y, z): our (Z, Y, X) stack transposed
    nib.save(nib.Nifti1Image(np.stack(images).astype(np.int16).T, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.stack(labels).astype(np.uint8).T, affine), tmp_path / "ct_seg.nii.gz")
    code = main(["finetune", str(tmp_path / "ct.nii.gz"), str(tmp_path / "ct_seg.nii.gz"), "-o",
                 str(tmp_path / "m"), "--model", str(ft_dir), "--backend", "torch", "--device", "cpu",
                 "--epochs", "1", "--window", "100,200"])
    out = capsys.readouterr()
    assert code == 0, out.err
    record = json.loads((tmp_path / "m" / "napari_sam.json").read_text())["finetune"]
    assert record["slices"] == 5 and record["train_objects"] + record["val_objects"] == 10
    shifted = affine.copy()
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(np.stack(labels).astype(np.uint8).T, shifted), tmp_path / "moved_seg.nii.gz")
    code = main(["finetune", str(tmp_path / "ct.nii.gz"), str(tmp_path / "moved_seg.nii.gz"), "-o",
                 str(tmp_path / "m2"), "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and "not on the grid" in err and "loading model" not in err


def test_files_without_labels_are_skipped_and_said(ft_dir, folders, tmp_path):
    img_dir, lab_dir = folders
    tifffile.imwrite(lab_dir / "cell_1_labels.tif", np.zeros((96, 96), np.uint16))
    res = run_cli("finetune", str(img_dir), str(lab_dir), "-o", str(tmp_path / "m"), "--model", str(ft_dir),
                  "--backend", "torch", "--device", "cpu", "--epochs", "1")
    assert res.returncode == 0, res.stderr
    assert "10 objects in 5 labelled image(s)/slice(s); 1 file(s) without labels skipped" in res.stderr
    assert "note: 1 image(s) without labels skipped: cell_1.png" in res.stderr
    record = json.loads((tmp_path / "m" / "napari_sam.json").read_text())["finetune"]
    assert record["held_out"] and all(h.startswith("cell_") for h in record["held_out"])


def test_resume_with_another_model_is_refused_before_it_loads(ft_dir, tiny_sam_dir, folders, tmp_path, capsys):
    img_dir, lab_dir = folders
    args = ["finetune", str(img_dir), str(lab_dir), "-o", str(tmp_path / "m"), "--backend", "torch", "--device",
            "cpu", "--epochs", "1"]
    assert main([*args, "--model", str(ft_dir)]) == 0
    capsys.readouterr()
    assert main([*args, "--model", str(tiny_sam_dir), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "give the same model" in err and "loading model" not in err
    assert main([*args, "--model", str(ft_dir), "--resume", "--epochs", "2"]) == 0
    assert "continuing the run in" in capsys.readouterr().err
