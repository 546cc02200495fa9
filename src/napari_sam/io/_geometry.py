"""Index → patient-space affines shared by the readers and writers.

Our arrays are (slice, row, column) = (Z, Y, X), napari's order, and our affines map
those indices to DICOM patient coordinates (LPS, millimetres). NIfTI arrays are indexed
(i, j, k) = (X, Y, Z) and their affines map to RAS. Layers without DICOM geometry get
an axis-aligned affine from their scale and translate.
"""

from __future__ import annotations

import numpy as np

_FLIP_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
_REVERSE = np.eye(3)[::-1]  # (z, y, x) <-> (x, y, z)


def as_volume(data, what: str) -> np.ndarray:
    """``data`` as a 3D (Z, Y, X) array; a 2D image becomes one slice."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"{what} takes 2D or 3D data; got shape {data.shape}")
    return data


def affine_from_layer_meta(meta: dict, ndim: int = 3) -> np.ndarray:
    """The LPS affine of a layer: its DICOM geometry if any, else scale/translate."""
    dicom = (meta.get("metadata") or {}).get("dicom") or {}
    if "affine_lps" in dicom:
        return np.asarray(dicom["affine_lps"], float)
    scale = list(meta.get("scale") or [1.0] * ndim)[-3:]
    translate = list(meta.get("translate") or [0.0] * ndim)[-3:]
    scale = [1.0] * (3 - len(scale)) + scale
    translate = [0.0] * (3 - len(translate)) + translate
    a = np.eye(4)
    a[:3, :3] = np.diag(scale)
    a[:3, 3] = translate
    return a


def lps_zyx_to_ras_ijk(affine_lps: np.ndarray) -> np.ndarray:
    """Affine of (Z, Y, X) indices in LPS → affine of (X, Y, Z) indices in RAS (NIfTI)."""
    out = np.eye(4)
    out[:3, :3] = _FLIP_LPS_RAS @ affine_lps[:3, :3] @ _REVERSE
    out[:3, 3] = _FLIP_LPS_RAS @ affine_lps[:3, 3]
    return out


def ras_ijk_to_lps_zyx(affine_ras: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lps_zyx_to_ras_ijk`."""
    out = np.eye(4)
    out[:3, :3] = _FLIP_LPS_RAS @ affine_ras[:3, :3] @ _REVERSE
    out[:3, 3] = _FLIP_LPS_RAS @ affine_ras[:3, 3]
    return out


def scale_translate(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-axis spacing (column norms) and origin, for napari's scale/translate."""
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)), tuple(float(v) for v in affine[:3, 3])
