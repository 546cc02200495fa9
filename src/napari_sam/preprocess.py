"""Intensity handling and model-input geometry, in plain numpy (plus Pillow for resizing).

Two steps, kept apart on purpose:

1. :func:`resolve_intensity` looks at the data once (an image, or a whole volume) and
   returns a concrete :class:`~napari_sam._types.IntensityMapping`. A volume gets one
   mapping for all its slices, so neighbouring slices are encoded with the same contrast.
2. :func:`to_rgb_uint8` applies that mapping to one 2D image and returns SAM's uint8
   ``(H, W, 3)`` input.

The stored intensities (HU, photon counts) are never changed; windowing only shapes
what the encoder sees.
"""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import replace

import numpy as np

from ._types import IntensityMapping, ModelInputSpec

# (center, width) in Hounsfield units, the usual radiology presets.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "mediastinum": (50.0, 350.0),
}

DEFAULT_PERCENTILES = (0.5, 99.5)

# Above this many values, percentiles are estimated on a strided subsample: exact enough
# for contrast, and it keeps a large volume from being copied into memory.
_MAX_PERCENTILE_SAMPLES = 8_000_000

# A trailing axis longer than this is not a channel axis: the array is a stack.
MAX_CHANNELS = 16


def _check_array(image, name: str = "image") -> np.ndarray:
    if image is None:
        raise TypeError(f"{name} must be an array, got None")
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        image = np.asarray(image)
    dtype = np.dtype(image.dtype)
    if not (dtype.kind in "biuf"):
        raise TypeError(
            f"{name} has dtype {dtype}; expected bool, integer or float pixel data"
        )
    if 0 in image.shape:
        raise ValueError(f"{name} is empty (shape {tuple(image.shape)})")
    return image


def check_image_2d(image, name: str = "image") -> np.ndarray:
    """Validate a single 2D image: ``(H, W)`` or ``(H, W, C)`` with C ≤ 16.

    Returns the array (as a numpy array). Raises ``ValueError``/``TypeError`` naming the
    parameter and the offending shape or dtype.
    """
    image = _check_array(image, name)
    shape = tuple(image.shape)
    if len(shape) == 2:
        pass
    elif len(shape) == 3:
        if shape[-1] > MAX_CHANNELS:
            raise ValueError(
                f"{name} has shape {shape}: that looks like a 3D stack, not one 2D image "
                f"(a channel axis, if any, must be last with at most {MAX_CHANNELS} "
                "channels); embed one slice at a time, e.g. image[z]"
            )
    else:
        raise ValueError(
            f"{name} must be 2D (H, W) or (H, W, C); got {len(shape)}D shape {shape}"
        )
    if shape[0] < 2 or shape[1] < 2:
        raise ValueError(f"{name} must be at least 2x2 pixels; got shape {shape}")
    return np.asarray(image)


def _sample(data, max_samples: int = _MAX_PERCENTILE_SAMPLES) -> np.ndarray:
    """A strided view of ``data`` with at most ``max_samples`` values (no full copy)."""
    size = int(np.prod(data.shape))
    if size <= max_samples:
        return np.asarray(data)
    # Stride the leading (slice/row) axes; keep channel axis whole.
    step = int(np.ceil((size / max_samples) ** (1.0 / max(1, data.ndim - 1))))
    index = tuple(slice(None, None, step) for _ in range(data.ndim - 1)) + (slice(None),)
    return np.asarray(data[index])


