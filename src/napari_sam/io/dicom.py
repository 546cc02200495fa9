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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._geometry import placement

# Transfer syntaxes whose decoders are optional plugins of pydicom, and what to install.
_DECODERS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg (JPEG baseline)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg (JPEG extended)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg (JPEG lossless)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg (JPEG lossless SV1)",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg or python-gdcm (JPEG-LS)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg or python-gdcm (JPEG-LS)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg (JPEG 2000 lossless)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg (JPEG 2000)",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle or python-gdcm (RLE)",
}

# Spacing deviations below this fraction are rounding, not irregular geometry.
_SPACING_TOLERANCE = 0.01


class DicomSeriesWarning(UserWarning):
    """Irregular geometry (gaps, uneven spacing) found while reading a series."""


@dataclass
class DicomVolume:
    """A DICOM series as an array with geometry.

    Attributes
    ----------
    data : ndarray, (Z, Y, X) or (Y, X)
        Stored values with the rescale applied (HU for CT): int16 when exact, else float32.
    spacing : (dz, dy, dx)
        Millimetres between slices, rows and columns (dz = 1.0 for one slice).
    origin : ndarray (3,)
        Patient position (LPS, mm) of the first voxel of the first slice.
    row_direction, column_direction, slice_direction : ndarray (3,)
        Unit vectors (LPS) of increasing column index, row index and slice index.
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
            **placement(self.affine, self.data.ndim),
            "metadata": {
                "dicom": {
                    "series_uid": self.series_uid,
                    "modality": self.modality,
                    "affine_lps": self.affine.tolist(),
                    "origin_lps": self.origin.tolist(),
                    "spacing_zyx": list(self.spacing),
                    "files": list(self.files),
                    "warnings": list(self.warnings),
                }
            },
        }
        window = self.window or default_window(self.modality, self.data)
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


def _first(value, default=None):
    return default if value is None else value


def _window_of(ds) -> tuple[float, float] | None:
    c, w = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if c is None or w is None:
        return None
    c = c[0] if hasattr(c, "__len__") and not isinstance(c, str) else c
    w = w[0] if hasattr(w, "__len__") and not isinstance(w, str) else w
    try:
        return float(c), float(w)
    except (TypeError, ValueError):
        return None


def _pixels(ds, path: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders / bad data
        uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
        if uid in _DECODERS:
            raise ValueError(
                f"{path}: pixel data is compressed (transfer syntax {uid}) and no decoder is "
                f"installed; install {_DECODERS[uid]} (e.g. `pip install {_DECODERS[uid].split(' (')[0].split(' or ')[0]}`)"
            ) from exc
        raise ValueError(f"{path}: cannot read pixel data ({exc})") from exc


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
        })
        entry["files"].append(f)
    return series


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
    if len(datasets) == 1 and int(getattr(datasets[0][1], "NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(*datasets[0], series_uid)
    return _read_single_frames(datasets, series_uid)


def _orientation(ds) -> tuple[np.ndarray, np.ndarray]:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None:
        return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    v = np.asarray([float(x) for x in iop])
    return v[:3] / np.linalg.norm(v[:3]), v[3:] / np.linalg.norm(v[3:])


def _assemble(slices, positions, row, col, pixel_spacing, meta_ds, series_uid, files) -> DicomVolume:
    """slices: list of (rescaled float arrays, integer-exact flag)."""
    normal = np.cross(row, col)
    proj = np.array([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(proj, kind="stable")
    proj = proj[order]
    problems = []
    if len(proj) > 1:
        diffs = np.diff(proj)
        if np.any(diffs < 1e-4):
            dup = [files[order[i]] for i in np.flatnonzero(diffs < 1e-4)[:2]]
            raise ValueError(
                f"two slices share a position (e.g. {dup}); the series mixes acquisitions or "
                "echoes: split it (or choose files) before reading"
            )
        dz = float(np.median(diffs))
        if np.max(np.abs(diffs - dz)) > _SPACING_TOLERANCE * dz:
            gaps = [f"{proj[i]:.2f}->{proj[i + 1]:.2f} mm" for i in np.flatnonzero(diffs > 1.5 * dz)]
            msg = (f"irregular slice spacing in series {series_uid}: median {dz:.3f} mm, "
                   f"range {diffs.min():.3f}-{diffs.max():.3f} mm")
            if gaps:
                msg += f"; missing slice(s) between {', '.join(gaps)}"
            problems.append(msg)
            warnings.warn(msg, DicomSeriesWarning, stacklevel=3)
    else:
        dz = float(getattr(meta_ds, "SpacingBetweenSlices", 0) or getattr(meta_ds, "SliceThickness", 0) or 1.0)
    arrays = [slices[i][0] for i in order]
    exact = all(slices[i][1] for i in order)
    stacked = np.stack(arrays)
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
        slice_direction=normal,
        modality=str(getattr(meta_ds, "Modality", "")),
        series_uid=series_uid,
        series_description=str(getattr(meta_ds, "SeriesDescription", "")),
        window=_window_of(meta_ds),
        files=[files[i] for i in order],
        warnings=problems,
    )


def _rescaled(pixels: np.ndarray, slope, intercept) -> tuple[np.ndarray, bool]:
    slope = float(_first(slope, 1.0))
    intercept = float(_first(intercept, 0.0))
    values = pixels.astype(np.float64) * slope + intercept
    # int16 only when every rescaled value is a whole number (HU usually are)
    exact = bool(np.all(values == np.round(values)))
    return values, exact


def _read_single_frames(datasets, series_uid) -> DicomVolume:
    first = datasets[0][1]
    row, col = _orientation(first)
    shape = None
    slices, positions, files = [], [], []
    for f, ds in datasets:
        px = _pixels(ds, f)
        if px.ndim != 2:
            raise ValueError(f"{f}: expected a single-frame grayscale image, got pixel array {px.shape}")
        if shape is None:
            shape = px.shape
        elif px.shape != shape:
            raise ValueError(f"{f}: image size {px.shape} differs from the series' {shape}")
        r, c = _orientation(ds)
        if not (np.allclose(r, row, atol=1e-4) and np.allclose(c, col, atol=1e-4)):
            raise ValueError(f"{f}: orientation differs from the rest of series {series_uid}")
        ipp = getattr(ds, "ImagePositionPatient", None)
        if ipp is None:
            if len(datasets) > 1:
                raise ValueError(f"{f}: no ImagePositionPatient; cannot order the slices of a series without it")
            ipp = [0.0, 0.0, 0.0]
        positions.append(np.array([float(v) for v in ipp]))
        slices.append(_rescaled(px, getattr(ds, "RescaleSlope", None), getattr(ds, "RescaleIntercept", None)))
        files.append(f)
    return _assemble(slices, positions, row, col, getattr(first, "PixelSpacing", None), first, series_uid, files)


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
    px = _pixels(ds, path)
    n = int(ds.NumberOfFrames)
    if px.shape[0] != n or px.ndim != 3:
        raise ValueError(f"{path}: expected {n} grayscale frames, got pixel array {px.shape}")
    orient = _group(ds, 0, "PlaneOrientationSequence")
    if orient is not None:
        row, col = _orientation(orient)
    else:
        row, col = _orientation(ds)
    measures = _group(ds, 0, "PixelMeasuresSequence")
    spacing = getattr(measures, "PixelSpacing", None) if measures is not None else getattr(ds, "PixelSpacing", None)
    slices, positions = [], []
    for i in range(n):
        pos = _group(ds, i, "PlanePositionSequence")
        if pos is None or not hasattr(pos, "ImagePositionPatient"):
            raise ValueError(f"{path}: frame {i} has no PlanePositionSequence/ImagePositionPatient")
        positions.append(np.array([float(v) for v in pos.ImagePositionPatient]))
        tr = _group(ds, i, "PixelValueTransformationSequence")
        slope = getattr(tr, "RescaleSlope", None) if tr is not None else getattr(ds, "RescaleSlope", None)
        intercept = getattr(tr, "RescaleIntercept", None) if tr is not None else getattr(ds, "RescaleIntercept", None)
        slices.append(_rescaled(px[i], slope, intercept))
    vol = _assemble(slices, positions, row, col, spacing, ds, series_uid, [path] * n)
    vol.files = [path]
    return vol


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
    labels layers in patient space (io/seg.py). Irregular geometry is reported through
    DicomSeriesWarning, which napari shows as a notification."""
    from .seg import read_seg

    layers = []
    for uid, info in list_series(path).items():
        if info["modality"].upper() == "SEG":
            candidates = _seg_neighbours(path)
            for f in info["files"]:
                vol = read_seg(f, source_files=[c for c in candidates if c not in info["files"]])
                name = info["description"] or Path(f).stem
                layers.append((vol.labels, vol.layer_metadata(name), "labels"))
        else:
            vol = read_dicom_series(path, series_uid=uid)
            layers.append((vol.data, vol.layer_metadata(), "image"))
    return layers


def write_dicom_series(folder, hu: np.ndarray, *, spacing=(2.5, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                       description: str = "CT phantom", modality: str = "CT") -> list[str]:
    """Write a (Z, Y, X) HU volume as an axial single-frame CT series (one file a slice).

    Used for the bundled sample; the files carry the patient/study/series modules that
    viewers and DICOM-SEG export expect. Returns the file paths in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"a DICOM series needs a 3D volume; got shape {hu.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    dz, dy, dx = (float(v) for v in spacing)
    paths = []
    for z, plane in enumerate(hu):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^CT", "PHANTOM", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", "", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, z + 1
        ds.SeriesDescription, ds.Manufacturer = description, "napari-sam-labeler (synthetic)"
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + z * dz]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [dy, dx], dz
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
        ds.PixelData = (np.round(plane) + 1024).astype(np.int16).tobytes()
        path = folder / f"CT{z + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths
