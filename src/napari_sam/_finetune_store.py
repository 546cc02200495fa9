"""A fine-tune's folder: the resumable checkpoint, the saved model and its model card.

The folder is a ``save_pretrained`` directory (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) that :func:`napari_sam.api.load_model`, transformers and the
widget open, plus ``napari_sam.json`` (input convention and the fine-tune's record),
``README.md`` (the model card) and ``.finetune/`` (the checkpoint ``resume`` continues from).

Both the checkpoint and the model are written to a temporary folder first and renamed into
place, so a crash mid-write leaves the previous ones readable; the checkpoint carries
SHA-256 sums and is verified before it is trusted. Tensors are saved with ``torch.save``
and read back with ``weights_only=True`` (no pickled objects).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from ._types import ModelInputSpec

SIDECAR = "napari_sam.json"
MODELS_ENV = "NAPARI_SAM_MODELS"
CHECKPOINT = ".finetune"
FORMAT = 1
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", SIDECAR, "README.md")


def models_folder() -> Path:
    """Where the widget puts fine-tuned models: ``$NAPARI_SAM_MODELS``, else the platform's
    user data folder (``~/.local/share/napari-sam-labeler/models`` on Linux)."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-sam-labeler")) / "models"


def finetuned_models(folder=None) -> list[dict]:
    """The fine-tuned models in ``folder`` (default :func:`models_folder`), newest first:
    ``{"path", "name", "base_model", "dice_before", "dice_after", "date"}`` each."""
    root = Path(folder).expanduser() if folder is not None else models_folder()
    found = []
    if not root.is_dir():
        return found
    for sub in root.iterdir():
        record = (read_sidecar(sub) or {}).get("finetune") if sub.is_dir() else None
        if isinstance(record, dict) and (sub / "config.json").is_file():
            found.append({"path": str(sub), "name": sub.name, "base_model": record.get("base_model"),
                          "dice_before": record.get("dice_before"), "dice_after": record.get("dice_after"),
                          "date": str(record.get("date", ""))})
    return sorted(found, key=lambda m: m["date"], reverse=True)


class CheckpointError(ValueError):
    """A fine-tune checkpoint that cannot be used (damaged, or from other data/settings)."""


def read_sidecar(folder) -> dict | None:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def spec_from_sidecar(folder) -> ModelInputSpec | None:
    """The input convention a fine-tuned model was trained with (None when not recorded)."""
    data = read_sidecar(folder)
    spec = (data or {}).get("input")
    if not isinstance(spec, dict):
        return None
    try:
        return ModelInputSpec(
            kind=str(spec["kind"]), target_length=int(spec["target_length"]), resize=str(spec["resize"]),
            normalize=str(spec["normalize"]), mean=tuple(float(v) for v in spec["mean"]),
            std=tuple(float(v) for v in spec["std"]), resample=str(spec["resample"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{Path(folder) / SIDECAR} has an unreadable 'input' entry: {exc}") from exc


def check_output(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder whose contents a fine-tune would destroy or misread (it
    changes nothing: :func:`clear` removes an earlier run once a new one starts)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in the output folder "
                         "(--resume) or start again there (--overwrite)")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a folder")
    _writable(output)
    if not output.exists() or not any(output.iterdir()):
        if resume:
            raise CheckpointError(f"resume: {output} holds no fine-tune checkpoint to continue from")
        return
    record = read_sidecar(output)
    ours = record is not None and "finetune" in record
    has_checkpoint = (output / CHECKPOINT / "state.json").is_file()
    if not ours and not has_checkpoint:
        raise ValueError(
            f"output {output} is not empty and is not a napari-sam fine-tune folder; "
            "choose a new or empty folder (nothing there was changed)"
        )
    if resume:
        if not has_checkpoint:
            raise CheckpointError(f"resume: {output} holds no fine-tune checkpoint ({CHECKPOINT}/) to continue from")
        return
    if not overwrite:
        raise ValueError(
            f"output {output} already holds a fine-tune: continue it (--resume, resume=True) or start "
            "again there (--overwrite, overwrite=True)"
        )


def drop_checkpoint(output: Path) -> None:
    """Remove the checkpoint (and ``output`` itself when that leaves it empty)."""
    shutil.rmtree(output / CHECKPOINT, ignore_errors=True)
    try:
        output.rmdir()
    except OSError:
        pass  # not empty: the user's or an earlier model's files stay


def clear(output: Path) -> None:
    """Remove an earlier fine-tune's checkpoint and model files from ``output`` (only those:
    anything else the user keeps there stays)."""
    shutil.rmtree(output / CHECKPOINT, ignore_errors=True)
    for name in (*MODEL_FILES, "model.safetensors.index.json"):
        (output / name).unlink(missing_ok=True)
    for shard in output.glob("model-*-of-*.safetensors"):
        shard.unlink()


def _writable(output: Path) -> None:
    """Raise unless ``output`` (or the folder it would be made in) can be written."""
    from ._fileio import cannot_write

    target = output
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise ValueError(f"output {output}: {target} is not a folder")
    reason = cannot_write(target)
    if reason:
        raise ValueError(f"output {output}: cannot write into {target} ({reason})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by ``tmp`` (rename; the old one is removed afterwards)."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(output: Path, tensors: dict, state: dict) -> None:
    """Write the checkpoint atomically: ``tensors`` (torch.save) and ``state`` (JSON)."""
    import torch

    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f"{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save(tensors, tmp / "tensors.pt")
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state}))
        sums = {name: _sha256(tmp / name) for name in ("tensors.pt", "state.json")}
        (tmp / "manifest.json").write_text(json.dumps(sums))
        _swap_in(tmp, output / CHECKPOINT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_checkpoint(output: Path) -> tuple[dict, dict]:
    """``(tensors, state)`` of the checkpoint in ``output``, verified against its sums."""
    import torch

    folder = output / CHECKPOINT
    try:
        sums = json.loads((folder / "manifest.json").read_text())
        for name in ("tensors.pt", "state.json"):
            if _sha256(folder / name) != sums[name]:
                raise CheckpointError(f"{folder / name} does not match its checksum")
        state = json.loads((folder / "state.json").read_text())
        tensors = torch.load(folder / "tensors.pt", map_location="cpu", weights_only=True)
    except CheckpointError as exc:
        raise CheckpointError(f"the fine-tune checkpoint is damaged ({exc}); delete {folder} to start again") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"the fine-tune checkpoint in {folder} cannot be read ({exc}); delete it to start again"
        ) from exc
    if state.get("format") != FORMAT:
        raise CheckpointError(f"the fine-tune checkpoint in {folder} has format {state.get('format')}, "
                              f"this version reads {FORMAT}; delete it to start again")
    return tensors, state


def spec_record(spec: ModelInputSpec) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}


