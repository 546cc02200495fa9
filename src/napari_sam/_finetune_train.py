"""The pieces of a fine-tune: data, the trainable decoder, one optimizer step, validation.

:mod:`napari_sam.finetune` runs them in its loop; nothing here keeps state between calls
except through the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass, replace

import numpy as np

from . import _finetune_data as fd
from . import preprocess as pp
from ._types import Prompt
from .checkpoints import load_sam_model, weights_fingerprint
from .engine import SamEngine
from .volume import Stack, embed_cached_steps


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite (a learning rate too high, usually)."""


@dataclass
class _Item:
    embedding: object
    shape: tuple[int, int]
    name: str
    image: int


# --- data -------------------------------------------------------------------------------


def pairs(images, labels) -> list[tuple[object, np.ndarray]]:
    single = hasattr(images, "shape") or hasattr(labels, "shape")
    if single:
        images, labels = [images], [labels]
    images, labels = list(images), list(labels)
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images and {len(labels)} labels; they must pair one to one")
    if not images:
        raise ValueError("no images given")
    pairs = []
    for i, (image, lab) in enumerate(zip(images, labels)):
        lab = np.asarray(lab)
        if lab.dtype.kind not in "biu":
            raise TypeError(f"labels[{i}] must be integer or bool label ids; got dtype {lab.dtype}")
        if lab.ndim not in (2, 3):
            raise ValueError(f"labels[{i}] must be 2D (H, W) or 3D (Z, H, W); got shape {lab.shape}")
        shape = tuple(np.shape(image))
        if shape[:lab.ndim] != lab.shape or len(shape) > lab.ndim + 1:
            raise ValueError(f"images[{i}] has shape {shape} and labels[{i}] {lab.shape}: the labels must "
                             "cover the image pixel for pixel (a channel axis, if any, last)")
        pairs.append((image, lab))
    return pairs


@dataclass
class Plan:
    """What a fine-tune will learn from, found from the arrays alone (no model needed).

    ``work``: (image, labels, mapping, name, source index) per labelled image/slice with a
    usable object; ``data_key``/``contrast_key`` identify the pixels and labels, and the SAM
    contrast (a checkpoint is only resumed with the same); ``objects`` usable objects,
    ``small`` skipped under min_area; ``unlabelled`` names 2D images with no label at all.
    """

    work: list
    data_key: str
    contrast_key: str
    objects: int
    small: int
    unlabelled: list


def plan(images, labels, mapping, intensity, cfg, names=None) -> Plan:
    """Check and index the data: every error about it is raised here, before any model work."""
    given = pairs(images, labels)
    if names is None:
        names = [f"image {i}" for i in range(len(given))]
    names = [str(n) for n in names]
    if len(names) != len(given):
        raise ValueError(f"got {len(names)} names for {len(given)} images")
    work, unlabelled = [], []
    for i, (image, lab) in enumerate(given):
        if lab.ndim == 2:
            image = pp.check_image_2d(image, f"images[{i}]")
            m = mapping or pp.resolve_intensity(image, **intensity)
            if lab.any():
                work.append((image, lab, m, names[i], i))
            else:
                unlabelled.append(names[i])
        else:
            stack = Stack(image, axis=0, mapping=mapping, **intensity)
            for z in range(lab.shape[0]):
                if lab[z].any():
                    work.append((stack[z], lab[z], stack.mapping, f"{names[i]} slice {z}", i))
    if not work:
        raise ValueError("the labels hold no objects (every label image is 0 everywhere)")
    data, contrast = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    usable, small, kept, per_item = 0, 0, [], []
    for entry in work:
        image, lab, m = entry[:3]
        data.update(np.ascontiguousarray(image).tobytes() + np.ascontiguousarray(lab).tobytes())
        contrast.update(m.key().encode() + b";")
        areas = fd.object_areas(lab)[2]
        n = int((areas >= cfg.min_area).sum())
        usable, small = usable + n, small + int((areas < cfg.min_area).sum())
        if n:
            kept.append(entry)
            per_item.append(n)
    if not usable:
        raise ValueError(f"no labelled object has {cfg.min_area} pixels or more (min_area)")
    if cfg.val_fraction > 0 and len(kept) < 2 and usable < 2:
        raise ValueError("validation needs a second labelled object or image: label more, or pass "
                         "val_fraction=0 (--val-fraction 0) to train without validation")
    return Plan(kept, data.hexdigest(), contrast.hexdigest(), usable, small, unlabelled)


