"""What fine-tuning learns from: objects of a labels image, prompts sampled on them, targets.

Pure numpy (plus Pillow through :mod:`napari_sam.preprocess`): every random choice is drawn
from a ``numpy.random.Generator`` the caller passes, so a seed fixes a whole run and a
resumed run draws what the uninterrupted one would have.

Coordinates: objects are found in ``(row, col)`` pixels; prompts are returned in the
model's ``(x, y)`` input frame (what transformers' prompt encoder takes), targets at the
decoder's low resolution ``L x L`` in the padded model frame, with a ``valid`` map that is
False over the padding (a loss must not reward predicting the padding as background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import preprocess as pp
from ._types import ModelInputSpec

# SAM's box noise (Kirillov et al. 2023, appendix): std 10 % of the side, at most 20 pixels
# of the 1024 model frame.
BOX_MAX_SHIFT = 20.0


@dataclass
class LabelledObject:
    """One label value of one labels image: a training or validation example.

    ``crop`` is the object's mask inside its tight box ``box`` = (row_min, col_min,
    row_max, col_max) (inclusive); ``target`` the mask's area fraction per low-res
    decoder pixel (float16, L x L); ``item`` indexes the image (or slice) it lies in.
    """

    item: int
    label: int
    box: tuple[int, int, int, int]
    crop: np.ndarray
    target: np.ndarray

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    def full_mask(self, shape) -> np.ndarray:
        mask = np.zeros(shape, bool)
        r0, c0, r1, c1 = self.box
        mask[r0:r1 + 1, c0:c1 + 1] = self.crop
        return mask


def low_res_frame(original_size, spec: ModelInputSpec, low_res: int) -> tuple[int, int]:
    """``(lh, lw)``: the part of the decoder's ``L x L`` output the image covers (the rest
    is padding); what :func:`napari_sam.preprocess.mask_to_logits` places a mask in."""
    h, w = pp.resized_shape(original_size, spec)
    scale = low_res / spec.target_length
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def low_res_target(mask: np.ndarray, spec: ModelInputSpec, low_res: int) -> np.ndarray:
    """A binary mask at image size → its area fraction per low-res decoder pixel (L, L)."""
    from PIL import Image

    lh, lw = low_res_frame(mask.shape, spec, low_res)
    frac = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((lw, lh), Image.BOX), np.float32)
    out = np.zeros((low_res, low_res), np.float32)
    out[:lh, :lw] = np.clip(frac, 0.0, 1.0)
    return out


def valid_map(original_size, spec: ModelInputSpec, low_res: int) -> np.ndarray:
    """True over the low-res pixels the image covers, False over the padding."""
    lh, lw = low_res_frame(original_size, spec, low_res)
    valid = np.zeros((low_res, low_res), bool)
    valid[:lh, :lw] = True
    return valid


def find_objects(labels: np.ndarray, item: int, spec: ModelInputSpec, low_res: int, min_area: int):
    """The objects of one 2D labels image, and how many were too small to use.

    Each nonzero label value is one object (several pieces of one value stay one object:
    the user gave them one label). Objects under ``min_area`` pixels are skipped.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    values = np.unique(labels)
    values = values[values != 0]
    found, small = [], 0
    if values.size == 0:
        return found, small
    slices = ndimage.find_objects(_dense_ids(labels, values))
    for k, sl in enumerate(slices):
        if sl is None:
            continue
        crop = labels[sl] == values[k]
        if int(crop.sum()) < min_area:
            small += 1
            continue
        box = (sl[0].start, sl[1].start, sl[0].stop - 1, sl[1].stop - 1)
        full = np.zeros(labels.shape, bool)
        full[sl] = crop
        target = low_res_target(full, spec, low_res).astype(np.float16)
        found.append(LabelledObject(item=item, label=int(values[k]), box=box, crop=crop, target=target))
    return found, small


