"""Where a layer sits in napari's world, and where napari actually draws it.

Medical layers carry their full patient-space placement (``napari_sam.io._geometry``):
an oblique series has an ``affine`` whose slice axis is tilted against napari's slicing
axis. napari draws such a layer slice by slice *without* the out-of-slice tilt (it warns
"non-orthogonal slicing"): slice ``k`` is the one whose index napari computes from the
world z alone, and its pixels are placed by the in-plane part of the transform. A click
is converted by napari with the full inverse, which puts the point off the slice it was
clicked on. So the plugin's own layers (points, boxes, preview) use the *drawn*
transform: what the user sees is what SAM gets. For axis-aligned layers the drawn
transform is the layer's own.
"""

from __future__ import annotations

import numpy as np


def world_matrix(layer) -> np.ndarray:
    """The layer's (n+1)² data → world matrix, read through napari's public API."""
    n = layer.ndim
    origin = np.asarray(layer.data_to_world(np.zeros(n)), float)
    out = np.eye(n + 1)
    for axis in range(n):
        unit = np.zeros(n)
        unit[axis] = 1.0
        out[:n, axis] = np.asarray(layer.data_to_world(unit), float) - origin
    out[:n, n] = origin
    return out


def placement(layer) -> dict:
    """Keyword arguments that give a new layer exactly ``layer``'s placement."""
    return {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "affine": np.asarray(layer.affine.affine_matrix),
        "units": tuple(layer.units),
    }


def drawn_matrix(layer) -> np.ndarray:
    """The transform napari draws ``layer`` with in 2D slicing (block-diagonal: the slice
    index from world z alone, pixels from the in-plane part); equal to the layer's own
    transform when that is axis-aligned, and for 2D layers."""
    full = world_matrix(layer)
    n = layer.ndim
    if n != 3 or _block_diagonal(full):
        return full
    inverse = np.linalg.inv(full)
    drawn = np.eye(4)
    # slice axis: napari takes world z -> data z from the inverse, restricted to axis 0
    drawn[0, 0] = 1.0 / inverse[0, 0]
    drawn[0, 3] = -inverse[0, 3] / inverse[0, 0]
    # in-plane: napari draws the slice with the forward transform restricted to (y, x)
    drawn[1:3, 1:3] = full[1:3, 1:3]
    drawn[1:3, 3] = full[1:3, 3]
    return drawn


def drawn_placement(layer) -> dict:
    """Keyword arguments for the plugin's own layers: ``layer`` as napari draws it."""
    if layer.ndim != 3 or _block_diagonal(world_matrix(layer)):
        return placement(layer)
    return {"scale": (1.0, 1.0, 1.0), "translate": (0.0, 0.0, 0.0), "rotate": np.eye(3),
            "shear": np.zeros(3), "affine": drawn_matrix(layer), "units": tuple(layer.units)}


def world_to_drawn_data(layer, world: np.ndarray) -> np.ndarray:
    """World points (N, n) → ``layer``'s data coordinates as drawn (see module doc)."""
    world = np.atleast_2d(np.asarray(world, float))
    inverse = np.linalg.inv(drawn_matrix(layer))
    homogeneous = np.hstack([world, np.ones((len(world), 1))])
    return (homogeneous @ inverse.T)[:, :-1]


def _block_diagonal(matrix: np.ndarray, tol: float = 1e-9) -> bool:
    scale = max(float(np.abs(matrix[:3, :3]).max()), 1.0)
    return bool(np.all(np.abs(matrix[0, 1:3]) <= tol * scale) and np.all(np.abs(matrix[1:3, 0]) <= tol * scale))
