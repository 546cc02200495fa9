"""DICOM series → a volume in physical units with its geometry (pydicom).

Rules that radiology software follows and napari plugins usually do not:

* files are grouped by SeriesInstanceUID (several series: choose one, or get an error
  that lists them);
* slices are ordered by ImagePositionPatient projected on the slice normal, never by
  file name or InstanceNumber;
* RescaleSlope/RescaleIntercept are applied per slice (HU as int16 when exact, else
  float32);
* slice spacing is the distance between slice positions (not SliceThickness); irregular
  spacing or a missing slice is reported as a warning and reading goes on;
* orientation, origin and the index → patient (LPS, mm) affine are kept.

Enhanced multi-frame objects are read from their functional groups. Compressed pixel
data whose decoder is missing raises an error that names the package to install.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._dicom_pixels import decode, is_colour, number, rescaled, vector, window_of
from ._dicom_write import write_dicom_series  # noqa: F401  (public here: samples and tests use it)
from ._geometry import frame_metadata, placement, regular_slots, slice_step

# Spacing deviations below this fraction are rounding, not irregular geometry.
_SPACING_TOLERANCE = 0.01
# Slice steps further than this from the normal are a tilt/shear worth telling the user.
_TILT_TOLERANCE_DEG = 0.01


class DicomSeriesWarning(UserWarning):
    """Irregular geometry (gaps, uneven spacing) found while reading a series."""


@dataclass
class DicomVolume:
    """A DICOM series as an array with geometry.

    Attributes
    ----------
    data : ndarray, (Z, Y, X) or (Y, X); colour: (Z, Y, X, 3) or (Y, X, 3)
        Grayscale: stored values with the rescale applied (HU for CT), int16 when exact,
        else float32. Colour (RGB, YBR, palette): RGB as stored (usually uint8).
    spacing : (dz, dy, dx)
        Millimetres between slices, rows and columns (dz = 1.0 for one slice).
    origin : ndarray (3,)
        Patient position (LPS, mm) of the first voxel of the first slice.
    row_direction, column_direction, slice_direction : ndarray (3,)
        Unit vectors (LPS) of increasing column index, row index and slice index. The slice
        direction is the step between slice positions: the normal of the images, except for
        gantry-tilted or sheared stacks, where it holds the shear.
    affine : ndarray (4, 4)
        Maps (slice, row, column, 1) indices to LPS millimetres.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    modality: str
    series_uid: str
    series_description: str = ""
    window: tuple[float, float] | None = None
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rgb: bool = False
    photometric: str = ""

    @property
    def affine(self) -> np.ndarray:
        dz, dy, dx = self.spacing
        a = np.eye(4)
        a[:3, 0] = self.slice_direction * dz
        a[:3, 1] = self.column_direction * dy
        a[:3, 2] = self.row_direction * dx
        a[:3, 3] = self.origin
        return a

    def layer_metadata(self) -> dict:
        """napari layer keyword arguments: name, scale, contrast limits, geometry metadata."""
        meta = {
            "name": self.series_description or f"{self.modality} series",
            # napari world = patient space (LPS, z y x), as every reader and writer here
            **placement(self.affine, self.data.ndim - self.rgb),
            "rgb": self.rgb,
            "metadata": {
                "dicom": {
                    "series_uid": self.series_uid,
                    "modality": self.modality,
                    **frame_metadata(self.affine),
                    "origin_lps": self.origin.tolist(),
                    "spacing_zyx": list(self.spacing),
                    "files": list(self.files),
                    "warnings": list(self.warnings),
                    "photometric": self.photometric,
                }
            },
        }
        if self.photometric == "MONOCHROME1":
            # low values are white (radiographs): shown as the standard says, values untouched;
            # the SAM Labeler inverts SAM's input the same way
            meta["colormap"] = "gray_r"
        window = None if self.rgb else self.window or default_window(self.modality, self.data)
        if window is not None:
            c, w = window
            meta["contrast_limits"] = (c - w / 2.0, c + w / 2.0)
        return meta


def default_window(modality: str, data: np.ndarray) -> tuple[float, float] | None:
    """Display window when the files give none: CT abdomen; otherwise 0.5-99.5 percentiles."""
    from ..preprocess import CT_PRESETS, resolve_intensity

    if modality.upper() == "CT":
        return CT_PRESETS["abdomen"]
    m = resolve_intensity(data, multichannel=False, percentiles=(0.5, 99.5))
    lo, hi = m.lows[0], m.highs[0]
    return ((lo + hi) / 2.0, max(hi - lo, 1e-6))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _candidate_files(path) -> list[str]:
    if isinstance(path, (list, tuple)):
        files = [str(p) for p in path]
    else:
        p = Path(path)
        if p.is_dir():
            files = [str(f) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")
                     and f.name.upper() != "DICOMDIR"]
        else:
            files = [str(p)]
    return [f for f in files if is_dicom_file(f)]


