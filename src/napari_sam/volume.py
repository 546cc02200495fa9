"""3D stacks: one slice at a time, embedded once, through the cache.

A :class:`Stack` wraps (Z, Y, X), (Z, Y, X, C) or (T, Y, X) data along a chosen axis. It
reads one slice at a time (``np.asarray(data[index])``), so dask arrays, zarr arrays and
memory-mapped TIFFs are never loaded whole and memory stays flat as the stack grows. One
intensity mapping is resolved for the whole stack, so every slice is encoded with the
same contrast (and hits the same cache keys from napari, notebooks or the CLI).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from . import preprocess as pp
from ._types import ImageEmbedding, IntensityMapping
from .cache import EmbeddingCache, engine_cache_key, slice_key
from .engine import drain


def embed_cached_steps(engine, image, *, mapping: IntensityMapping, cache: EmbeddingCache):
    """:meth:`SamEngine.embed_steps` through ``cache``: the one place the two meet.

    A generator: yields the encoder's ``(done, total)`` progress when the embedding has to
    be computed (nothing when the cache has it) and returns the :class:`ImageEmbedding`,
    which is stored in the cache after computing. The cache itself only stores.
    """
    image = np.asarray(image)
    key = slice_key(image, engine_cache_key(engine), mapping)
    emb = cache.get(key, engine)
    if emb is None:
        emb = yield from engine.embed_steps(image, mapping=mapping)
        cache.put(key, emb)
    return emb


def embed_cached(engine, image, *, mapping: IntensityMapping, cache: EmbeddingCache) -> ImageEmbedding:
    """``engine.embed(image, mapping=mapping)`` served from ``cache`` when present (see above)."""
    return drain(embed_cached_steps(engine, image, mapping=mapping, cache=cache))


@dataclass
class StackProgress:
    """One step of :meth:`Stack.encode`.

    ``done`` of ``total`` slices are embedded; ``index`` is the slice concerned and
    ``cached`` whether it came from the cache. Steps with ``fraction`` < 1 report the
    encoder's progress inside the current batch (so a cancel takes effect between
    encoder blocks, not only between slices).
    """

    done: int
    total: int
    index: int
    cached: bool
    fraction: float = 1.0


class Stack:
    """A 3D (or 3D + channels) array seen as a sequence of 2D slices.

    Parameters
    ----------
    data : array-like
        numpy, dask, zarr or memory-mapped array, 3D, or 4D with channels last.
    axis : int
        The slice axis (0 for Z or T). Channels, if any, must be the last axis.
    mapping : IntensityMapping, optional
        A mapping to use; else resolved once from the whole stack with ``intensity``.
    **intensity
        ``window``, ``preset``, ``percentiles``, ``channel`` (see
        :func:`napari_sam.preprocess.resolve_intensity`).
    """

    def __init__(self, data, *, axis: int = 0, mapping: IntensityMapping | None = None, **intensity):
        if not hasattr(data, "shape") or not hasattr(data, "dtype"):
            data = np.asarray(data)
        ndim = len(data.shape)
        if ndim not in (3, 4):
            raise ValueError(
                f"a stack must be 3D (Z, Y, X) or 4D (Z, Y, X, C); got shape {tuple(data.shape)}"
            )
        if ndim == 4 and data.shape[-1] > pp.MAX_CHANNELS:
            raise ValueError(
                f"4D data of shape {tuple(data.shape)}: the last axis must be channels "
                f"(at most {pp.MAX_CHANNELS}); pick one 3D volume first"
            )
        spatial = ndim - 1 if ndim == 4 else ndim
        if not -spatial <= axis < spatial:
            raise ValueError(f"axis={axis} is out of range for a stack of shape {tuple(data.shape)}")
        self.data = data
        self.axis = axis % spatial
        self.multichannel = ndim == 4
        if 0 in data.shape:
            raise ValueError(f"stack is empty (shape {tuple(data.shape)})")
        if mapping is None:
            mapping = pp.resolve_intensity(data, multichannel=self.multichannel, **intensity)
        self.mapping = mapping

    def __len__(self) -> int:
        return int(self.data.shape[self.axis])

    @property
    def slice_shape(self) -> tuple[int, int]:
        spatial = [s for i, s in enumerate(self.data.shape[: 3]) if i != self.axis]
        return int(spatial[0]), int(spatial[1])

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """Shape of a labels volume for this stack (channels dropped)."""
        return tuple(int(s) for s in self.data.shape[:3])

    def labels_index(self, z: int) -> tuple:
        """The index tuple that selects slice ``z`` of a labels volume."""
        self.index(z)
        idx = [slice(None)] * 3
        idx[self.axis] = int(z)
        return tuple(idx)

    def index(self, z: int) -> tuple:
        """The index tuple that selects slice ``z`` of the data."""
        if not 0 <= z < len(self):
            raise IndexError(f"slice {z} is out of range for a stack of {len(self)} slices")
        idx = [slice(None)] * len(self.data.shape)
        idx[self.axis] = int(z)
        return tuple(idx)

    def __getitem__(self, z: int) -> np.ndarray:
        """Slice ``z`` as a numpy array (only that slice is read)."""
        return np.asarray(self.data[self.index(z)])

    def key(self, z: int, engine) -> str:
        return slice_key(self[z], engine_cache_key(engine), self.mapping)

    # --- embeddings -------------------------------------------------------------------

    def embedding(self, z: int, engine, cache: EmbeddingCache | None = None) -> ImageEmbedding:
        """The embedding of slice ``z`` (from the cache when present)."""
        image = self[z]
        if cache is None:
            return engine.embed(image, mapping=self.mapping)
        return embed_cached(engine, image, mapping=self.mapping, cache=cache)

    def encode(
        self,
        engine,
        cache: EmbeddingCache,
        indices: Iterable[int] | None = None,
        *,
        batch_size: int | str = "auto",
    ) -> Iterator[StackProgress]:
        """Embed slices into ``cache``, yielding progress after each slice.

        Only slices not yet cached are encoded, ``batch_size`` at a time; stop iterating
        to cancel (what is done stays cached, so a later run resumes). Embeddings are not
        kept by the generator: memory does not grow with the number of slices. Each
        batch's disk writes run while the next batch encodes; when the generator ends
        (finished, failed or cancelled) every encoded slice is on disk.

        Parameters
        ----------
        indices : iterable of int, optional
            Slices to encode (a range, or just the slice on screen); default all.
        batch_size : int or "auto"
            Slices per encoder call (more uses more memory, may be faster on a GPU).
            ``"auto"``: :meth:`SamEngine.suggested_batch_size` before each call (1 on CPUs;
            on CUDA what fits in free memory, measured on the first slice).
        """
        auto = isinstance(batch_size, str) and batch_size.strip().lower() == "auto"
        if not auto and (isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer)
                         or batch_size < 1):
            raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got {batch_size!r}")
        order = list(range(len(self))) if indices is None else [int(i) for i in indices]
        for z in order:
            self.index(z)  # validates
        total = len(order)
        model_key = engine_cache_key(engine)
        done = 0
        pending: list[tuple[int, np.ndarray, str]] = []
        try:
            for z in order:
                image = self[z]
                key = slice_key(image, model_key, self.mapping)
                if cache.get(key, engine) is not None:
                    done += 1
                    yield StackProgress(done, total, z, True)
                    continue
                pending.append((z, image, key))
                if len(pending) >= (_suggested_batch_size(engine) if auto else batch_size):
                    yield from self._encode_batch(engine, cache, pending, done, total)
                    done += len(pending)
                    pending = []
            if pending:
                yield from self._encode_batch(engine, cache, pending, done, total)
        finally:
            cache.flush()  # finished, failed or cancelled: what was encoded is on disk

    def _encode_batch(self, engine, cache, pending, done, total):
        rgbs = [pp.to_rgb_uint8(image, self.mapping) for _, image, _ in pending]
        steps = engine.encode_steps(rgbs)
        while True:
            try:
                step, of = next(steps)
            except StopIteration as stop:
                features = stop.value
                break
            if step < of:
                yield StackProgress(done, total, pending[0][0], False, step / of)
        # Disk writes run on the cache's writer thread while the next batch encodes; the
        # previous batch's writes are waited for here, so one batch's writes at most are
        # pending at a time.
        cache.flush(keep=0)
        for j, (z, image, key) in enumerate(pending):
            cache.put(key, engine.embedding_from(features[j:j + 1].clone(), self.slice_shape, self.mapping),
                      wait=False)
            yield StackProgress(done + j + 1, total, z, False)


def _suggested_batch_size(engine) -> int:
    suggest = getattr(engine, "suggested_batch_size", None)  # stand-in engines may lack it
    return int(suggest()) if suggest is not None else 1
