"""Physical length units: one unit per layer, written back as the layer really is.

Microscopy files give each axis its own unit (OME ``PhysicalSize*Unit``, ImageJ ``unit``,
TIFF ``ResolutionUnit``); napari layers carry one scale per axis and ``units``. Readers
convert every axis to one unit (the file's, when all axes share it, else micrometres);
medical layers are in millimetres (patient space). Writers write the layer's unit.
"""

from __future__ import annotations

# length of one unit in micrometres
_MICROMETRES = {
    "m": 1e6, "meter": 1e6, "metre": 1e6, "dm": 1e5, "cm": 1e4, "centimeter": 1e4, "mm": 1e3, "millimeter": 1e3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "pm": 1e-6, "å": 1e-4, "angstrom": 1e-4, "in": 25400.0, "inch": 25400.0,
}
_CANONICAL = {1e3: "mm", 1.0: "µm", 1e-3: "nm", 1e4: "cm", 1e6: "m"}


def normalise(unit) -> str | None:
    """A unit name as this module writes it ('mm', 'µm', 'nm', ...), None if not a length."""
    if unit is None:
        return None
    text = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    for candidate in (text, text.lower()):
        if candidate in _MICROMETRES:
            return _CANONICAL.get(_MICROMETRES[candidate], candidate)
    return None


def convert(value: float, unit: str, to: str) -> float:
    """``value`` in ``unit`` expressed in ``to`` (both length units)."""
    return float(value) * _MICROMETRES[normalise(unit)] / _MICROMETRES[normalise(to)]


def common_unit(sizes: dict, units: dict) -> tuple[dict, str | None]:
    """Per-axis sizes in per-axis units → the same sizes in one unit (None: unitless)."""
    known = {ax: normalise(units.get(ax)) for ax in sizes}
    if not all(known.values()):  # none, or a mix of physical sizes and pixels: keep the numbers
        return dict(sizes), None
    named = {u for u in known.values() if u}
    target = named.pop() if len(named) == 1 else "µm"
    return {ax: convert(v, known[ax], target) if known[ax] else float(v) for ax, v in sizes.items()}, target


def layer_unit(meta: dict) -> str | None:
    """The one length unit of a layer's state (napari ``units``), None for pixels."""
    units = meta.get("units")
    if not units:
        return None
    names = {normalise(u) for u in units[-3:]}
    names.discard(None)
    return names.pop() if len(names) == 1 else None