def list_series(path) -> dict[str, dict]:
    """The DICOM series under ``path``: ``{uid: {"description", "modality", "files"}}``."""
    import pydicom

    series: dict[str, dict] = {}
    for f in _candidate_files(path):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # a damaged file: reported, the rest is still listed
            warnings.warn(f"skipping unreadable DICOM file {f}: {exc}", DicomSeriesWarning, stacklevel=2)
            continue
        if "PixelData" not in ds and not hasattr(ds, "Rows"):
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "unknown"))
        entry = series.setdefault(uid, {
            "description": str(getattr(ds, "SeriesDescription", "")),
            "modality": str(getattr(ds, "Modality", "")),
            "files": [],
            "geometry": {},
        })
        entry["files"].append(f)
        entry["geometry"][f] = _geometry_key(ds, f)
    return series


def _geometry_key(ds, path):
    """Files that can stack together share this: orientation, size, single frames."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    try:
        orientation = tuple(round(float(v), 3) for v in iop) if iop is not None else None
    except (TypeError, ValueError):
        orientation = "malformed"
    frames = str(getattr(ds, "NumberOfFrames", "1") or "1")
    return (orientation, str(getattr(ds, "Rows", "")), str(getattr(ds, "Columns", "")),
            path if frames not in ("1", "") else "")


def read_dicom_series(path, series_uid: str | None = None) -> DicomVolume:
    """Read a DICOM series (a folder, one file, or a list of files).

    Parameters
    ----------
    path : path or list of paths
    series_uid : str, optional
        Which series, when the folder holds several.

    Raises
    ------
    FileNotFoundError
        No DICOM files at ``path``.
    ValueError
        Several series and no ``series_uid``, duplicate slice positions, missing or
        compressed pixel data without a decoder; the message says which.
    """
    import pydicom

    series = list_series(path)
    if not series:
        raise FileNotFoundError(f"no DICOM files found at {path}")
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{uid} ({s['modality']} {s['description']!r}, {len(s['files'])} files)"
                                for uid, s in series.items())
            raise ValueError(f"{path} holds {len(series)} DICOM series; choose one with series_uid: {listing}")
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise ValueError(f"series {series_uid} is not in {path}; found {', '.join(series)}")
    files = series[series_uid]["files"]
    datasets = []
    for f in files:
        try:
            datasets.append((f, pydicom.dcmread(f)))
        except Exception as exc:
            raise ValueError(f"{f}: not a readable DICOM file ({exc})") from exc
    if len(datasets) == 1 and number(datasets[0][1], "NumberOfFrames", datasets[0][0], 1, int) > 1:
        return _read_multiframe(*datasets[0], series_uid)
    return _read_single_frames(datasets, series_uid)


def _orientation(ds, path: str) -> tuple[np.ndarray, np.ndarray]:
    iop = vector(ds, "ImageOrientationPatient", path, 6)
    if iop is None:
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    row, col = iop[:3], iop[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise ValueError(f"{path}: ImageOrientationPatient has a zero vector ({list(iop)})")
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _assemble(slices, positions, row, col, pixel_spacing, meta_ds, series_uid, files, *,
              colour=False, problems=None) -> DicomVolume:
    """slices: list of (array, integer-exact flag): rescaled grayscale, or RGB as stored."""
    normal = np.cross(row, col)
    proj = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(proj, kind="stable")
    proj = proj[order]
    problems = list(problems or [])
    if len(proj) > 1:
        diffs = np.diff(proj)
        if np.any(diffs < 1e-4):
            dup = [files[order[i]] for i in np.flatnonzero(diffs < 1e-4)[:2]]
            raise ValueError(
                f"two slices share a position (e.g. {dup}); the series mixes acquisitions or "
                "echoes: split it (or choose files) before reading"
            )
        gap = float(np.median(diffs))
        if np.max(np.abs(diffs - gap)) > _SPACING_TOLERANCE * gap:
            gaps = [f"{proj[i]:.2f}->{proj[i + 1]:.2f} mm" for i in np.flatnonzero(diffs > 1.5 * gap)]
            msg = (f"irregular slice spacing in series {series_uid}: median {gap:.3f} mm, "
                   f"range {diffs.min():.3f}-{diffs.max():.3f} mm")
            if gaps:
                msg += f"; missing slice(s) between {', '.join(gaps)}"
            problems.append(msg)
            warnings.warn(msg, DicomSeriesWarning, stacklevel=3)
        order, positions, files, slices = _fill_missing(order, proj, positions, files, slices, colour, problems,
                                                        series_uid)
        step, tilt = slice_step([positions[i] for i in order], normal)
        dz = float(np.linalg.norm(step))
        direction = step / dz
        if tilt > _TILT_TOLERANCE_DEG:
            note = (f"slices step {dz:.3f} mm at {tilt:.2f} degrees to the slice normal (gantry tilt or a "
                    "sheared stack): the placement holds the shear, every slice sits at its own position")
            problems.append(note)
            warnings.warn(note, DicomSeriesWarning, stacklevel=3)
    else:
        dz = _declared_spacing(meta_ds, files[0]) or 1.0
        direction = normal
    arrays = [slices[i][0] for i in order]
    stacked = np.stack(arrays)
    if not colour:
        exact = all(slices[i][1] for i in order)
        if exact and stacked.min() >= np.iinfo(np.int16).min and stacked.max() <= np.iinfo(np.int16).max:
            stacked = stacked.astype(np.int16)
        else:
            stacked = stacked.astype(np.float32)
    data = stacked if len(arrays) > 1 else stacked[0]
    dy, dx = (float(v) for v in pixel_spacing) if pixel_spacing is not None else (1.0, 1.0)
    return DicomVolume(
        data=data,
        spacing=(dz, dy, dx),
        origin=np.asarray(positions[order[0]], float),
        row_direction=row,
        column_direction=col,
        slice_direction=direction,
        modality=str(getattr(meta_ds, "Modality", "")),
        series_uid=series_uid,
        series_description=str(getattr(meta_ds, "SeriesDescription", "")),
        window=None if colour else window_of(meta_ds),
        files=[files[i] for i in order],
        warnings=problems,
        rgb=colour,
        photometric=str(getattr(meta_ds, "PhotometricInterpretation", "")).upper(),
    )


def _fill_missing(order, proj, positions, files, slices, colour, problems, series_uid):
    """Insert a blank slice (no file: "") wherever whole slices are missing, so that every
    slice sits at its own ImagePositionPatient on napari's regular grid; a series spaced
    irregularly in any other way is left as it is (the warning above says so)."""
    grid = regular_slots(proj)
    if grid is None or grid[1] == len(order):
        return order, positions, files, slices
    slots, depth = grid
    first, last = positions[order[0]], positions[order[-1]]
    fill = (np.zeros_like(slices[order[0]][0]) if colour
            else np.full(slices[order[0]][0].shape, min(float(s[0].min()) for s in slices)))
    by_slot = dict(zip(slots, order))
    new_slices, new_positions, new_files = [], [], []
    for slot in range(depth):
        if slot in by_slot:
            i = by_slot[slot]
            new_slices.append(slices[i])
            new_positions.append(positions[i])
            new_files.append(files[i])
        else:
            new_slices.append((fill, True))
            new_positions.append(first + (last - first) * slot / (depth - 1))
            new_files.append("")
    note = (f"series {series_uid}: {depth - len(order)} missing slice(s) inserted blank (lowest value, no "
            "file) so that every slice sits at its own position")
    problems.append(note)
    warnings.warn(note, DicomSeriesWarning, stacklevel=4)
    return list(range(depth)), new_positions, new_files, new_slices


def _declared_spacing(ds, path) -> float | None:
    """SpacingBetweenSlices, else SliceThickness (for stacks without positions)."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = number(ds, keyword, path)
        if value:
            return abs(value)
    return None


