"""Embedding cache: keys, fp16 fidelity, atomic writes, verification, eviction."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_sam import preprocess as pp
from napari_sam.cache import EmbeddingCache, default_cache_dir, engine_cache_key, slice_key
from napari_sam.volume import embed_cached


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def chunk_files(directory: Path):
    metadata = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
    return [p for p in directory.rglob("*") if p.is_file() and p.name not in metadata and ".tmp" not in p.parts]


def test_round_trip_memory_and_disk(tiny_engine, blob_image, tmp_path):
    mapping = pp.resolve_intensity(blob_image)
    cache = EmbeddingCache(tmp_path)
    first = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=cache)
    assert cache.misses == 1 and cache.stats().entries == 1
    again = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=cache)
    assert again is first and cache.hits == 1  # memory hit

    reopened = EmbeddingCache(tmp_path)  # a new session: disk hit
    disk = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=reopened)
    assert reopened.hits == 1 and reopened.misses == 0
    assert disk.original_size == first.original_size and disk.input_size == first.input_size
    assert disk.mapping == mapping and disk.spec == tiny_engine.spec and disk.model_id == first.model_id
    assert disk.features.dtype == first.features.dtype and disk.features.shape == first.features.shape


def test_float16_storage_decodes_like_float32(tiny_engine, blob_image, tmp_path):
    mapping = pp.resolve_intensity(blob_image)
    fp32 = tiny_engine.embed(blob_image, mapping=mapping)
    cache = EmbeddingCache(tmp_path)
    cache.put(slice_key(blob_image, engine_cache_key(tiny_engine), mapping), fp32)
    stored = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=EmbeddingCache(tmp_path))
    assert not np.array_equal(stored.features.numpy(), fp32.features.numpy())  # really rounded
    for prompt in ({"points": [[60, 70]]}, {"box": (30, 30, 90, 110)}, {"points": [[120, 170]], "multimask": True}):
        a = tiny_engine.predict(fp32, **prompt)
        b = tiny_engine.predict(stored, **prompt)
        for i in range(len(a.masks)):
            assert iou(a.masks[i], b.masks[i]) >= 0.99
    entry_bytes = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert entry_bytes < 2 * 2**20


def test_keys_follow_content_contrast_and_model(tiny_engine, blob_image, tmp_path):
    from conftest import build_tiny_sam

    import napari_sam

    m = pp.resolve_intensity(blob_image)
    key = slice_key(blob_image, engine_cache_key(tiny_engine), m)
    assert key == slice_key(blob_image.copy(), engine_cache_key(tiny_engine), m)  # same content
    changed = blob_image.copy()
    changed[0, 0] ^= 1
    assert slice_key(changed, engine_cache_key(tiny_engine), m) != key
    other_contrast = pp.resolve_intensity(blob_image, window=(100, 50))
    assert slice_key(blob_image, engine_cache_key(tiny_engine), other_contrast) != key
    assert slice_key(blob_image.astype(np.uint16), engine_cache_key(tiny_engine), m) != key
    build_tiny_sam(tmp_path / "other", seed=9)
    other = napari_sam.load_model(tmp_path / "other", device="cpu")
    assert slice_key(blob_image, engine_cache_key(other), m) != key
    location = tiny_engine.source.location
    fp32 = napari_sam.load_model(location, device="cpu", dtype="fp32")
    bf16 = napari_sam.load_model(location, device="cpu", dtype="bf16", backend="torch")
    assert engine_cache_key(bf16) != engine_cache_key(fp32)  # precisions never share entries


@pytest.mark.parametrize("damage", ["flip", "truncate", "drop_chunk", "bad_json"])
def test_corrupt_entries_are_detected_recomputed_never_served(tiny_engine, blob_image, tmp_path, damage):
    mapping = pp.resolve_intensity(blob_image)
    good = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=EmbeddingCache(tmp_path))
    (chunk,) = chunk_files(tmp_path)
    if damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 3])
    elif damage == "drop_chunk":
        chunk.unlink()
    else:
        (next(tmp_path.rglob(".zarray"))).write_text("{not json")
    cache = EmbeddingCache(tmp_path)
    key = slice_key(blob_image, engine_cache_key(tiny_engine), mapping)
    assert cache.get(key, tiny_engine) is None
    assert cache.corrupt == 1 and cache.stats().entries == 0  # removed, not served
    again = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=cache)  # recomputed
    np.testing.assert_allclose(again.features.numpy(), good.features.numpy(), atol=1e-6)
    assert EmbeddingCache(tmp_path).get(key, tiny_engine) is not None  # the new entry is sound


WRITER = textwrap.dedent("""
    import sys, numpy as np, torch
    from napari_sam.cache import EmbeddingCache
    from napari_sam._types import ImageEmbedding, IntensityMapping, sam_input_spec
    cache = EmbeddingCache(sys.argv[1])
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    i = 0
    while True:
        feats = torch.from_numpy(rng.standard_normal((1, 256, 64, 64)).astype(np.float32))
        emb = ImageEmbedding(feats, (512, 512), (1024, 1024), sam_input_spec(), IntensityMapping("identity"), "m")
        cache.put(f"{i:040x}", emb)
        i += 1
