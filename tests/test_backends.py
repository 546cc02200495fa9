"""Encoder backends and precisions (issue 15): OpenVINO and ONNX Runtime against torch on
the tiny model, the exported-encoder cache (atomic, verified, rebuilt when damaged),
cancel, and the rule that "auto" never picks an emulated precision."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

import napari_sam  # noqa: E402
from napari_sam import _exports, _onnxruntime, _openvino, backends  # noqa: E402

EXPORTED = ["openvino", "onnxruntime"]
MODULES = {"openvino": _openvino, "onnxruntime": _onnxruntime}


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


@pytest.fixture
def encoder_dir(tmp_path, monkeypatch):
    folder = tmp_path / "encoders"
    monkeypatch.setenv(_exports.ENCODERS_ENV, str(folder))
    return folder


def load(tiny_sam_dir, **kwargs):
    return napari_sam.load_model(tiny_sam_dir, device="cpu", **kwargs)


@pytest.mark.parametrize("backend", EXPORTED)
def test_exported_fp32_equals_torch(tiny_sam_dir, blob_image, encoder_dir, backend):
    torch_engine = load(tiny_sam_dir, dtype="fp32", backend="torch")
    ov_engine = load(tiny_sam_dir, dtype="fp32", backend=backend)
    assert (torch_engine.backend, ov_engine.backend) == ("torch", backend)
    a, b = torch_engine.embed(blob_image), ov_engine.embed(blob_image)
    assert rel_err(b.features, a.features) < 1e-5
    assert b.model_id == a.model_id
    prompt = dict(points=[[40, 40], [10, 60]], point_labels=[1, 0], box=[20, 20, 70, 70])
    pa, pb = torch_engine.predict(a, **prompt), ov_engine.predict(b, **prompt)
    np.testing.assert_allclose(pb.logits, pa.logits, atol=1e-5)
    # fp32 from either backend is the same embedding: the cache shares it
    from napari_sam.cache import engine_cache_key

    assert engine_cache_key(ov_engine) == engine_cache_key(torch_engine)


@pytest.mark.parametrize("backend", EXPORTED)
def test_exported_batch_equals_single(tiny_sam_dir, blob_image, encoder_dir, backend):
    engine = load(tiny_sam_dir, dtype="fp32", backend=backend)
    rgb = np.stack([blob_image] * 3, axis=-1)
    flipped = np.ascontiguousarray(rgb[::-1])
    both = engine.encode_rgb([rgb, flipped])
    assert rel_err(both[1:2], engine.encode_rgb([flipped])) < 1e-5
    assert rel_err(both[0:1], engine.encode_rgb([rgb])) < 1e-5


@pytest.mark.parametrize("backend, dtype, bound", [("openvino", "int8-weights", 0.1), ("openvino", "int8", 0.3),
                                                   ("onnxruntime", "int8-weights", 0.1)])
def test_int8_is_close_but_not_fp32(tiny_sam_dir, blob_image, encoder_dir, dtype, bound, backend):
    ref = load(tiny_sam_dir, dtype="fp32", backend="torch").embed(blob_image).features
    engine = load(tiny_sam_dir, dtype=dtype, backend=backend)
    assert engine.precision == dtype
    err = rel_err(engine.embed(blob_image).features, ref)
    assert 1e-4 < err < bound  # really quantized, and still the same function


def test_bf16_where_native(tiny_sam_dir, blob_image, encoder_dir):
    if not backends.cpu_has_native_bf16("openvino"):
        with pytest.raises(ValueError, match="no bf16 instructions"):
            load(tiny_sam_dir, dtype="bf16", backend="openvino")
        return
    ref = load(tiny_sam_dir, dtype="fp32", backend="torch").embed(blob_image).features
    engine = load(tiny_sam_dir, dtype="bf16", backend="openvino")
    features = engine.embed(blob_image).features
    assert 1e-4 < rel_err(features, ref) < 0.05
    # bf16 is the encoder's: the decoder stays fp32, and so do the features it reads
    import torch

    assert engine.dtype == torch.float32 == features.dtype
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("backend", EXPORTED)
def test_export_is_cached_and_reused(tiny_sam_dir, encoder_dir, monkeypatch, backend):
    messages = []
    load(tiny_sam_dir, dtype="fp32", backend=backend, on_progress=messages.append)
    assert any("Exporting" in m for m in messages)
    (folder,) = [p for p in encoder_dir.iterdir() if not p.name.startswith(".")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == set(MODULES[backend].FILES)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MODULES[backend].FILES, "manifest.json"])
    # readable by the other users of a shared cache (a writer once left the weights 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()} == {"0o644"}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although a verified export is cached")

    monkeypatch.setattr(_openvino, "_convert", no_export)
    monkeypatch.setattr(_onnxruntime, "_export", no_export)
    messages.clear()
    load(tiny_sam_dir, dtype="fp32", backend=backend, on_progress=messages.append)
    # bf16 compiles the same float graph: no second export either
    if backend == "openvino" and backends.cpu_has_native_bf16("openvino"):
        load(tiny_sam_dir, dtype="bf16", backend="openvino", on_progress=messages.append)
    assert messages == []
    assert [p.name for p in encoder_dir.iterdir()] == [folder.name]  # no temporary leftovers


DAMAGE = ["flip", "truncate", "manifest", "no_files", "files_list", "other_identity"]


@pytest.mark.parametrize("backend, damage", [("openvino", d) for d in DAMAGE] + [("onnxruntime", "flip"),
                                                                                  ("onnxruntime", "truncate")])
def test_damaged_export_is_rebuilt(tiny_sam_dir, blob_image, encoder_dir, caplog, backend, damage):
    first = load(tiny_sam_dir, dtype="fp32", backend=backend)
    expected = first.embed(blob_image).features
    folder = first.encoder.path
    weights = folder / MODULES[backend].FILES[1]
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        meta = json.loads((folder / "manifest.json").read_text())
        if damage == "other_identity":  # e.g. an int8 export copied under a float key
            meta["identity"] = meta["identity"].replace("|float|", "|int8|")
        else:
            meta["files"] = {} if damage == "no_files" else []
            data = (folder / "encoder.bin").read_bytes()
            (folder / "encoder.bin").write_bytes(data[:1000])
        (folder / "manifest.json").write_text(json.dumps(meta))
    messages = []
    with caplog.at_level(logging.WARNING, logger="napari_sam"):
        again = load(tiny_sam_dir, dtype="fp32", backend=backend, on_progress=messages.append)
    assert "damaged" in caplog.text and any("Exporting" in m for m in messages)
    assert rel_err(again.embed(blob_image).features, expected) < 1e-6
    identity = json.loads((folder / "manifest.json").read_text())["identity"]
    assert _exports.read_verified(folder, identity, MODULES[backend].FILES) is not None


def test_cancel_stops_a_running_encode(tiny_sam_dir, encoder_dir):
    engine = load(tiny_sam_dir, dtype="fp32", backend="openvino")
    rgb = np.zeros((256, 256, 3), np.uint8)
    compiled, cancelled = engine.encoder.compiled, []

    class Spy:  # the real request, with cancel() recorded
        def __init__(self):
            self.request = compiled.create_infer_request()

        def __getattr__(self, name):
            return getattr(self.request, name)

        def cancel(self):
            cancelled.append(True)
            self.request.cancel()

        def wait_for(self, ms):  # report "still running" once, as a long encode would
            if not hasattr(self, "polled"):
                self.polled = True
                return False
            return self.request.wait_for(ms)

    engine.encoder.compiled = type("C", (), {"create_infer_request": staticmethod(Spy)})()
    steps = engine.encode_steps([rgb] * 3)
    assert next(steps) == (0, 3 * _exports.STEPS)
    assert next(steps)[0] < _exports.STEPS  # the first image's request is running
    steps.close()  # cancels the request; must not raise
    assert cancelled == [True]
    engine.encoder.compiled = compiled
    # the engine still works afterwards
    assert engine.encode_rgb([rgb]).shape[0] == 1
    # cancelling, then other batch sizes (this once failed inside OpenVINO's dynamic shapes)
    for cancelled_size, next_size in [(2, 3), (3, 2), (1, 4), (4, 1)]:
        steps = engine.encode_steps([rgb] * cancelled_size)
        next(steps)
        next(steps)
        steps.close()
        assert engine.encode_rgb([rgb] * next_size).shape[0] == next_size


@pytest.mark.parametrize("backend, name", [("openvino", "OpenVINO"), ("onnxruntime", "ONNX Runtime")])
def test_exported_engine_has_no_torch_encoder(tiny_sam_dir, encoder_dir, backend, name):
    engine = load(tiny_sam_dir, dtype="fp32", backend=backend)
    with pytest.raises(RuntimeError, match=f"runs in {name}"):
        engine.model.vision_encoder(None)
    assert f"backend={backend}" in repr(engine)


class _Device:
    def __init__(self, kind):
        self.type = kind


def test_auto_never_emulates(monkeypatch):
    cpu = _Device("cpu")
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda backend="torch": False)
    assert backends.resolve_precision("auto", "openvino", cpu) == "fp32"
    assert backends.resolve_precision("auto", "torch", cpu) == "fp32"
    with pytest.raises(ValueError, match="no bf16 instructions"):
        backends.resolve_precision("bf16", "openvino", cpu)
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda backend="torch": True)
    assert backends.resolve_precision("auto", "openvino", cpu) == "bf16"
    assert backends.resolve_precision("auto", "torch", cpu) == "bf16"


def test_an_isa_cap_without_bf16_is_respected(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not backends.cpu_has_native_bf16("openvino") and not backends.cpu_has_native_bf16("torch")
    assert backends.resolve_precision("auto", "openvino", _Device("cpu")) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert not backends._isa_capped_below_bf16()


def test_choices_are_checked():
    cpu = _Device("cpu")
    with pytest.raises(ValueError, match="needs backend='openvino' or 'onnxruntime'"):
        backends.resolve_precision("int8", "torch", cpu)
    with pytest.raises(ValueError, match="CUDA or MPS"):
        backends.resolve_precision("fp16", "openvino", cpu)
    with pytest.raises(ValueError, match="not one of"):
        backends.resolve_precision("int4", "openvino", cpu)
    with pytest.raises(ValueError, match="not one of"):
        backends.resolve_backend("tensorrt", cpu)
    with pytest.raises(ValueError, match="runs on the CPU"):
        backends.resolve_backend("openvino", _Device("cuda"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        backends.resolve_backend("onnxruntime", _Device("cuda"))
    with pytest.raises(ValueError, match="needs backend='openvino'"):
        backends.resolve_precision("int8", "onnxruntime", cpu)
    with pytest.raises(ValueError, match="fp32 and int8 only"):
        backends.resolve_precision("bf16", "onnxruntime", cpu)
    assert backends.resolve_precision("auto", "onnxruntime", cpu) == "fp32"  # never emulated bf16
    assert backends.resolve_backend("auto", _Device("cuda")) == "torch"
    assert backends.resolve_backend("auto", cpu) == "openvino"


def test_cache_keys_separate_precisions(tiny_sam_dir, encoder_dir):
    from napari_sam.cache import engine_cache_key

    keys = {(b, d): engine_cache_key(load(tiny_sam_dir, dtype=d, backend=b))
            for b in EXPORTED for d in ("fp32", "int8-weights")}
    assert keys[("openvino", "fp32")] == keys[("onnxruntime", "fp32")]  # the same function to 2e-6
    assert len(set(keys.values())) == 3  # each backend's int8 is its own


@pytest.mark.parametrize("backend", EXPORTED)
def test_unwritable_encoder_folder_still_works(tiny_sam_dir, blob_image, tmp_path, monkeypatch, caplog, backend):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv(_exports.ENCODERS_ENV, str(afile / "sub"))
    with caplog.at_level(logging.WARNING, logger="napari_sam"):
        engine = load(tiny_sam_dir, dtype="fp32", backend=backend)
    assert "cannot keep the exported encoder" in caplog.text and _exports.ENCODERS_ENV in caplog.text
    assert engine.encoder.path is None
    ref = load(tiny_sam_dir, dtype="fp32", backend="torch").embed(blob_image).features
    assert rel_err(engine.embed(blob_image).features, ref) < 1e-5


def test_key_path_taken_by_a_file_and_stale_temporaries(tiny_sam_dir, encoder_dir):
    import os
    import time

    first = load(tiny_sam_dir, dtype="fp32", backend="openvino")
    folder = first.encoder.path
    import shutil

    shutil.rmtree(folder)
    folder.write_text("a file where the export goes")
    stale, fresh = encoder_dir / ".tmp-killed", encoder_dir / ".tmp-running"
    for tmp in (stale, fresh):
        tmp.mkdir()
        (tmp / "encoder.bin").write_bytes(b"x" * 100)
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))
    again = load(tiny_sam_dir, dtype="fp32", backend="openvino")
    assert again.encoder.path == folder and folder.is_dir()
    assert not stale.exists() and fresh.exists()  # a running export's folder is left alone
    shutil.rmtree(folder)
    folder.symlink_to(encoder_dir / "nowhere")  # a dangling link where the export goes
    again = load(tiny_sam_dir, dtype="fp32", backend="openvino")
    assert again.encoder.path == folder and folder.is_dir() and not folder.is_symlink()


def test_another_encoder_configuration_is_another_export(tiny_sam_dir, tmp_path, encoder_dir):
    import shutil

    other = tmp_path / "relu"
    shutil.copytree(tiny_sam_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "relu"  # same weights, another function
    (other / "config.json").write_text(json.dumps(config))
    a = load(tiny_sam_dir, dtype="fp32", backend="openvino")
    b = load(other, dtype="fp32", backend="openvino")
    assert a.fingerprint == b.fingerprint and a.encoder.path != b.encoder.path


def _slow_session(nodes: int = 200, size: int = 1024):
    """An ONNX Runtime session that takes seconds: a chain of large MatMuls."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.eye(size, dtype=np.float32), "W")
    chain = [helper.make_node("MatMul", ["pixel_values" if i == 0 else f"h{i}", "W"], [f"h{i + 1}"])
             for i in range(nodes)]
    graph = helper.make_graph(chain, "slow", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                                           [1, size, size])],
                              [helper.make_tensor_value_info(f"h{nodes}", TensorProto.FLOAT, [1, size, size])],
                              initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every MatMul
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_onnxruntime_cancel_stops_the_run_between_operators():
    import time

    session = _slow_session()
    image = np.ones((1, 1024, 1024), np.float32)
    started = time.perf_counter()
    session.run(None, {"pixel_values": image})
    full = time.perf_counter() - started
    encoder = _onnxruntime.OnnxRuntimeEncoder(session, "fp32")
    steps = encoder.encode_steps(np.stack([image[0]] * 2))
    assert next(steps) == (0, 2 * _exports.STEPS)
    started = time.perf_counter()
    assert next(steps)[0] < _exports.STEPS  # polled while the first run is going
    steps.close()  # sets terminate and waits for the run to stop
    stopped = time.perf_counter() - started
    assert stopped < full / 3, (stopped, full)
    assert encoder.seconds_per_image is None  # nothing finished


