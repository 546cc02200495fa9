"""The torch encoder's accelerator paths, exercised on the CPU (issue 15): autocast mixed
precision (what CUDA/MPS bf16/fp16 use), torch.compile (opt-in), and batch sizing from
measured bytes per image and free device memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_sam
from napari_sam import backends
from napari_sam.api import EmbeddingCache, Stack
from napari_sam.engine import drain


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def pixels_of(engine, image):
    from napari_sam import preprocess as pp

    rgb = pp.to_rgb_uint8(image, pp.resolve_intensity(image))
    return np.stack([pp.model_input(rgb, engine.spec)[0]])


def test_autocast_keeps_weights_and_output_fp32(torch_engine, blob_image):
    """The CUDA/MPS bf16 path (autocast), run here with device_type "cpu"."""
    pixels = pixels_of(torch_engine, blob_image)
    reference = drain(torch_engine.encoder.encode_steps(pixels))
    mixed = backends.TorchEncoder(torch_engine.model, torch_engine.device, torch.float32, autocast=torch.bfloat16)
    features = drain(mixed.encode_steps(pixels))
    assert features.dtype == torch.float32  # the decoder reads fp32
    assert {p.dtype for p in torch_engine.model.parameters()} == {torch.float32}
    assert 1e-4 < rel_err(features, reference) < 0.05  # really bf16, and still the same function


def test_mixed_precision_is_for_accelerators_only():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert backends.mixed_precision(cuda, "bf16") and backends.mixed_precision(mps, "fp16")
    assert not backends.mixed_precision(cpu, "bf16")  # CPUs cast the model (measured faster there)
    assert not backends.mixed_precision(cuda, "fp32")


def test_compiled_blocks_equal_eager_and_compile_once_per_block_kind(torch_engine, blob_image):
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters

    pixels = pixels_of(torch_engine, blob_image)
    reference = drain(torch_engine.encoder.encode_steps(pixels))
    compiled = backends.TorchEncoder(torch_engine.model, torch_engine.device, torch.float32, compile=True)
    counters.clear()
    first = drain(compiled.encode_steps(pixels))
    graphs = counters["stats"]["unique_graphs"]
    assert rel_err(first, reference) < 1e-4
    # windowed and global-attention blocks: at most one graph each, not one per block
    assert 1 <= graphs <= 2
    again = drain(compiled.encode_steps(pixels))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation on the next image
    assert rel_err(again, first) < 1e-6
    # Other batch sizes: one more graph per block kind, dynamic in the batch (dynamo keeps
    # size 1 apart), then none: each size recompiling would pass dynamo's recompile limit
    # after a few sizes, and from then on the blocks would silently run uncompiled.
    sizes = iter((3, 2, 5, 7, 4))
    for i, size in enumerate(sizes):
        batch = drain(compiled.encode_steps(np.concatenate([pixels] * size)))
        assert rel_err(batch[-1:], first) < 1e-4
        if i == 0:
            dynamic = counters["stats"]["unique_graphs"]
            assert dynamic <= 2 * graphs
    assert counters["stats"]["unique_graphs"] == dynamic


def test_compile_is_refused_for_exported_backends(tiny_sam_dir):
    with pytest.raises(ValueError, match="compile=True compiles the torch encoder"):
        napari_sam.load_model(tiny_sam_dir, device="cpu", backend="onnxruntime", compile=True)


def test_compile_without_a_cpp_compiler_is_one_line_before_any_work(tiny_sam_dir, tmp_path, monkeypatch):
    from test_cli import run_cli

    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ValueError, match="needs a C.. compiler"):
        napari_sam.load_model(tiny_sam_dir, device="cpu", backend="torch", compile=True)
    image = tmp_path / "a.tif"
    import tifffile

    tifffile.imwrite(image, np.zeros((32, 32), np.uint8))
    res = run_cli("segment", str(image), "--point", "5,5", "-o", str(tmp_path / "o.tif"), "--model",
                  str(tiny_sam_dir), "--backend", "torch", "--compile", env_extra={"CXX": "/nonexistent/g++"})
    assert res.returncode == 2 and "C++ compiler" in res.stderr and "Traceback" not in res.stderr
    assert "loading model" not in res.stderr


def test_a_cpu_only_backend_on_auto_device_means_the_cpu(monkeypatch):
    from napari_sam.api import resolve_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_runtime("auto", "fp32", "onnxruntime") == ("cpu", "onnxruntime", "fp32")
    assert resolve_runtime("auto", "fp32", "torch")[0] == "cuda"


class FakeMemory:
    """A device whose allocator grows by ``per_image`` bytes for each image encoded."""

    def __init__(self, free: int, per_image: int):
        self.free_bytes, self.per_image, self.now, self.top = free, per_image, 10_000, 10_000

    def allocated(self):
        return self.now

    def reset_peak(self):
        self.top = self.now

    def peak(self):
        return self.top

    def free(self):
        return self.free_bytes


def test_batches_are_sized_by_measured_bytes_per_image(torch_engine, blob_image):
    memory = FakeMemory(free=10 * 2**30, per_image=600 * 2**20)
    encoder = backends.TorchEncoder(torch_engine.model, torch_engine.device, torch.float32, memory=memory)
    real_block = encoder._block

    def block(layer, hidden):  # each block "allocates" its share of the per-image bytes
        memory.top = max(memory.top, memory.now + memory.per_image * hidden.shape[0])
        return real_block(layer, hidden)

    encoder._block = block
    assert encoder.suggested_batch_size() == 1  # nothing measured yet
    pixels = pixels_of(torch_engine, blob_image)
    drain(encoder.encode_steps(np.concatenate([pixels, pixels])))
    assert encoder.bytes_per_image == 600 * 2**20
    assert encoder.suggested_batch_size() == int(10 * 2**30 * 0.8) // (600 * 2**20) == 13
    memory.free_bytes = 100 * 2**20  # the device filled up meanwhile
    assert encoder.suggested_batch_size() == 1
    memory.free_bytes = 1000 * 2**30
    assert encoder.suggested_batch_size() == backends.MAX_BATCH


def test_memory_batch_size_bounds():
    assert backends.memory_batch_size(0, 100) == 1
    assert backends.memory_batch_size(10**12, 1) == backends.MAX_BATCH
    assert backends.memory_batch_size(1000, 0) == 1
    assert backends.memory_batch_size(1000, 100, limit=4) == 4


def test_cpu_engines_suggest_one_slice_per_call(torch_engine, tiny_engine, blob_image):
    for engine in (torch_engine, tiny_engine):
        engine.embed(blob_image)
        assert engine.suggested_batch_size() == 1


def test_stack_encode_auto_uses_the_engines_suggestion(torch_engine, tmp_path, monkeypatch):
    volume = (np.random.default_rng(0).random((5, 64, 64)) * 255).astype(np.uint8)
    calls = []
    real = torch_engine.encode_steps

    def counting(images):
        calls.append(len(images))
        return real(images)

    monkeypatch.setattr(torch_engine, "encode_steps", counting)
    monkeypatch.setattr(torch_engine, "suggested_batch_size", lambda: 2)
    steps = list(Stack(volume).encode(torch_engine, EmbeddingCache(tmp_path)))
    assert calls == [2, 2, 1]
    assert [p.index for p in steps if p.fraction == 1.0] == list(range(5))
    with pytest.raises(ValueError, match="batch_size must be 'auto' or an integer"):
        list(Stack(volume).encode(torch_engine, EmbeddingCache(tmp_path), batch_size="2"))
    calls.clear()
    list(Stack(volume[:3]).encode(torch_engine, EmbeddingCache(tmp_path / "b"), batch_size="AUTO"))
    assert calls == [2, 1]
