"""``napari-sam bench``: how fast SAM runs on this machine, and what each option costs.

Everything is measured in one process against a baseline taken in the same run: plain
transformers ``SamModel.get_image_embeddings`` at fp32 (machines are noisy; ratios hold
better than seconds). For each encoder backend and precision this machine can run:
seconds per image, the ratio to the baseline, and the accuracy cost as the embedding's
relative error and the IoU of the masks its embedding gives against the baseline's, on
the same 64 prompts (48 points, 16 boxes) through the same fp32 decoder. Then, with the
chosen engine: slices/s at batch 1/2/4, click→mask (prompt → full-size mask) against the
bare decoder call, and the time from opening a cached 100-slice stack to its first
mask. Peak RSS (per encoder row on Linux: loading, exporting and encoding) and the
machine (CPU flags, library versions) go into the JSON record.

With no weights at hand, ``--random vit_b|vit_l|vit_h`` builds randomly initialised
weights of Meta's shapes (initializer_range 0.02): timing does not depend on the values.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import preprocess as pp
from ._types import Prompt
from .api import EmbeddingCache, Stack, embed_cached, load_model

ARCHS = {
    # hidden size, layers, heads, global attention layers (Meta's SAM configurations)
    "vit_b": (768, 12, 12, [2, 5, 8, 11]),
    "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
    "vit_h": (1280, 32, 16, [7, 15, 23, 31]),
}
ALL_CHOICES = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16"),
               ("openvino", "int8-weights"), ("openvino", "int8"), ("onnxruntime", "fp32"),
               ("onnxruntime", "int8-weights")]


def random_model(arch: str, directory: Path) -> Path:
    """A ``save_pretrained`` folder of randomly initialised SAM weights of ``arch``'s shape."""
    import torch
    from transformers import SamConfig, SamModel

    if arch not in ARCHS:
        raise ValueError(f"--random {arch!r}: choose one of {', '.join(ARCHS)}")
    torch.manual_seed(0)
    hidden, layers, heads, global_idx = ARCHS[arch]
    config = SamConfig(vision_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          global_attn_indexes=global_idx, initializer_range=0.02))
    SamModel(config).save_pretrained(directory)
    return directory


def machine() -> dict:
    """CPU, flags that matter for SAM, cores and library versions."""
    import torch
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["cpu"] = model
        info["cpu_flags"] = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                                             "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"})
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import openvino

        info["openvino"] = openvino.get_version()
    except ImportError:
        info["openvino"] = None
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def test_prompts(shape, seed: int = 0) -> list[Prompt]:
    """48 single points and 16 boxes spread over an image of ``shape``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    prompts = [Prompt(points=[[rng.uniform(0, h - 1), rng.uniform(0, w - 1)]]) for _ in range(48)]
    for _ in range(16):
        r0, c0 = rng.uniform(0, h / 2), rng.uniform(0, w / 2)
        prompts.append(Prompt(box=[r0, c0, min(h - 1, r0 + rng.uniform(16, h / 2)),
                                   min(w - 1, c0 + rng.uniform(16, w / 2))]))
    return prompts


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: /proc/self/clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """Peak RSS since :func:`_reset_peak` (Linux), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _runnable(choices, device: str) -> list[tuple[str, str]]:
    from .api import resolve_runtime

    keep = []
    for backend, dtype in choices:
        try:
            _, kind, precision = resolve_runtime(device, dtype, backend)
        except ValueError:
            continue  # not on this machine (no OpenVINO, no native bf16, ...)
        if (kind, precision) not in keep:
            keep.append((kind, precision))
    return keep


