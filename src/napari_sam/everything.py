"""Automatic segmentation ("segment everything") from cached embeddings.

The algorithm is that of SAM's reference automatic mask generator (Meta's
``SamAutomaticMaskGenerator``), written here in numpy/torch without torchvision:

1. A regular grid of ``points_per_side`` x ``points_per_side`` single-point prompts over the
   image (and, with ``crop_n_layers`` > 0, over overlapping crops of it, each crop embedded
   on its own, through the cache like any image).
2. The points are decoded ``points_per_batch`` at a time, three candidate masks each. A
   candidate is kept when its predicted IoU exceeds ``pred_iou_thresh`` (tested before the
   mask is upsampled, so rejected candidates cost no upsampling) and its stability score
   (IoU of the mask thresholded at +offset and -offset) reaches ``stability_score_thresh``.
   Masks touching a crop's inner edge are dropped (the neighbouring crop sees them whole).
3. Box non-maximum suppression (greedy, by predicted IoU) within each crop, then across
   crops preferring masks from smaller crops.
4. With ``min_mask_region_area`` > 0, small holes are filled and small islands removed in
   every mask, followed by another NMS that prefers unchanged masks (as Meta does).
5. The masks are pasted into one ``uint32`` instance image, best predicted IoU first; a pixel
   belongs to the first mask that claims it, and a mask that finds most of its pixels
   already claimed by better masks is dropped (it duplicates them).

In 3D every slice is segmented this way, then instances are linked from slice to slice by
overlap (greedy one-to-one matching on IoU >= ``link_iou``) so that one object keeps one id.

Nothing here imports napari; the engine is used through two methods,
``point_candidates`` and ``upscale_logits``, so a stand-in engine can drive it in tests.
Coordinates are napari's ``(row, col)``; boxes are ``(row0, col0, row1, col1)`` with
exclusive ends.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import numpy as np

from ._maskops import box_iou, crop_boxes, mask_box, nms, point_grid, remove_small_regions, stability_score

__all__ = ["EverythingParams", "EverythingProgress", "EverythingResult", "MaskRecord", "segment_steps",
           "link_slice", "merge_records", "paste", "point_grid", "crop_boxes", "stability_score", "mask_box",
           "box_iou", "nms", "remove_small_regions"]


def _real(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


@dataclass(frozen=True)
class EverythingParams:
    """Parameters of automatic segmentation; defaults are those of Meta's reference generator.

    Attributes
    ----------
    points_per_side : int
        Grid points along each side of the image (32 → 1024 prompts).
    points_per_batch : int
        Prompts decoded together (memory grows with it).
    pred_iou_thresh : float
        Keep candidates whose predicted IoU is above this.
    stability_score_thresh : float
        Keep candidates whose stability score is at least this.
    stability_score_offset : float
        Logit offset used for the stability score.
    box_nms_thresh : float
        Box IoU above which the lower-scoring of two masks is suppressed.
    crop_n_layers : int
        Extra layers of crops (layer k has 2**k x 2**k crops); 0 = the whole image only.
    crop_nms_thresh : float
        Box NMS threshold between masks from different crops.
    crop_overlap_ratio : float
        Overlap between neighbouring crops, as a fraction of the image's shorter side
        (scaled down for deeper layers).
    crop_n_points_downscale_factor : int
        Points per side in layer k is ``points_per_side / factor**k``.
    min_mask_region_area : int
        Fill holes and remove islands smaller than this (pixels); 0 = off.
    link_iou : float
        3D only: minimum IoU between an object on one slice and on the next to link them.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    link_iou: float = 0.3

    def __post_init__(self):
        ints = {"points_per_side": 1, "points_per_batch": 1, "crop_n_layers": 0,
                "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if self.points_per_side > 1024:
            raise ValueError(f"points_per_side must be at most 1024 (a million prompts); got {self.points_per_side}")
        unit = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                "crop_overlap_ratio", "link_iou")
        for name in unit:
            value = getattr(self, name)
            if not _real(value) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number between 0 and 1; got {value!r}")
        off = self.stability_score_offset
        if not _real(off) or off <= 0:
            raise ValueError(f"stability_score_offset must be a positive number; got {off!r}")
        if self.crop_n_layers > 4:
            raise ValueError(f"crop_n_layers must be at most 4 (256 crops in the deepest layer); got {self.crop_n_layers}")

    def check_image(self, shape) -> None:
        """Raise ValueError when an image of ``shape`` (H, W) cannot be segmented with these
        parameters (too small, or cut by ``crop_n_layers`` into crops under 2 pixels)."""
        h, w = int(shape[0]), int(shape[1])
        if h < 2 or w < 2:
            raise ValueError(f"the image is {h}x{w} pixels; segmenting needs at least 2x2")
        crops, _ = crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        small = min(crops, key=lambda b: min(b[2] - b[0], b[3] - b[1]))
        if min(small[2] - small[0], small[3] - small[1]) < 2:
            raise ValueError(
                f"crop_n_layers={self.crop_n_layers} cuts this {h}x{w} image into crops under 2 pixels "
                f"wide; use fewer crop layers")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass
