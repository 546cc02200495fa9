"""Embedding cache: a memory LRU in front of an on-disk zarr store.

Each 2D slice's embedding is computed once, ever: the key is a content hash of the
slice's pixels plus the model identity (weights fingerprint, input convention, dtype)
plus the intensity mapping, so the same data reopened from napari, a notebook or the CLI
hits the cache, and changed data or contrast misses it.

On disk every entry is one zarr array (float16, about 2 MiB for a ViT-L slice) whose
attributes hold the geometry, mapping and a SHA-256 of the stored bytes. Entries are
written to a temporary folder and renamed into place (atomic), and verified on every
read: a truncated or corrupt entry is deleted, recomputed and never served. Nothing is
pickled. The store has a size cap; the least recently used entries are evicted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends import cache_name
from ._types import ImageEmbedding, IntensityMapping, ModelInputSpec

CACHE_ENV = "NAPARI_SAM_CACHE"
FORMAT_VERSION = 1


class CacheWarning(UserWarning):
    """The disk cache cannot be used as asked (the work goes on without it)."""


def _zarr_v2_kwargs() -> dict:
    """What makes zarr 3 write zarr's v2 format (zarr 2 writes nothing else)."""
    import zarr

    return {"zarr_format": 2} if int(zarr.__version__.split(".")[0]) >= 3 else {}

DEFAULT_MEMORY_BYTES = 512 * 2**20
DEFAULT_DISK_BYTES = 20 * 2**30
_TMP = ".tmp"


