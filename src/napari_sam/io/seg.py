"""DICOM-SEG out and in (highdicom, the ``medical`` extra).

A labels volume becomes one binary DICOM Segmentation that references the source
series instance by instance: one segment per label id (segment numbers 1..N in label
order), named by the caller or "label <id>", with the label id kept in the segment's
tracking ID so that reading the file back restores the same ids on the same slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._fileio import atomic_write, storable_labels, napari_writer
from ._geometry import as_volume, frame_metadata, placement, regular_slots, slice_step

SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # binary/fractional, label map

_TRACKING_PREFIX = "napari-sam-labeler label "


def _highdicom():
    try:
        import highdicom
    except ImportError as exc:
        raise ImportError(
            "DICOM-SEG needs highdicom: pip install 'napari-sam-labeler[medical]' (or pip install highdicom)"
        ) from exc
    return highdicom


def write_dicom_seg(
    path,
    labels: np.ndarray,
    source_files: Sequence[str],
    *,
    names: Mapping[int, str] | None = None,
    series_description: str = "SAM Labeler segmentation",
) -> str:
    """Write ``labels`` (Z, Y, X), aligned with ``source_files`` slice by slice, as DICOM-SEG.

    Parameters
    ----------
    source_files : sequence of str
        The source series' single-frame files in the labels' slice order (as
        :func:`napari_sam.io.dicom.read_dicom_series` returns them in ``files``).
    names : mapping, optional
        Segment label per label id (default "label <id>").
    """
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    hd = _highdicom()
    from .._version import __version__

    labels = as_volume(storable_labels(labels, f"DICOM-SEG {path}"), "DICOM-SEG export")
    files = list(source_files)
    if len(files) != labels.shape[0]:
        raise ValueError(
            f"labels have {labels.shape[0]} slices but the source series has {len(files)} files; "
            "DICOM-SEG needs the labels aligned with the series they were drawn on"
        )
    # slices the reader inserted blank for missing images have no file to reference
    missing = [z for z, f in enumerate(files) if not f]
    drawn = [z for z in missing if labels[z].any()]
    if drawn:
        raise ValueError(f"labels on slice(s) {drawn}, which the series does not have (inserted blank "
                         "for missing images): DICOM-SEG can only reference images that exist")
    keep = [z for z, f in enumerate(files) if f]
    labels, files = labels[keep], [files[z] for z in keep]
    sources = [_with_type2(pydicom.dcmread(f)) for f in files]
    if int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        raise ValueError("DICOM-SEG export from enhanced multi-frame sources is not supported yet")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape[1:] != (rows, cols):
        raise ValueError(f"labels slices are {labels.shape[1:]}, the source images {(rows, cols)}")
    ids = [int(i) for i in np.unique(labels) if i != 0]
    if not ids:
        raise ValueError("the labels are empty: there is no segment to export")
    label_map = np.zeros(labels.shape, np.uint16)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="SAM Labeler (Segment Anything)", version=__version__, family=codes.DCM.ArtificialIntelligence,
    )
    descriptions = []
    for number, label in enumerate(ids, start=1):
        label_map[labels == label] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=(names or {}).get(label, f"label {label}"),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=f"{_TRACKING_PREFIX}{label}",
        ))
    try:
        seg = _segmentation(hd, sources, label_map, descriptions, series_description, __version__)
    except AttributeError as exc:
        raise ValueError(f"the source series lacks a DICOM attribute DICOM-SEG needs: {exc}") from exc
    with atomic_write(path) as tmp:
        seg.save_as(tmp)
    return str(path)


# Patient and study attributes of type 2 ("present, may be empty"): anonymised series often
# drop them, and highdicom reads them from the source. Missing ones are added empty.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds):
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _segmentation(hd, sources, label_map, descriptions, series_description, version):
    from pydicom.uid import generate_uid

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="napari-sam-labeler",
        manufacturer_model_name="SAM Labeler",
        software_versions=version,
        device_serial_number="none",
        series_description=series_description,
        # every slice of every segment: the SEG alone then carries the series' whole grid,
        # so it opens without the source files (read_seg) in the same shape
        omit_empty_frames=False,
    )


@dataclass
class SegVolume:
    """A DICOM-SEG as a labels volume in patient space.

    Attributes
    ----------
    labels : ndarray (Z, Y, X), uint8/uint16/uint32
        Label ids: the ones this plugin wrote (kept in the tracking IDs), else segment numbers.
    affine_lps : ndarray (4, 4)
        (slice, row, column) index → LPS millimetres (io/_geometry.py).
    names : dict
        Label id → segment label.
    source_files : list of str
        The referenced series' files in slice order, when they were found (else empty: the
        grid then comes from the SEG's own frame positions).
    """

    labels: np.ndarray
    affine_lps: np.ndarray
    names: dict
    series_uid: str
    referenced_series_uid: str
    source_files: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def layer_metadata(self, name: str) -> dict:
        meta = {
            "name": name,
            **placement(self.affine_lps, 3),
            "metadata": {
                "dicom": {
                    "series_uid": self.referenced_series_uid,
                    "seg_series_uid": self.series_uid,
                    "modality": "SEG",
                    **frame_metadata(self.affine_lps),
                    "files": list(self.source_files),
                    "warnings": list(self.warnings),
                },
                "segments": {int(k): v for k, v in self.names.items()},
            },
        }
        ids = sorted(self.names)
        meta["features"] = {"index": [0, *ids], "segment": ["background", *(self.names[i] for i in ids)]}
        return meta


def is_seg(ds) -> bool:
    return str(getattr(ds, "SOPClassUID", "")) in SEG_SOP_CLASSES or str(getattr(ds, "Modality", "")) == "SEG"


def _item(ds, index: int, name: str):
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = getattr(ds, seq_name, None)
        if seq is not None and len(seq) > idx and name in seq[idx] and len(seq[idx][name].value):
            return seq[idx][name].value[0]
    return None


def _unit(v) -> np.ndarray:
    v = np.asarray([float(x) for x in v])
    return v / np.linalg.norm(v)


def _source_grid(seg, candidates: Sequence[str]):
    """The referenced series among ``candidates``: (files in slice order, positions), or None."""
    import pydicom

    referenced = {str(r.ReferencedSOPInstanceUID) for s in getattr(seg, "ReferencedSeriesSequence", [])
                  for r in s.ReferencedInstanceSequence}
    found = {}
    for f in candidates:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM or damaged: not the source
            continue
        if str(getattr(ds, "SOPInstanceUID", "")) in referenced and hasattr(ds, "ImagePositionPatient"):
            found[f] = np.array([float(v) for v in ds.ImagePositionPatient])
    if not found or len(found) < len(referenced):
        return None
    return found


def _frame_step(positions, proj, normal, measures) -> np.ndarray:
    """Slice step of a SEG's own frames: between the two nearest distinct frame positions
    (which keeps a gantry tilt), shortened when SpacingBetweenSlices says slices are missing
    between them; the declared spacing (or 1) along the normal when all frames share a plane."""
    declared = float(getattr(measures, "SpacingBetweenSlices", 0) or 0) if measures is not None else 0.0
    order = np.argsort(proj, kind="stable")
    distinct = [order[0]] + [j for i, j in zip(order[:-1], order[1:]) if proj[j] - proj[i] > 1e-4]
    if len(distinct) < 2:
        return normal * (declared or float(getattr(measures, "SliceThickness", 1) or 1))
    gaps = [(proj[b] - proj[a], a, b) for a, b in zip(distinct[:-1], distinct[1:])]
    gap, a, b = min(gaps)
    step = positions[b] - positions[a]
    if declared and gap > 1.5 * declared:
        step = step * (declared / gap)
    return step


def read_seg(path, source_files: Sequence[str] | None = None) -> SegVolume:
    """Read a DICOM-SEG (binary or fractional) into a labels volume in patient space.

    The grid is the referenced series' when its files are among ``source_files`` (every
    referenced instance found), else the SEG's own frame positions: from the lowest to the
    highest frame along the slice normal, spaced by SpacingBetweenSlices (else the frames'
    smallest gap). Either way the placement is exact, so the layer overlays the series.
    No highdicom needed: pydicom reads it.
    """
    import pydicom

    seg = pydicom.dcmread(str(path))
    if not is_seg(seg):
        raise ValueError(f"{path}: not a DICOM Segmentation (SOP class {getattr(seg, 'SOPClassUID', '?')})")
    pixels = np.asarray(seg.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    n = pixels.shape[0]
    labelmap = str(getattr(seg, "SegmentationType", "BINARY")) == "LABELMAP"  # pixels are segment numbers
    if str(getattr(seg, "SegmentationType", "BINARY")) == "FRACTIONAL":
        pixels = pixels > float(getattr(seg, "MaximumFractionalValue", 255)) / 2.0
    orient = _item(seg, 0, "PlaneOrientationSequence")
    if orient is None:
        raise ValueError(f"{path}: no PlaneOrientationSequence; cannot place the segmentation in patient space")
    iop = [float(v) for v in orient.ImageOrientationPatient]
    row, col = _unit(iop[:3]), _unit(iop[3:])
    normal = np.cross(row, col)
    measures = _item(seg, 0, "PixelMeasuresSequence")
    dy, dx = (float(v) for v in measures.PixelSpacing) if measures is not None else (1.0, 1.0)
    positions, numbers = [], []
    for i in range(n):
        pos = _item(seg, i, "PlanePositionSequence")
        ident = _item(seg, i, "SegmentIdentificationSequence")
        if pos is None or (ident is None and not labelmap):
            raise ValueError(f"{path}: frame {i} has no plane position or segment number")
        positions.append(np.array([float(v) for v in pos.ImagePositionPatient]))
        numbers.append(int(ident.ReferencedSegmentNumber) if ident is not None else 0)
    proj = np.array([p @ normal for p in positions])
    problems = []
    source = _source_grid(seg, source_files) if source_files else None
    if source is not None:
        found = sorted(source, key=lambda f: float(source[f] @ normal))
        grid = np.array([float(source[f] @ normal) for f in found])
        origin = source[found[0]]
        step = slice_step([source[f] for f in found], normal)[0] if len(found) > 1 else normal
        slots, depth = regular_slots(grid) or (list(range(len(found))), len(found))  # as the image reader
        files = [""] * depth
        for f, slot in zip(found, slots):
            files[slot] = f
        if depth > len(found):
            step = (source[found[-1]] - source[found[0]]) / (depth - 1)
        index = [slots[int(np.argmin(np.abs(grid - d)))] for d in proj]
    else:
        files = []
        step = _frame_step(positions, proj, normal, measures)
        origin = positions[int(np.argmin(proj))]
        index = [int(np.round((d - proj.min()) / float(step @ normal))) for d in proj]
        depth = max(index) + 1
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = step, col * dy, row * dx, origin
    names, ids = {}, {}
    for desc in seg.SegmentSequence:
        number = int(desc.SegmentNumber)
        if number == 0:  # a label map's "background" segment
            continue
        tracking = str(getattr(desc, "TrackingID", "") or "")
        label = int(tracking[len(_TRACKING_PREFIX):]) if tracking.startswith(_TRACKING_PREFIX) else number
        ids[number], names[label] = label, str(getattr(desc, "SegmentLabel", f"segment {number}"))
    biggest = max(ids.values(), default=0)
    dtype = np.uint8 if biggest < 256 else np.uint16 if biggest < 65536 else np.uint32
    labels = np.zeros((depth, *pixels.shape[1:]), dtype)
    overlap = 0
    if labelmap:  # one frame per slice, pixel value = segment number
        lut = np.zeros(max([*ids, int(pixels.max())]) + 1, labels.dtype)
        for number, label in ids.items():
            lut[number] = label
        for i in range(n):
            frame = pixels[i].astype(np.int64)
            labels[index[i]][frame > 0] = lut[frame[frame > 0]]
        numbers = []
    for i in np.argsort(numbers, kind="stable"):  # a higher segment number wins an overlap
        mask = pixels[i].astype(bool)
        view = labels[index[i]]
        overlap += int(np.count_nonzero(mask & (view != 0)))
        view[mask] = ids.get(numbers[i], numbers[i])
    if overlap:
        problems.append(f"{overlap} pixels belong to more than one segment; the higher segment number was kept")
    referenced = getattr(seg, "ReferencedSeriesSequence", None)
    return SegVolume(
        labels=labels, affine_lps=affine, names=names, series_uid=str(getattr(seg, "SeriesInstanceUID", "")),
        referenced_series_uid=str(referenced[0].SeriesInstanceUID) if referenced else "",
        source_files=files, warnings=problems,
    )


def read_dicom_seg(path, source_files: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM-SEG back onto its source series: ``(labels (Z, Y, X), names)``, slices in
    the order of ``source_files``; label ids restored from the tracking IDs we write."""
    vol = read_seg(path, source_files)
    if not vol.source_files:
        raise ValueError(f"{path} does not reference the given source images (or not all of them)")
    order = {f: i for i, f in enumerate(vol.source_files)}
    wanted = [order[f] for f in source_files]
    return vol.labels[wanted], vol.names


@napari_writer
def napari_write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a labels layer drawn on a DICOM series → DICOM-SEG referencing it."""
    dicom = (meta.get("metadata") or {}).get("dicom") or {}
    files = dicom.get("files")
    if not files:
        raise ValueError(
            "this labels layer has no DICOM source series (metadata['dicom']['files']); "
            "DICOM-SEG needs the series it was drawn on: open the series with this plugin and "
            "draw the labels with the SAM Labeler, or save as NIfTI/OME-TIFF instead"
        )
    return [write_dicom_seg(path, np.asarray(data), files, series_description=f"{meta.get('name', 'labels')}")]
