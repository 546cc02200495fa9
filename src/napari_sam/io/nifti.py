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
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), lps_zyx_to_ras_ijk(affine_lps))
    if labels:
        img.header.set_intent("label")
    img.header.set_xyzt_units("micron" if unit == "µm" else "mm")
    with atomic_write(path, suffix="".join(Path(path).suffixes)) as tmp:  # nibabel reads the suffix
        nib.save(img, str(tmp))
    return str(path)


def read_nifti(path) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read NIfTI as ``(data (Z, Y, X), affine_lps, is_labels)``; the data stay lazy
    (a memory map for uncompressed files). The affine is in millimetres, or in micrometres
    for a file that declares micron (microscopy): :func:`nifti_unit` says which."""
    nib = _nibabel()
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(f"{path}: only 2D/3D NIfTI is supported here, got shape {data.shape}")
    intent = img.header.get_intent()[0]
    name = Path(path).name.lower()
    is_labels = intent == "label" or (data.dtype.kind in "iu" and any(w in name for w in _LABEL_WORDS))
    affine = ras_ijk_to_lps_zyx(img.affine)
    if img.header.get_xyzt_units()[0] == "meter":
        affine[:3, :] *= 1e3
    return data.transpose(2, 1, 0), affine, is_labels


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
    meta = {
        "name": Path(path).name.split(".nii")[0],
        **placement(affine, 3, nifti_unit(path)),  # napari world = patient space (io/_geometry.py)
        "metadata": {"dicom": frame_metadata(affine), "source": str(path)},
    }
    return [(data, meta, "labels" if is_labels else "image")]


@napari_writer
def napari_write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a labels layer → NIfTI with the source geometry."""
    unit = layer_unit(meta) or "mm"  # what the layer's numbers (and its recorded affine) are in
    return [write_nifti(path, np.asarray(data), affine_from_layer_meta(meta, np.ndim(data)), labels=True, unit=unit)]
