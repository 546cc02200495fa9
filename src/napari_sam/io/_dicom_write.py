"""Write a HU volume as an axial CT series (the bundled DICOM sample, tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