""")


def test_writer_killed_mid_write_leaves_nothing_corrupt(tmp_path, tiny_engine):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while len(list(tmp_path.glob("??/*.zarr"))) < 3 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.137)  # somewhere inside a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cache = EmbeddingCache(tmp_path)
    entries = list(tmp_path.glob("??/*.zarr"))
    assert len(entries) >= 3
    for entry in entries:
        key = entry.name.removesuffix(".zarr")
        emb = cache.get(key, tiny_engine)
        assert emb is not None and emb.features.shape == (1, 256, 64, 64)
    assert cache.corrupt == 0
    # whatever the killed writer left half-done lives only in the temporary folder
    cache.clean_temporary(older_than_s=0)
    assert not any((tmp_path / ".tmp").glob("*"))


def test_disk_cap_evicts_least_recently_used(tiny_engine, tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64), dtype=np.uint8) for _ in range(5)]
    mapping = pp.resolve_intensity(images[0])
    keys = [slice_key(img, engine_cache_key(tiny_engine), mapping) for img in images]
    probe = EmbeddingCache(tmp_path / "probe")
    embed_cached(tiny_engine, images[0], mapping=mapping, cache=probe)
    entry = probe.stats().bytes
    root = tmp_path / "capped"
    cache = EmbeddingCache(root, disk_bytes=int(3.5 * entry))
    for img in images[:3]:
        time.sleep(0.02)
        embed_cached(tiny_engine, img, mapping=mapping, cache=cache)
    time.sleep(0.02)
    assert EmbeddingCache(root).get(keys[0], tiny_engine) is not None  # reading makes it recent
    for img in images[3:]:
        time.sleep(0.02)
        embed_cached(tiny_engine, img, mapping=mapping, cache=cache)
    on_disk = {p.name.removesuffix(".zarr") for p in root.glob("??/*.zarr")}
    assert on_disk == {keys[0], keys[3], keys[4]}  # 1 and 2 were least recently used
    assert cache.stats().bytes <= 3.5 * entry


def test_memory_budget(tiny_engine, tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (64, 64), dtype=np.uint8) for _ in range(5)]
    mapping = pp.resolve_intensity(images[0])
    one = tiny_engine.embed(images[0], mapping=mapping)
    size = one.features.numel() * one.features.element_size()
    cache = EmbeddingCache(False, memory_bytes=2 * size)  # memory only
    for img in images:
        embed_cached(tiny_engine, img, mapping=mapping, cache=cache)
    assert len(cache._memory) == 2 and cache._memory_used <= 2 * size
    assert cache.stats().entries == 0


def test_no_pickle_on_disk(tiny_engine, blob_image, tmp_path):
    embed_cached(tiny_engine, blob_image, mapping=pp.resolve_intensity(blob_image), cache=EmbeddingCache(tmp_path))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80", f"{path} looks like a pickle"


def test_default_directory_and_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    assert EmbeddingCache().directory == tmp_path / "here"
    monkeypatch.delenv("NAPARI_SAM_CACHE")
    assert "napari-sam-labeler" in str(default_cache_dir())


def test_clear(tiny_engine, blob_image, tmp_path):
    cache = EmbeddingCache(tmp_path)
    embed_cached(tiny_engine, blob_image, mapping=pp.resolve_intensity(blob_image), cache=cache)
    assert cache.clear() == 1
    assert cache.stats().entries == 0 and not list(tmp_path.glob("??/*.zarr"))
    assert not (tmp_path / ".tmp").exists()
    assert cache.get(slice_key(blob_image, engine_cache_key(tiny_engine), pp.resolve_intensity(blob_image)),
                     tiny_engine) is None  # memory was cleared too


def test_entries_are_written_in_the_format_both_zarr_versions_read(tiny_engine, blob_image, tmp_path, monkeypatch):
    """Issue 20.4: one cache folder, an install with zarr 3 and one with zarr 2."""
    import zarr

    mapping = pp.resolve_intensity(blob_image)
    embed_cached(tiny_engine, blob_image, mapping=mapping, cache=EmbeddingCache(tmp_path))
    (entry,) = [p for p in tmp_path.rglob("*.zarr") if ".tmp" not in p.parts]
    assert (entry / ".zarray").exists() and not (entry / "zarr.json").exists()  # zarr's v2 format
    # an entry in zarr's v3 format, met by an install with zarr 2: skipped, never deleted
    v3 = tmp_path / "ab" / ("ab" + "0" * 38 + ".zarr")
    zarr.open_array(store=str(v3), mode="w", shape=(2,), dtype="float16",
                    **({"zarr_format": 3} if int(zarr.__version__.split(".")[0]) >= 3 else {}))
    if not (v3 / "zarr.json").exists():
        pytest.skip("this zarr cannot write the v3 format")
    monkeypatch.setattr(zarr, "__version__", "2.18.3")
    cache = EmbeddingCache(tmp_path)
    assert cache.get("ab" + "0" * 38, tiny_engine) is None
    assert cache.unreadable == 1 and cache.corrupt == 0 and v3.exists()


def test_a_cache_that_cannot_be_written_warns_once_and_work_goes_on(tiny_engine, blob_image, tmp_path, monkeypatch):
    """Issue 20.5: a read-only cache folder made `segment` fail; the cache is an optimisation."""
    from napari_sam.cache import CacheWarning

    mapping = pp.resolve_intensity(blob_image)
    first = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=EmbeddingCache(tmp_path))

    def read_only(*_args, **_kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr("os.utime", read_only)
    reader = EmbeddingCache(tmp_path)
    again = embed_cached(tiny_engine, blob_image, mapping=mapping, cache=reader)
    assert reader.hits == 1  # served from the disk store anyway (was: PermissionError from utime)
    np.testing.assert_allclose(again.features.numpy(), first.features.numpy(), atol=2e-2)
    monkeypatch.setattr(EmbeddingCache, "_write", lambda self, key, emb: read_only())
    cache = EmbeddingCache(tmp_path / "other")
    with pytest.warns(CacheWarning, match="cannot be written") as record:
        for image in (blob_image, blob_image[::-1].copy()):
            embed_cached(tiny_engine, image, mapping=mapping, cache=cache)
    assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1
