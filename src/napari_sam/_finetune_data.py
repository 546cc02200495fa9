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
    row_max, col_max) (inclusive); ``target`` the mask's area fraction per low-res decoder
    pixel over the cells its box touches (float16), whose first cell is ``target_at`` in
    the L x L frame (:meth:`low_res` places it); ``item`` indexes the image (or slice).
    """

    item: int
    label: int
    box: tuple[int, int, int, int]
    crop: np.ndarray
    target: np.ndarray
    target_at: tuple[int, int] = (0, 0)

    def low_res(self, size: int) -> np.ndarray:
        """The target in the decoder's whole ``size x size`` frame (float32)."""
        out = np.zeros((size, size), np.float32)
        i, j = self.target_at
        out[i:i + self.target.shape[0], j:j + self.target.shape[1]] = self.target
        return out

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


def region_target(labels: np.ndarray, value, box, spec: ModelInputSpec, low_res: int):
    """:func:`low_res_target` of ``labels == value``, computed over the low-res cells the
    object's ``box`` touches only (PIL's box filter on that region, with the cells' exact
    fractional bounds): memory and time follow the object's size, not the image's.
    Returns (target crop float32, (row, col) of its first cell)."""
    from PIL import Image

    h, w = labels.shape
    lh, lw = low_res_frame(labels.shape, spec, low_res)
    sy, sx = h / lh, w / lw  # image pixels per low-res cell
    r0, c0, r1, c1 = box
    # the cells the box's pixels touch, one more on each side (a box filter's support can
    # reach a neighbour when the grid is finer than the image), and the pixels under them
    # with one more on each side too (the filter's support, clipped like the whole image's)
    i0, i1 = max(0, int(r0 / sy) - 1), min(lh - 1, int(np.ceil((r1 + 1) / sy)))
    j0, j1 = max(0, int(c0 / sx) - 1), min(lw - 1, int(np.ceil((c1 + 1) / sx)))
    y0, y1, x0, x1 = i0 * sy, (i1 + 1) * sy, j0 * sx, (j1 + 1) * sx
    Y0, Y1 = max(0, int(np.floor(y0)) - 1), min(h, int(np.ceil(y1)) + 1)
    X0, X1 = max(0, int(np.floor(x0)) - 1), min(w, int(np.ceil(x1)) + 1)
    region = (labels[Y0:Y1, X0:X1] == value).astype(np.float32)
    frac = Image.fromarray(region).resize((j1 - j0 + 1, i1 - i0 + 1), Image.BOX,
                                          box=(x0 - X0, y0 - Y0, x1 - X0, y1 - Y0))
    return np.clip(np.asarray(frac, np.float32), 0.0, 1.0), (i0, j0)


def object_areas(labels: np.ndarray):
    """Label values (nonzero) of a 2D labels image, their bounding slices and pixel counts."""
    from scipy import ndimage

    labels = np.asarray(labels)
    values = np.unique(labels)
    values = values[values != 0]
    if values.size == 0:
        return values, [], np.zeros(0, np.int64)
    ids = _dense_ids(labels, values)
    return values, ndimage.find_objects(ids), np.bincount(ids.ravel(), minlength=values.size + 1)[1:]


def find_objects(labels: np.ndarray, item: int, spec: ModelInputSpec, low_res: int, min_area: int):
    """The objects of one 2D labels image, and how many were too small to use.

    Each nonzero label value is one object (several pieces of one value stay one object:
    the user gave them one label). Objects under ``min_area`` pixels are skipped.
    """
    labels = np.asarray(labels)
    values, slices, areas = object_areas(labels)
    found, small = [], 0
    for k, sl in enumerate(slices):
        if sl is None:
            continue
        if areas[k] < min_area:
            small += 1
            continue
        box = (sl[0].start, sl[1].start, sl[0].stop - 1, sl[1].stop - 1)
        target, at = region_target(labels, values[k], box, spec, low_res)
        found.append(LabelledObject(item=item, label=int(values[k]), box=box, crop=labels[sl] == values[k],
                                    target=target.astype(np.float16), target_at=at))
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
