"""Automatic segmentation through the cache: the public functions :mod:`napari_sam.api` re-exports.

:mod:`napari_sam.everything` holds the algorithm (grid, filters, NMS, paste, 3D links) and
needs only a decoder; here images and stacks are embedded through the cache (crops too)
and the options are checked.
"""

from __future__ import annotations

import operator

import numpy as np

from . import everything as _everything
from . import preprocess as pp
from .cache import EmbeddingCache
from .engine import SamEngine, drain
from .everything import EverythingParams, EverythingProgress, EverythingResult, MaskRecord
from .preprocess import resolve_intensity
from .volume import Stack, embed_cached_steps



def _everything_params(params: EverythingParams | None, options: dict) -> tuple[EverythingParams, dict]:
    """Split keyword options into EverythingParams fields and intensity options."""
    names = set(EverythingParams.names())
    chosen = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    unknown = set(rest) - {"window", "preset", "percentiles", "channel"}
    if unknown:
        raise TypeError(f"unexpected option(s) {sorted(unknown)}; automatic segmentation takes "
                        f"{sorted(names)} and window/preset/percentiles/channel")
    if params is not None and chosen:
        raise TypeError(f"give either params or options {sorted(chosen)}, not both")
    if params is not None and not isinstance(params, EverythingParams):
        raise TypeError(f"params must be an EverythingParams, got {type(params).__name__}")
    return (params if params is not None else EverythingParams(**chosen)), rest


def _crop_embedder(engine, image, mapping, cache):
    store = cache if cache is not None else EmbeddingCache(False)

    def embed_steps(box):
        r0, c0, r1, c1 = box
        return embed_cached_steps(engine, image[r0:r1, c0:c1], mapping=mapping, cache=store)

    return embed_steps


def segment_everything_steps(
    engine: SamEngine,
    image: np.ndarray,
    *,
    params: EverythingParams | None = None,
    cache: EmbeddingCache | None = None,
    cancelled=None,
    mapping=None,
    **options,
):
    """:func:`segment_everything` as a generator of :class:`EverythingProgress`.

    Its return value is the :class:`EverythingResult`, or None when ``cancelled()``
    returned True (polled between decoder batches and encoder blocks). ``mapping`` (an
    :class:`~napari_sam._types.IntensityMapping` resolved beforehand, as the widget keeps
    one per layer) replaces the intensity options.
    """
    params, intensity = _everything_params(params, options)
    image = pp.check_image_2d(image)
    if mapping is None:
        mapping = resolve_intensity(image, **intensity)
    elif intensity:
        raise TypeError(f"give either mapping or {sorted(intensity)}, not both")
    return (yield from _everything.segment_steps(
        engine, image.shape[:2], _crop_embedder(engine, image, mapping, cache), params,
        cancelled=cancelled or (lambda: False),
    ))


def segment_everything(
    engine: SamEngine,
    image: np.ndarray,
    *,
    params: EverythingParams | None = None,
    cache: EmbeddingCache | None = None,
    **options,
) -> EverythingResult:
    """Segment every object in a 2D image (SAM's automatic mask generation).

    A grid of point prompts is decoded from the image's (cached) embedding; candidates are
    filtered by predicted IoU and stability, de-duplicated by box NMS and pasted into one
    instance labels image, best first, no pixel claimed twice (see
    :mod:`napari_sam.everything` and docs/usage.md).

    Parameters
    ----------
    engine : SamEngine
    image : ndarray, (H, W) or (H, W, C)
    params : EverythingParams, optional
        All parameters at once; or pass any of its fields as keywords
        (``points_per_side=16, pred_iou_thresh=0.8, ...``). Defaults are Meta's.
    cache : EmbeddingCache, optional
        The image (and crops) are embedded through this cache; a second call on the same
        image costs only the decoder.
    **options
        EverythingParams fields, and ``window``, ``preset``, ``percentiles`` or ``channel``
        for the intensity mapping.

    Returns
    -------
    EverythingResult
        ``labels`` (H, W) uint32 (0 = background, ids 1.. best first) and ``records``
        (one :class:`MaskRecord` per id).
    """
    return drain(segment_everything_steps(engine, image, params=params, cache=cache, **options))


def segment_everything_volume_steps(
    engine: SamEngine,
    stack: Stack,
    *,
    z_range: tuple[int, int] | None = None,
    params: EverythingParams | None = None,
    cache: EmbeddingCache | None = None,
    cancelled=None,
    **options,
):
    """:func:`segment_everything_volume` as a generator of :class:`EverythingProgress`.

    Returns the :class:`EverythingResult`, or None when cancelled.
    """
    params, intensity = _everything_params(params, options)
    if intensity:
        raise TypeError(f"{sorted(intensity)}: a Stack carries its own intensity mapping")
    if not isinstance(stack, Stack):
        raise TypeError(f"stack must be a napari_sam.Stack (Stack(data, axis=...)); got {type(stack).__name__}")
    n = len(stack)
    a, b = 0, n
    if z_range is not None:
        try:
            if (not isinstance(z_range, (tuple, list, range, np.ndarray)) or len(z_range) != 2
                    or any(isinstance(v, (bool, np.bool_)) for v in z_range)):
                raise TypeError
            a, b = operator.index(z_range[0]), operator.index(z_range[1])
        except TypeError:
            raise TypeError(f"z_range must be two integers (start, stop); got {z_range!r}") from None
        if not 0 <= a < b <= n:
            raise ValueError(f"z_range {tuple(z_range)} must satisfy 0 <= start < stop <= {n} (stop is exclusive)")
    params.check_image(stack.slice_shape)
    stop = cancelled or (lambda: False)
    labels = np.zeros(stack.spatial_shape, np.uint32)
    records: dict[int, MaskRecord] = {}
    previous = np.zeros(stack.slice_shape, np.uint32)
    next_id = 1
    for z in range(a, b):
        image = stack[z]
        result = yield from _everything.segment_steps(
            engine, stack.slice_shape, _crop_embedder(engine, image, stack.mapping, cache), params,
            z=z, cancelled=stop,
        )
        if result is None:
            return None
        linked, ids, next_id = _everything.link_slice(previous, result.labels, params.link_iou, next_id)
        labels[stack.labels_index(z)] = linked
        _everything.merge_records(records, result.records, ids, z)
        previous = linked
        yield EverythingProgress("linking", z - a + 1, b - a, z)
    return EverythingResult(labels, [records[k] for k in sorted(records)])


def segment_everything_volume(
    engine: SamEngine,
    stack: Stack,
    *,
    z_range: tuple[int, int] | None = None,
    params: EverythingParams | None = None,
    cache: EmbeddingCache | None = None,
    **options,
) -> EverythingResult:
    """Segment every object in a stack, slice by slice, with one id per object through it.

    Each slice of ``z_range`` (``(start, stop)``, stop exclusive; default all) is segmented
    as :func:`segment_everything` does, from the stack's cached slice embeddings; then an
    object on one slice and one on the next are linked (same id) when their IoU is at
    least ``link_iou`` (greedy, one to one, best overlap first). Objects absent from a
    slice end there: a reappearing object gets a new id.

    Returns
    -------
    EverythingResult
        ``labels`` uint32 of the stack's spatial shape (slices outside ``z_range`` are 0);
        ``records`` with each object's first and last slice and total area.
    """
    return drain(segment_everything_volume_steps(engine, stack, z_range=z_range, params=params,
                                                 cache=cache, **options))
