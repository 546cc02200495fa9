"""Stacks: axes, lazy arrays, selective, batched, cancellable and resumable encoding."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_sam.cache import EmbeddingCache
from napari_sam.volume import Stack


@pytest.fixture
def volume(blob_image):
    return np.stack([np.roll(blob_image, 4 * z, axis=1) for z in range(6)]).astype(np.uint16) * 3


def test_slices_and_one_mapping_for_the_stack(volume):
    stack = Stack(volume)
    assert len(stack) == 6 and stack.slice_shape == volume.shape[1:]
    np.testing.assert_array_equal(stack[2], volume[2])
    assert stack.mapping.mode == "percentile"
    # the same mapping as resolving over the whole volume at once
    from napari_sam.preprocess import resolve_intensity

    assert stack.mapping == resolve_intensity(volume, multichannel=False)


def test_other_axis_and_channels(volume):
    stack = Stack(volume, axis=1)  # e.g. (T, Y, X) viewed along Y
    assert len(stack) == volume.shape[1] and stack.slice_shape == (6, volume.shape[2])
    np.testing.assert_array_equal(stack[5], volume[:, 5, :])
    rgb = np.stack([volume, volume // 2], axis=-1)
    stack = Stack(rgb)
    assert stack.multichannel and stack[0].shape == (*volume.shape[1:], 2)
    assert len(stack.mapping.lows) == 2


@pytest.mark.parametrize("kind", ["dask", "zarr", "memmap"])
def test_lazy_arrays_are_read_slice_by_slice(volume, tmp_path, kind, tiny_engine):
    if kind == "dask":
        import dask.array as da

        lazy = da.from_array(volume, chunks=(1, *volume.shape[1:]))
    elif kind == "zarr":
        import zarr

        lazy = zarr.open_array(store=str(tmp_path / "v.zarr"), mode="w", shape=volume.shape,
                               dtype=volume.dtype, chunks=(1, *volume.shape[1:]))
        lazy[...] = volume
    else:
        path = tmp_path / "v.tif"
        tifffile.imwrite(path, volume)
        lazy = tifffile.memmap(path)
    stack = Stack(lazy)
    assert isinstance(stack[3], np.ndarray)
    np.testing.assert_array_equal(stack[3], volume[3])
    cache = EmbeddingCache(tmp_path / "cache")
    steps = [p for p in stack.encode(tiny_engine, cache, indices=[1, 3]) if p.fraction == 1.0]
    assert [p.index for p in steps] == [1, 3]
    # embeddings equal those of the in-memory array
    eager = Stack(volume)
    a = stack.embedding(3, tiny_engine, cache)
    b = eager.embedding(3, tiny_engine)
    np.testing.assert_allclose(a.features.float().numpy(), b.features.float().numpy(), atol=2e-3)


def test_encode_only_what_is_asked_then_resume_after_cancel(volume, tiny_engine, tmp_path):
    cache = EmbeddingCache(tmp_path)
    stack = Stack(volume)
    done = [p for p in stack.encode(tiny_engine, cache, indices=[4]) if p.fraction == 1.0]
    assert [(p.index, p.cached) for p in done] == [(4, False)]
    assert cache.stats().entries == 1

    gen = stack.encode(tiny_engine, cache)
    seen = []
    for p in gen:
        if p.fraction == 1.0:
            seen.append(p.index)
        if len(seen) == 3:
            gen.close()  # the user pressed Cancel
            break
    assert seen == [0, 1, 2]
    assert cache.stats().entries == 4  # 4 from before, 0-2 before the cancel
    resumed = [p for p in Stack(volume).encode(tiny_engine, EmbeddingCache(tmp_path)) if p.fraction == 1.0]
    assert [p.index for p in resumed] == list(range(6))
    assert [p.index for p in resumed if not p.cached] == [3, 5]
    assert [p.done for p in resumed] == list(range(1, 7)) and all(p.total == 6 for p in resumed)
    assert EmbeddingCache(tmp_path).stats().entries == 6


def test_batched_encoding_matches_single(volume, tiny_engine, tmp_path):
    single = Stack(volume)
    batched = Stack(volume)
    c1, c2 = EmbeddingCache(tmp_path / "a"), EmbeddingCache(tmp_path / "b")
    list(single.encode(tiny_engine, c1, batch_size=1))
    steps = list(batched.encode(tiny_engine, c2, batch_size=4))
    assert [p.index for p in steps if p.fraction == 1.0] == list(range(6))
    assert any(p.fraction < 1.0 for p in steps)  # progress inside a batch (cancellable)
    for z in range(6):
        a = single.embedding(z, tiny_engine, c1).features
        b = batched.embedding(z, tiny_engine, c2).features
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_reopened_data_hits_the_same_cache(volume, tiny_engine, tmp_path):
    cache = EmbeddingCache(tmp_path)
    list(Stack(volume).encode(tiny_engine, cache))
    path = tmp_path / "again.tif"
    tifffile.imwrite(path, volume)
    reopened = Stack(tifffile.imread(path))
    steps = [p for p in reopened.encode(tiny_engine, EmbeddingCache(tmp_path)) if p.fraction == 1.0]
    assert all(p.cached for p in steps)
    changed = Stack(volume, window=(300, 200))  # another contrast: new keys
    steps = [p for p in changed.encode(tiny_engine, EmbeddingCache(tmp_path), indices=[0]) if p.fraction == 1.0]
    assert not steps[0].cached


@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        (np.zeros((8, 8)), {}, "3D"),
        (np.zeros((2, 2, 8, 8, 3)), {}, "3D"),
        (np.zeros((3, 8, 8)), {"axis": 3}, "axis"),
        (np.zeros((3, 8, 8, 40)), {}, "channels"),
        (np.zeros((0, 8, 8)), {}, "empty"),
    ],
)
def test_bad_stacks(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Stack(data, **kwargs)


def test_bad_indices_and_batch(volume, tiny_engine, tmp_path):
    stack = Stack(volume)
    with pytest.raises(IndexError, match="out of range"):
        list(stack.encode(tiny_engine, EmbeddingCache(tmp_path), indices=[9]))
    with pytest.raises(ValueError, match="batch_size"):
        list(stack.encode(tiny_engine, EmbeddingCache(tmp_path), batch_size=0))


def test_disk_writes_overlap_the_next_encode_and_are_flushed(volume, torch_engine, tmp_path, monkeypatch):
    """Slice z's write runs while slice z+1 encodes (the write waits for that encode to
    start: without the overlap this would time out), and all are on disk at the end."""
    import threading

    cache = EmbeddingCache(tmp_path, memory_bytes=0)  # reads of pending slices come from the writer's queue
    real_write, real_steps = cache._write, torch_engine.encode_steps
    started, events = threading.Event(), []

    def write(key, embedding):
        assert started.wait(30), "the next slice did not start encoding while this one was written"
        events.append("write")
        real_write(key, embedding)

    def encode_steps(images):
        events.append("encode")
        started.set() if events.count("encode") > 1 else None
        return real_steps(images)

    monkeypatch.setattr(cache, "_write", write)
    monkeypatch.setattr(torch_engine, "encode_steps", encode_steps)
    stack = Stack(volume)
    steps = stack.encode(torch_engine, cache, range(3), batch_size=1)
    first = next(p for p in steps if p.fraction == 1.0)
    assert cache.get(stack.key(first.index, torch_engine), torch_engine) is not None  # pending, still readable
    rest = list(steps)
    assert [p.index for p in rest if p.fraction == 1.0] == [1, 2]
    assert events.index("write") > events.index("encode", 1)  # the first write finished after encode 2 began
    fresh = EmbeddingCache(tmp_path)
    assert all(fresh._path(stack.key(z, torch_engine)).exists() for z in range(3))


def test_a_cancelled_encode_still_writes_what_it_encoded(volume, torch_engine, tmp_path):
    cache = EmbeddingCache(tmp_path)
    stack = Stack(volume)
    steps = stack.encode(torch_engine, cache, batch_size=1)
    done = []
    for p in steps:
        if p.fraction == 1.0:
            done.append(p.index)
        if len(done) == 2:
            steps.close()  # cancel: the second slice's write may still be running
            break
    assert done == [0, 1]
    fresh = EmbeddingCache(tmp_path)
    assert fresh._path(stack.key(0, torch_engine)).exists() and fresh._path(stack.key(1, torch_engine)).exists()


def test_a_failing_background_write_is_raised(volume, torch_engine, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)

    def broken(key, embedding):
        raise ValueError("broken write")

    monkeypatch.setattr(cache, "_write", broken)
    with pytest.raises(ValueError, match="broken write"):
        list(Stack(volume).encode(torch_engine, cache, range(2), batch_size=1))
