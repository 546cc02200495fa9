"""Running independent jobs here or on a Dask distributed cluster (the ``distributed`` extra).

A job is a plain top-level function and small arguments (paths, prompts, settings): no
array and no model travels in the task graph. Each process that runs jobs loads the
model once (:func:`worker_engine` keeps it per process) and writes into the shared cache
and output folders, so a run on a cluster produces the files a local run produces.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ._modelstack import quiet_transformers
from .api import EmbeddingCache, load_model

# per process: (model, device, dtype, backend) -> engine; directory -> cache
_ENGINES: dict[tuple, Any] = {}
_CACHES: dict[str, EmbeddingCache] = {}


@dataclass(frozen=True)
class ModelSettings:
    """What each worker needs to load the model and open the cache (all plain values)."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    compile: bool = False
    cache: str | None = None  # folder; None = the default cache; "" = no cache


def worker_engine(settings: ModelSettings):
    """The engine for ``settings``, loaded once per process."""
    key = (settings.model, settings.device, settings.dtype, settings.backend, settings.compile)
    if key not in _ENGINES:
        quiet_transformers(errors_only=False)  # its bar would break into the batch's own
        _ENGINES[key] = load_model(settings.model, device=settings.device, dtype=settings.dtype,
                                   backend=settings.backend, compile=settings.compile)
    return _ENGINES[key]


def worker_cache(settings: ModelSettings) -> EmbeddingCache | None:
    """The embedding cache for ``settings``, opened once per process (None for no cache)."""
    if settings.cache == "":
        return None
    key = settings.cache or ""
    if key not in _CACHES:
        _CACHES[key] = EmbeddingCache(settings.cache)
    return _CACHES[key]


def connect(address: str):
    """A Dask client for the scheduler at ``address`` (``tcp://host:8786``), with a clear
    error when the extra is missing or the scheduler cannot be reached."""
    try:
        from distributed import Client
    except ImportError:
        raise ModuleNotFoundError(
            'spreading work over a cluster needs the distributed extra: pip install "napari-sam-labeler[distributed]"'
        ) from None
    # Client's own timeout does not cover a server that accepts the connection and then
    # says nothing a scheduler would (any other TCP service): bound the whole handshake
    import threading

    box: dict = {}

    def attempt():
        try:
            box["client"] = Client(address, timeout="20s")
        except BaseException as exc:  # reported below, in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    if "client" in box:
        return box["client"]
    reason = box.get("error") or "no answer in 30 s (is it a Dask scheduler?)"
    raise ConnectionError(f"cannot reach the Dask scheduler at {address}: {reason}")


def run_jobs(func: Callable, jobs: Iterable[tuple], *, scheduler: str | None = None) -> Iterator[tuple[int, Any]]:
    """Run ``func(*job)`` for every job; yield ``(job index, result)`` as each finishes.

    Locally (no ``scheduler``) the jobs run one after another in this process. With a
    scheduler address they are submitted to that cluster, and results arrive in the order
    they finish. An exception in a job propagates (batch jobs return their failures as
    results instead of raising).
    """
    jobs = list(jobs)
    if scheduler is None:
        for i, job in enumerate(jobs):
            yield i, func(*job)
        return
    from distributed import as_completed

    client = connect(scheduler)
    try:
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(func, *job, pure=False, key=f"napari-sam-{run}-{i}"): i
                   for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        client.close()


def embed_slices(path: str, axis: int, indices: list[int], mapping, settings: ModelSettings,
                 batch_size: int | str = "auto") -> tuple[int, int]:
    """Embed ``indices`` of the stack at ``path`` into the shared cache (a worker's job).

    The worker opens the file itself (memory-mapped where it can) and uses the intensity
    mapping resolved once for the whole stack, so its cache keys are the local run's.
    Returns (slices done, of which were already cached).
    """
    from .api import Stack, open_volume

    cache = worker_cache(settings)
    if cache is None:
        raise ValueError("embedding on a cluster needs a cache folder the workers share")
    stack = Stack(open_volume(path), axis=axis, mapping=mapping)
    cached = done = 0
    for step in stack.encode(worker_engine(settings), cache, indices, batch_size=batch_size):
        if step.fraction == 1.0:
            done += 1
            cached += step.cached
    return done, cached
