"""Small file helpers shared by every writer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cannot_write(folder) -> str | None:
    """Why a file cannot be created in ``folder`` (None when it can): tried, not guessed from
    permission bits (root, read-only mounts and immutable folders all answer truthfully)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextmanager
def atomic_write(path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Readers never see a half-written file, and a failed write leaves the old file alone.
    ``suffix`` keeps the extension some writers dispatch on (``.nii.gz``, ``.ome.tif``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def storable_labels(data, what: str):
    """Labels of any integer or bool dtype as the smallest unsigned type that holds the ids.

    napari, numpy and NIfTI readers often give int64 or int32 labels that file formats refuse
    (nibabel rejects int64; OME has no 64-bit integers). Refused, with the id named: negative
    ids, ids beyond 32 bits, and non-integer values.
    """
    import numpy as np

    data = np.asarray(data)
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype.kind == "f" and data.size and np.array_equal(data, np.round(data)):
        data = data.astype(np.int64)
    if data.dtype.kind not in "iu":
        raise ValueError(f"{what}: labels must be integers (label ids); got {data.dtype}")
    if data.size == 0:
        return data.astype(np.uint8)
    low, high = int(data.min()), int(data.max())
    if low < 0:
        raise ValueError(f"{what}: label id {low} is negative; ids are 0 (background) or positive")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if high <= np.iinfo(dtype).max:
            return data.astype(dtype, copy=False)
    raise ValueError(f"{what}: label id {high} does not fit in 32 bits (the largest storable id is {2**32 - 1})")


class LabelsWriteError(RuntimeError):
    """A labels writer's own reason for refusing, for napari to show.

    napari reads a ``ValueError`` from a writer as "this writer does not apply" and tells
    the user only "not a valid writer"; this type reaches the user with its message.
    """


def napari_writer(write):
    """Wrap an npe2 writer so that its refusals reach the user (see LabelsWriteError)."""
    import functools

    @functools.wraps(write)
    def wrapper(path, data, meta):
        try:
            return write(path, data, meta)
        except (ValueError, ImportError) as exc:
            raise LabelsWriteError(f"could not save {path}: {exc}") from exc

    return wrapper