def write_model(output: Path, model, spec: ModelInputSpec, record: dict, card: str) -> None:
    """Save ``model`` (a full ``SamModel``) with its processor config, sidecar and card.

    Written into a temporary folder inside ``output``, then each file renamed into place
    (the sidecar last: a folder with it is a complete model).
    """
    from transformers import SamImageProcessor

    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        t = spec.target_length
        processor = SamImageProcessor(size={"longest_edge": t}, pad_size={"height": t, "width": t},
                                      mask_size={"longest_edge": t // 4},
                                      mask_pad_size={"height": t // 4, "width": t // 4},
                                      image_mean=list(spec.mean), image_std=list(spec.std),
                                      do_normalize=spec.normalize == "imagenet")
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        (tmp / SIDECAR).write_text(json.dumps({"format": FORMAT, "input": spec_record(spec), "finetune": record},
                                              indent=2))
        for name in sorted(os.listdir(tmp), key=lambda n: n == SIDECAR):
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def model_card(record: dict) -> str:
    """The model card (``README.md``, Hugging Face's format) of a fine-tune ``record``."""
    base = record["base_model"]
    hub = "/" in base and not Path(base).expanduser().exists()
    front = ["---", "library_name: transformers", "pipeline_tag: mask-generation",
             "tags: [segment-anything, sam, napari-sam-labeler, fine-tuned]"]
    if hub:
        front.append(f"base_model: {base}")
    front.append("---")
    s = record["settings"]
    by = record.get("dice_by_prompt") or {}
    skipped = f"; {record['skipped_small']} objects under {s['min_area']} pixels skipped" if record["skipped_small"] else ""
    lines = [
        *front, "",
        f"# SAM fine-tuned with napari-sam-labeler (from {base})", "",
        f"The {record['trained']} of `{base}` ({record['base_location']}) trained on "
        f"{record['train_objects']} labelled objects from {record['images']} image(s) "
        f"({record['slices']} labelled image(s)/slice(s)); {record['val_objects']} objects held out for validation"
        f"{skipped}. The image encoder is unchanged: embeddings cached for the base model are reused.", "",
        "## Validation Dice (held-out objects, full resolution)", "",
        "| prompt | before | after |", "|---|---|---|",
        f"| tight box | {_fmt(by.get('box', [None, None])[0])} | {_fmt(by.get('box', [None, None])[1])} |",
        f"| one click at the centre | {_fmt(by.get('point', [None, None])[0])} | "
        f"{_fmt(by.get('point', [None, None])[1])} |",
        f"| mean | {_fmt(record['dice_before'])} | {_fmt(record['dice_after'])} |", "",
        f"Held out: {', '.join(record['held_out']) or 'nothing (no validation split)'}.", "",
        *([f"Note: {note}." for note in record.get("notes", [])] + ([""] if record.get("notes") else [])),
        "## Training", "",
        f"- {record['steps']} steps, {record['epochs']} epoch(s); saved: epoch {record['best_epoch']} "
        f"(the best validation Dice; epoch 0 is the base model); stopped by: {record['stopped']}",
        f"- loss {s['loss']} on the decoder's low-resolution logits, plus the IoU head's squared error; "
        f"AdamW lr {s['learning_rate']}, weight decay {s['weight_decay']}, batch {s['batch_size']} objects, seed {s['seed']}",
        f"- prompts: a jittered box (noise {s['box_jitter']} of the side) in {s['box_fraction']:.0%} of steps, else "
        f"1-{s['max_points']} clicks inside/outside; a correction click with the previous mask as input in "
        f"{s['refine_fraction']:.0%} of steps",
        f"- preprocessing: {record['preprocessing']}; made {record['date']} with "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items()), "",
        "## Use", "",
        "```", "napari-sam segment IMAGE --model THIS_FOLDER ...   # or pick it in the napari widget's Model",
        "python -c \"from napari_sam.api import load_model; engine = load_model('THIS_FOLDER')\"", "```", "",
        "The full record (settings, validation after every epoch) is in `napari_sam.json`.", "",
    ]
    return "\n".join(lines)
