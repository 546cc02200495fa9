"""Sample data that ships with dependencies or is synthesised: nothing is downloaded.

Each function returns napari ``LayerData`` tuples, so it serves both the npe2
``sample_data`` contribution and scripts.
"""

from __future__ import annotations

import numpy as np


def cell_image() -> np.ndarray:
    """scikit-image's bundled ``cell.png``: a cell in saline, phase contrast (660 x 550, uint8)."""
    from skimage import data

    return data.cell()


def ct_phantom(shape: tuple[int, int, int] = (24, 128, 128), seed: int = 0) -> np.ndarray:
    """A small synthetic CT volume in Hounsfield units (int16, (Z, Y, X)).

    A water-density body (0 HU) in air (-1000 HU) holding a liver-like organ (60 HU), a
    kidney-like organ (30 HU) and a bone-like ring (700 HU), with mild noise: enough
    structure for prompts, windowing and propagation to be tried without patient data.
    """
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), np.linspace(-1, 1, shape[2]),
        indexing="ij",
    )
    vol = np.full(shape, -1000.0)
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    vol[body] = 0.0
    vol[((z / 0.9) ** 2 + ((y + 0.1) / 0.35) ** 2 + ((x + 0.35) / 0.3) ** 2) < 1] = 60.0
    vol[((z / 0.6) ** 2 + ((y - 0.2) / 0.2) ** 2 + ((x - 0.45) / 0.15) ** 2) < 1] = 30.0
    r = np.sqrt((y - 0.45) ** 2 + x**2)
    vol[(r > 0.1) & (r < 0.18)] = 700.0
    vol += np.random.default_rng(seed).normal(0, 10, shape)
    return vol.astype(np.int16)


def cell_2d():
    """napari sample: the 2D microscopy image."""
    return [(cell_image(), {"name": "cell (scikit-image)"}, "image")]


def phantom_3d():
    """napari sample: the synthetic CT volume, shown with an abdomen window."""
    vol = ct_phantom()
    meta = {
        "name": "CT phantom (HU)",
        "scale": (2.5, 1.0, 1.0),
        "contrast_limits": (40 - 200, 40 + 200),
        "colormap": "gray",
    }
    return [(vol, meta, "image")]


def ct_phantom_dicom():
    """napari sample: the CT phantom written as a real DICOM series and read back.

    The layer carries the series' geometry and files, so labels drawn on it can be saved
    as DICOM-SEG or NIfTI. The files are written once into one folder per user in the
    temporary directory and reused (each opening used to leave a new folder behind).
    """
    import os
    import shutil
    import tempfile

    from .io.dicom import read_dicom_series, write_dicom_series

    import getpass

    uid = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    folder = os.path.join(tempfile.gettempdir(), f"napari-sam-ct-phantom-dicom-v1-{uid}")
    try:
        vol = read_dicom_series(folder)
        if vol.data.shape != ct_phantom().shape:
            raise ValueError("not the phantom")
    except Exception:  # noqa: BLE001 - absent, partial or foreign: write it afresh
        tmp = tempfile.mkdtemp(prefix="napari-sam-ct-phantom-")
        write_dicom_series(tmp, ct_phantom(), spacing=(2.5, 1.5, 1.5), origin=(-96.0, -96.0, -30.0))
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put one there first (or the name is taken): use ours
            folder = tmp
        vol = read_dicom_series(folder)
    return [(vol.data, vol.layer_metadata(), "image")]