def test_onnxruntime_engine_cancel_then_runs_again(tiny_sam_dir, encoder_dir):
    engine = load(tiny_sam_dir, dtype="fp32", backend="onnxruntime")
    rgb = np.zeros((256, 256, 3), np.uint8)
    for cancelled_size, next_size in [(2, 3), (3, 1)]:
        steps = engine.encode_steps([rgb] * cancelled_size)
        next(steps)
        next(steps)
        steps.close()
        assert engine.encode_rgb([rgb] * next_size).shape[0] == next_size


@pytest.mark.parametrize("backend", EXPORTED)
def test_export_in_a_child_process(tiny_sam_dir, blob_image, encoder_dir, monkeypatch, backend):
    """What the widget does: the export runs in a child process; this one only loads it."""

    def no_export(*args, **kwargs):
        raise AssertionError("exported in this process")

    monkeypatch.setattr(_openvino, "_convert", no_export)
    monkeypatch.setattr(_onnxruntime, "_export", no_export)
    messages = []
    engine = load(tiny_sam_dir, dtype="fp32", backend=backend, export_in_subprocess=True,
                  on_progress=messages.append)
    assert any("Exporting" in m for m in messages)  # forwarded from the child
    assert engine.encoder.path is not None and engine.encoder.path.parent == encoder_dir
    ref = load(tiny_sam_dir, dtype="fp32", backend="torch").embed(blob_image).features
    assert rel_err(engine.embed(blob_image).features, ref) < 1e-5


