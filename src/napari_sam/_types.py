"""Small data classes shared by every layer of the package.

Nothing here imports torch at module import time: these types travel through the
widget, the CLI and (later) the server, which must stay light until a model is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class IntensityMapping:
    """A concrete map from stored intensities to SAM's uint8 range.

    Resolved once per image or once per volume (so every slice of a volume gets the
    same contrast), and recorded in every embedding: it is part of what the embedding
    depends on, hence of the cache key.

    Attributes
    ----------
    mode : str
        ``"identity"`` (uint8 data passed through), ``"window"`` (explicit center/width
        or a CT preset), ``"percentile"`` (clip at data percentiles) or ``"bool"``.
    lows, highs : tuple of float
        Per-channel intensity that maps to 0 and to 255 (one entry for single-channel
        data). Ignored for ``"identity"`` and ``"bool"``.
    channel : int or None
        For multichannel data, the channel used; ``None`` means all channels (RGB, or a
        composite for other channel counts).
    label : str
        Human readable origin, e.g. ``"lung W1500/L-600"`` or ``"p0.5-p99.5"``.
    invert : bool
        Bright where the stored values are low (DICOM MONOCHROME1: X-ray, CR/DX), so that
        SAM sees bone bright and air dark, as radiographs are read.
    """

    mode: str
    lows: tuple[float, ...] = ()
    highs: tuple[float, ...] = ()
    channel: int | None = None
    label: str = ""
    invert: bool = False

    def key(self) -> str:
        """Stable text for cache keys (exact float repr, no locale)."""
        lows = ",".join(repr(float(v)) for v in self.lows)
        highs = ",".join(repr(float(v)) for v in self.highs)
        return f"{self.mode}|{lows}|{highs}|{self.channel}" + ("|invert" if self.invert else "")


@dataclass(frozen=True)
class ModelInputSpec:
    """How a model wants its 2D input: size, resizing, normalisation.

    SAM: longest side resized to ``target_length``, ImageNet mean/std on [0, 255] values,
    zero padding to a square at the bottom/right. MedSAM: the whole image stretched to
    ``target_length`` squared, min-max scaled to [0, 1], no ImageNet normalisation.
    """

    kind: str = "sam"  # "sam" or "medsam"
    target_length: int = 1024
    resize: str = "longest"  # "longest" (keep aspect, pad) or "stretch"
    normalize: str = "imagenet"  # "imagenet" or "minmax"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resample: str = "bilinear"  # PIL filter used for the resize

    def key(self) -> str:
        return (
            f"{self.kind}|{self.target_length}|{self.resize}|{self.normalize}|"
            f"{self.mean}|{self.std}|{self.resample}"
        )


def sam_input_spec(target_length: int = 1024) -> ModelInputSpec:
    """Preprocessing of the original SAM models (and transformers' ``SamProcessor``)."""
    return ModelInputSpec(kind="sam", target_length=target_length)


def medsam_input_spec(target_length: int = 1024) -> ModelInputSpec:
    """Preprocessing of MedSAM (Ma et al. 2024): stretch to a square, scale to [0, 1]."""
    return ModelInputSpec(
        kind="medsam",
        target_length=target_length,
        resize="stretch",
        normalize="minmax",
        resample="bicubic",
    )


@dataclass
class Prompt:
    """One prompt set: what a user gives for one object.

    Attributes
    ----------
    points : ndarray of float, shape (N, 2), optional
        ``(row, col)`` pixel coordinates in the original image.
    point_labels : ndarray of int, shape (N,), optional
        1 = positive (object), 0 = negative (background).
    box : ndarray of float, shape (4,), optional
        ``(row_min, col_min, row_max, col_max)``.
    mask_input : ndarray, optional
        Earlier low-resolution logits (shape ``(L, L)`` or ``(1, L, L)`` with L the
        model's mask size, 256 for SAM) or a binary mask at the original image size.
    """

    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None


@dataclass
class Prediction:
    """Decoder output for one prompt set.

    Attributes
    ----------
    masks : ndarray of bool, shape (K, H, W)
        K = 1, or 3 with ``multimask=True``; at the original image size.
    scores : ndarray of float32, shape (K,)
        The decoder's predicted IoU for each mask.
    logits : ndarray of float32, shape (K, L, L)
        Low-resolution mask logits (L = 256 for SAM), in the padded model frame; pass
        one of them back as ``mask_input`` to refine.
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray

    @property
    def best(self) -> int:
        """Index of the mask with the highest predicted IoU."""
        return int(np.argmax(self.scores))


@dataclass
class ImageEmbedding:
    """Everything the mask decoder needs for one 2D image: decoding never re-reads the image.

    Attributes
    ----------
    features : torch.Tensor, shape (1, C, h, w)
        The image encoder's output (C = 256, h = w = 64 for SAM at 1024).
    original_size : (int, int)
        ``(H, W)`` of the image the user gave.
    input_size : (int, int)
        ``(h, w)`` of the resized image inside the padded model input.
    spec : ModelInputSpec
        The model's input convention (needed to map prompts and masks).
    mapping : IntensityMapping
        How intensities were mapped to uint8 before encoding.
    model_id : str
        Identity of the model that produced the features; ``predict`` refuses
        embeddings from another model.
    """

    features: "torch.Tensor"
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    spec: ModelInputSpec
    mapping: IntensityMapping
    model_id: str
    extra: dict[str, Any] = field(default_factory=dict)
