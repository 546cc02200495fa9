"""Fine-tune SAM's mask decoder on the user's own labels.

The image encoder stays frozen, so each labelled image (or slice) is embedded once, through
the same cache napari and the CLI use, and training runs only the decoder: seconds to
minutes on a CPU. Prompts are sampled per object the way users prompt (jittered boxes,
clicks inside and outside, a correction click with the previous mask as input), the loss
is Dice + BCE (or Dice + focal) on the decoder's low-resolution logits plus the IoU head's
error, validation Dice is measured through :meth:`SamEngine.predict_batch` (what the widget
runs) before training and after each epoch, training stops early when it stops rising, and
the best decoder is saved as a ``save_pretrained`` folder with a model card. A checkpoint
after every ``checkpoint_every`` steps, each epoch and a cancel lets ``resume=True`` continue
exactly where the run stopped. docs/finetune.md describes every choice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import _finetune_data as fd
from . import _finetune_store as store
from . import _finetune_train as ft
from ._finetune_store import CheckpointError
from .cache import EmbeddingCache
from .checkpoints import load_sam_model, resolve_model_source, weights_fingerprint
from .engine import SamEngine

LOSSES = ("dice+bce", "dice+focal")
# settings a resumed run may change; the others must match the checkpoint's
RESUMABLE = ("epochs", "max_steps", "patience", "min_delta", "checkpoint_every")


@dataclass
class FinetuneConfig:
    """Settings of a fine-tune (defaults in parentheses; docs/finetune.md explains them).

    epochs (20) passes over the training objects at most; max_steps (None) optimizer steps
    at most; batch_size (8) objects per step; learning_rate (1e-4), weight_decay (0.01) for
    AdamW; val_fraction (0.2) of the images/slices held out (of the objects when there is
    one image); patience (3) epochs without a validation Dice gain above min_delta (0.001)
    stop training; loss "dice+bce" or "dice+focal"; train_prompt_encoder (False) trains
    the prompt encoder too; box_fraction (0.5) of steps prompt with a jittered box, the
    rest with 1..max_points (3) clicks; refine_fraction (0.5) of steps add a correction
    click with the previous mask as input; box_jitter (0.1) box noise as a fraction of
    its side; min_area (16) pixels below which objects are skipped; seed (0) fixes every
    random choice; checkpoint_every (50) steps, and after each epoch.
    """

    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    val_fraction: float = 0.2
    patience: int = 3
    min_delta: float = 1e-3
    loss: str = "dice+bce"
    train_prompt_encoder: bool = False
    box_fraction: float = 0.5
    max_points: int = 3
    refine_fraction: float = 0.5
    box_jitter: float = 0.1
    min_area: int = 16
    seed: int = 0
    checkpoint_every: int = 50

    def checked(self) -> "FinetuneConfig":
        for name in ("epochs", "batch_size", "patience", "max_points", "min_area", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {self.seed!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, (int, np.integer)) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None; got {self.max_steps!r}")
        for name, lo, hi in (("val_fraction", 0.0, 0.9), ("box_fraction", 0.0, 1.0), ("refine_fraction", 0.0, 1.0),
                             ("box_jitter", 0.0, 1.0)):
            value = float(getattr(self, name))
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {value!r}")
        for name in ("learning_rate", "weight_decay", "min_delta"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'learning_rate' else 'non-negative'} "
                                 f"number; got {value!r}")
        if str(self.loss).lower() not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        return replace(self, loss=str(self.loss).lower())


@dataclass
class FinetuneProgress:
    """One step of :func:`finetune_steps`.

    ``phase`` is "embed" (``done`` of ``total`` images/slices embedded), "train" (``done``
    of at most ``total`` optimizer steps; ``loss`` of this step), "validate" (``val_dice``
    after ``epoch`` epochs; epoch 0 is the model before training) or "save".
    """

    phase: str
    done: float
    total: int
    epoch: int = 0
    loss: float | None = None
    val_dice: float | None = None
    message: str = ""


@dataclass
class FinetuneResult:
    """What a fine-tune did. ``dice_before``/``dice_after``: mean validation Dice of the
    base and the saved model (None without a validation split); ``dice_by_prompt`` maps
    "box" and "point" to their (before, after) pair; ``stopped`` is "early stopping",
    "epochs", "max_steps" or "cancelled" (then only the checkpoint was written);
    ``held_out`` names the validation images/slices ("cell_07.tif", "ct.nii.gz slice 12");
    ``notes`` says what the user should know (images skipped, the base decoder kept, ...)."""

    model_dir: str
    dice_before: float | None
    dice_after: float | None
    dice_by_prompt: dict
    epochs: int
    steps: int
    best_epoch: int
    stopped: str
    train_objects: int
    val_objects: int
    history: list = field(default_factory=list)
    held_out: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def check_finetune_output(output, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise (before any work) when ``output`` cannot take a fine-tune: an unrelated
    non-empty folder, an earlier fine-tune without ``resume``/``overwrite``, or ``resume``
    with no checkpoint there."""
    store.check_output(Path(output).expanduser(), resume=resume, overwrite=overwrite)