class EverythingProgress:
    """One step of automatic segmentation: ``done`` of ``total`` units of ``stage``.

    ``stage`` is ``"embedding"`` (a crop or slice through the encoder; units are encoder
    blocks), ``"decoding"`` (units are prompt batches) or ``"linking"`` (slices). ``z`` is
    the slice concerned in 3D, else None.
    """

    stage: str
    done: int
    total: int
    z: int | None = None


@dataclass
class MaskRecord:
    """What is known about one instance of the result.

    ``id`` is its label; ``area`` its pixels in the labels (in 3D: over all slices);
    ``predicted_iou`` and ``stability`` its decoder scores (3D: of its best slice);
    ``point`` the grid prompt ``(row, col)`` that found it (3D: on slice ``z``) and
    ``box`` ``(row0, col0, row1, col1)`` (exclusive ends) of its pixels on that slice;
    ``slices`` (3D) the first and last slice it appears on.
    """

    id: int
    area: int
    predicted_iou: float
    stability: float
    point: tuple[float, float]
    box: tuple[int, int, int, int]
    z: int | None = None
    slices: tuple[int, int] | None = None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class EverythingResult:
    """Instance labels and a record per instance (ordered by id)."""

    labels: np.ndarray
    records: list[MaskRecord] = field(default_factory=list)


# --- one image ----------------------------------------------------------------------------

_UPSAMPLE_BYTES = 256 * 2**20


class _Candidate:
    """A kept mask: its box (image pixels, exclusive ends) and the mask over that box, bit-packed
    (candidates are kept until the NMS; packed, a large image's thousands stay small)."""

    __slots__ = ("box", "area", "predicted_iou", "stability", "point", "crop", "_bits", "_shape")

    def __init__(self, box, mask, predicted_iou, stability, point, crop):
        mask = np.asarray(mask, bool)
        self.box = tuple(int(v) for v in box)
        self._shape = mask.shape
        self._bits = np.packbits(mask, axis=None)
        self.area = int(np.count_nonzero(mask))
        self.predicted_iou, self.stability = float(predicted_iou), float(stability)
        self.point, self.crop = point, crop

    @property
    def mask(self) -> np.ndarray:
        n = self._shape[0] * self._shape[1]
        return np.unpackbits(self._bits, count=n).reshape(self._shape).view(bool)


def _near_inner_edge(box, crop, shape, atol: int = 20) -> bool:
    """True when ``box`` touches an edge of ``crop`` that is not an edge of the image."""
    h, w = shape
    crop_edges = np.array([crop[0], crop[1], crop[2], crop[3]], float)
    image_edges = np.array([0, 0, h, w], float)
    b = np.array(box, float)
    near_crop = np.isclose(b, crop_edges, atol=atol, rtol=0)
    near_image = np.isclose(b, image_edges, atol=atol, rtol=0)
    return bool(np.any(near_crop & ~near_image))


def _side(params: EverythingParams, layer: int) -> int:
    """Grid points per side in crop layer ``layer`` (Meta's downscaling per layer)."""
    return max(1, int(params.points_per_side / (params.crop_n_points_downscale_factor ** layer)))


