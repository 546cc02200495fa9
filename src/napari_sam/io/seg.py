"""DICOM-SEG out and in (highdicom, the ``medical`` extra).

A labels volume becomes one binary DICOM Segmentation that references the source
series instance by instance: one segment per label id (segment numbers 1..N in label
order), named by the caller or "label <id>", with the label id kept in the segment's
tracking ID so that reading the file back restores the same ids on the same slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .._fileio import atomic_write
from ._geometry import as_volume

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

    labels = as_volume(labels, "DICOM-SEG export")
    files = list(source_files)
    if len(files) != labels.shape[0]:
        raise ValueError(
            f"labels have {labels.shape[0]} slices but the source series has {len(files)} files; "
            "DICOM-SEG needs the labels aligned with the series they were drawn on"
        )
    sources = [pydicom.dcmread(f) for f in files]
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
        omit_empty_frames=True,
    )


def read_dicom_seg(path, source_files: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM-SEG back onto its source series.

    Returns ``(labels (Z, Y, X), names)``: label ids restored from the segments' tracking
    IDs (segment numbers otherwise), slices in the order of ``source_files``.
    """
    import pydicom

    hd = _highdicom()
    seg = hd.seg.segread(str(path))
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in source_files]
    referenced = {str(r.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    if not referenced & set(uids):
        raise ValueError(f"{path} does not reference any of the given source images")
    numbers = list(seg.segment_numbers)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, relabel=False,
        assert_missing_frames_are_empty=True,
    )
    labels = np.zeros(pixels.shape, np.uint32)
    names: dict[int, str] = {}
    for number in numbers:
        desc = seg.get_segment_description(number)
        tracking = str(getattr(desc, "tracking_id", "") or "")
        label = int(tracking[len(_TRACKING_PREFIX):]) if tracking.startswith(_TRACKING_PREFIX) else int(number)
        labels[pixels == number] = label
        names[label] = str(desc.segment_label)
    return labels, names


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