def check_finetune(images, labels, output, *, config: FinetuneConfig | None = None, mapping=None,
                   resume: bool = False, overwrite: bool = False, names=None, model=None, **intensity) -> dict:
    """Check everything a fine-tune can check without the model, and say what it will use.

    The settings, the output folder, the image/label pairs and their objects, the SAM
    contrast options and, with ``resume``, that the checkpoint is intact and was made with
    these data, contrast and settings. Raises what :func:`finetune` would raise for them.
    Returns ``{"slices", "objects", "small", "unlabelled"}``: labelled images/slices used,
    usable objects, objects under ``min_area``, names of images without labels; with
    ``resume`` also ``resume_step``/``resume_epoch``, and ``model`` (what ``load_model`` will
    be given) must be where the checkpoint's run started from.
    """
    cfg = _checked(config)
    output = Path(output).expanduser()
    store.check_output(output, resume=resume, overwrite=overwrite)
    planned = ft.plan(images, labels, mapping, intensity, cfg, names)
    found = {"slices": len(planned.work), "objects": planned.objects, "small": planned.small,
             "unlabelled": list(planned.unlabelled)}
    if resume:
        _, saved = store.read_checkpoint(output)
        for key, value in (("data", planned.data_key), ("contrast", planned.contrast_key),
                           ("settings", _settings(cfg))):
            if saved["identity"].get(key) != value:
                raise CheckpointError(_mismatch(output, key, saved["identity"].get(key), value))
        started = saved.get("model") or {}
        if model is not None and started.get("location"):
            try:
                asked = resolve_model_source(model).location
            except FileNotFoundError:  # loading it will say what is missing
                asked = started["location"]
            if _where(asked) != _where(started["location"]):
                raise CheckpointError(f"resume: the checkpoint in {output} was started from the model at "
                                      f"{started['location']}; this run's model is {asked}: give the same model")
        found.update(resume_step=saved["loop"]["step"], resume_epoch=saved["loop"]["epoch"])
    return found


def finetune(engine: SamEngine, images, labels, output, *, config: FinetuneConfig | None = None,
             cache: EmbeddingCache | None = None, mapping=None, resume: bool = False, overwrite: bool = False,
             on_progress=None, cancelled=None, names=None, **intensity) -> FinetuneResult:
    """Fine-tune ``engine``'s mask decoder on ``labels`` and save the model to ``output``.

    Parameters
    ----------
    engine : SamEngine
        The model to start from (any backend: embeddings come from its encoder; the
        decoder trains in float32 on its device).
    images, labels : array or sequence of arrays
        Pairs of an image ``(H, W)`` / ``(H, W, C)`` with labels ``(H, W)``, or a volume
        ``(Z, H, W[, C])`` with labels ``(Z, H, W)`` (its labelled slices are used). Each
        nonzero label value is one object.
    output : path
        A new or empty folder (or, with ``resume``/``overwrite``, an earlier fine-tune's).
        It becomes a ``save_pretrained`` model folder that :func:`load_model` opens.
    config : FinetuneConfig, optional
    cache : EmbeddingCache, optional
        Embeddings are read from and written to it (what napari and the CLI share).
    mapping : IntensityMapping, optional
        One intensity mapping for every image; else each image's (a volume's) own,
        from ``window``/``preset``/``percentiles``/``channel`` in ``**intensity``.
    resume : bool
        Continue the checkpoint in ``output`` (same data and settings; ``epochs``,
        ``max_steps``, ``patience``, ``min_delta`` and ``checkpoint_every`` may change).
    overwrite : bool
        Start again in a folder that holds an earlier fine-tune.
    on_progress : callable(FinetuneProgress), optional
    cancelled : callable() -> bool, optional
        Polled while embedding and before each step; when true the result says
        ``stopped="cancelled"`` and, once a step was made, a checkpoint is written
        (``resume=True`` continues; before that, embeddings made stay in ``cache``).
    names : sequence of str, optional
        One name per image (file names, layer names) for progress, ``held_out`` and the
        model card; default "image 0", "image 1", ...

    Returns
    -------
    FinetuneResult
    """
    steps = finetune_steps(engine, images, labels, output, config=config, cache=cache, mapping=mapping,
                           resume=resume, overwrite=overwrite, cancelled=cancelled, names=names, **intensity)
    while True:
        try:
            progress = next(steps)
        except StopIteration as done:
            return done.value
        if on_progress is not None:
            on_progress(progress)