def _dense_ids(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Label values → 1..K (0 stays 0), for ``ndimage.find_objects``."""
    ids = np.searchsorted(values, labels)
    ids = np.where(labels == 0, 0, ids + 1)
    return ids.astype(np.int64)


def jittered_box(obj: LabelledObject, shape, spec: ModelInputSpec, rng: np.random.Generator,
                 jitter: float) -> np.ndarray:
    """The object's box with SAM's noise, clipped to the image: (row0, col0, row1, col1)."""
    r0, c0, r1, c1 = obj.box
    h, w = shape
    side = np.array([r1 - r0 + 1, c1 - c0 + 1, r1 - r0 + 1, c1 - c0 + 1], np.float64)
    # BOX_MAX_SHIFT model pixels, in image pixels
    cap = BOX_MAX_SHIFT * max(h, w) / spec.target_length
    noise = np.clip(rng.normal(0.0, 1.0, 4) * jitter * side, -cap, cap) if jitter > 0 else np.zeros(4)
    box = np.array([r0, c0, r1, c1], np.float64) + noise
    box[[0, 2]] = np.clip(box[[0, 2]], 0, h - 1)
    box[[1, 3]] = np.clip(box[[1, 3]], 0, w - 1)
    lo = np.minimum(box[:2], box[2:])
    hi = np.maximum(box[:2], box[2:])
    return np.concatenate([lo, hi])


def sample_points(obj: LabelledObject, shape, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points on an object: the first inside it, each further one inside or (half the
    time, where there is room) outside it within its box grown by 10 %, as a user clicks.

    Returns ``(n, 2)`` (row, col) and labels (1 inside, 0 outside).
    """
    r0, c0, r1, c1 = obj.box
    h, w = shape
    inside = np.argwhere(obj.crop) + (r0, c0)
    gr, gc = max(1, (r1 - r0 + 1) // 10), max(1, (c1 - c0 + 1) // 10)
    R0, C0, R1, C1 = max(0, r0 - gr), max(0, c0 - gc), min(h - 1, r1 + gr), min(w - 1, c1 + gc)
    ring = np.ones((R1 - R0 + 1, C1 - C0 + 1), bool)
    ring[r0 - R0:r1 - R0 + 1, c0 - C0:c1 - C0 + 1] &= ~obj.crop
    outside = np.argwhere(ring) + (R0, C0)
    points = np.empty((n, 2), np.float64)
    labels = np.empty(n, np.int64)
    for i in range(n):
        negative = i > 0 and len(outside) > 0 and rng.random() < 0.5
        pool = outside if negative else inside
        points[i] = pool[rng.integers(len(pool))]
        labels[i] = 0 if negative else 1
    return points, labels


def centre_point(obj: LabelledObject) -> np.ndarray:
    """The object's pixel farthest from its border (row, col): a deterministic click."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(obj.crop, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([r + obj.box[0], c + obj.box[1]], np.float64)


def tight_box(obj: LabelledObject) -> np.ndarray:
    return np.asarray(obj.box, np.float64)


def corrective_points(pred_logits: np.ndarray, targets: np.ndarray, valid: np.ndarray, spec: ModelInputSpec,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One click per object where the previous mask is wrong, as a user corrects it.

    ``pred_logits`` / ``targets`` / ``valid``: (B, L, L). A missed pixel gives a positive
    click, a spurious one a negative click; an object predicted exactly gets a positive click
    inside it. Returns points (B, 2) in the model's (x, y) frame and labels (B,).
    """
    b, size = pred_logits.shape[0], pred_logits.shape[-1]
    cell = spec.target_length / size
    xy = np.zeros((b, 2), np.float32)
    labels = np.ones(b, np.int64)
    for i in range(b):
        truth = targets[i] > 0.5
        pred = pred_logits[i] > 0
        wrong = (pred != truth) & valid[i]
        pool = np.argwhere(wrong)
        if len(pool) == 0:
            pool = np.argwhere(truth & valid[i])
            if len(pool) == 0:
                pool = np.argwhere(valid[i])
        r, c = pool[rng.integers(len(pool))]
        labels[i] = 1 if truth[r, c] else 0
        xy[i] = ((c + 0.5) * cell - 0.5, (r + 0.5) * cell - 0.5)  # the prompt encoder adds 0.5
    return xy, labels


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
