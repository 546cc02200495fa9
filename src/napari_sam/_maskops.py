"""Masks and boxes for automatic segmentation: grids, crops, stability, box IoU, NMS, cleanup.

Pure numpy (``stability_score`` also takes torch tensors), no torchvision; each is tested
against hand-computed cases in ``tests/test_everything.py``. Boxes are
``(row0, col0, row1, col1)`` with exclusive ends.
"""

from __future__ import annotations

import math

import numpy as np


def point_grid(n_per_side: int) -> np.ndarray:
    """Grid of ``n*n`` points in [0, 1]² as ``(row, col)`` fractions, cell centres."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    rows, cols = np.meshgrid(side, side, indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def crop_boxes(shape: tuple[int, int], n_layers: int, overlap_ratio: float) -> tuple[list[tuple], list[int]]:
    """Crops of an image ``(H, W)``: the whole image, then ``2**k`` x ``2**k`` per layer k.

    Returns boxes ``(row0, col0, row1, col1)`` (exclusive ends) and the layer of each;
    neighbouring crops of a layer overlap (Meta's ``generate_crop_boxes``).
    """
    h, w = int(shape[0]), int(shape[1])
    boxes, layers = [(0, 0, h, w)], [0]
    short = min(h, w)
    for k in range(1, n_layers + 1):
        n = 2 ** k
        overlap = int(overlap_ratio * short * (2 / n))
        crop_h = int(math.ceil((overlap * (n - 1) + h) / n))
        crop_w = int(math.ceil((overlap * (n - 1) + w) / n))
        for i in range(n):
            for j in range(n):
                r0, c0 = (crop_h - overlap) * i, (crop_w - overlap) * j
                boxes.append((r0, c0, min(r0 + crop_h, h), min(c0 + crop_w, w)))
                layers.append(k)
    return boxes, layers


def stability_score(logits, threshold: float = 0.0, offset: float = 1.0):
    """IoU of ``logits > threshold + offset`` with ``logits > threshold - offset``.

    ``logits`` is ``(..., H, W)`` (numpy or torch); returns ``(...)`` scores. A mask that
    is empty even at the lower threshold scores 1 (nothing to be unstable about).
    """
    if hasattr(logits, "dim"):  # torch: count in int32 to keep memory small
        inter = (logits > threshold + offset).sum(dim=(-1, -2), dtype=_torch().int32)
        union = (logits > threshold - offset).sum(dim=(-1, -2), dtype=_torch().int32)
        return _torch().where(union > 0, inter.float() / union.clamp(min=1).float(), _torch().ones_like(inter, dtype=_torch().float32))
    logits = np.asarray(logits)
    inter = (logits > threshold + offset).sum(axis=(-1, -2))
    union = (logits > threshold - offset).sum(axis=(-1, -2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _torch():
    import torch

    return torch


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row0, col0, row1, col1)`` (exclusive ends) of a 2D mask's pixels; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``(N, 4)`` and ``(M, 4)`` (exclusive ends) → ``(N, M)``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    r0 = np.maximum(a[:, None, 0], b[None, :, 0])
    c0 = np.maximum(a[:, None, 1], b[None, :, 1])
    r1 = np.minimum(a[:, None, 2], b[None, :, 2])
    c1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = (r1 - r0).clip(0) * (c1 - c0).clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best score first.

    A box is suppressed when its IoU with an already kept box is above ``iou_threshold``.
    Equal scores keep the earlier box (a stable order), so results are reproducible.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    # One kept box against the boxes still alive: memory stays linear in the number of
    # boxes (a dense grid gives tens of thousands of candidates; N x N would not fit).
    alive = np.arange(len(order))
    keep = []
    while alive.size:
        i, rest = alive[0], alive[1:]
        keep.append(order[i])
        inter = ((np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0])).clip(0)
                 * (np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1])).clip(0))
        union = area[i] + area[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        alive = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


def remove_small_regions(mask: np.ndarray, area: int, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or remove islands (``"islands"``) smaller than ``area``.

    Returns the new mask and whether it changed. 8-connected regions, as Meta's; when
    every island is small the largest is kept, so a mask never vanishes here.
    """
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands'; got {mode!r}")
    holes = mode == "holes"
    work = ~mask if holes else mask
    regions, n = ndimage.label(work, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask, False
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area) + 1
    if small.size == 0:
        return mask, False
    if holes:
        out = mask | np.isin(regions, small)
    else:
        keep = np.flatnonzero(sizes >= area) + 1
        if keep.size == 0:
            keep = np.array([int(np.argmax(sizes)) + 1])
        out = np.isin(regions, keep)
    return out, True