def plan_objects(p: Plan, spec, low_res: int, min_area: int) -> list:
    """The objects of every planned image/slice, with their low-res targets."""
    objects = []
    for k, (_image, lab, *_rest) in enumerate(p.work):
        objects.extend(fd.find_objects(lab, k, spec, low_res, min_area)[0])
    return objects


def embed_items(engine, p: Plan, cache, cancelled=None):
    """Embed every planned image/slice: a generator of ``(done, total, message)``; returns the
    items, or None when ``cancelled()`` turned true (what was embedded stays in ``cache``)."""
    import torch

    items = []
    for n, (image, lab, m, name, source) in enumerate(p.work):
        steps = (embed_cached_steps(engine, image, mapping=m, cache=cache) if cache is not None
                 else engine.embed_steps(image, mapping=m))
        while True:
            if cancelled is not None and cancelled():
                steps.close()
                return None
            try:
                done, total = next(steps)
            except StopIteration as stop:
                embedding = stop.value
                break
            yield n + done / max(total, 1), len(p.work), f"embedding {name}"
        # kept as the cache keeps them (float16): half the memory, and a run that embedded afresh
        # trains on exactly what a resumed run reads back from the cache
        embedding = replace(embedding, features=embedding.features.to(torch.float16))
        items.append(_Item(embedding, tuple(lab.shape), name, source))
        yield n + 1, len(p.work), f"embedded {name}"
    return items


def split(n_items: int, objects, fraction, seed):
    """Hold out whole images/slices when there are several, else some objects of the one."""
    if fraction == 0:
        return objects, []
    rng = np.random.default_rng([seed, 1])
    used = sorted({o.item for o in objects})
    if len(used) >= 2:
        n_val = min(len(used) - 1, max(1, int(round(fraction * len(used)))))
        val_items = set(rng.permutation(used)[:n_val].tolist())
        return [o for o in objects if o.item not in val_items], [o for o in objects if o.item in val_items]
    n_val = min(len(objects) - 1, max(1, int(round(fraction * len(objects)))))
    order = rng.permutation(len(objects))
    val = set(order[:n_val].tolist())
    return [o for k, o in enumerate(objects) if k not in val], [o for k, o in enumerate(objects) if k in val]


# --- the trainable decoder --------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _parts_class():
    import torch.nn as nn
    from transformers import SamModel

    class DecoderParts(nn.Module):
        """The prompt encoder, mask decoder and positional embedding of a ``SamModel``:
        what :meth:`SamEngine.predict_batch` runs on an embedding, without the encoder."""

        def __init__(self, config, prompt_encoder, mask_decoder, shared_image_embedding):
            super().__init__()
            self.config = config
            self.prompt_encoder = prompt_encoder
            self.mask_decoder = mask_decoder
            self.shared_image_embedding = shared_image_embedding

        def get_image_wide_positional_embeddings(self):
            return SamModel.get_image_wide_positional_embeddings(self)

        def forward(self, features, points=None, labels=None, boxes=None, masks=None, multimask=False):
            """``SamModel.forward`` from ``image_embeddings``, one prompt set per row:
            returns low-res logits (B, K, L, L) and predicted IoUs (B, K)."""
            pe = self.get_image_wide_positional_embeddings().repeat(features.shape[0], 1, 1, 1)
            sparse, dense = self.prompt_encoder(input_points=points, input_labels=labels, input_boxes=boxes,
                                                input_masks=masks)
            low, iou = self.mask_decoder(image_embeddings=features, image_positional_embeddings=pe,
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=multimask)
            return low[:, 0], iou[:, 0]

    return DecoderParts


