"""The public API: what a notebook, a script, the CLI and the widget call.

The faces (``cli.py``, ``_qt/``, later the scoring server) reach the core only through
this module; import-linter contracts in ``pyproject.toml`` (checked by
``tests/test_architecture.py``) hold them to it. Everything here is a thin composition of
the engine, the cache, stacks and propagation; nothing imports napari or Qt, and importing
it does not import torch.

Coordinates are napari's: ``(row, col)`` in 2D, ``(plane, row, col)`` in 3D.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import annotate
from . import preprocess as pp
from .preprocess import resolve_intensity
from ._types import Prediction, Prompt
from ._fileio import atomic_write, storable_labels
from .autosave import Autosave, image_key
from .cache import CacheStats, EmbeddingCache
from .checkpoints import DEFAULT_MODEL, MODEL_ENV, ModelNotFoundError, hub_cache_path, resolve_model_source
from ._exports import ExportCancelled, ExportError
from .engine import SamEngine, load_model
from .automatic import (
    segment_everything, segment_everything_steps, segment_everything_volume, segment_everything_volume_steps,
)
from .finetune import (FinetuneConfig, FinetuneProgress, FinetuneResult, check_finetune, check_finetune_output,
                       finetune, finetune_steps)
from ._finetune_store import MODELS_ENV, CheckpointError, finetuned_models, models_folder
from .everything import EverythingParams, EverythingProgress, EverythingResult, MaskRecord
from .propagate import PropagationStep, PropagationSummary, StopRule, propagate, seeds_from_labels
from .volume import Stack, StackProgress, embed_cached, embed_cached_steps

__all__ = [
    # models
    "DEFAULT_MODEL", "MODEL_ENV", "ModelNotFoundError", "ExportError", "ExportCancelled", "SamEngine", "load_model", "model_status",
    "ModelStatus", "resolve_device_dtype", "resolve_runtime", "check_compile", "resolve_intensity",
    # embeddings and the persistent cache
    "EmbeddingCache", "CacheStats", "embed_cached", "embed_cached_steps", "embedding_key",
    # labels kept safe as they are committed
    "Autosave", "image_key",
    # files
    "read_image", "open_volume", "write_labels_tiff", "write_labels_nifti",
    # 2D and 3D segmentation
    "Prompt", "Prediction", "ObjectResult", "segment_2d", "Stack", "StackProgress", "segment_volume",
    "StopRule", "PropagationStep", "PropagationSummary", "propagate_labels",
    # automatic segmentation
    "EverythingParams", "EverythingProgress", "EverythingResult", "MaskRecord", "segment_everything",
    "segment_everything_steps", "segment_everything_volume", "segment_everything_volume_steps",
    # fine-tuning the decoder on the user's labels
    "FinetuneConfig", "FinetuneProgress", "FinetuneResult", "CheckpointError", "finetune", "finetune_steps",
    "check_finetune", "check_finetune_output", "models_folder", "finetuned_models", "MODELS_ENV",
]


def embedding_key(engine: SamEngine, image: np.ndarray, mapping) -> str:
    """The content key of ``image``'s embedding: pixels, model and intensity mapping (the
    persistent cache's key). Equal pixels give equal keys, so an embedding found by it always
    belongs to the pixels given, however they were loaded or changed."""
    from .cache import engine_cache_key, slice_key

    return slice_key(np.asarray(image), engine_cache_key(engine), mapping)


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """The device and dtype :func:`load_model` would use for these choices (imports torch).

    Returns names such as ``("cpu", "float32")`` or ``("cuda", "bfloat16")``.
    """
    from .backends import torch_dtype

    dev, _, precision = resolve_runtime(device, dtype, "torch")
    return dev, str(torch_dtype(precision)).replace("torch.", "")


def check_compile(device: str) -> None:
    """Raise ValueError when ``torch.compile`` cannot work on ``device`` here (the CPU
    needs a C++ compiler)."""
    import torch

    from .backends import check_compile as check

    check(torch.device(device))


def resolve_runtime(device: str = "auto", dtype: str = "auto", backend: str = "auto") -> tuple[str, str, str]:
    """The device, encoder backend and precision :func:`load_model` would use (imports torch).

    Returns names such as ``("cpu", "openvino", "bf16")`` or ``("cuda", "torch", "bf16")``;
    raises ValueError for a choice this machine cannot run.
    """
    from .backends import resolve_backend, resolve_precision
    from .engine import resolve_device_for

    dev = resolve_device_for(device, backend)
    kind = resolve_backend(backend, dev)
    return str(dev), kind, resolve_precision(dtype, kind, dev)


@dataclass
class ObjectResult:
    """One segmented object: its label id, the mask and the decoder's predicted IoU."""

    label: int
    mask: np.ndarray
    score: float


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D/3D image from TIFF, NumPy ``.npy`` or a common bitmap format.

    Parameters
    ----------
    path : str or PathLike
        TIFF (level 0 of a pyramid; planar samples moved last), ``.npy``, PNG, JPEG, ...

    Returns
    -------
    ndarray
        ``(H, W)``, ``(H, W, C)``, ``(Z, H, W)`` or ``(Z, H, W, C)``, the file's dtype.

    Raises
    ------
    FileNotFoundError
        The file is missing (the message names it).
    ValueError
        The file cannot be decoded (the message names it and the reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return _samples_last(*_tiff_level0(path, lazy=False))
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from skimage import io

        return io.imread(path)
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def open_volume(path: str | os.PathLike):
    """Open a 3D stack without loading it.

    Parameters
    ----------
    path : str or PathLike
        TIFF (memory-mapped when it can be, else read through zarr), a zarr array folder,
        or ``.npy`` (memory-mapped); other formats are read whole (:func:`read_image`).

    Returns
    -------
    array-like
        Indexable like a NumPy array, ``(Z, H, W)`` or ``(Z, H, W, C)``; slices are read
        as they are indexed (pass it to :class:`Stack`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume not found: {path}")
    try:
        if path.is_dir():
            import zarr

            return zarr.open_array(store=str(path), mode="r")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix in (".tif", ".tiff"):
            return _samples_last(*_tiff_level0(path, lazy=True))
        return read_image(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot open volume {path}: {exc}") from exc


def _tiff_level0(path: Path, lazy: bool):
    """The full-resolution level of a TIFF and its axes as tifffile (and OME) report them:
    the napari reader's own access (memory map, else a zarr view of level 0)."""
    from .io.tiff import read_tiff

    data, axes, _scale, _unit = read_tiff(path)
    return (data if lazy else np.asarray(data)), axes


def _samples_last(data, axes: str):
    """Colour samples stored as separate planes (axes ``SYX``, ``ZSYX``) moved last, as
    interleaved RGB is, so the image means the same whichever way it was stored."""
    axes = axes.upper()
    if "S" in axes and not axes.endswith("S") and len(axes) == np.ndim(data):
        data = np.ascontiguousarray(np.moveaxis(np.asarray(data), axes.index("S"), -1))
    return data


def write_labels_tiff(path: str | os.PathLike, labels: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write a labels image as TIFF, atomically (temporary file + rename).

    Parameters
    ----------
    path : str or PathLike
    labels : ndarray of int or bool, ``(H, W)`` or ``(Z, H, W)``
        Stored in the smallest unsigned dtype that holds its ids (negative ids are refused).
    overwrite : bool
        An existing file is replaced only when True.

    Returns
    -------
    Path
    """
    import tifffile

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    labels = storable_labels(labels, f"labels TIFF {path}")
    with atomic_write(path) as tmp:
        tifffile.imwrite(tmp, labels, compression="zlib", metadata={"axes": "YX" if labels.ndim == 2 else "ZYX"})
    return path


def write_labels_nifti(path: str | os.PathLike, labels: np.ndarray, *, like: dict | None = None,
                       scale: Sequence[float] = (1.0, 1.0, 1.0), translate: Sequence[float] = (0.0, 0.0, 0.0),
                       overwrite: bool = False) -> Path:
    """Write a (Z, Y, X) or (Y, X) labels array as NIfTI in patient space (needs nibabel).

    The placement is that of the image the labels were drawn on: ``like`` is its napari
    layer metadata (what this package's readers and samples return, e.g. a DICOM series'
    exact geometry), else ``scale``/``translate`` in millimetres, napari's (z, y, x) order
    read as LPS. Any tool that reads the image's NIfTI overlays these labels on it.
    """
    from .io._geometry import affine_from_layer_meta
    from .io.nifti import write_nifti

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    labels = np.asarray(labels)
    meta = like if like is not None else {"scale": tuple(scale)[-labels.ndim:],
                                          "translate": tuple(translate)[-labels.ndim:]}
    write_nifti(path, labels, affine_from_layer_meta(meta, labels.ndim), labels=True)
    return path


def _prompts(points, point_labels, boxes):
    has_points = points is not None and len(points) > 0
    has_boxes = boxes is not None and len(boxes) > 0
    if not has_points and not has_boxes:
        raise ValueError("give at least one point or one box")
    return annotate.group_prompts(
        np.asarray(points, float) if has_points else None,
        None if point_labels is None else np.asarray(point_labels),
        np.asarray(boxes, float).reshape(-1, 4) if has_boxes else None,
    )


def segment_2d(
    engine: SamEngine,
    image: np.ndarray,
    *,
    points: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    multimask: bool = False,
    cache: EmbeddingCache | None = None,
    **intensity,
) -> tuple[np.ndarray, list[ObjectResult]]:
    """Segment objects in one 2D image and return a labels image.

    Objects follow :func:`napari_sam.annotate.group_prompts`, as in the widget: every
    box is one object, a point joins the box that contains it (else the nearest box),
    and points alone form one object. Objects get label ids 1, 2, ... in box order;
    where masks overlap, the object with the higher predicted IoU keeps the pixel. With ``multimask``, each object takes the
    candidate with the highest predicted IoU.

    Parameters
    ----------
    engine : SamEngine
    image : ndarray, (H, W) or (H, W, C)
    points : (N, 2) array-like of (row, col), optional
    point_labels : (N,) array-like of 1/0, optional
    boxes : (M, 4) array-like of (row_min, col_min, row_max, col_max), optional
    multimask : bool
    cache : EmbeddingCache, optional
        Read/write the embedding through this cache.
    **intensity
        ``window``, ``preset``, ``percentiles`` or ``channel`` for the intensity mapping.

    Returns
    -------
    labels : ndarray of uint8/uint16, shape (H, W)
    objects : list of ObjectResult
    """
    prompts = _prompts(points, point_labels, boxes)
    if cache is None:
        embedding = engine.embed(image, **intensity)
    else:
        image = pp.check_image_2d(image)
        embedding = embed_cached(engine, image, mapping=pp.resolve_intensity(image, **intensity), cache=cache)
    return _segment_embedding(engine, embedding, prompts, multimask)


def _segment_embedding(engine, embedding, prompts, multimask):
    predictions = engine.predict_batch(embedding, prompts, multimask=multimask)
    objects = []
    for label, pred in enumerate(predictions, start=1):
        k = pred.best if multimask else 0
        objects.append(ObjectResult(label, pred.masks[k], float(pred.scores[k])))
    dtype = np.uint8 if len(objects) < 256 else np.uint16
    labels = np.zeros(embedding.original_size, dtype)
    ranked = sorted(objects, key=lambda o: o.score, reverse=True)
    plan = annotate.plan_commit(labels, [o.mask for o in ranked], [o.label for o in ranked])
    labels[plan.indices] = plan.values
    return labels, objects


@dataclass
class ModelStatus:
    """Where the configured model resolves to and whether its weights are present."""

    requested: str
    origin: str  # "argument", "$NAPARI_SAM_MODEL" or "default"
    kind: str | None
    location: str | None
    available: bool
    detail: str


def model_status(model: str | os.PathLike | None = None) -> ModelStatus:
    """Resolve ``model`` (or the configured default) without loading any weights.

    Parameters
    ----------
    model : str or PathLike, optional
        Hugging Face id, ``save_pretrained`` folder or Meta ``.pth``; default
        ``$NAPARI_SAM_MODEL``, else ``facebook/sam-vit-large``.

    Returns
    -------
    ModelStatus
        Where it resolves, whether the weights are here, and how to get them if not.
    """
    from .checkpoints import DEFAULT_MODEL, ModelNotFoundError, how_to_get_weights

    if model is not None:
        origin = "argument"
    elif os.environ.get(MODEL_ENV):
        origin = f"${MODEL_ENV}"
    else:
        origin = "default"
    requested = os.fspath(model) if model is not None else (os.environ.get(MODEL_ENV) or DEFAULT_MODEL)
    try:
        source = resolve_model_source(requested)
    except ModelNotFoundError as exc:
        return ModelStatus(requested, origin, None, None, False, str(exc))
    if source.kind == "hf_id":
        cached = hub_cache_path(source.location)
        if cached is None:
            return ModelStatus(
                requested, origin, source.kind, None, False,
                "not in the local Hugging Face cache (it would be downloaded on first use "
                "where the Hub is reachable).\n" + how_to_get_weights(source.location),
            )
        return ModelStatus(requested, origin, source.kind, cached, True, f"cached at {cached}")
    kind = "save_pretrained folder" if source.kind == "hf_dir" else "Meta-format checkpoint"
    return ModelStatus(requested, origin, source.kind, source.location, True, f"{kind} {source.location}")


def propagate_labels(
    engine: SamEngine,
    stack: Stack,
    labels: np.ndarray,
    *,
    seed_slices: Sequence[int],
    ids: Sequence[int] | None = None,
    cache: EmbeddingCache | None = None,
    start: int | None = None,
    direction: str = "both",
    z_range: tuple[int, int] | None = None,
    rule: StopRule | None = None,
    overwrite: bool = False,
    interior_point: bool = False,
):
    """Propagate the labels on ``seed_slices`` through ``stack``, writing into ``labels``.

    A generator of :class:`~napari_sam.propagate.PropagationStep` (each already written);
    its return value is the :class:`~napari_sam.propagate.PropagationSummary`. Each
    object keeps its label id; on every slice it reaches, its old pixels there are
    replaced; other labels are never touched (unless ``overwrite``).

    Parameters
    ----------
    labels : ndarray, the stack's spatial shape
        Modified in place.
    seed_slices : sequence of int
        Slices whose labels are the seeds (annotated or corrected by the user).
    ids : sequence of int, optional
        Objects to propagate; default all labels on the seed slices.
    """
    if tuple(labels.shape) != stack.spatial_shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; the stack is {stack.spatial_shape}")
    seeds = {}
    for z in seed_slices:
        objects = seeds_from_labels(np.asarray(labels[stack.labels_index(z)]), ids)
        if objects:
            seeds[int(z)] = objects
    if not seeds:
        raise ValueError(f"no labels{'' if ids is None else ' ' + str(list(ids))} on slices {list(seed_slices)} to propagate")
    steps = propagate(
        engine, lambda z: stack.embedding(z, engine, cache), seeds, len(stack),
        start=start, direction=direction, z_range=z_range, rule=rule, interior_point=interior_point,
    )
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        view = labels[stack.labels_index(step.z)]
        chosen = sorted(step.masks)
        plan = annotate.plan_commit(view, [step.masks[i] for i in chosen], chosen,
                                    overwrite=overwrite, replace=chosen)
        view[plan.indices] = plan.values
        yield step


def segment_volume(
    engine: SamEngine,
    stack: Stack,
    z: int,
    *,
    points=None,
    point_labels=None,
    boxes=None,
    multimask: bool = False,
    propagate_objects: bool = True,
    cache: EmbeddingCache | None = None,
    direction: str = "both",
    rule: StopRule | None = None,
):
    """Segment objects on slice ``z`` and (optionally) propagate them through the stack.

    Parameters
    ----------
    engine : SamEngine
    stack : Stack
        The volume and the axis it is sliced along (one intensity mapping for all slices).
    z : int
        The slice the prompts are on.
    points, point_labels, boxes, multimask
        As for :func:`segment_2d`, in the slice's ``(row, col)``.
    propagate_objects : bool
        Carry each object from slice ``z`` through the stack.
    cache : EmbeddingCache, optional
        Each slice is embedded once and kept here.
    direction : {"both", "up", "down"}
        "up" = increasing slice index.
    rule : StopRule, optional
        When an object stops (predicted IoU, area change); default ``StopRule()``.

    Returns
    -------
    labels : ndarray of uint8/uint16, the stack's spatial shape ``(Z, H, W)``
    objects : list of ObjectResult
        The objects found on slice ``z``.
    summary : PropagationSummary or None
        Slices each object reached and why it stopped (None without propagation).
    """
    embedding = stack.embedding(z, engine, cache)
    labels2d, objects = _segment_embedding(engine, embedding, _prompts(points, point_labels, boxes), multimask)
    dtype = np.uint8 if len(objects) < 256 else np.uint16
    labels = np.zeros(stack.spatial_shape, dtype)
    labels[stack.labels_index(z)] = labels2d
    summary = None
    if propagate_objects and any(o.mask.any() for o in objects):
        steps = propagate_labels(engine, stack, labels, seed_slices=[z], cache=cache,
                                 direction=direction, rule=rule)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                summary = stop.value
                break
    return labels, objects, summary