def default_cache_dir() -> Path:
    """``$NAPARI_SAM_CACHE``, else the platform's user cache folder (platformdirs)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-sam-labeler")) / "embeddings"


def slice_key(image: np.ndarray, model_key: str, mapping: IntensityMapping) -> str:
    """The cache key of one 2D image: pixels + model identity + intensity mapping.

    Equal pixel values give equal keys whatever the memory layout or byte order (a
    big-endian TIFF read memory-mapped and the same file read into memory)."""
    data = np.ascontiguousarray(image)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{FORMAT_VERSION}|{data.shape}|{data.dtype.str}|{model_key}|{mapping.key()}|".encode())
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()


def engine_cache_key(engine) -> str:
    """Model identity for cache keys: weights fingerprint, input convention and the
    encoder's precision (fp32 from every backend agrees to 2e-6 and shares keys;
    :func:`napari_sam.backends.cache_name`)."""
    return f"{engine.model_id}|{cache_name(engine.backend, engine.precision)}"


@dataclass
class CacheStats:
    directory: str
    entries: int
    bytes: int
    models: dict


class EmbeddingCache:
    """Memory LRU (byte budget) backed by a zarr store on disk (size cap, LRU eviction).

    Parameters
    ----------
    directory : path, optional
        Root of the disk store; default :func:`default_cache_dir`. ``False`` keeps the
        cache in memory only.
    memory_bytes : int
        Budget for embeddings kept in memory (on the engine's device).
    disk_bytes : int
        Cap for the disk store; least recently used entries are removed beyond it.
    """

    def __init__(self, directory=None, *, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 disk_bytes: int = DEFAULT_DISK_BYTES):
        self.directory = None if directory is False else Path(directory or default_cache_dir())
        self.memory_bytes = int(memory_bytes)
        self.disk_bytes = int(disk_bytes)
        self._memory: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._memory_used = 0
        self._disk_used: int | None = None
        self._lock = threading.RLock()  # the widget reads from the GUI thread while workers write
        self.hits = self.misses = self.corrupt = self.unreadable = 0
        self._warned = False
        self._pending: dict[str, ImageEmbedding] = {}  # written in the background, not yet on disk
        self._writes: list = []
        self._writer = None

    # --- keys and paths ---------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.zarr"

    # --- memory -----------------------------------------------------------------------

    @staticmethod
    def _nbytes(embedding: ImageEmbedding) -> int:
        f = embedding.features
        return int(f.numel() * f.element_size())

    def _remember(self, key: str, embedding: ImageEmbedding) -> None:
        with self._lock:
            self._remember_locked(key, embedding)

    def _remember_locked(self, key: str, embedding: ImageEmbedding) -> None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        size = self._nbytes(embedding)
        if size > self.memory_bytes:
            return
        self._memory[key] = embedding
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= self._nbytes(old)

    # --- public API -------------------------------------------------------------------

    def get(self, key: str, engine) -> ImageEmbedding | None:
        """The embedding stored under ``key``, on ``engine``'s device and dtype, or None."""
        with self._lock:
            emb = self._memory.get(key)
            if emb is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return emb
            emb = self._pending.get(key)
            if emb is not None:
                self.hits += 1
                return emb
        if self.directory is not None:
            emb = self._read(key, engine)
            if emb is not None:
                self.hits += 1
                self._remember(key, emb)
                return emb
        self.misses += 1
        return None

    def put(self, key: str, embedding: ImageEmbedding, *, wait: bool = True) -> None:
        """Store ``embedding`` in memory and (atomically) on disk.

        The disk store is an optimisation: when it cannot be written (read-only folder,
        full disk, permissions) one ``CacheWarning`` says so and the work goes on.
        ``wait=False`` writes on the cache's writer thread (one write at a time, in
        order) while the caller goes on, e.g. encoding the next slice; the entry can be
        read at once, and :meth:`flush` waits until it is on disk."""
        self._remember(key, embedding)
        if self.directory is None or self._path(key).exists():
            return
        if wait:
            self._write_or_warn(key, embedding)
            return
        with self._lock:
            self._pending[key] = embedding
            if self._writer is None:
                from concurrent.futures import ThreadPoolExecutor

                # not a daemon: writes still running when Python exits are finished
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-sam-cache-writer")
            self._writes.append(self._writer.submit(self._write_pending, key, embedding))

    def flush(self, keep: int = 0) -> None:
        """Wait for background writes until at most ``keep`` are still running; an
        unexpected error in one of them is raised here."""
        while True:
            with self._lock:
                if len(self._writes) <= keep:
                    return
                oldest = self._writes.pop(0)
            oldest.result()

    def _write_pending(self, key: str, embedding: ImageEmbedding) -> None:
        try:
            self._write_or_warn(key, embedding)
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _write_or_warn(self, key: str, embedding: ImageEmbedding) -> None:
        try:
            self._write(key, embedding)
        except OSError as exc:
            self._warn_once(f"embedding cache {self.directory} cannot be written ({exc}); "
                            "embeddings are kept in memory only")

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, CacheWarning, stacklevel=3)

    def contains(self, key: str) -> bool:
        """Whether ``key`` is present (memory or disk), without verifying or loading it."""
        return (key in self._memory or key in self._pending
                or (self.directory is not None and self._path(key).exists()))

    # --- disk -------------------------------------------------------------------------

    def _write(self, key: str, embedding: ImageEmbedding) -> None:
        import zarr

        features = embedding.features.detach().float().cpu().numpy()
        if features.shape[0] != 1:
            raise ValueError(f"one embedding per entry; got features of shape {features.shape}")
        stored = features[0].astype(np.float16)
        attrs = {
            "format": FORMAT_VERSION,
            "sha256": hashlib.sha256(stored.tobytes()).hexdigest(),
            "shape": list(stored.shape),
            "original_size": list(embedding.original_size),
            "input_size": list(embedding.input_size),
            "spec": asdict(embedding.spec),
            "mapping": asdict(embedding.mapping),
            "model_id": embedding.model_id,
        }
        final = self._path(key)
        tmp_root = self.directory / _TMP
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.zarr"
        try:
            # zarr's v2 on-disk format: zarr 2 and zarr 3 (both allowed) read it, so one cache
            # folder serves both installs
            arr = zarr.open_array(store=str(tmp), mode="w", shape=stored.shape, dtype="float16",
                                  chunks=stored.shape, **_zarr_v2_kwargs())
            arr[...] = stored
            arr.attrs.update(attrs)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)  # atomic on one filesystem
            except OSError:
                if not final.exists():  # not a lost race with another writer
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if self._disk_used is not None:
            self._disk_used += _tree_size(final)
        self._evict()

    def _read(self, key: str, engine) -> ImageEmbedding | None:
        import torch
        import zarr

        path = self._path(key)
        if not path.exists():
            return None
        if (path / "zarr.json").exists() and int(zarr.__version__.split(".")[0]) < 3:
            self.unreadable += 1  # zarr's v3 format, from another install: skipped, never deleted
            return None
        try:
            arr = zarr.open_array(store=str(path), mode="r")
            attrs = dict(arr.attrs)
            stored = np.asarray(arr[...])
            ok = (
                attrs.get("format") == FORMAT_VERSION
                and list(stored.shape) == attrs.get("shape")
                and stored.dtype == np.float16
                and hashlib.sha256(stored.tobytes()).hexdigest() == attrs.get("sha256")
            )
            if ok:
                spec = ModelInputSpec(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in attrs["spec"].items()})
                m = attrs["mapping"]
                mapping = IntensityMapping(m["mode"], tuple(m["lows"]), tuple(m["highs"]),
                                           m["channel"], m["label"], bool(m.get("invert", False)))
        except Exception:  # unreadable metadata or chunks: treated as corrupt below
            ok = False
        if not ok:
            self.corrupt += 1
            shutil.rmtree(path, ignore_errors=True)
            return None
        try:
            os.utime(path)  # recency for LRU eviction
        except OSError:  # a read-only cache still serves what it holds
            pass
        features = torch.from_numpy(stored[None]).to(device=engine.device, dtype=engine.dtype)
        return ImageEmbedding(
            features=features,
            original_size=tuple(attrs["original_size"]),
            input_size=tuple(attrs["input_size"]),
            spec=spec,
            mapping=mapping,
            model_id=attrs["model_id"],
        )

    def _entries(self):
        if self.directory is None or not self.directory.exists():
            return []
        return [p for p in self.directory.glob("??/*.zarr") if p.is_dir()]

    def _evict(self) -> None:
        if self._disk_used is None:
            self._disk_used = sum(_tree_size(p) for p in self._entries())
        if self._disk_used <= self.disk_bytes:
            return
        entries = sorted(self._entries(), key=lambda p: p.stat().st_mtime)
        for path in entries:
            if self._disk_used <= self.disk_bytes:
                break
            size = _tree_size(path)
            shutil.rmtree(path, ignore_errors=True)
            self._disk_used -= size

    def stats(self) -> CacheStats:
        """Entries and bytes on disk, per model."""
        import zarr

        models: dict[str, int] = {}
        total = 0
        entries = self._entries()
        for path in entries:
            total += _tree_size(path)
            try:
                model = str(zarr.open_array(store=str(path), mode="r").attrs.get("model_id", "?"))
            except Exception:  # a damaged entry is reported, and dropped on its next read
                model = "unreadable"
            models[model] = models.get(model, 0) + 1
        return CacheStats(str(self.directory), len(entries), total, models)

    def clear(self) -> int:
        """Delete every entry (and stale temporary files); returns the number removed."""
        with self._lock:
            self._memory.clear()
            self._memory_used = 0
        entries = self._entries()
        for path in entries:
            shutil.rmtree(path, ignore_errors=True)
        if self.directory is not None:
            shutil.rmtree(self.directory / _TMP, ignore_errors=True)
        self._disk_used = 0
        return len(entries)

    def clean_temporary(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary folders left by writers that were killed mid-write."""
        if self.directory is None:
            return 0
        tmp_root = self.directory / _TMP
        removed = 0
        now = time.time()
        for path in tmp_root.glob("*") if tmp_root.exists() else []:
            if now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        return removed


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


__all__ = ["EmbeddingCache", "default_cache_dir", "slice_key", "engine_cache_key", "CACHE_ENV"]