def decoder_parts(engine: SamEngine):
    """A float32 copy of ``engine``'s prompt encoder and mask decoder (on its device), and
    an engine view that decodes with it (same encoder, embeddings and cache keys)."""
    import torch

    m = engine.model
    if next(m.mask_decoder.parameters()).dtype != torch.float32:
        m = load_sam_model(engine.source)  # the float32 weights: a bf16/fp16 engine's were rounded
        if weights_fingerprint(m) != engine.fingerprint:
            raise ValueError(f"the weights at {engine.source.describe()} changed since the model was loaded; "
                             "load it again")
    # one deepcopy: the prompt encoder's positional embedding stays tied to the model's
    pe, md, shared = copy.deepcopy((m.prompt_encoder, m.mask_decoder, m.shared_image_embedding))
    parts = _parts_class()(m.config, pe, md, shared).to(device=engine.device, dtype=torch.float32)
    view = SamEngine(parts, device=engine.device, dtype=torch.float32, spec=engine.spec, source=engine.source,
                     fingerprint=engine.fingerprint, encoder=engine.encoder,
                     encoder_fingerprint=engine.encoder_fingerprint)
    return parts, view


def trainable(parts, cfg):
    names = ("mask_decoder.", "prompt_encoder.") if cfg.train_prompt_encoder else ("mask_decoder.",)
    tied = "prompt_encoder.shared_embedding."  # SAM's fixed random Fourier features: never trained
    params = []
    for name, p in parts.named_parameters():
        p.requires_grad_(name.startswith(names) and not name.startswith(tied))
        if p.requires_grad:
            params.append(p)
    return params


def trainable_state(parts) -> dict:
    return {k: v.detach().clone().cpu() for k, v in parts.state_dict().items()
            if k.startswith(("mask_decoder.", "prompt_encoder."))}


# --- one step ---------------------------------------------------------------------------


def _losses(logits, iou_pred, target, valid, loss_kind):
    """Per object and candidate: segmentation loss (B, K) and IoU-head error (B, K)."""
    import torch
    import torch.nn.functional as F

    t = target[:, None].expand_as(logits)
    v = valid[:, None].expand_as(logits).float()
    p = torch.sigmoid(logits)
    inter = (p * t * v).sum((-1, -2))
    dice = 1 - (2 * inter + 1) / ((p * v).sum((-1, -2)) + (t * v).sum((-1, -2)) + 1)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    if loss_kind == "dice+focal":  # SAM's weighting: 20 focal to 1 dice
        p_t = p * t + (1 - p) * (1 - t)
        ce = 20 * ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))
    pixel = (ce * v).sum((-1, -2)) / v.sum((-1, -2)).clamp_min(1)
    with torch.no_grad():
        pred, truth = (logits > 0) & (v > 0), (t > 0.5) & (v > 0)
        union = (pred | truth).sum((-1, -2)).float()
        iou_true = torch.where(union > 0, (pred & truth).sum((-1, -2)).float() / union.clamp_min(1), 1.0)
    return dice + pixel, (iou_pred - iou_true) ** 2


def _prompts(batch, items, spec, cfg, rng):
    """Sample one prompt structure for the batch, then its prompts per object (model frame)."""
    use_box = rng.random() < cfg.box_fraction
    n_points = 0 if use_box else int(rng.integers(1, cfg.max_points + 1))
    refine = rng.random() < cfg.refine_fraction
    boxes, points, labels = [], [], []
    for o in batch:
        shape = items[o.item].shape
        if use_box:
            boxes.append(pp.box_to_model(fd.jittered_box(o, shape, spec, rng, cfg.box_jitter), shape, spec))
        else:
            pts, lab = fd.sample_points(o, shape, n_points, rng)
            points.append(pp.points_to_model(pts, shape, spec))
            labels.append(lab)
    return (np.stack(boxes).astype(np.float32) if use_box else None,
            np.stack(points).astype(np.float32) if n_points else None,
            np.stack(labels) if n_points else None, refine)


