"""(OME-)TIFF with physical pixel sizes and axes (tifffile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._units import common_unit, layer_unit
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
    """Read a TIFF lazily with its axes and physical scale in one unit.

    Returns ``(data, axes, scale, unit)``: ``data`` is a memory map when the file allows it,
    else a zarr array over tifffile's store (nothing is loaded); ``scale`` has one entry per
    axis (physical size for Z/Y/X, 1 otherwise), all in ``unit`` (the file's unit when the
    axes share one, else µm; None when the file gives no physical size). Units come from OME
    ``PhysicalSize*Unit`` (µm by default, as OME says), ImageJ's ``unit``, or the TIFF
    ResolutionUnit (inch, cm).
    """
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        sizes, units = {}, {}
        if tif.is_ome and tif.ome_metadata:
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
            for ax in "XYZ":
                if f"PhysicalSize{ax}" in pixels:
                    sizes[ax] = float(pixels[f"PhysicalSize{ax}"])
                    units[ax] = pixels.get(f"PhysicalSize{ax}Unit", "µm")
        else:
            sizes, units = _resolution_sizes(tif)
    sizes, unit = common_unit(sizes, units)
    try:
        data = tifffile.memmap(path, mode="r")
    except ValueError:  # compressed, tiled or pyramidal: level 0 through tifffile's zarr store
        data = zarr.open_array(tifffile.imread(path, aszarr=True, level=0), mode="r")
    scale = tuple(sizes.get(ax, 1.0) for ax in axes)
    return data, axes, scale, unit


def _resolution_sizes(tif) -> tuple[dict, dict]:
    """Pixel sizes from X/YResolution (pixels per unit): ImageJ's unit, else ResolutionUnit."""
    page = tif.pages[0]
    ij = tif.imagej_metadata or {} if tif.is_imagej else {}
    unit = ij.get("unit")
    if unit is None and "ResolutionUnit" in page.tags:
        unit = {2: "inch", 3: "cm"}.get(int(page.tags["ResolutionUnit"].value))
    sizes, units = {}, {}
    for ax in "XY":
        tag = f"{ax}Resolution"
        if tag in page.tags:
            num, den = page.tags[tag].value
            if num:
                sizes[ax], units[ax] = den / num, unit
    if "spacing" in ij:
        sizes["Z"], units["Z"] = float(ij["spacing"]), unit
    return sizes, units


@napari_writer
def napari_write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 writer: a labels layer → OME-TIFF with the layer's scale as physical size, in the
    layer's unit (mm for medical layers, "pixel" for layers without one)."""
    scale = tuple(meta.get("scale") or (1.0,) * np.ndim(data))
    unit = layer_unit(meta) or "pixel"
    axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(np.ndim(data))  # labels have no channel axis
    if axes is None:
        raise ValueError(f"OME-TIFF labels are 2D to 4D (T, Z, Y, X); this layer has shape {np.shape(data)}")
    return [write_ome_tiff(path, storable_labels(data, f"OME-TIFF labels {path}"), spacing_zyx=scale,
                           axes=axes, unit=unit)]


def napari_get_reader(path):
    """npe2 reader hook for OME-TIFF (None for anything else): lazy, with physical scale,
    channels split into layers and time kept as an axis."""
    if isinstance(path, (list, tuple)) or not str(path).lower().endswith((".ome.tif", ".ome.tiff")):
        return None
    return _read_layers


def _read_layers(path):
    data, axes, scale, unit = read_tiff(path)
    axes = axes.upper()
    meta = {"name": Path(path).name.split(".ome.")[0], "metadata": {"axes": axes, "source": str(path)}}
    if "S" in axes and not axes.endswith("S"):  # colour stored as planes: samples last, as RGB
        s = axes.index("S")
        data = np.moveaxis(np.asarray(data), s, -1)
        axes, scale = axes[:s] + axes[s + 1:] + "S", scale[:s] + scale[s + 1:] + (1.0,)
    units = [unit if ax in "ZYX" and unit else "pixel" for ax in axes]
    if "S" in axes and axes.endswith("S") and data.shape[-1] in (3, 4):
        meta["rgb"] = True
        scale, units = scale[:-1], units[:-1]
    if "C" in axes:
        c = axes.index("C")
        meta["channel_axis"] = c
        scale, units = scale[:c] + scale[c + 1:], units[:c] + units[c + 1:]
    meta["scale"] = tuple(scale)
    if unit is not None:
        meta["units"] = tuple(units)
    return [(data, meta, "image")]
