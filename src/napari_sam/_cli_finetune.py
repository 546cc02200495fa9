"""``napari-sam finetune IMAGES LABELS -o MODEL_DIR``: train the mask decoder on labelled images."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

from .api import FinetuneConfig

IMAGE_SUFFIXES = (".tif", ".tiff", ".npy", ".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz")
# a labels file may carry one of these after the image's name (cell_07.tif -> cell_07_labels.tif)
LABEL_TAGS = ("", "_labels", "_label", "_masks", "_mask", "_seg", "_gt")

# (option, FinetuneConfig field, type, help)
OPTIONS = [
    ("--epochs", "epochs", int, "passes over the training objects at most (default 20)"),
    ("--max-steps", "max_steps", int, "optimizer steps at most (default: no limit)"),
    ("--batch-size", "batch_size", int, "objects per step (default 8)"),
    ("--lr", "learning_rate", float, "AdamW learning rate (default 1e-4)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0.01)"),
    ("--val-fraction", "val_fraction", float, "share of images/slices held out for validation (default 0.2; "
     "of the objects when there is one image; 0: no validation)"),
    ("--patience", "patience", int, "epochs without a validation gain before stopping (default 3)"),
    ("--loss", "loss", str, "dice+bce (default) or dice+focal"),
    ("--min-area", "min_area", int, "skip objects smaller than this many pixels (default 16)"),
    ("--seed", "seed", int, "seed of every random choice (default 0)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints (default 50; also each epoch)"),
]


def add_parser(sub, add_model_args, add_cache_args, add_intensity_args) -> None:
    p = sub.add_parser("finetune", help="fine-tune the mask decoder on labelled images into a new model folder")
    p.add_argument("images", help="an image/stack file, or a folder of them (TIFF, .npy, PNG, JPEG, BMP, NIfTI)")
    p.add_argument("labels", help="its labels file (same shape; 0 = background, each id one object), or a folder "
                   "with one labels file per image: same name, or the name plus " + "/".join(LABEL_TAGS[1:]))
    p.add_argument("-o", "--output", required=True, help="the new model's folder (new or empty; with --resume "
                   "or --overwrite an earlier fine-tune's)")
    for flag, _field, kind, text in OPTIONS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--train-prompt-encoder", action="store_true", help="train the prompt encoder too")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in OUTPUT")
    p.add_argument("--overwrite", action="store_true", help="start again in OUTPUT though it holds a fine-tune")
    add_intensity_args(p)
    add_model_args(p)
    add_cache_args(p)


def _config(args) -> FinetuneConfig:
    chosen = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _k, _t in OPTIONS}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    if args.train_prompt_encoder:
        chosen["train_prompt_encoder"] = True
    return FinetuneConfig(**chosen).checked()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
                  and not p.name.startswith("."))


def _stem(path: Path) -> str:
    name = path.name
    for double in (".ome.tif", ".ome.tiff", ".nii.gz"):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return path.stem


def _nifti(path: Path, user_error, labels: bool):
    """A NIfTI volume as (Z, Y, X) in patient-space order, with its affine (labels as integers)."""
    from .io.nifti import read_nifti

    try:
        data, affine, _ = read_nifti(path)
    except ModuleNotFoundError as exc:
        raise user_error(f"{path}: reading NIfTI needs nibabel: pip install 'napari-sam-labeler[medical]'") from exc
    data = np.asarray(data)
    if data.ndim != 3:
        raise user_error(f"{path}: a {data.ndim}D NIfTI {data.shape}; fine-tuning takes 3D volumes")
    if labels and data.dtype.kind == "f" and np.array_equal(data, np.round(data)) and data.min() >= 0:
        data = data.astype(np.uint32)
    return data, affine


def pair_files(images: Path, labels: Path, user_error) -> list[tuple[Path, Path]]:
    """(image, labels) file pairs: one of each, or folders matched by name."""
    if images.is_file() != labels.is_file() or not images.exists() or not labels.exists():
        for what, path in (("IMAGES", images), ("LABELS", labels)):
            if not path.exists():
                raise user_error(f"{what} {path} does not exist")
        raise user_error(f"IMAGES {images} and LABELS {labels}: give two files or two folders")
    if images.is_file():
        return [(images, labels)]
    if images.resolve() == labels.resolve():
        raise user_error(f"IMAGES and LABELS are the same folder {images}; keep the labels in their own folder")
    by_stem: dict = {}
    for p in _files(labels):
        by_stem.setdefault(_stem(p), []).append(p)
    pairs, missing = [], []
    for image in _files(images):
        matches = [p for tag in LABEL_TAGS for p in by_stem.get(_stem(image) + tag, [])]
        if len(matches) > 1:
            raise user_error(f"{image.name} has {len(matches)} labels files in {labels}: "
                             f"{', '.join(p.name for p in matches)}; keep one")
        if not matches:
            missing.append(image.name)
        else:
            pairs.append((image, matches[0]))
    if missing and pairs:
        raise user_error(f"no labels file in {labels} for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (expected the same name, or with "
                         + "/".join(LABEL_TAGS[1:]) + ")")
    if not pairs:
        raise user_error(f"no image in {images} has a labels file of the same name in {labels}")
    return pairs


def _read(pairs, api, user_error):
    images, labels = [], []
    for image_path, label_path in pairs:
        nifti = [str(p).lower().endswith((".nii", ".nii.gz")) for p in (image_path, label_path)]
        if any(nifti):
            if not all(nifti):
                raise user_error(f"{image_path} and {label_path}: pair a NIfTI with a NIfTI (their grids must match)")
            image, image_affine = _nifti(image_path, user_error, labels=False)
            lab, label_affine = _nifti(label_path, user_error, labels=True)
            if lab.shape == image.shape and not np.allclose(image_affine, label_affine, atol=1e-3):
                raise user_error(f"{label_path} is not on the grid of {image_path} (their affines differ): "
                                 "resample the labels onto the image first")
        else:
            lab = np.asarray(api.read_image(label_path))
            image = None
        if lab.dtype.kind not in "biu":
            raise user_error(f"{label_path}: labels must be integer ids; it holds {lab.dtype} values")
        if image is None:
            image = api.open_volume(image_path) if lab.ndim == 3 else np.asarray(api.read_image(image_path))
        if tuple(image.shape[:lab.ndim]) != lab.shape:
            raise user_error(f"{image_path} {tuple(image.shape)} and {label_path} {lab.shape} differ in shape: "
                             "the labels must cover the image pixel for pixel")
        images.append(image)
        labels.append(lab)
    return images, labels


def _bar(tqdm, phase: str, total: int):
    # no rate: progress is set, not counted, and "161319 step/s" after a resume helps nobody
    return tqdm(total=total, desc=phase, unit="image" if phase == "embed" else "step", file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def cmd_finetune(args, user_error, load_engine, open_cache, intensity) -> int:
    from tqdm import tqdm

    from . import api

    cfg = _config(args)  # ValueError naming the field, before anything loads
    output = Path(args.output).expanduser()
    api.check_finetune_output(output, resume=args.resume, overwrite=args.overwrite)
    pairs = pair_files(Path(args.images), Path(args.labels), user_error)
    images, labels = _read(pairs, api, user_error)
    names = [image.name for image, _ in pairs]
    # the data, its objects, the SAM contrast and a checkpoint to resume: all before the model loads
    model = args.model or os.environ.get(api.MODEL_ENV) or api.DEFAULT_MODEL
    plan = api.check_finetune(images, labels, output, config=cfg, resume=args.resume, overwrite=args.overwrite,
                              names=names, model=model, **intensity)
    if args.resume:
        print(f"continuing the run in {output} from step {plan['resume_step']} (epoch {plan['resume_epoch']})",
              file=sys.stderr)
    engine = load_engine(args)
    cache = open_cache(args)
    skipped = f"; {len(plan['unlabelled'])} file(s) without labels skipped" if plan["unlabelled"] else ""
    small = f", {plan['small']} under --min-area skipped" if plan["small"] else ""
    print(f"{engine}; fine-tuning on {plan['objects']} objects in {plan['slices']} labelled image(s)/slice(s)"
          f"{small}{skipped}; into {output} ...", file=sys.stderr)
    stop = {"asked": False}

    def on_interrupt(_signum, _frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print("\nnapari-sam: stopping after the current image or step (Ctrl-C again to quit now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    bars: dict = {}
    try:
        steps = api.finetune_steps(engine, images, labels, output, config=cfg, cache=cache, resume=args.resume,
                                   overwrite=args.overwrite, cancelled=lambda: stop["asked"], names=names,
                                   **intensity)
        while True:
            try:
                p = next(steps)
            except StopIteration as done:
                result = done.value
                break
            if p.phase not in ("embed", "train"):
                tqdm.write(p.message, file=sys.stderr)
                continue
            bar = bars.get(p.phase)
            if bar is None:
                for other in bars.values():
                    other.close()
                bar = bars[p.phase] = _bar(tqdm, p.phase, p.total)
            bar.n = int(p.done)
            if p.loss is not None:
                bar.set_postfix_str(f"loss {p.loss:.4f}")
            bar.refresh()
    finally:
        signal.signal(signal.SIGINT, previous)
        for bar in bars.values():
            bar.close()
    for note in result.notes:
        print(f"napari-sam: note: {note}", file=sys.stderr)
    if result.stopped == "cancelled":
        if (output / ".finetune" / "state.json").is_file():
            print(f"stopped after {result.steps} steps; checkpoint in {output}; run the same command with --resume "
                  "to continue", file=sys.stderr)
        else:
            cached = "" if args.no_cache else " (what was embedded is cached)"
            print(f"stopped before training; nothing was written{cached}: run the same command to start",
                  file=sys.stderr)
        return 130
    if result.dice_before is None:
        print(f"trained {result.steps} steps ({result.epochs} epochs, no validation); saved {output}")
    else:
        by = result.dice_by_prompt
        kept = " (the base decoder: no epoch beat it)" if result.best_epoch == 0 else ""
        print(f"validation Dice {result.dice_before:.3f} -> {result.dice_after:.3f} (box {by['box'][0]:.3f} -> "
              f"{by['box'][1]:.3f}, point {by['point'][0]:.3f} -> {by['point'][1]:.3f}); saved {output}{kept} "
              f"(epoch {result.best_epoch} of {result.epochs}, stopped by {result.stopped})")
    return 0