def train_step(parts, optimizer, batch, items, valid, spec, cfg, rng, device) -> float:
    import torch

    boxes, points, labels, refine = _prompts(batch, items, spec, cfg, rng)
    feats = torch.cat([items[o.item].embedding.features for o in batch]).to(device, torch.float32)
    size = valid[0].shape[-1]
    target = torch.from_numpy(np.stack([o.low_res(size) for o in batch])).to(device)
    vmask = torch.from_numpy(np.stack([valid[o.item] for o in batch])).to(device)
    kw = dict(boxes=None if boxes is None else torch.from_numpy(boxes[:, None]).to(device),
              points=None if points is None else torch.from_numpy(points[:, None]).to(device),
              labels=None if labels is None else torch.from_numpy(labels[:, None]).to(device))
    single_point = points is not None and points.shape[1] == 1
    if refine:  # a correction click where the first mask is wrong, that mask as input
        with torch.no_grad():
            low, iou = parts(feats, multimask=single_point, **kw)
            prev = low[torch.arange(len(batch)), iou.argmax(1)]
        xy, lab = fd.corrective_points(prev.cpu().numpy(), target.cpu().numpy(), vmask.cpu().numpy(), spec, rng)
        add_xy = torch.from_numpy(xy[:, None, None]).to(device)
        add_lab = torch.from_numpy(lab[:, None, None]).to(device)
        kw["points"] = add_xy if kw["points"] is None else torch.cat([kw["points"], add_xy], 2)
        kw["labels"] = add_lab if kw["labels"] is None else torch.cat([kw["labels"], add_lab], 2)
        kw["masks"] = prev[:, None]
        single_point = False
    low, iou = parts(feats, multimask=False, **kw)
    seg, iou_err = _losses(low, iou, target, vmask, cfg.loss)
    shown = (seg[:, 0] + iou_err[:, 0]).mean()  # the single-mask loss: comparable from step to step
    loss = shown
    if single_point:  # ambiguous: SAM's three candidates, the best one learns (as SAM trains)
        low3, iou3 = parts(feats, multimask=True, **kw)
        seg3, err3 = _losses(low3, iou3, target, vmask, cfg.loss)
        loss = loss + (seg3.min(1).values + err3.mean(1)).mean()
    if not bool(torch.isfinite(loss)):  # before the update: the weights (and checkpoints) stay finite
        raise TrainingDiverged(f"training diverged (the loss is {float(loss.detach())}): lower the learning rate "
                               f"(now {cfg.learning_rate:g}; --lr)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(shown.detach())


# --- validation -------------------------------------------------------------------------


def validation_dice(engine: SamEngine, items, objects) -> dict:
    """Dice of ``engine``'s masks against each object, prompted by its tight box and by one
    click at its centre (the pixel farthest from its border): ``{"box", "point", "mean"}``."""
    by_item: dict[int, list] = {}
    for o in objects:
        by_item.setdefault(o.item, []).append(o)
    scores: dict[str, list] = {"box": [], "point": []}
    for k, objs in by_item.items():
        item = items[k]
        prompts = ([Prompt(box=fd.tight_box(o)) for o in objs]
                   + [Prompt(points=fd.centre_point(o)[None], point_labels=[1]) for o in objs])
        preds = engine.predict_batch(item.embedding, prompts)
        for j, o in enumerate(objs):
            truth = o.full_mask(item.shape)
            scores["box"].append(fd.dice(preds[j].masks[0], truth))
            scores["point"].append(fd.dice(preds[len(objs) + j].masks[0], truth))
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    out["mean"] = float(np.mean(scores["box"] + scores["point"]))
    return out
