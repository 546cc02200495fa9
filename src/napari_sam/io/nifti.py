"""NIfTI images and labels with their affine (nibabel, the ``medical`` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._units import layer_unit
from .._fileio import atomic_write, storable_labels, napari_writer
from ._geometry import (
    affine_from_layer_meta, as_volume, frame_metadata, lps_zyx_to_ras_ijk, placement, ras_ijk_to_lps_zyx,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LABEL_WORDS = ("label", "seg", "mask")


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:
        raise ImportError(
            "NIfTI needs nibabel: pip install 'napari-sam-labeler[medical]' (or pip install nibabel)"
        ) from exc
    return nibabel


def _rigid(ras: np.ndarray) -> np.ndarray:
    """The affine without shear: in-plane axes kept, the slice axis along their normal,
    spaced by the step's component along it (what a scanner without tilt would give)."""
    out = np.array(ras, float)
    i, j, k = (out[:3, n] for n in range(3))
    normal = np.cross(i, j)
    normal /= np.linalg.norm(normal)
    along = float(k @ normal)
    out[:3, 2] = normal * along
    return out


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def write_nifti(path, data: np.ndarray, affine_lps: np.ndarray, *, labels: bool = False, unit: str = "mm") -> str:
    """Write (Z, Y, X) ``data`` with its LPS affine as NIfTI (RAS, (X, Y, Z) order).

    Labels are stored as integers with the NIfTI "label" intent. ``unit`` is what the
    affine's numbers are: "mm" (patient space, the default) or "µm" (microscopy). The file is written to a
    temporary name and renamed into place.
    """
    nib = _nibabel()
    data = as_volume(storable_labels(data, f"NIfTI labels {path}") if labels else data, "NIfTI export")
    ras = lps_zyx_to_ras_ijk(affine_lps)
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), ras)
    # sform: the exact placement (a gantry tilt's shear too); qform: its nearest rigid form,
    # which ITK-based tools (SimpleITK, ITK-SNAP) fall back to when the sform is sheared
    img.set_sform(ras, code=1)
    img.set_qform(_rigid(ras), code=1)
    if labels:
        img.header.set_intent("label")
    img.header.set_xyzt_units("micron" if unit == "µm" else "mm")
    with atomic_write(path, suffix="".join(Path(path).suffixes)) as tmp:  # nibabel reads the suffix
        nib.save(img, str(tmp))
    return str(path)


def read_nifti(path) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read NIfTI as ``(data, affine_lps, is_labels)``: data (Z, Y, X), or (T, Z, Y, X) for a
    4D series (fMRI, DWI); lazy (a memory map for uncompressed files). The affine is in
    millimetres, or in micrometres for a file that declares micron: :func:`nifti_unit`.

    Labels: files with NIfTI's label intent (float files with whole-number values become
    unsigned integers), or integer files named like labels (label/seg/mask) whose sampled
    values look like ids (non-negative, at most 256 distinct values), so a ``*_masked`` MR
    or an int16 CT of "segmental arteries" stays an image.
    """
    nib = _nibabel()
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim not in (3, 4):
        raise ValueError(f"{path}: NIfTI with {data.ndim} dimensions {data.shape}; 2D, 3D and 4D (time) are supported")
    affine = ras_ijk_to_lps_zyx(img.affine)
    if img.header.get_xyzt_units()[0] == "meter":
        affine[:3, :] *= 1e3
    data = data.transpose(tuple(reversed(range(data.ndim))))  # (X, Y, Z[, T]) -> ([T,] Z, Y, X)
    is_labels = _looks_like_labels(data, img.header.get_intent()[0] == "label", Path(path).name.lower())
    if is_labels and data.dtype.kind == "f":
        data = storable_labels(np.asarray(data), f"NIfTI labels {path}")
    return data, affine, is_labels


def _looks_like_labels(data, label_intent: bool, name: str) -> bool:
    sample = np.asarray(data[tuple(slice(None, None, max(1, n // 32)) for n in data.shape)])
    whole = data.dtype.kind in "iub" or (sample.size and np.array_equal(sample, np.round(sample)))
    if label_intent:
        return bool(whole) and (not sample.size or sample.min() >= 0)
    if data.dtype.kind not in "iu" or not any(word in name for word in _LABEL_WORDS):
        return False
    return bool(not sample.size or (sample.min() >= 0 and len(np.unique(sample)) <= 256))


def nifti_unit(path) -> str:
    """"µm" for a NIfTI that declares micron, else "mm" (the medical default)."""
    return "µm" if _nibabel().load(str(path)).header.get_xyzt_units()[0] == "micron" else "mm"


def napari_get_reader(path):
    """npe2 reader hook for .nii/.nii.gz (None for anything else)."""
    if isinstance(path, (list, tuple)) or not is_nifti(path):
        return None
    return _read_layers


def _read_layers(path):
    data, affine, is_labels = read_nifti(path)
    where = placement(affine, 3, nifti_unit(path))  # napari world = patient space (io/_geometry.py)
    if data.ndim == 4:  # time first, then the placed volume
        where = _with_time_axis(where)
    meta = {
        "name": Path(path).name.split(".nii")[0],
        **where,
        "metadata": {"dicom": frame_metadata(affine), "source": str(path)},
    }
    return [(data, meta, "labels" if is_labels else "image")]


def _with_time_axis(where: dict) -> dict:
    out = {"scale": (1.0, *where["scale"]), "units": ("pixel", *where["units"])}
    if "translate" in where:
        out["translate"] = (0.0, *where["translate"])
    if "affine" in where:
        affine = np.eye(5)
        affine[1:, 1:] = where["affine"]
        out["affine"] = affine
    return out


@napari_writer
def napari_write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a labels layer → NIfTI with the source geometry."""
    if np.ndim(data) not in (2, 3):
        raise ValueError(f"NIfTI labels are 2D or 3D; this layer is {np.ndim(data)}D {np.shape(data)} "
                         "(save one time point, or save as OME-TIFF)")
    unit = layer_unit(meta) or "mm"  # what the layer's numbers (and its recorded affine) are in
    return [write_nifti(path, np.asarray(data), affine_from_layer_meta(meta, np.ndim(data)), labels=True, unit=unit)]