def _finite_percentiles(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    values = values.ravel()
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(values, [lo, hi])
    return float(low), float(high)


def resolve_intensity(
    data,
    *,
    window: tuple[float, float] | None = None,
    preset: str | None = None,
    percentiles: tuple[float, float] | None = None,
    channel: int | None = None,
    multichannel: bool | None = None,
    invert: bool = False,
) -> IntensityMapping:
    """Decide how ``data`` maps to SAM's uint8 input.

    Parameters
    ----------
    data : array-like
        A 2D image ``(H, W)``/``(H, W, C)`` or a whole volume ``(Z, H, W)``/
        ``(Z, H, W, C)``; for a volume the statistics cover all slices, so every
        slice is mapped the same way. Lazy arrays (dask, zarr, memmap) are sampled.
    window : (center, width), optional
        Explicit intensity window, e.g. ``(40, 400)`` for a CT abdomen.
    preset : str, optional
        One of :data:`CT_PRESETS` (abdomen, lung, brain, bone, mediastinum).
    percentiles : (low, high), optional
        Percentile clip; default ``(0.5, 99.5)``. Used unless a window or preset is
        given, or the data are uint8 (then the identity map is used).
    channel : int, optional
        For multichannel data, the channel to use (others are ignored).
    multichannel : bool, optional
        Whether the last axis is channels. Default: guessed as ``ndim`` 3 with at most
        16 entries on the last axis for a 2D image; pass it explicitly for volumes.
    invert : bool
        Map low values to bright (DICOM MONOCHROME1 radiographs).

    Returns
    -------
    IntensityMapping
    """
    mapping = _resolve(data, window, preset, percentiles, channel, multichannel)
    return replace(mapping, invert=True) if invert else mapping


def _resolve(data, window, preset, percentiles, channel, multichannel) -> IntensityMapping:
    data = _check_array(data, "image")
    if window is not None and preset is not None:
        raise ValueError("give either window or preset, not both")
    if preset is not None:
        key = str(preset).lower()
        if key not in CT_PRESETS:
            raise ValueError(
                f"preset {preset!r} is unknown; choose one of {', '.join(CT_PRESETS)}"
            )
        window = CT_PRESETS[key]
        label = f"{key} W{window[1]:g}/L{window[0]:g}"
    else:
        label = ""
    if multichannel is None:
        multichannel = data.ndim == 3 and data.shape[-1] <= MAX_CHANNELS
    n_channels = int(data.shape[-1]) if multichannel else 1
    if channel is not None:
        if not multichannel:
            raise ValueError(f"channel={channel} given but the image has no channel axis")
        if not (-n_channels <= int(channel) < n_channels):
            raise ValueError(
                f"channel={channel} is out of range for an image with {n_channels} channels"
            )
        channel = int(channel) % n_channels

    if window is not None:
        center, width = (float(v) for v in window)
        if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
            raise ValueError(f"window must be (center, width) with width > 0; got {window}")
        low, high = center - width / 2.0, center + width / 2.0
        used = 1 if (channel is not None or not multichannel) else n_channels
        return IntensityMapping(
            "window", (low,) * used, (high,) * used, channel,
            label or f"W{width:g}/L{center:g}",
        )

    if data.dtype == bool:
        return IntensityMapping("bool", channel=channel, label="binary")
    if data.dtype == np.uint8 and percentiles is None:
        return IntensityMapping("identity", channel=channel, label="uint8")

    lo, hi = percentiles if percentiles is not None else DEFAULT_PERCENTILES
    if not (0.0 <= float(lo) < float(hi) <= 100.0):
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; got {(lo, hi)}")
    sample = _sample(data)
    if not multichannel:
        low, high = _finite_percentiles(sample, lo, hi)
        lows, highs = (low,), (high,)
    elif channel is not None:
        low, high = _finite_percentiles(sample[..., channel], lo, hi)
        lows, highs = (low,), (high,)
    else:
        pairs = [_finite_percentiles(sample[..., c], lo, hi) for c in range(n_channels)]
        lows, highs = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return IntensityMapping("percentile", lows, highs, channel, f"p{lo:g}-p{hi:g}")


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map [low, high] -> [0, 255] with clipping; NaN -> 0, +inf -> 255."""
    values = np.asarray(values, dtype=np.float64)
    if high > low:
        scaled = (values - low) * 255.0 / (high - low)
    else:
        # Constant data: nothing to stretch; only values above the level light up.
        scaled = np.where(values > high, 255.0, 0.0)
    scaled = np.where(np.isnan(scaled), 0.0, scaled)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled).astype(np.uint8)


def _composite(channels: list[np.ndarray]) -> np.ndarray:
    """Combine independently scaled uint8 channels into an RGB image.

    1 channel: gray. 2 channels: (c0, c1, 0), the usual two-colour overlay (e.g. nuclei
    red, membrane green). 3: as RGB. More: the per-pixel maximum, as gray.
    """
    h, w = channels[0].shape
    n = len(channels)
    if n == 1:
        return np.repeat(channels[0][..., None], 3, axis=-1)
    if n == 2:
        return np.stack([channels[0], channels[1], np.zeros((h, w), np.uint8)], axis=-1)
    if n == 3:
        return np.stack(channels, axis=-1)
    gray = np.max(np.stack(channels, axis=0), axis=0)
    return np.repeat(gray[..., None], 3, axis=-1)


def to_rgb_uint8(image, mapping: IntensityMapping) -> np.ndarray:
    """Apply ``mapping`` to one 2D image and return SAM's ``(H, W, 3)`` uint8 input.

    RGBA input drops alpha; RGB uint8 with the identity mapping passes through.
    """
    image = check_image_2d(image)
    multichannel = image.ndim == 3
    if multichannel and image.shape[-1] == 1:
        image, multichannel = image[..., 0], False
    if multichannel and mapping.channel is not None:
        image, multichannel = image[..., mapping.channel], False
    if multichannel and image.shape[-1] == 4:
        image = image[..., :3]  # RGBA: alpha is not image content

    if not multichannel:
        chans = [image]
    else:
        chans = [image[..., c] for c in range(image.shape[-1])]

    out = []
    for i, ch in enumerate(chans):
        if mapping.mode == "identity":
            if ch.dtype != np.uint8:
                raise TypeError(
                    f"identity intensity mapping needs uint8 data, got {ch.dtype}"
                )
            out.append(np.asarray(ch))
        elif mapping.mode == "bool":
            out.append(np.where(np.asarray(ch) != 0, 255, 0).astype(np.uint8))
        else:
            j = i if len(mapping.lows) > 1 else 0
            if j >= len(mapping.lows):
                raise ValueError(
                    f"intensity mapping has {len(mapping.lows)} channel ranges, "
                    f"the image has {len(chans)} channels"
                )
            out.append(_scale_to_uint8(ch, mapping.lows[j], mapping.highs[j]))
    if mapping.invert:
        out = [255 - channel for channel in out]
    return np.ascontiguousarray(_composite(out))


def prepare_image(image, **intensity) -> tuple[np.ndarray, IntensityMapping]:
    """Resolve the mapping for one 2D image and apply it: ``(rgb_uint8, mapping)``."""
    image = check_image_2d(image)
    mapping = resolve_intensity(image, **intensity)
    return to_rgb_uint8(image, mapping), mapping


# --- model input geometry -------------------------------------------------------------


def resized_shape(original_size: Sequence[int], spec: ModelInputSpec) -> tuple[int, int]:
    """``(h, w)`` of the image inside the model input (before padding)."""
    h, w = int(original_size[0]), int(original_size[1])
    if spec.resize == "stretch":
        return spec.target_length, spec.target_length
    scale = spec.target_length / max(h, w)
    # Same rounding as Meta's ResizeLongestSide and transformers' SamImageProcessor; at
    # least one pixel on each side (a 2 x 5000 strip would otherwise round to height 0).
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def model_input(rgb: np.ndarray, spec: ModelInputSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize, normalise and pad one uint8 RGB image for the encoder.

    Returns
    -------
    pixels : ndarray of float32, shape (3, T, T)
        T = ``spec.target_length``; channels first.
    input_size : (int, int)
        ``(h, w)`` of the resized image inside the padded square.
    """
    from PIL import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"model_input takes uint8 (H, W, 3); got {rgb.dtype} {rgb.shape}")
    h, w = resized_shape(rgb.shape[:2], spec)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[spec.resample]
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), resample=resample))
    pixels = resized.astype(np.float32)
    if spec.normalize == "imagenet":
        mean = np.asarray(spec.mean, np.float32) * 255.0
        std = np.asarray(spec.std, np.float32) * 255.0
        pixels = (pixels - mean) / std
    elif spec.normalize == "minmax":
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = (pixels - lo) / max(hi - lo, 1e-8)
    else:
        raise ValueError(f"unknown normalisation {spec.normalize!r}")
    t = spec.target_length
    out = np.zeros((3, t, t), np.float32)
    out[:, :h, :w] = pixels.transpose(2, 0, 1)
    return out, (h, w)