def _frame_stack_positions(n, row, col, ds, path, why: str):
    """Positions for frames that have none: along the normal at the declared spacing."""
    dz = _declared_spacing(ds, path)
    origin = vector(ds, "ImagePositionPatient", path, 3)
    origin = np.zeros(3) if origin is None else origin
    normal = np.cross(row, col)
    note = (f"{why}; opened as a stack of {n} frames in stored order, spacing "
            f"{dz if dz else 1.0:g} mm ({'SpacingBetweenSlices/SliceThickness' if dz else 'none declared: 1'})")
    warnings.warn(f"{path}: {note}", DicomSeriesWarning, stacklevel=4)
    return [origin + k * (dz or 1.0) * normal for k in range(n)], note


def _plane(px: np.ndarray, colour: bool, path: str) -> np.ndarray:
    want = 3 if colour else 2
    if px.ndim != want:
        kind = "colour (rows, columns, 3)" if colour else "grayscale (rows, columns)"
        raise ValueError(f"{path}: expected one {kind} image, got pixel array {px.shape}")
    return px


def _read_single_frames(datasets, series_uid) -> DicomVolume:
    first_path, first = datasets[0]
    colour = is_colour(first)
    row, col = _orientation(first, first_path)
    if any(getattr(ds, "ImagePositionPatient", None) is None for _f, ds in datasets) and len(datasets) > 1:
        # no positions (secondary capture, ultrasound, scanned images): stored order
        datasets = sorted(datasets, key=lambda item: number(item[1], "InstanceNumber", item[0], 0, int))
        positions, note = _frame_stack_positions(len(datasets), row, col, first, first_path,
                                                 "the images have no ImagePositionPatient")
        problems = [note]
    else:
        positions, problems = [], []
    shape = None
    slices, files = [], []
    for k, (f, ds) in enumerate(datasets):
        px = _plane(decode(ds, f), colour, f)
        if shape is None:
            shape = px.shape
        elif px.shape != shape:
            raise ValueError(f"{f}: image size {px.shape} differs from the series' {shape}")
        r, c = _orientation(ds, f)
        if not (np.allclose(r, row, atol=1e-4) and np.allclose(c, col, atol=1e-4)):
            raise ValueError(f"{f}: orientation differs from the rest of series {series_uid}")
        if not problems:
            ipp = vector(ds, "ImagePositionPatient", f, 3)
            positions.append(np.zeros(3) if ipp is None else ipp)
        if colour:
            slices.append((px, True))
        else:
            slices.append(rescaled(px, number(ds, "RescaleSlope", f), number(ds, "RescaleIntercept", f)))
        files.append(f)
    return _assemble(slices, positions, row, col, _pixel_spacing(first, first_path), first, series_uid, files,
                     colour=colour, problems=problems)