def run(model=None, *, device: str = "auto", choices=None, repeats: int = 1, batch_sizes=(1, 2, 4),
        stack_slices: int = 100, preprocessing: str | None = None, say: Callable[[str], None] = print) -> dict:
    """Measure; returns the record :func:`main` writes as JSON (see the module docstring)."""
    from skimage import data

    image = data.coins()
    mapping = pp.resolve_intensity(image)
    rgb = pp.to_rgb_uint8(image, mapping)
    base = load_model(model, device=device, dtype="fp32", backend="torch", preprocessing=preprocessing)
    pixels = np.stack([pp.model_input(rgb, base.spec)[0]])
    prompts = test_prompts(image.shape)
    record = {"machine": machine(), "model": base.source.describe(), "preprocessing": base.spec.kind,
              "image": list(image.shape), "encoders": []}

    import torch

    say(f"baseline: plain SamModel fp32 on {base.device} …")
    with torch.inference_mode():
        tensor = torch.from_numpy(pixels).to(base.device)
        base.model.get_image_embeddings(tensor)  # warm-up, as for every other entry
        base_s, ref = _timed(lambda: base.model.get_image_embeddings(tensor), repeats)
    ref = ref.float().cpu()
    ref_embedding = base.embedding_from(ref, image.shape, mapping)
    ref_masks = [p.masks[0] for p in base.predict_batch(ref_embedding, prompts)]
    record["baseline_s"] = float(f"{base_s:.4g}")
    say(f"  {base_s:.2f} s/image")

    for backend, precision in _runnable(choices or ALL_CHOICES, device):
        say(f"{backend} {precision} …")
        _reset_peak()
        start = time.perf_counter()
        engine = base if (backend, precision) == ("torch", "fp32") else load_model(
            model, device=device, dtype=precision, backend=backend, preprocessing=preprocessing,
            on_progress=lambda m: say(f"  {m}"))
        prepare_s = time.perf_counter() - start
        engine.encode_rgb([rgb])  # warm-up (first-run allocations, OpenVINO's lazy init)
        seconds, features = _timed(lambda: engine.encode_rgb([rgb]), repeats)
        features = features.float().cpu()
        err = float((features - ref).norm() / ref.norm())
        got = base.predict_batch(base.embedding_from(features, image.shape, mapping), prompts)
        ious = [_iou(p.masks[0], m) for p, m in zip(got, ref_masks)]
        entry = {"backend": backend, "dtype": precision, "s_per_image": float(f"{seconds:.4g}"),
                 "vs_baseline": round(base_s / seconds, 2), "embedding_rel_err": float(f"{err:.3g}"),
                 "mask_iou_mean": round(float(np.mean(ious)), 4), "mask_iou_min": round(float(np.min(ious)), 4),
                 "load_s": round(prepare_s, 1), "peak_rss_mb": _peak_mb()}
        record["encoders"].append(entry)
        say(f"  {seconds:.2f} s/image ({entry['vs_baseline']}x), embedding error {err:.2g}, "
            f"mask IoU mean {entry['mask_iou_mean']:.4f} min {entry['mask_iou_min']:.4f}, "
            f"peak RSS {entry['peak_rss_mb']:.0f} MB (load {prepare_s:.0f} s)")
        if engine is not base:
            del engine

    engine = load_model(model, device=device, preprocessing=preprocessing)  # what users get by default
    record["default"] = {"backend": engine.backend, "dtype": engine.precision}
    say(f"default engine: {engine.backend} {engine.precision}")
    images = [rgb, rgb[::-1], rgb[:, ::-1], rgb[::-1, ::-1]]
    record["batches"] = {}
    for b in batch_sizes:
        batch = [np.ascontiguousarray(images[i % 4]) for i in range(b)]
        engine.encode_rgb(batch)
        seconds, _ = _timed(lambda: engine.encode_rgb(batch), repeats)
        record["batches"][str(b)] = round(b / seconds, 3)
        say(f"  batch {b}: {b / seconds:.3f} slices/s")

    embedding = engine.embed(image, mapping=mapping)
    point = Prompt(points=[[150, 190]])
    click_ms = _median_ms(lambda: engine.predict(embedding, points=point.points), 30)
    feats = embedding.features.to(engine.device, engine.dtype)
    xy = torch.from_numpy(pp.points_to_model(np.array([[150.0, 190.0]]), image.shape, engine.spec)[None, None])
    labels = torch.ones((1, 1, 1), dtype=torch.int64)

    def bare():
        with torch.inference_mode():
            return engine.model(image_embeddings=feats, input_points=xy.to(engine.device),
                                input_labels=labels.to(engine.device), multimask_output=False).pred_masks

    bare_ms = _median_ms(bare, 30)
    record["click_ms"] = {"predict": round(click_ms, 2), "bare_decoder": round(bare_ms, 2),
                          "ratio": round(click_ms / bare_ms, 3)}
    say(f"click→mask {click_ms:.1f} ms (full-size mask) vs bare decoder {bare_ms:.1f} ms "
        f"({click_ms / bare_ms:.2f}x)")

    record["reopen_s"] = _reopen(engine, embedding, stack_slices, say)
    record["peak_rss_mb"] = max([_peak_mb()] + [r["peak_rss_mb"] for r in record["encoders"]])
    say(f"peak RSS of the whole run {record['peak_rss_mb']:.0f} MB")
    return record


def _reopen(engine, embedding, n: int, say) -> float:
    """Seconds from opening a cached ``n``-slice stack (new cache object) to a mask on its middle slice.

    The cache is filled with one real embedding under every slice's key (what is timed
    is reading, verifying and decoding, not encoding)."""
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 4000, (n, 128, 128), dtype=np.uint16)
    with tempfile.TemporaryDirectory(prefix="napari-sam-bench-") as folder:
        cache = EmbeddingCache(folder)
        stack = Stack(volume)
        for z in range(n):
            cache.put(stack.key(z, engine), engine.embedding_from(embedding.features, (128, 128), stack.mapping))
        del cache, stack
        start = time.perf_counter()
        cache = EmbeddingCache(folder)
        stack = Stack(volume)
        got = embed_cached(engine, stack[n // 2], mapping=stack.mapping, cache=cache)
        engine.predict(got, points=[[64, 64]])
        seconds = time.perf_counter() - start
    say(f"reopen a cached {n}-slice stack → first mask: {seconds:.3f} s")
    return round(seconds, 3)


def main(args) -> int:
    """The ``bench`` command."""
    model = args.model
    with tempfile.TemporaryDirectory(prefix="napari-sam-random-") as tmp:
        if args.random:
            print(f"building random {args.random} weights (nothing is downloaded) …", file=sys.stderr)
            model = str(random_model(args.random, Path(tmp)))
        choices = [c for c in ALL_CHOICES if not (args.quick and c[1] == "int8")
                   and (not args.backends or c[0] in args.backends)]
        record = run(model, device=args.device, choices=choices, repeats=args.repeats,
                     stack_slices=args.slices, preprocessing=args.preprocessing, say=lambda m: print(m, file=sys.stderr, flush=True))
    record["model"] = f"random {args.random}" if args.random else record["model"]
    text = json.dumps(record, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    print(text)
    return 0
