"""Spread 2D masks through a stack, slice by slice, with SAM.

From an object's mask on one slice, the next slice is prompted with the previous
slice's result: its bounding box (with a margin), its low-resolution logits as the mask
prompt, and optionally a point deep inside it. All objects travelling through a slice
are decoded together in one batched call, each keeping its own label id.

Where an object has masks on several slices (seeds: user prompts or corrections), every
slice in between belongs to the nearest seed, so propagation respects both ends; re-
running from one corrected slice changes only the slices that belong to it.

An object stops when the decoder's predicted IoU drops below a threshold, when its area
jumps or vanishes, or at a user limit; stopped objects are not written on that slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from ._types import Prompt
from .annotate import box_of_mask


@dataclass
class StopRule:
    """When an object stops travelling.

    Attributes
    ----------
    min_iou : float
        Stop when the decoder's predicted IoU falls below this.
    max_area_ratio : float
        Stop when the area grows or shrinks by more than this factor between neighbours.
    min_area : int
        Stop when the mask has fewer pixels (the object vanished).
    max_slices : int or None
        Stop after this many slices from the seed, in each direction.
    """

    min_iou: float = 0.5
    max_area_ratio: float = 2.5
    min_area: int = 4
    max_slices: int | None = None

    def check(self, score: float, area: int, previous_area: int) -> str | None:
        if area == 0 or area < self.min_area:
            return "vanished"  # an empty mask has nothing to carry to the next slice
        if score < self.min_iou:
            return f"predicted IoU {score:.2f} < {self.min_iou:g}"
        ratio = area / max(previous_area, 1)
        if ratio > self.max_area_ratio or ratio < 1.0 / self.max_area_ratio:
            return f"area changed x{ratio:.2f}"
        return None


@dataclass
class PropagationStep:
    """What one slice received: ``masks`` per object id (to write) and objects that stopped."""

    z: int
    masks: dict[int, np.ndarray]
    scores: dict[int, float]
    stopped: dict[int, str] = field(default_factory=dict)


@dataclass
class PropagationSummary:
    """Per object: the slices written and where/why it stopped."""

    slices: dict[int, list[int]] = field(default_factory=dict)
    stops: dict[int, list[tuple[int, str]]] = field(default_factory=dict)


@dataclass
class _Track:
    obj: int
    end: int  # last slice this track may write (inclusive), in its direction
    mask: np.ndarray
    logits: np.ndarray | None = None


DIRECTIONS = ("both", "up", "down")


def seed_ranges(
    seed_slices: list[int], z_min: int, z_max: int
) -> dict[int, tuple[int, int]]:
    """For each seed slice, the inclusive range of slices that are nearest to it.

    Ties go to the lower seed. Slices outside ``[z_min, z_max]`` are never assigned.
    """
    seeds = sorted(set(seed_slices))
    out = {}
    for i, s in enumerate(seeds):
        lo = z_min if i == 0 else (seeds[i - 1] + s) // 2 + 1
        hi = z_max if i == len(seeds) - 1 else (s + seeds[i + 1]) // 2
        out[s] = (max(lo, z_min), min(hi, z_max))
    return out


def _interior_point(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(mask)
    return np.array([np.unravel_index(int(np.argmax(dist)), mask.shape)], float)


def _grow_box(box: np.ndarray, shape, margin: float) -> np.ndarray:
    h, w = box[2] - box[0] + 1, box[3] - box[1] + 1
    dr, dc = max(2.0, margin * h), max(2.0, margin * w)
    return np.array([
        max(box[0] - dr, 0), max(box[1] - dc, 0),
        min(box[2] + dr, shape[0] - 1), min(box[3] + dc, shape[1] - 1),
    ])


def propagate(
    engine,
    embedding_for: Callable[[int], object],
    seeds: Mapping[int, Mapping[int, np.ndarray]],
    n_slices: int,
    *,
    start: int | None = None,
    direction: str = "both",
    z_range: tuple[int, int] | None = None,
    rule: StopRule | None = None,
    interior_point: bool = False,
    box_margin: float = 0.1,
) -> Iterator[PropagationStep]:
    """Propagate seed masks through neighbouring slices; a generator of steps.

    Parameters
    ----------
    engine : SamEngine (or anything with ``predict_batch(embedding, prompts)``)
    embedding_for : callable
        ``z -> ImageEmbedding`` (e.g. ``lambda z: stack.embedding(z, engine, cache)``).
    seeds : mapping
        ``{z: {label_id: mask (H, W) bool}}``: objects annotated on slice ``z``.
    n_slices : int
        Length of the stack.
    start : int, optional
        Propagate only from the seeds on this slice (after a correction there); other
        seeds still bound the range. Default: from every seed.
    direction : {"both", "up", "down"}
        "up" is increasing slice index.
    z_range : (int, int), optional
        Inclusive slice limits: nothing outside them is yielded (so nothing is written
        there). A seed outside the range still leads its objects into it: the slices in
        between are predicted to carry the object, not written.
    rule : StopRule, optional
    interior_point : bool
        Add a positive point at the deepest pixel of the previous mask.
    box_margin : float
        Box prompt margin, as a fraction of the previous box size (at least 2 pixels).

    Yields
    ------
    PropagationStep
        One per slice and sweep, in order of distance from the seed; write ``masks``.
        The generator's return value is a :class:`PropagationSummary`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    rule = rule or StopRule()
    z_min, z_max = (0, n_slices - 1) if z_range is None else (int(z_range[0]), int(z_range[1]))
    if not (0 <= z_min <= z_max < n_slices):
        raise ValueError(f"z_range {z_range} is not inside the stack of {n_slices} slices")
    if not seeds:
        raise ValueError("no seed masks: annotate at least one object on one slice")
    if start is not None and start not in seeds:
        raise ValueError(f"start={start} has no seed masks (seed slices: {sorted(seeds)})")
    shape = None
    per_object: dict[int, list[int]] = {}
    for z, objects in seeds.items():
        if not 0 <= z < n_slices:
            raise ValueError(f"seed slice {z} is outside the stack of {n_slices} slices")
        for obj, mask in objects.items():
            if int(obj) <= 0:
                raise ValueError(f"object ids must be > 0, got {obj}")
            mask = np.asarray(mask)
            if shape is None:
                shape = mask.shape
            elif mask.shape != shape:
                raise ValueError(f"seed masks differ in shape: {shape} and {mask.shape}")
            per_object.setdefault(int(obj), []).append(int(z))

    # Sweeps: (seed slice, step) -> tracks of objects leaving that seed in that direction.
    sweeps: dict[tuple[int, int], list[_Track]] = {}
    for obj, slices in per_object.items():
        for s, (lo, hi) in seed_ranges(slices, z_min, z_max).items():
            if start is not None and s != start:
                continue
            mask = np.asarray(seeds[s][obj], bool)
            if not mask.any():
                continue
            for step, end in ((1, hi), (-1, lo)):
                if direction == "up" and step < 0 or direction == "down" and step > 0:
                    continue
                if rule.max_slices is not None:
                    end = min(end, s + rule.max_slices) if step > 0 else max(end, s - rule.max_slices)
                if (end - s) * step > 0:
                    sweeps.setdefault((s, step), []).append(_Track(obj, end, mask))

    summary = PropagationSummary()
    for (s, step), tracks in sorted(sweeps.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        z = s
        while tracks:
            z += step
            tracks = [t for t in tracks if (t.end - z) * step >= 0]
            if not tracks:
                break
            prompts = []
            for t in tracks:
                box = _grow_box(box_of_mask(t.mask), shape, box_margin)
                points = _interior_point(t.mask) if interior_point else None
                prompts.append(Prompt(
                    points=points, point_labels=None if points is None else np.ones(1, int),
                    box=box, mask_input=t.logits if t.logits is not None else t.mask,
                ))
            predictions = engine.predict_batch(embedding_for(z), prompts, multimask=False)
            result = PropagationStep(z, {}, {})
            survivors = []
            for t, pred in zip(tracks, predictions):
                mask, score = pred.masks[0], float(pred.scores[0])
                reason = rule.check(score, int(mask.sum()), int(t.mask.sum()))
                if reason:
                    result.stopped[t.obj] = reason
                    summary.stops.setdefault(t.obj, []).append((z, reason))
                    continue
                result.masks[t.obj] = mask
                result.scores[t.obj] = score
                if z_min <= z <= z_max:
                    summary.slices.setdefault(t.obj, []).append(z)
                t.mask, t.logits = mask, pred.logits[0]
                survivors.append(t)
            tracks = survivors
            if z_min <= z <= z_max:
                yield result
    return summary


def seeds_from_labels(labels_slice: np.ndarray, ids=None) -> dict[int, np.ndarray]:
    """``{id: mask}`` for the labels on one slice (all non-zero ids, or ``ids``)."""
    present = [int(i) for i in np.unique(labels_slice) if i != 0]
    chosen = present if ids is None else [int(i) for i in ids if int(i) in present]
    return {i: labels_slice == i for i in chosen}
