"""Committed labels kept safe as they are made, to survive a crash of napari.

Every commit (and propagation, undo, redo) through the SAM Labeler writes the touched
slices of the labels layer (the whole image for 2D) as compressed ``.npz`` files, each
written to a temporary name, flushed and renamed: a ``kill -9`` right after a commit loses
nothing. Entries live beside the embeddings (``<cache>/autosave/<key>/``), keyed by
the image's content (its shape, dtype and the pixels of up to 8 evenly spaced slices), so
that opening the same image again, from any file or path, finds them. Nothing is pickled;
a damaged file is skipped, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from ._fileio import atomic_write

FORMAT = 1
_SAMPLED_SLICES = 8


def image_key(data) -> str:
    """Content key of an image or stack (2D: every pixel; 3D: up to 8 slices, read lazily)."""
    h = hashlib.blake2b(digest_size=16)
    shape = tuple(int(n) for n in data.shape)
    h.update(f"autosave-v{FORMAT}|{shape}|{np.dtype(data.dtype).newbyteorder('=').str}|".encode())
    if len(shape) >= 3 and not (len(shape) == 3 and shape[-1] in (3, 4)):
        picks = np.unique(np.linspace(0, shape[0] - 1, min(_SAMPLED_SLICES, shape[0])).round().astype(int))
        planes = [np.asarray(data[int(z)]) for z in picks]
    else:
        planes = [np.asarray(data)]
    for plane in planes:
        plane = np.ascontiguousarray(plane)
        if not plane.dtype.isnative:
            plane = plane.astype(plane.dtype.newbyteorder("="))
        h.update(memoryview(plane).cast("B"))
    return h.hexdigest()


class Autosave:
    """Autosaved labels under ``root`` (default: ``autosave`` inside the embedding cache folder,
    which ``napari-sam cache clear`` leaves alone).

    Each labeling session (one labels layer in one napari session) has its own entry under
    the image's key, so a new session never overwrites what an earlier one kept, and two
    labels layers on one image never mix.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        if root is None:
            from .cache import default_cache_dir

            root = default_cache_dir() / "autosave"  # `cache clear` removes embeddings only
        self.root = Path(root)

    @staticmethod
    def new_session(tag: str = "") -> str:
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}{tag}"

    def _dir(self, key: str, session: str) -> Path:
        return self.root / key / session

    def record(self, key: str, session: str, labels, slices, *, image_name: str = "", labels_name: str = "") -> None:
        """Save ``labels`` at ``slices`` (indices along axis 0; None for a 2D image)."""
        folder = self._dir(key, session)
        folder.mkdir(parents=True, exist_ok=True)
        for z in ([None] if slices is None else sorted({int(s) for s in slices})):
            plane = np.asarray(labels if z is None else labels[z])
            name = "image.npz" if z is None else f"z{z:06d}.npz"
            with atomic_write(folder / name, suffix=".npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, labels=plane, z=np.int64(-1 if z is None else z))
                    fh.flush()
                    os.fsync(fh.fileno())
        meta = {"format": FORMAT, "image": image_name, "labels": labels_name, "time": time.time(),
                "shape": list(np.shape(labels)), "dtype": np.dtype(labels.dtype).str, "session": session}
        with atomic_write(folder / "meta.json", suffix=".json") as tmp:
            tmp.write_text(json.dumps(meta))

    def sessions(self, key: str) -> list[dict]:
        """The sessions kept for ``key``, newest first (each: names, time, shape, slices)."""
        out = []
        for folder in (self.root / key).glob("*") if (self.root / key).is_dir() else []:
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            files = list(folder.glob("*.npz"))
            if files and meta.get("format") == FORMAT:
                meta["session"], meta["slices"] = folder.name, len(files)
                out.append(meta)
        return sorted(out, key=lambda m: -float(m.get("time", 0)))

    def available(self, key: str, exclude=()) -> dict | None:
        """The newest session kept for ``key`` other than ``exclude``, or None."""
        return next((m for m in self.sessions(key) if m["session"] not in set(exclude)), None)

    def saved_slices(self, key: str, session: str) -> list[int]:
        """Slices saved for a stack (empty for a 2D image or nothing saved)."""
        return sorted(int(p.stem[1:]) for p in self._dir(key, session).glob("z*.npz") if p.stem[1:].isdigit())

    def restore(self, key: str, session: str) -> np.ndarray | None:
        """A session's labels: every saved slice in place, zeros elsewhere (None if nothing)."""
        meta = next((m for m in self.sessions(key) if m["session"] == session), None)
        if meta is None:
            return None
        labels = np.zeros(meta["shape"], np.dtype(meta["dtype"]))
        for path in sorted(self._dir(key, session).glob("*.npz")):
            try:
                with np.load(path, allow_pickle=False) as saved:
                    plane, z = saved["labels"], int(saved["z"])
            except (OSError, ValueError, KeyError):
                continue  # damaged: skipped, never trusted
            if z < 0 and plane.shape == labels.shape:
                labels[...] = plane
            elif 0 <= z < labels.shape[0] and plane.shape == labels.shape[1:]:
                labels[z] = plane
        return labels

    def discard(self, key: str, session: str) -> None:
        shutil.rmtree(self._dir(key, session), ignore_errors=True)
        try:
            (self.root / key).rmdir()  # the image's folder, once empty
        except OSError:
            pass