def points_to_model(points_rc: np.ndarray, original_size, spec: ModelInputSpec) -> np.ndarray:
    """Map ``(row, col)`` pixel coordinates to the model's ``(x, y)`` input frame."""
    h, w = original_size
    rh, rw = resized_shape(original_size, spec)
    pts = np.asarray(points_rc, np.float64)
    xy = np.empty(pts.shape, np.float64)
    xy[..., 0] = pts[..., 1] * (rw / w)
    xy[..., 1] = pts[..., 0] * (rh / h)
    return xy.astype(np.float32)


def box_to_model(box_rc: np.ndarray, original_size, spec: ModelInputSpec) -> np.ndarray:
    """Map ``(row_min, col_min, row_max, col_max)`` to the model's ``(x0, y0, x1, y1)``."""
    box = np.asarray(box_rc, np.float64)
    corners = np.stack([box[..., 0:2], box[..., 2:4]], axis=-2)  # (..., 2, 2) rows/cols
    xy = points_to_model(corners, original_size, spec)
    return xy.reshape(*box.shape[:-1], 4)


def mask_to_logits(
    mask: np.ndarray, original_size, spec: ModelInputSpec, low_res: int, eps: float = 1e-3
) -> np.ndarray:
    """Turn a binary mask at image size into decoder ``mask_input`` logits ``(L, L)``.

    The mask is placed in the padded model frame exactly like the image, reduced to the
    decoder's low resolution by area averaging, and mapped to logits of ±log((1-eps)/eps)
    (with soft edges where the reduction averaged), as SAM expects from its own output.
    """
    from PIL import Image

    mask = np.asarray(mask)
    if mask.shape != tuple(original_size):
        raise ValueError(
            f"mask_input has shape {mask.shape}; a binary mask must match the image "
            f"size {tuple(original_size)} (or pass low-res logits of shape ({low_res}, {low_res}))"
        )
    h, w = resized_shape(original_size, spec)
    scale = low_res / spec.target_length
    lh, lw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    frac = np.asarray(
        Image.fromarray((mask != 0).astype(np.float32)).resize((lw, lh), Image.BOX),
        np.float64,
    )
    prob = np.full((low_res, low_res), 0.0)
    prob[:lh, :lw] = frac
    prob = np.clip(prob, eps, 1.0 - eps)
    return np.log(prob / (1.0 - prob)).astype(np.float32)
