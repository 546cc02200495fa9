"""Benchmark: cold stack encoding vs warm reopen from the cache, bytes per slice, and
peak memory as the stack grows.

Ratios are measured against a baseline taken in the same run (these machines are noisy).
Weights are random (nothing is downloaded): timing does not depend on their values.

    python benchmarks/volume.py                    # ViT-B sized encoder, 4 slices
    python benchmarks/volume.py --arch vit_l -n 2  # ViT-L (slow on CPU: ~30-40 s a slice)
    python benchmarks/volume.py --arch tiny -n 32  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ARCHS = {
    # hidden, layers, heads, global attention layers (Meta's SAM configurations)
    "vit_b": (768, 12, 12, [2, 5, 8, 11]),
    "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
}


def build_model(arch: str, directory: Path) -> Path:
    import torch
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    if arch == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny_sam

        build_tiny_sam(directory)
        return directory
    hidden, layers, heads, global_idx = ARCHS[arch]
    config = SamConfig(vision_config=dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        global_attn_indexes=global_idx, initializer_range=0.02,
    ))
    SamModel(config).save_pretrained(directory)
    return directory


def synthetic_stack(n: int, size: int = 512):
    """A lazily generated stack (dask): each slice is made only when it is read."""
    import dask.array as da

    def make(block_id):
        z = block_id[0]
        rng = np.random.default_rng(z)
        yy, xx = np.mgrid[:size, :size]
        img = rng.normal(200, 20, (size, size)) + 800 * (((yy - size / 2) ** 2 + (xx - size / 2 - z) ** 2) < (size / 4) ** 2)
        return img.astype(np.uint16)[None]

    return da.map_blocks(make, dtype=np.uint16, chunks=((1,) * n, (size,), (size,)))


def timed_encode(engine, stack, cache):
    t = time.perf_counter()
    cached = sum(p.cached for p in stack.encode(engine, cache) if p.fraction == 1.0)
    return time.perf_counter() - t, cached


def peak_rss_child(model_dir: str, n: int, cache_dir: str) -> None:
    import napari_sam
    from napari_sam.cache import EmbeddingCache
    from napari_sam.volume import Stack

    engine = napari_sam.load_model(model_dir, device="cpu", dtype="fp32")
    stack = Stack(synthetic_stack(n))
    for _ in stack.encode(engine, EmbeddingCache(cache_dir, memory_bytes=64 * 2**20)):
        pass
    print(json.dumps({"n": n, "peak_rss_mib": _peak_rss_mib()}))


def _peak_rss_mib() -> float:
    """This process's peak RSS. ru_maxrss survives fork+exec on Linux (a child would
    report its parent's peak), so prefer VmHWM, which exec resets."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_b", choices=["tiny", "vit_b", "vit_l"])
    parser.add_argument("-n", "--slices", type=int, default=4)
    parser.add_argument("--rss-sizes", default="4,8,16", help="stack sizes for the peak-memory check (tiny model)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_rss_child(args.child[0], int(args.child[1]), args.child[2])
        return

    import napari_sam
    from napari_sam.cache import EmbeddingCache
    from napari_sam.volume import Stack

    work = Path(tempfile.mkdtemp(prefix="sam-bench-"))
    model_dir = build_model(args.arch, work / "model")
    engine = napari_sam.load_model(model_dir, device="cpu", dtype="fp32")
    print(f"model: random {args.arch}, {engine.device}, torch threads {__import__('torch').get_num_threads()}")

    stack = Stack(synthetic_stack(args.slices))
    cache_dir = work / "cache"
    cold, _ = timed_encode(engine, stack, EmbeddingCache(cache_dir))
    warm, hits = timed_encode(engine, Stack(synthetic_stack(args.slices)), EmbeddingCache(cache_dir))
    stats = EmbeddingCache(cache_dir).stats()
    print(f"cold encode of {args.slices} slices: {cold:.2f} s ({cold / args.slices:.2f} s/slice)")
    print(f"warm reopen (new cache object, disk hits {hits}/{args.slices}): {warm:.3f} s")
    print(f"ratio cold/warm: {cold / max(warm, 1e-9):.0f}x")
    print(f"bytes per cached slice: {stats.bytes / max(stats.entries, 1) / 2**20:.2f} MiB (float16, compressed)")

    tiny_dir = build_model("tiny", work / "tiny") if args.arch != "tiny" else model_dir
    sizes = [int(s) for s in args.rss_sizes.split(",")]
    rows = []
    for n in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(tiny_dir), str(n), str(work / f"rss{n}")],
            capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mib"]
    for row in rows:
        print(f"peak RSS encoding {row['n']:>4} slices (lazy 512x512 stack): {row['peak_rss_mib']:.0f} MiB "
              f"(x{row['peak_rss_mib'] / base:.2f} vs {rows[0]['n']} slices)")


if __name__ == "__main__":
    main()
