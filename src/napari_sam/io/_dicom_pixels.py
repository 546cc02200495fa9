"""DICOM pixel data → arrays: decoders, colour, rescale and window (pydicom).

Colour images (RGB, YBR_* converted by pydicom's colour-space handling, PALETTE COLOR
through its lookup table) come out as (..., 3) RGB, so SAM sees the colours it was trained
on. Grayscale values are rescaled to physical units (HU for CT). Every failure is a
``ValueError`` of one line that names the file and the reason.
"""

from __future__ import annotations

import numpy as np

_EXTRA = "pip install 'napari-sam-labeler[medical]'"
# Transfer syntaxes whose decoders are optional pydicom plugins (installed by the medical
# extra: pylibjpeg with libjpeg and openjpeg; RLE is decoded by pydicom itself).
_DECODERS = {
    "1.2.840.10008.1.2.4.50": ("JPEG baseline", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.51": ("JPEG extended", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.57": ("JPEG lossless", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.70": ("JPEG lossless SV1", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.80": ("JPEG-LS lossless", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.81": ("JPEG-LS near-lossless", "pylibjpeg pylibjpeg-libjpeg"),
    "1.2.840.10008.1.2.4.90": ("JPEG 2000 lossless", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.91": ("JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.201": ("HTJ2K lossless", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.4.203": ("HTJ2K", "pylibjpeg pylibjpeg-openjpeg"),
    "1.2.840.10008.1.2.5": ("RLE lossless", "pylibjpeg pylibjpeg-rle"),
}


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def transfer_syntax(ds) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))


def is_colour(ds) -> bool:
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    return int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"


def decode(ds, path: str) -> np.ndarray:
    """The pixel array of ``ds``: colour as (..., 3) RGB, grayscale as stored."""
    try:
        pixels = ds.pixel_array  # pydicom converts YBR_* to RGB
    except Exception as exc:  # pydicom raises several types for missing decoders / bad data
        uid = transfer_syntax(ds)
        if uid in _DECODERS and "missing dependencies" in str(exc):  # pydicom's words for "no decoder"
            name, packages = _DECODERS[uid]
            raise ValueError(
                f"{path}: pixel data is compressed ({name}, transfer syntax {uid}) and no decoder is "
                f"installed; {_EXTRA} (or pip install {packages})"
            ) from exc
        raise ValueError(f"{path}: cannot read pixel data ({_one_line(exc)})") from exc
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:
            raise ValueError(f"{path}: cannot apply the palette colour table ({_one_line(exc)})") from exc
    return pixels


def rescaled(pixels: np.ndarray, slope, intercept) -> tuple[np.ndarray, bool]:
    """Stored values → physical units; the flag says whether every value is a whole number."""
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    values = pixels.astype(np.float64) * slope + intercept
    exact = bool(np.all(values == np.round(values)))  # int16 only when HU are whole numbers
    return values, exact


def window_of(ds) -> tuple[float, float] | None:
    c, w = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if c is None or w is None:
        return None
    c = c[0] if hasattr(c, "__len__") and not isinstance(c, str) else c
    w = w[0] if hasattr(w, "__len__") and not isinstance(w, str) else w
    try:
        return float(c), float(w)
    except (TypeError, ValueError):
        return None


def number(ds, keyword: str, path: str, default=None, kind=float):
    """A numeric attribute, or ``default`` when absent; a malformed value is a one-line error."""
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {keyword} is not a number ({value!r})") from None


def vector(ds, keyword: str, path: str, length: int):
    """A multi-valued decimal attribute (positions, orientations, spacings), or None."""
    value = getattr(ds, keyword, None)
    if value is None:
        return None
    try:
        out = np.array([float(v) for v in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__")
                                           and not isinstance(value, str) else [value])])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {keyword} is not numeric ({value!r})") from None
    if out.size != length:
        raise ValueError(f"{path}: {keyword} has {out.size} values, expected {length}")
    return out
