"""Interactive-labeling logic without Qt: prompts from clicks, and safe label commits.

The napari widget, the CLI and notebooks share these rules, so a prompt means the same
object everywhere and a commit never overwrites other labels unless asked to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._types import Prompt


def group_prompts(
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> list[Prompt]:
    """Turn clicks and boxes into one prompt set per object.

    Every box is one object. Each point joins the box that contains it (the smallest one
    when boxes nest), or else the nearest box. Without boxes, all points form one object.

    Parameters
    ----------
    points : (N, 2) array of (row, col), optional
    point_labels : (N,) array of 1/0, optional (all positive when omitted)
    boxes : (M, 4) array of (row_min, col_min, row_max, col_max), optional

    Returns
    -------
    list of Prompt, in box order (or a single prompt for points only); empty when there
    is nothing to segment.
    """
    pts = None if points is None or len(points) == 0 else np.asarray(points, float).reshape(-1, 2)
    labels = None
    if pts is not None:
        labels = np.ones(len(pts), np.int64) if point_labels is None else np.asarray(point_labels, np.int64)
        if len(labels) != len(pts):
            raise ValueError(f"point_labels has {len(labels)} entries but points has {len(pts)}")
    bx = None if boxes is None or len(boxes) == 0 else np.asarray(boxes, float).reshape(-1, 4)
    if bx is None:
        return [] if pts is None else [Prompt(points=pts, point_labels=labels)]
    owner = np.empty(0, int) if pts is None else np.array([_owning_box(p, bx) for p in pts], int)
    prompts = []
    for i, box in enumerate(bx):
        mine = owner == i
        if pts is not None and mine.any():
            prompts.append(Prompt(points=pts[mine], point_labels=labels[mine], box=box))
        else:
            prompts.append(Prompt(box=box))
    return prompts


def _owning_box(point: np.ndarray, boxes: np.ndarray) -> int:
    r, c = point
    inside = (boxes[:, 0] <= r) & (r <= boxes[:, 2]) & (boxes[:, 1] <= c) & (c <= boxes[:, 3])
    if inside.any():
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return int(np.flatnonzero(inside)[np.argmin(areas[inside])])
    dr = np.maximum(np.maximum(boxes[:, 0] - r, 0), r - boxes[:, 2])
    dc = np.maximum(np.maximum(boxes[:, 1] - c, 0), c - boxes[:, 3])
    return int(np.argmin(np.hypot(dr, dc)))


def box_of_mask(mask: np.ndarray) -> np.ndarray | None:
    """``(row_min, col_min, row_max, col_max)`` of a 2D mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([rows[0], cols[0], rows[-1], cols[-1]], float)


def next_label_id(labels) -> int:
    """The smallest id above every label in use (1 for an empty layer)."""
    return int(np.max(labels)) + 1 if np.size(labels) else 1


@dataclass
class CommitPlan:
    """The pixels a commit changes, in a form napari's labels history can record.

    Attributes
    ----------
    indices : tuple of ndarray
        Row and column indices (prefix more axes for a slice of a volume).
    values : ndarray
        New label value at each index.
    kept : int
        Mask pixels left alone because they belong to other labels (overwrite off).
    ids : list of int
        The label id given to each object, in order.
    """

    indices: tuple[np.ndarray, ...]
    values: np.ndarray
    kept: int
    ids: list[int]

    @property
    def size(self) -> int:
        return int(self.values.size)


