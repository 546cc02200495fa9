"""A DICOM study folder (or files) → napari layers: the npe2 reader.

Every series opens on its own: images as image layers, DICOM-SEG as labels layers
(io/seg.py); objects without pixel data (structured reports, presentation states, RT
plans, DICOMDIR) are skipped. A series that cannot be read is reported and the others
still open; a series of several orientations or sizes (a localizer) opens as one layer per
part, with a note. Nothing is all-or-nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .dicom import DicomSeriesWarning, _candidate_files, is_dicom_file, list_series, read_dicom_series


def _plane_name(orientation) -> str:
    if not isinstance(orientation, tuple):
        return "plane"
    normal = np.abs(np.cross(orientation[:3], orientation[3:]))
    axis = int(np.argmax(normal))
    if normal[axis] < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def series_parts(info: dict) -> list[list[str]]:
    """A series' files split into stackable parts (a 3-plane localizer gives three)."""
    parts: dict = {}
    for f in info["files"]:
        parts.setdefault(info["geometry"][f], []).append(f)
    return list(parts.values())


def napari_get_reader(path):
    """npe2 reader hook: a reader for DICOM files/folders, None for anything else."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    for p in paths:
        p = Path(p)
        if p.is_dir():
            if not any(is_dicom_file(f) for f in _iter_limited(p)):
                return None
        elif not is_dicom_file(p):
            return None
    return _read_layers


def _iter_limited(folder: Path, limit: int = 200) -> Iterable[Path]:
    for i, f in enumerate(folder.rglob("*")):
        if i >= limit:
            return
        if f.is_file():
            yield f


def _seg_neighbours(path) -> list[str]:
    """Where a SEG's source series may be: what was opened, or the SEG file's own folder."""
    if isinstance(path, (list, tuple)):
        return _candidate_files(path)
    p = Path(path)
    if p.is_dir():
        return _candidate_files(p)
    return [str(f) for f in sorted(p.parent.iterdir()) if f.is_file() and is_dicom_file(f)]


def _read_layers(path):
    """Every series at ``path`` as a layer: images as image layers, DICOM-SEG objects as
    labels layers in patient space (io/seg.py). A series that cannot be read is reported
    (DicomSeriesWarning, a napari notification) and the others still open; a series of
    several orientations or sizes (a localizer) opens as one layer per part, with a note."""
    from .seg import read_seg

    layers, problems = [], []
    for uid, info in list_series(path).items():
        if info["modality"].upper() == "SEG":
            candidates = _seg_neighbours(path)
            for f in info["files"]:
                try:
                    vol = read_seg(f, source_files=[c for c in candidates if c not in info["files"]])
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                layers.append((vol.labels, vol.layer_metadata(info["description"] or Path(f).stem), "labels"))
            continue
        parts = series_parts(info)
        for k, files in enumerate(parts):
            try:
                vol = read_dicom_series(files, series_uid=uid)
            except (ValueError, FileNotFoundError) as exc:
                problems.append(str(exc))
                continue
            meta = vol.layer_metadata()
            if len(parts) > 1:
                plane = _plane_name(info["geometry"][files[0]][0])
                meta["name"] = f"{meta['name']} ({plane} {k + 1}/{len(parts)})"
                note = (f"series {uid} has {len(parts)} parts of different orientation or size "
                        "(a localizer?): each opens as its own layer, hidden")
                meta["metadata"]["dicom"]["warnings"].append(note)
                meta["visible"] = False  # single scout images would cover the series they plan
            layers.append((vol.data, meta, "image"))
    for problem in problems:
        warnings.warn(f"not opened: {problem}", DicomSeriesWarning, stacklevel=2)
    if not layers and problems:
        raise ValueError("; ".join(problems))
    if not layers:
        raise ValueError(f"{path}: no DICOM image or segmentation here (only objects without pixel data, "
                         "e.g. structured reports, RT plans or presentation states)")
    return layers
