"""(OME-)TIFF with physical pixel sizes and axes (tifffile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._fileio import atomic_write, storable_labels, napari_writer


def write_ome_tiff(path, data, *, spacing_zyx=(1.0, 1.0, 1.0), axes: str | None = None, unit: str = "µm") -> str:
    """Write ``data`` as OME-TIFF with PhysicalSize{Z,Y,X}; atomic (temporary + rename)."""
    import tifffile

    data = np.asarray(data)
    axes = axes or {2: "YX", 3: "ZYX", 4: "ZYXC"}.get(data.ndim)
    if axes is None:
        raise ValueError(f"cannot guess axes for data of shape {data.shape}; pass axes=")
    spacing = [float(v) for v in spacing_zyx][-3:]
    dz, dy, dx = [1.0] * (3 - len(spacing)) + spacing
    metadata = {"axes": axes, "PhysicalSizeX": dx, "PhysicalSizeY": dy, "PhysicalSizeXUnit": unit,
                "PhysicalSizeYUnit": unit}
    if "Z" in axes:
        metadata.update(PhysicalSizeZ=dz, PhysicalSizeZUnit=unit)
    with atomic_write(path, suffix=".ome.tif") as tmp:
        tifffile.imwrite(tmp, data, ome=True, metadata=metadata, compression="zlib",
                         photometric="minisblack")
    return str(path)


def read_tiff(path):
    """Read a TIFF lazily with its axes and physical scale.

    Returns ``(data, axes, scale)``: ``data`` is a memory map when the file allows it,
    else a zarr array over tifffile's store (nothing is loaded); ``scale`` has one entry
    per axis (physical size for Z/Y/X from OME or ImageJ metadata, 1 otherwise).
    """
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        sizes = {"X": 1.0, "Y": 1.0, "Z": 1.0}
        if tif.is_ome and tif.ome_metadata:
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
            for ax in "XYZ":
                if f"PhysicalSize{ax}" in pixels:
                    sizes[ax] = float(pixels[f"PhysicalSize{ax}"])
        elif tif.is_imagej:
            ij = tif.imagej_metadata or {}
            page = tif.pages[0]
            if "XResolution" in page.tags:
                num, den = page.tags["XResolution"].value
                sizes["X"] = den / num if num else 1.0
            if "YResolution" in page.tags:
                num, den = page.tags["YResolution"].value
                sizes["Y"] = den / num if num else 1.0
            sizes["Z"] = float(ij.get("spacing", 1.0))
    try:
        data = tifffile.memmap(path, mode="r")
    except ValueError:
        data = zarr.open_array(tifffile.imread(path, aszarr=True), mode="r")
    scale = tuple(sizes.get(ax, 1.0) for ax in axes)
    return data, axes, scale


@napari_writer
def napari_write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a labels layer → OME-TIFF with the layer's scale as physical size."""
    scale = tuple(meta.get("scale") or (1.0,) * np.ndim(data))
    return [write_ome_tiff(path, storable_labels(data, f"OME-TIFF labels {path}"), spacing_zyx=scale)]


def napari_get_reader(path):
    """npe2 reader hook for OME-TIFF (None for anything else): lazy, with physical scale,
    channels split into layers and time kept as an axis."""
    if isinstance(path, (list, tuple)) or not str(path).lower().endswith((".ome.tif", ".ome.tiff")):
        return None
    return _read_layers


def _read_layers(path):
    data, axes, scale = read_tiff(path)
    axes = axes.upper()
    meta = {"name": Path(path).name.split(".ome.")[0], "metadata": {"axes": axes, "source": str(path)}}
    if "S" in axes and axes.endswith("S") and data.shape[-1] in (3, 4):
        meta["rgb"] = True
        scale = scale[:-1]
    if "C" in axes:
        c = axes.index("C")
        meta["channel_axis"] = c
        scale = scale[:c] + scale[c + 1:]
    meta["scale"] = tuple(scale)
    return [(data, meta, "image")]
