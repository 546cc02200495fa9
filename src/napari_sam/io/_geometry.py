"""One geometry convention for every medical reader and writer.

Arrays are indexed (slice, row, column) = (Z, Y, X), napari's order. A volume's
``affine_lps`` maps those indices to DICOM patient coordinates (LPS, millimetres, in
x, y, z order), as ITK/SimpleITK and 3D Slicer place it. NIfTI arrays are (i, j, k) =
(X, Y, Z) with a RAS affine; the NIfTI reader and writer convert.

**napari world = patient space.** A layer's world coordinates are LPS millimetres in
napari's axis order, ``(z, y, x)`` = (S, P, L): world axis 0 runs from the patient's
feet to head, axis 1 from anterior to posterior (down on screen), axis 2 from the
patient's right to left (right on screen: the radiological view). Every reader gives its
layer this placement (:func:`placement`) and every writer reads it back
(:func:`affine_from_layer_meta`), so a DICOM series, a NIfTI of it written by any tool,
and labels saved as NIfTI or DICOM-SEG overlay voxel for voxel.

An axial series (rows along +x, columns along +y, slices along +z) needs only napari's
``scale`` and ``translate``. Any other orientation (oblique, coronal, sagittal, flipped
axes) gets ``scale`` (the voxel spacing) plus an ``affine`` holding the direction cosines
and the origin. OME-TIFF and other microscopy files have no patient space: they keep
their physical ``scale`` only.
"""

from __future__ import annotations

import numpy as np

_FLIP_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
_REVERSE = np.eye(3)[::-1]  # (z, y, x) <-> (x, y, z)
_AXIS_ALIGNED_TOL = 1e-6


def as_volume(data, what: str) -> np.ndarray:
    """``data`` as a 3D (Z, Y, X) array; a 2D image becomes one slice."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"{what} takes 2D or 3D data; got shape {data.shape}")
    return data


def napari_matrix(affine_lps: np.ndarray) -> np.ndarray:
    """(Z, Y, X) index → LPS (x, y, z) affine  →  index → napari world (z, y, x) affine."""
    a = np.asarray(affine_lps, float)
    out = np.eye(4)
    out[:3, :3] = _REVERSE @ a[:3, :3]
    out[:3, 3] = _REVERSE @ a[:3, 3]
    return out


def lps_matrix(world_affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`napari_matrix`."""
    return napari_matrix(world_affine)  # reversing the output axes is its own inverse


# napari world axes (slider, screen down, screen right) per acquisition plane, as rows
# over the patient's (z, y, x): the radiological views, head up in coronal and sagittal.
_FRAMES = {
    "axial": np.eye(3),                                              # z | P down, L right
    "coronal": np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]),       # y | feet down, L right
    "sagittal": np.array([[0.0, 0, 1], [-1, 0, 0], [0, 1, 0]]),      # x | feet down, P right
}


def plane_of(affine_lps: np.ndarray) -> str:
    """"axial", "coronal" or "sagittal": the patient axis nearest the slice axis."""
    step = np.asarray(affine_lps, float)[:3, 0]
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(step)))]


def world_frame(affine_lps: np.ndarray) -> np.ndarray:
    """The axis permutation ``Q`` (3 x 3) from napari-ordered patient axes (z, y, x) to the
    frame of the volume's acquisition plane: identity for axial series; for coronal and
    sagittal series the patient axes are reordered so that napari's slider runs along the
    slice axis and the screen shows the image plane head up (napari cannot draw a transform
    that permutes axes). It depends only on the plane, so the series, any NIfTI of it (rows
    flipped or not) and its labels share it and overlay."""
    return _FRAMES[plane_of(affine_lps)].copy()


def placement(affine_lps: np.ndarray, ndim: int = 3, unit: str = "mm") -> dict:
    """napari layer keyword arguments that put a (Z, Y, X) volume at ``affine_lps``.

    ``{"scale", "translate"}`` when the volume is axis-aligned in its frame
    (:func:`world_frame`), else ``{"scale", "affine"}`` (spacing, then the remaining
    rotation/shear and the origin). A 2D image (one slice, no stack to overlay) is placed
    by its pixel spacing only. ``units`` says what the numbers are (mm: patient space).
    """
    world = napari_matrix(affine_lps)
    spacing = np.linalg.norm(world[:3, :3], axis=0)
    if ndim == 2:
        return {"scale": tuple(float(s) for s in spacing[1:]), "units": (unit, unit)}
    if ndim != 3:
        raise ValueError(f"placement is for 2D or 3D layers, not {ndim}D")
    frame = np.eye(4)
    frame[:3, :3] = world_frame(affine_lps)
    world = frame @ world
    directions = world[:3, :3] / spacing
    if np.allclose(directions, np.eye(3), atol=_AXIS_ALIGNED_TOL):
        return {"scale": tuple(float(s) for s in spacing), "translate": tuple(float(t) for t in world[:3, 3]),
                "units": (unit,) * 3}
    rotation = np.eye(4)
    rotation[:3, :3] = directions
    rotation[:3, 3] = world[:3, 3]
    return {"scale": tuple(float(s) for s in spacing), "affine": rotation, "units": (unit,) * 3}