def plan_commit(
    current: np.ndarray,
    masks: Sequence[np.ndarray],
    ids: Sequence[int],
    *,
    overwrite: bool = False,
    replace: int | Sequence[int] | None = None,
) -> CommitPlan:
    """Decide which pixels of a 2D labels slice change when ``masks`` are committed.

    Parameters
    ----------
    current : (H, W) integer array
        The labels as they are now (not modified).
    masks : sequence of (H, W) bool arrays
        One per object, committed in order; an earlier object keeps pixels a later one
        also claims.
    ids : sequence of int
        Label id for each mask (> 0).
    overwrite : bool
        Whether pixels of *other* labels may be taken. Off by default: existing labels
        are never overwritten silently; ``kept`` counts what was spared.
    replace : int or sequence of int, optional
        The label(s) being refined or re-propagated: their old pixels outside the new
        masks become background, so the commit replaces those labels only.
    """
    current = np.asarray(current)
    if len(masks) != len(ids):
        raise ValueError(f"{len(masks)} masks but {len(ids)} label ids")
    new = current.copy()
    if replace is not None:
        new[np.isin(current, np.atleast_1d(replace))] = 0
    claimed = np.zeros(current.shape, bool)
    kept = 0
    for mask, label in zip(masks, ids):
        if label <= 0:
            raise ValueError(f"label id must be > 0, got {label}")
        mask = np.asarray(mask, bool)
        if mask.shape != current.shape:
            raise ValueError(f"mask shape {mask.shape} does not match labels slice {current.shape}")
        free = (new == 0) | (new == label)
        other = mask & ~free & ~claimed
        kept += 0 if overwrite else int(other.sum())
        take = mask & ~claimed & (free | overwrite)
        new[take] = label
        claimed |= take
    changed = np.nonzero(new != current)
    return CommitPlan(changed, new[changed], kept, [int(i) for i in ids])


def parse_literal(text: str):
    """A prompt list written as text (a CSV cell, a JSON field): JSON, else a Python literal
    such as ``[(1, 2)]``; never ``eval``. Raises ``ValueError`` (the reason attached) for
    anything else, including nesting deeper than the parsers allow."""
    import ast
    import json

    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(str(exc) if isinstance(exc, ValueError) else type(exc).__name__) from None


def checked_points(points, labels, original_size) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Points ``(N, 2)`` ``(row, col)`` and labels (1/0) as arrays, checked against the
    image size; every problem is a ValueError that names it."""
    if points is None:
        if labels is not None:
            raise ValueError("point_labels given without points")
        return None, None
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1 and pts.size == 2:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (row, col); got {pts.shape}")
    if len(pts) == 0:
        raise ValueError("points is empty; pass None for no points")
    if not np.all(np.isfinite(pts)):
        raise ValueError("points contain NaN or infinite coordinates")
    h, w = original_size
    outside = (pts[:, 0] < -0.5) | (pts[:, 0] > h - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > w - 0.5)
    if outside.any():
        raise ValueError(
            f"points {pts[outside].tolist()} lie outside the image of shape {(h, w)} "
            "(coordinates are (row, col) in pixels)"
        )
    if labels is None:
        lab = np.ones(len(pts), np.int64)
    else:
        lab = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(lab) != len(pts):
            raise ValueError(
                f"point_labels has {len(lab)} entries but points has {len(pts)}; give one label per point"
            )
        if not np.all(np.isin(lab, (0, 1))):
            raise ValueError(f"point_labels must be 1 (positive) or 0 (negative); got {sorted(set(lab.tolist()))}")
    return pts, lab


def checked_box(box, original_size) -> np.ndarray | None:
    """A box ``(row_min, col_min, row_max, col_max)`` checked and clipped to the image."""
    if box is None:
        return None
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,):
        raise ValueError(f"box must be (row_min, col_min, row_max, col_max); got shape {np.shape(box)}")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"box contains NaN or infinite values: {b.tolist()}")
    if b[0] > b[2] or b[1] > b[3]:
        raise ValueError(f"box has min > max: {b.tolist()} (expected row_min <= row_max, col_min <= col_max)")
    h, w = original_size
    if b[2] < -0.5 or b[3] < -0.5 or b[0] > h - 0.5 or b[1] > w - 0.5:
        raise ValueError(f"box {b.tolist()} lies entirely outside the image of shape {(h, w)}")
    # A box that overhangs the border (a drag past the edge) means "up to the edge".
    return np.clip(b, [-0.5, -0.5, -0.5, -0.5], [h - 0.5, w - 0.5, h - 0.5, w - 0.5])