def test_a_failed_child_export_falls_back_and_a_killed_one_is_an_error(tiny_sam_dir, encoder_dir, tmp_path,
                                                                        monkeypatch, caplog):
    fails, killed = tmp_path / "fails", tmp_path / "killed"
    fails.write_text("#!/bin/sh\necho 'Traceback: boom' >&2\nexit 3\n")
    killed.write_text("#!/bin/sh\nkill -9 $$\n")
    for script in (fails, killed):
        script.chmod(0o755)
    monkeypatch.setattr(_exports.sys, "executable", str(fails))
    with caplog.at_level(logging.WARNING, logger="napari_sam"):
        engine = load(tiny_sam_dir, dtype="fp32", backend="openvino", export_in_subprocess=True)
    assert "failed (exit 3)" in caplog.text and "boom" in caplog.text
    assert engine.encoder.path is not None  # exported here instead, and cached
    monkeypatch.setattr(_exports.sys, "executable", str(killed))
    with pytest.raises(RuntimeError, match="killed .*out of memory"):
        load(tiny_sam_dir, dtype="int8-weights", backend="openvino", export_in_subprocess=True)


def test_onnx_export_routes_are_the_same_function_and_kept_apart(tiny_sam_dir, blob_image, encoder_dir,
                                                                 monkeypatch):
    """torch.export-based (with onnxscript) and the older tracing exporter give the same
    encoder; their exports are cached under different identities."""
    import importlib.util

    ref = load(tiny_sam_dir, dtype="fp32", backend="torch").embed(blob_image).features
    routes = {}
    for route in ("dynamo", "torchscript"):
        if route == "dynamo" and not importlib.util.find_spec("onnxscript"):
            continue  # onnxscript is not installed here
        monkeypatch.setattr(_onnxruntime, "exporter", lambda route=route: route)
        engine = load(tiny_sam_dir, dtype="fp32", backend="onnxruntime")
        assert rel_err(engine.embed(blob_image).features, ref) < 1e-5
        routes[route] = engine.encoder.path
    assert len(set(routes.values())) == len(routes)