def finetune_steps(engine: SamEngine, images, labels, output, *, config: FinetuneConfig | None = None,
                   cache: EmbeddingCache | None = None, mapping=None, resume: bool = False,
                   overwrite: bool = False, cancelled=None, names=None, **intensity):
    """:func:`finetune` as a generator of :class:`FinetuneProgress`; returns the
    :class:`FinetuneResult`. Closing it (a worker's Cancel) once training has started writes
    a checkpoint first."""
    import torch

    if not isinstance(engine, SamEngine):
        raise TypeError(f"engine must be a SamEngine (from load_model), got {type(engine).__name__}")
    cfg = _checked(config)
    output = Path(output).expanduser()
    # everything about the data, the folder and a checkpoint is checked before any model work
    # (and before overwrite removes anything)
    store.check_output(output, resume=resume, overwrite=overwrite)
    planned = ft.plan(images, labels, mapping, intensity, cfg, names)
    objects = ft.plan_objects(planned, engine.spec, engine.low_res_size, cfg.min_area)
    train, val = ft.split(len(planned.work), objects, cfg.val_fraction, cfg.seed)
    parts, view = ft.decoder_parts(engine)
    identity = {"data": planned.data_key, "contrast": planned.contrast_key, "encoder": engine.encoder_fingerprint,
                "decoder": weights_fingerprint(parts), "objects": [len(train), len(val)],
                "settings": _settings(cfg)}
    optimizer = torch.optim.AdamW(ft.trainable(parts, cfg), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    st = {"epoch": 0, "step": 0, "position": 0, "order": None, "best_dice": None, "best_epoch": 0, "bad": 0,
          "history": [], "before": None}
    best: dict = {}
    notes = [f"{len(planned.unlabelled)} image(s) without labels skipped: {', '.join(planned.unlabelled[:5])}"
             f"{' ...' if len(planned.unlabelled) > 5 else ''}"] if planned.unlabelled else []
    if resume:
        tensors, saved = store.read_checkpoint(output)
        for key, value in identity.items():
            if saved["identity"].get(key) != value:
                raise CheckpointError(_mismatch(output, key, saved["identity"].get(key), value))
        parts.load_state_dict(tensors["parts"], strict=False)
        optimizer.load_state_dict(tensors["optimizer"])
        best = tensors["best"]
        rng.bit_generator.state = saved["rng"]
        st.update(saved["loop"])
        if _stop_reason(st, cfg, bool(val)) == "early stopping":
            notes.append(f"the run had already stopped early ({st['bad']} epochs without a gain, patience "
                         f"{cfg.patience}): raise patience (--patience) to train further")
    embedding = ft.embed_items(engine, planned, cache, cancelled)
    while True:
        try:
            done, total, message = next(embedding)
        except StopIteration as stop:
            items = stop.value
            break
        yield FinetuneProgress("embed", done, total, message=message)
    if items is None:  # cancelled while embedding: nothing trained, nothing written but the cache
        return FinetuneResult(model_dir=str(output), dice_before=None, dice_after=None, dice_by_prompt={},
                              epochs=st["epoch"], steps=st["step"], best_epoch=st["best_epoch"], stopped="cancelled",
                              train_objects=len(train), val_objects=len(val), notes=notes)
    valid = [fd.valid_map(item.shape, engine.spec, engine.low_res_size) for item in items]
    # with overwrite, the earlier fine-tune's files go when this run first writes (a cancel
    # before its first step keeps them); `wrote`: this run has a checkpoint of its own
    wrote = False

    def checkpoint():
        nonlocal wrote
        if overwrite and not wrote:
            store.clear(output)
        wrote = True
        store.write_checkpoint(output, {"parts": ft.trainable_state(parts), "optimizer": optimizer.state_dict(),
                                        "best": best},
                               {"identity": identity, "rng": rng.bit_generator.state, "loop": st,
                                "config": asdict(cfg), "model": {"requested": engine.source.requested,
                                                                  "location": str(engine.source.location)}})

    if st["before"] is None:
        before = ft.validation_dice(view, items, val) if val else None
        st.update(before=before or {}, best_dice=None if before is None else before["mean"])
        best = ft.trainable_state(parts)
        st["history"].append({"epoch": 0, "step": 0, "val": before})
        yield FinetuneProgress("validate", 0, cfg.epochs, epoch=0, val_dice=None if before is None else before["mean"],
                               message=_said(before, "before training"))
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    stopped = None
    try:
        while stopped is None:
            stopped = _stop_reason(st, cfg, bool(val))
            if stopped:
                break
            if st["order"] is None:
                st["order"], st["position"] = rng.permutation(len(train)).tolist(), 0
            while st["position"] < len(st["order"]):
                if cfg.max_steps is not None and st["step"] >= cfg.max_steps:
                    break
                if cancelled is not None and cancelled():
                    stopped = "cancelled"
                    break
                chosen = st["order"][st["position"]:st["position"] + cfg.batch_size]
                try:
                    loss = ft.train_step(parts, optimizer, [train[i] for i in chosen], items, valid, engine.spec,
                                         cfg, rng, engine.device)
                except ft.TrainingDiverged as exc:
                    if not resume and wrote:  # its checkpoints hold runaway weights: nothing to continue
                        store.drop_checkpoint(output)
                    raise ft.TrainingDiverged(
                        f"{exc}. " + ("Nothing was kept: run again with a lower learning rate." if not resume else
                                      "Start again with a lower learning rate (--overwrite, overwrite=True).")
                    ) from None
                st["position"] += len(chosen)
                st["step"] += 1
                if st["step"] % cfg.checkpoint_every == 0:
                    checkpoint()
                yield FinetuneProgress("train", st["step"], total, epoch=st["epoch"], loss=loss,
                                       message=f"epoch {st['epoch'] + 1}, step {st['step']}, loss {loss:.4f}")
            if stopped is None and st["position"] >= len(st["order"]):
                st["epoch"] += 1
                st["order"] = None
                if val:
                    dice = ft.validation_dice(view, items, val)
                    if dice["mean"] > st["best_dice"] + cfg.min_delta:
                        st.update(best_dice=dice["mean"], best_epoch=st["epoch"], bad=0)
                        best = ft.trainable_state(parts)
                    else:
                        st["bad"] += 1
                    st["history"].append({"epoch": st["epoch"], "step": st["step"], "val": dice})
                    yield FinetuneProgress("validate", st["epoch"], cfg.epochs, epoch=st["epoch"],
                                           val_dice=dice["mean"], message=_said(dice, f"after epoch {st['epoch']}"))
                else:
                    best = ft.trainable_state(parts)
                    st["best_epoch"] = st["epoch"]
                checkpoint()
    except GeneratorExit:  # closed by a worker's Cancel: keep the work for resume=True
        if st["step"] or resume:
            checkpoint()
        raise
    if st["step"] or resume or stopped != "cancelled":  # a cancel before the first step has nothing to keep
        checkpoint()
    result = FinetuneResult(
        model_dir=str(output), dice_before=None, dice_after=None, dice_by_prompt={}, epochs=st["epoch"],
        steps=st["step"], best_epoch=st["best_epoch"], stopped=stopped, train_objects=len(train),
        val_objects=len(val), history=st["history"], held_out=sorted({items[o.item].name for o in val}),
        notes=notes)
    if val:
        after = next(h["val"] for h in st["history"] if h["epoch"] == st["best_epoch"])
        result.dice_before, result.dice_after = st["before"]["mean"], after["mean"]
        result.dice_by_prompt = {k: (st["before"][k], after[k]) for k in ("box", "point")}
        if st["best_epoch"] == 0 and stopped != "cancelled":
            notes.append("no epoch beat the base model's validation Dice: the saved decoder is the base "
                         "model's, unchanged (try another learning rate, more epochs or more labels)")
    if stopped == "cancelled":
        return result
    yield FinetuneProgress("save", 0, 1, epoch=st["epoch"], message=f"saving the model to {output}")
    full = _full_model(engine)
    result_keys = full.load_state_dict(best, strict=False)
    if result_keys.unexpected_keys:
        raise RuntimeError(f"trained weights do not fit the model: {result_keys.unexpected_keys[:3]}")
    record = _record(engine, cfg, result, items, planned.small)
    store.write_model(output, full, engine.spec, record, store.model_card(record))
    yield FinetuneProgress("save", 1, 1, epoch=st["epoch"], message=f"saved to {output}")
    return result


def _where(location) -> str:
    """A model location comparable across spellings (relative paths, symlinks)."""
    import os

    return os.path.realpath(location) if os.path.exists(location) else str(location)


def _checked(config) -> FinetuneConfig:
    if config is None:
        return FinetuneConfig().checked()
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig (e.g. FinetuneConfig(epochs=5)); got {type(config).__name__}")
    return config.checked()


def _settings(cfg: FinetuneConfig) -> dict:
    """The settings a checkpoint must share with a resumed run."""
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}