def _pixel_spacing(ds, path):
    """PixelSpacing, else ImagerPixelSpacing; a zero or negative spacing (seen in real CR
    files) is no spacing: 1, with a warning."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = vector(ds, keyword, path, 2)
        if value is None:
            continue
        if np.all(value > 0):
            return value
        warnings.warn(f"{path}: {keyword} is {list(value)}; ignored", DicomSeriesWarning, stacklevel=3)
    return None


def _group(ds, frame_index: int, name: str):
    """A functional-group item for one frame: per-frame first, else shared."""
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        seq = getattr(ds, seq_name, None)
        if seq is not None and len(seq) > idx and hasattr(seq[idx], name):
            inner = getattr(seq[idx], name)
            if len(inner):
                return inner[0]
    return None


def _read_multiframe(path, ds, series_uid) -> DicomVolume:
    px = decode(ds, path)
    n = number(ds, "NumberOfFrames", path, 1, int)
    colour = is_colour(ds)
    if px.shape[0] != n or px.ndim != (4 if colour else 3):
        kind = "colour" if colour else "grayscale"
        raise ValueError(f"{path}: expected {n} {kind} frames, got pixel array {px.shape}")
    orient = _group(ds, 0, "PlaneOrientationSequence")
    row, col = _orientation(orient if orient is not None else ds, path)
    measures = _group(ds, 0, "PixelMeasuresSequence")
    spacing = _pixel_spacing(measures if measures is not None else ds, path)
    frame_positions = []
    for i in range(n):
        pos = _group(ds, i, "PlanePositionSequence")
        frame_positions.append(None if pos is None else vector(pos, "ImagePositionPatient", path, 3))
    problems = []
    if any(p is None for p in frame_positions):
        why = "frames have no positions (PlanePositionSequence)"
        if colour or str(getattr(ds, "Modality", "")).upper() in ("US", "XA", "RF", "ES", "XC"):
            why += ": a time series (cine)"
        positions, note = _frame_stack_positions(n, row, col, measures if measures is not None else ds, path, why)
        problems.append(note)
    else:
        positions = frame_positions
    slices = []
    for i in range(n):
        if colour:
            slices.append((px[i], True))
            continue
        tr = _group(ds, i, "PixelValueTransformationSequence")
        source = tr if tr is not None else ds
        slices.append(rescaled(px[i], number(source, "RescaleSlope", path), number(source, "RescaleIntercept", path)))
    vol = _assemble(slices, positions, row, col, spacing, ds, series_uid, [path] * n, colour=colour,
                    problems=problems)
    vol.files = [path]
    return vol