def _decode_crop(engine, embedding, crop, shape, layer: int, params: EverythingParams, cancelled):
    """Candidates from one crop's grid; a generator of decoded-batch counts."""
    r0, c0, r1, c1 = crop
    ch, cw = r1 - r0, c1 - c0
    n_side = _side(params, layer)
    # Meta scales the unit grid by the crop size (no half-pixel shift): same prompts, same masks.
    points = point_grid(n_side) * np.array([ch, cw])
    whole = crop == (0, 0, shape[0], shape[1])
    found: list[_Candidate] = []
    for start in range(0, len(points), params.points_per_batch):
        batch = points[start:start + params.points_per_batch]
        low, scores, which = engine.point_candidates(
            embedding, batch, multimask=True, min_score=params.pred_iou_thresh)
        # Upsample a few masks at a time: full-size logits are H*W floats each (~256 MiB a chunk).
        step = max(1, min(16, _UPSAMPLE_BYTES // (4 * ch * cw)))
        for s in range(0, len(which), step):
            logits = engine.upscale_logits(low[s:s + step], embedding)
            stab = stability_score(logits, 0.0, params.stability_score_offset)
            masks = logits > 0
            for j in range(len(logits)):
                st = float(stab[j])
                if st < params.stability_score_thresh:
                    continue
                m = masks[j].cpu().numpy() if hasattr(masks, "cpu") else np.asarray(masks[j])
                box = mask_box(m)
                if box is None:
                    continue
                full_box = (box[0] + r0, box[1] + c0, box[2] + r0, box[3] + c0)
                if not whole and _near_inner_edge(full_box, crop, shape):
                    continue
                p = batch[int(which[s + j])]
                found.append(_Candidate(
                    box=full_box, mask=m[box[0]:box[2], box[1]:box[3]],
                    predicted_iou=float(scores[s + j]), stability=st,
                    point=(float(p[0]) + r0, float(p[1]) + c0), crop=tuple(crop),
                ))
            del logits, masks
        yield 1
        if cancelled():
            return found
    if found:
        keep = nms(np.array([c.box for c in found]), np.array([c.predicted_iou for c in found]),
                   params.box_nms_thresh)
        found = [found[i] for i in keep]
    return found


def _postprocess(cands: list[_Candidate], area: int, nms_thresh: float) -> list[_Candidate]:
    """Fill small holes, remove small islands, then prefer unchanged masks in an NMS."""
    out, unchanged = [], []
    for c in cands:
        # Masks are stored cropped to their box: a one-pixel frame keeps the background
        # around the object one region, so corners of the box are not taken for holes.
        m, changed_h = remove_small_regions(np.pad(c.mask, 1), area, "holes")
        m, changed_i = remove_small_regions(m, area, "islands")
        m = m[1:-1, 1:-1]
        box = mask_box(m)
        if box is None:
            continue
        out.append(_Candidate(
            box=(c.box[0] + box[0], c.box[1] + box[1], c.box[0] + box[2], c.box[1] + box[3]),
            mask=m[box[0]:box[2], box[1]:box[3]], predicted_iou=c.predicted_iou,
            stability=c.stability, point=c.point, crop=c.crop,
        ))
        unchanged.append(0.0 if (changed_h or changed_i) else 1.0)
    if not out:
        return out
    keep = nms(np.array([c.box for c in out]), np.array(unchanged), nms_thresh)
    return [out[i] for i in sorted(keep)]


def paste(shape: tuple[int, int], cands: list[_Candidate], min_area: int = 0) -> tuple[np.ndarray, list[MaskRecord]]:
    """Paint candidates into a ``uint32`` instance image, best predicted IoU first.

    A pixel goes to the first (best) mask that claims it. A mask keeps what is left only
    when that is at least half its pixels and at least ``min_area`` pixels; otherwise it
    mostly repeats better masks and is dropped. Ids are 1.. in paste order.
    """
    labels = np.zeros(shape, np.uint32)
    order = sorted(range(len(cands)), key=lambda i: (-cands[i].predicted_iou, -cands[i].stability, i))
    records: list[MaskRecord] = []
    for i in order:
        c = cands[i]
        r0, c0, r1, c1 = c.box
        view = labels[r0:r1, c0:c1]
        free = c.mask & (view == 0)
        n_free = int(free.sum())
        if n_free == 0 or n_free * 2 < c.area or n_free < min_area:
            continue
        new_id = len(records) + 1
        view[free] = new_id
        box = mask_box(free)
        records.append(MaskRecord(
            id=new_id, area=n_free, predicted_iou=round(c.predicted_iou, 4), stability=round(c.stability, 4),
            point=(round(c.point[0], 2), round(c.point[1], 2)),
            box=(r0 + box[0], c0 + box[1], r0 + box[2], c0 + box[3]),
        ))
    return labels, records


def segment_steps(
    engine,
    shape: tuple[int, int],
    embed_steps: Callable[[tuple[int, int, int, int]], Iterator],
    params: EverythingParams | None = None,
    *,
    z: int | None = None,
    cancelled: Callable[[], bool] = lambda: False,
):
    """Segment everything in one image; a generator of :class:`EverythingProgress`.

    Parameters
    ----------
    engine
        A :class:`~napari_sam.engine.SamEngine` (or anything with ``point_candidates`` and
        ``upscale_logits``).
    shape : (H, W)
        The image size.
    embed_steps : callable
        ``embed_steps(crop_box)`` returns a generator that yields encoder progress
        ``(done, total)`` and returns the crop's :class:`ImageEmbedding` (the cache decides
        whether anything is computed). ``crop_box`` is ``(row0, col0, row1, col1)``.
    cancelled : callable
        Polled between batches; when it returns True the generator stops and returns None.

    Returns
    -------
    EverythingResult (the generator's return value), or None when cancelled.
    """
    params = params or EverythingParams()
    h, w = int(shape[0]), int(shape[1])
    params.check_image((h, w))
    crops, layers = crop_boxes((h, w), params.crop_n_layers, params.crop_overlap_ratio)
    per_crop = [_side(params, k) ** 2 for k in layers]
    total_batches = sum(math.ceil(n / params.points_per_batch) for n in per_crop)
    done = 0
    all_cands: list[_Candidate] = []
    crop_of: list[int] = []
    for ci, (crop, layer) in enumerate(zip(crops, layers)):
        steps = embed_steps(crop)
        while True:
            try:
                step, of = next(steps)
            except StopIteration as stop:
                embedding = stop.value
                break
            yield EverythingProgress("embedding", int(step), int(of), z)
            if cancelled():
                steps.close()
                return None
        decode = _decode_crop(engine, embedding, crop, (h, w), layer, params, cancelled)
        while True:
            try:
                done += next(decode)
            except StopIteration as stop:
                found = stop.value
                break
            yield EverythingProgress("decoding", done, total_batches, z)
        if cancelled():
            return None
        all_cands.extend(found)
        crop_of.extend([ci] * len(found))
    if len(crops) > 1 and all_cands:
        areas = np.array([(crops[i][2] - crops[i][0]) * (crops[i][3] - crops[i][1]) for i in crop_of], float)
        keep = nms(np.array([c.box for c in all_cands]), 1.0 / areas, params.crop_nms_thresh)
        all_cands = [all_cands[i] for i in sorted(keep)]
    if params.min_mask_region_area > 0:
        all_cands = _postprocess(all_cands, params.min_mask_region_area, params.box_nms_thresh)
    labels, records = paste((h, w), all_cands, params.min_mask_region_area)
    if z is not None:
        for r in records:
            r.z = z
            r.slices = (z, z)
    return EverythingResult(labels, records)


# --- 3D: link instances across slices --------------------------------------------------------

def link_slice(previous: np.ndarray, current: np.ndarray, min_iou: float, next_id: int) -> tuple[np.ndarray, dict[int, int], int]:
    """Give ``current``'s instances the ids of the ``previous`` slice's they overlap.

    Pairs are matched greedily by IoU (highest first), one to one, when IoU >= ``min_iou``;
    unmatched instances get new ids from ``next_id`` on. Returns the relabelled slice, the
    mapping {current id: new id} and the next free id.
    """
    cur_ids = np.unique(current)
    cur_ids = cur_ids[cur_ids > 0]
    mapping: dict[int, int] = {}
    if cur_ids.size == 0:
        return current.copy(), mapping, next_id
    prev_ids = np.unique(previous)
    prev_ids = prev_ids[prev_ids > 0]
    pairs: list[tuple[float, int, int]] = []
    if prev_ids.size:
        both = (previous > 0) & (current > 0)
        p_idx = np.searchsorted(prev_ids, previous[both])
        c_idx = np.searchsorted(cur_ids, current[both])
        inter = np.zeros((prev_ids.size, cur_ids.size), np.int64)
        np.add.at(inter, (p_idx, c_idx), 1)
        p_area = np.bincount(np.searchsorted(prev_ids, previous[previous > 0]), minlength=prev_ids.size)
        c_area = np.bincount(np.searchsorted(cur_ids, current[current > 0]), minlength=cur_ids.size)
        union = p_area[:, None] + c_area[None, :] - inter
        iou = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)
        pi, cj = np.nonzero(iou >= max(min_iou, 1e-12))
        pairs = sorted(((float(iou[a, b]), int(a), int(b)) for a, b in zip(pi, cj)), key=lambda t: (-t[0], t[1], t[2]))
    used_p, used_c = set(), set()
    for _, a, b in pairs:
        if a in used_p or b in used_c:
            continue
        used_p.add(a)
        used_c.add(b)
        mapping[int(cur_ids[b])] = int(prev_ids[a])
    for b, cid in enumerate(cur_ids):
        if int(cid) not in mapping:
            mapping[int(cid)] = next_id
            next_id += 1
    lut = np.zeros(int(cur_ids.max()) + 1, np.uint32)
    for k, v in mapping.items():
        lut[k] = v
    return lut[current], mapping, next_id


def merge_records(records: dict[int, MaskRecord], slice_records: list[MaskRecord], mapping: dict[int, int], z: int) -> None:
    """Fold one slice's records into the volume's, under the linked ids."""
    for r in slice_records:
        gid = mapping[r.id]
        old = records.get(gid)
        if old is None:
            records[gid] = MaskRecord(id=gid, area=r.area, predicted_iou=r.predicted_iou, stability=r.stability,
                                      point=r.point, box=r.box, z=z, slices=(z, z))
            continue
        best = r.predicted_iou > old.predicted_iou
        records[gid] = MaskRecord(
            id=gid, area=old.area + r.area,
            predicted_iou=r.predicted_iou if best else old.predicted_iou,
            stability=r.stability if best else old.stability,
            point=r.point if best else old.point, box=r.box if best else old.box,
            z=z if best else old.z, slices=(min(old.slices[0], z), max(old.slices[1], z)),
        )