def test_no_space_anywhere_is_one_error_and_a_full_cache_exports_elsewhere(tiny_sam_dir, blob_image, encoder_dir,
                                                                            monkeypatch, caplog):
    import errno

    real, calls = _onnxruntime._export, []

    def full_cache(model, input_size, precision, spec, say, out):
        calls.append(out)
        if len(calls) == 1:  # the cache folder fills up; the private temporary folder has room
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, input_size, precision, spec, say, out)

    monkeypatch.setattr(_onnxruntime, "_export", full_cache)
    with caplog.at_level(logging.WARNING, logger="napari_sam"):
        engine = load(tiny_sam_dir, dtype="fp32", backend="onnxruntime")
    assert "could not write the exported encoder" in caplog.text and engine.encoder.path is None
    assert not [p for p in encoder_dir.iterdir()]  # the failed attempt's folder is gone

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_onnxruntime, "_export", no_space)
    from napari_sam.api import ExportError

    with pytest.raises(ExportError, match="No space left on device.*free space"):
        load(tiny_sam_dir, dtype="fp32", backend="onnxruntime")


def test_a_dead_process_temporary_folder_is_swept_at_once(encoder_dir):
    import os
    import subprocess

    encoder_dir.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that has ended
    prefix = _exports._tmp_prefix().split("-")[1]
    gone, alive = encoder_dir / f".tmp-{prefix}-{dead.pid}-abc", encoder_dir / f".tmp-{prefix}-{os.getpid()}-abc"
    other = encoder_dir / f".tmp-otherhost-{dead.pid}-abc"  # another machine's: the 6 h rule
    for folder in (gone, alive, other):
        folder.mkdir()
    _exports._sweep_stale(encoder_dir)
    assert not gone.exists() and alive.exists() and other.exists()


def test_cancel_stops_a_child_export(tiny_sam_dir, encoder_dir):
    """Cancel while the widget's child process exports: the child is stopped, nothing is
    left in the cache, and the load says it was cancelled."""
    from napari_sam.api import ExportCancelled

    messages = []
    with pytest.raises(ExportCancelled):
        load(tiny_sam_dir, dtype="fp32", backend="openvino", export_in_subprocess=True,
             on_progress=messages.append, cancelled=lambda: bool(messages))  # once the export has begun
    assert any("Exporting" in m for m in messages)
    assert not encoder_dir.exists() or not any(encoder_dir.iterdir())  # no export, no temporary folder