def _stop_reason(st, cfg, has_val) -> str | None:
    if st["order"] is not None and st["position"] < len(st["order"]) and not (
            cfg.max_steps is not None and st["step"] >= cfg.max_steps):
        return None  # an epoch under way (resumed mid-epoch)
    if cfg.max_steps is not None and st["step"] >= cfg.max_steps:
        return "max_steps"
    if st["epoch"] >= cfg.epochs:
        return "epochs"
    if has_val and st["bad"] >= cfg.patience:
        return "early stopping"
    return None


def _said(dice, when) -> str:
    if dice is None:
        return f"no validation split ({when})"
    return f"validation Dice {when}: {dice['mean']:.3f} (box {dice['box']:.3f}, point {dice['point']:.3f})"


def _mismatch(output, key, old, new) -> str:
    what = {"data": "images or labels", "contrast": "SAM contrast (window, preset or percentiles)",
            "encoder": "image encoder (another model or preprocessing)",
            "decoder": "starting decoder (another model)", "objects": "split of objects",
            "settings": "settings"}[key]
    detail = ""
    if key == "settings":
        changed = [k for k in new if (old or {}).get(k) != new[k]]
        detail = ": " + ", ".join(f"{k} {(old or {}).get(k)!r} -> {new[k]!r}" for k in changed)
    return (f"resume: the checkpoint in {output} was made with other {what}{detail}; resume with what it was "
            "made with, or start again there (--overwrite, overwrite=True)")