def frame_metadata(affine_lps: np.ndarray) -> dict:
    """What writers need besides the napari placement: the exact affine and the frame."""
    return {"affine_lps": np.asarray(affine_lps, float).tolist(), "world_frame": world_frame(affine_lps).tolist()}


def slice_step(positions: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, float]:
    """The step from one slice to the next, and its angle to the slice normal in degrees.

    ``positions`` (N >= 2, LPS) are sorted along ``normal``. A CT with gantry tilt (or any
    sheared stack) steps along the table, not along the normal: the step, not the normal
    times the gap, is what places every slice at its own ImagePositionPatient.
    """
    step = np.median(np.diff(np.asarray(positions, float), axis=0), axis=0)
    length = float(np.linalg.norm(step))
    cos = min(1.0, abs(float(step @ normal)) / length) if length else 1.0
    return step, float(np.degrees(np.arccos(cos)))


def regular_slots(proj: np.ndarray, tolerance: float = 0.1) -> tuple[list[int], int] | None:
    """Slots of sorted slice positions (``proj``, along the normal) on a regular grid.

    When every gap is a whole multiple of the common gap (a slice or a few missing), returns
    ``(slot of each position, number of slots)``; None when the spacing is irregular in any
    other way (varying thickness), where no regular grid holds every slice."""
    proj = np.asarray(proj, float)
    if len(proj) < 2:
        return list(range(len(proj))), len(proj)
    diffs = np.diff(proj)
    gap = float(np.min(diffs))
    multiples = diffs / gap
    if gap <= 0 or np.any(np.abs(multiples - np.round(multiples)) > tolerance):
        return None
    slots = [0] + list(np.cumsum(np.round(multiples)).astype(int))
    return slots, slots[-1] + 1


def _shear_matrix(shear, n: int) -> np.ndarray:
    shear = np.asarray(shear, float)
    if shear.ndim == 2:
        return shear
    matrix = np.eye(n)
    matrix[np.triu_indices(n, 1)] = shear  # napari's upper-triangular coefficients
    return matrix


def layer_world_matrix(meta: dict, ndim: int) -> np.ndarray:
    """The (ndim+1)² data → world matrix of a layer from its state (napari's ``_get_state``
    keys: scale, translate, rotate, shear, affine), composed as napari does:
    ``affine ∘ (translate + rotate · shear · scale)``."""
    scale = np.asarray(meta.get("scale") if meta.get("scale") is not None else np.ones(ndim), float)[-ndim:]
    translate = np.asarray(meta.get("translate") if meta.get("translate") is not None else np.zeros(ndim),
                           float)[-ndim:]
    rotate = meta.get("rotate")
    rotate = np.eye(ndim) if rotate is None else np.asarray(rotate, float)[-ndim:, -ndim:]
    shear = meta.get("shear")
    shear = np.eye(ndim) if shear is None else _shear_matrix(shear, ndim)
    inner = np.eye(ndim + 1)
    inner[:ndim, :ndim] = rotate @ shear @ np.diag(scale)
    inner[:ndim, ndim] = translate
    outer = meta.get("affine")
    outer = np.eye(ndim + 1) if outer is None else np.asarray(getattr(outer, "affine_matrix", outer), float)
    if outer.shape != (ndim + 1, ndim + 1):
        outer = outer[-(ndim + 1):, -(ndim + 1):]
    return outer @ inner


def affine_from_layer_meta(meta: dict, ndim: int = 3) -> np.ndarray:
    """The LPS affine of a (Z, Y, X) layer: the exact one its reader recorded
    (``metadata['dicom']['affine_lps']``), else its napari placement read as patient space."""
    dicom = (meta.get("metadata") or {}).get("dicom") or {}
    if "affine_lps" in dicom:
        return np.asarray(dicom["affine_lps"], float)
    frame = np.eye(4)
    frame[:3, :3] = np.asarray(dicom.get("world_frame", np.eye(3)), float)
    if ndim == 2:
        m2 = layer_world_matrix(meta, 2)
        world = np.eye(4)
        world[1:3, 1:3] = m2[:2, :2]
        world[1:3, 3] = m2[:2, 2]
        return lps_matrix(world)
    return lps_matrix(frame.T @ layer_world_matrix(meta, 3))  # frame: a signed permutation


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