def _full_model(engine: SamEngine):
    """A float32 CPU ``SamModel`` with ``engine``'s image encoder, to save."""
    import torch

    enc = getattr(engine.model, "vision_encoder", None)
    params = list(enc.parameters()) if enc is not None and engine.backend == "torch" else []
    if params and params[0].dtype == torch.float32 and params[0].device.type == "cpu":
        full = copy.deepcopy(engine.model)
    else:  # the engine's encoder was exported, cast or moved: its float32 weights are on disk
        full = load_sam_model(engine.source)
    if weights_fingerprint(full, "vision_encoder.") != engine.encoder_fingerprint:
        raise ValueError(f"the weights at {engine.source.describe()} changed since the model was loaded; "
                         "load it again and fine-tune again")
    return full.float().eval()


def _record(engine, cfg, result, items, small) -> dict:
    import torch
    import transformers

    from ._version import __version__

    earlier = (store.read_sidecar(engine.source.location) or {}).get("finetune") if engine.source.kind == "hf_dir" \
        else None
    lineage = ([*earlier.get("lineage", []), earlier.get("base_model")] if isinstance(earlier, dict) else [])
    return {
        "base_model": engine.source.requested, "base_location": engine.source.describe(), "lineage": lineage,
        "preprocessing": engine.spec.kind, "trained": "mask decoder" + (" and prompt encoder"
                                                                          if cfg.train_prompt_encoder else ""),
        "images": len({item.image for item in items}), "slices": len(items),
        "train_objects": result.train_objects, "val_objects": result.val_objects, "skipped_small": small,
        "held_out": result.held_out, "notes": result.notes,
        "epochs": result.epochs, "steps": result.steps, "best_epoch": result.best_epoch, "stopped": result.stopped,
        "dice_before": result.dice_before, "dice_after": result.dice_after,
        "dice_by_prompt": {k: list(v) for k, v in result.dice_by_prompt.items()},
        "settings": asdict(cfg), "history": result.history,
        "versions": {"napari-sam-labeler": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "date": __import__("datetime").datetime.now().astimezone().isoformat(timespec="seconds"),
    }
