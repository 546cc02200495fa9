"""Benchmark: embedding a stack on a Dask cluster of 1 and of 2 workers, against the
local in-process run (`napari-sam embed` without --scheduler) measured in the same run.

Each configuration embeds the same slices into its own empty cache folder. The workers
get the torch threads of this machine divided between them, as dask-jobqueue or a
Kubernetes deployment would give each worker its share of a node.

    python benchmarks/cluster.py                   # ViT-B sized encoder, 8 slices
    python benchmarks/cluster.py --arch tiny -n 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def stack_file(directory: Path, n: int, size: int = 512) -> Path:
    import tifffile

    rng = np.random.default_rng(0)
    vol = rng.normal(100, 10, (n, size, size)).astype(np.float32)
    for z in range(n):
        vol[z, 100 + z:300 + z, 150:350] += 80
    path = directory / "stack.tif"
    tifffile.imwrite(path, vol)
    return path


def _limit_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_b", choices=["tiny", "vit_b", "vit_l"])
    ap.add_argument("-n", type=int, default=8, help="slices")
    ap.add_argument("--json", help="write the record here")
    args = ap.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from distributed import Client, LocalCluster
    from volume import build_model

    from napari_sam import api
    from napari_sam.cluster import ModelSettings, embed_slices, run_jobs

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(args.arch, tmp / "model")
        path = stack_file(tmp, args.n)
        stack = api.Stack(api.open_volume(path))
        record = {"arch": args.arch, "slices": args.n, "cores": cores}

        engine = api.load_model(str(model))
        cache = api.EmbeddingCache(tmp / "local")
        t = time.perf_counter()
        for _ in stack.encode(engine, cache):
            pass
        record["local_s"] = time.perf_counter() - t
        del engine

        for workers in (1, 2):
            threads = max(1, cores // workers)
            settings = ModelSettings(model=str(model), cache=str(tmp / f"cluster{workers}"))
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as c:
                with Client(c) as client:
                    client.run(_limit_threads, threads)
                    # load the model on every worker first: startup is not what is measured
                    client.run(lambda: __import__("napari_sam.cluster").cluster.worker_engine(settings))
                jobs = [(str(path), 0, [z], stack.mapping, settings, 1) for z in range(args.n)]
                t = time.perf_counter()
                done = sum(d for _, (d, _) in run_jobs(embed_slices, jobs, scheduler=c.scheduler_address))
                record[f"workers{workers}_s"] = time.perf_counter() - t
                assert done == args.n

    local = record["local_s"]
    print(f"{args.arch}, {args.n} slices of 512 x 512, {cores} cores (seconds; ratio = local / cluster)")
    print(f"  local (napari-sam embed):    {local:.1f} s")
    for w in (1, 2):
        s = record[f"workers{w}_s"]
        print(f"  cluster, {w} worker(s) x {max(1, cores // w)} thread(s): {s:.1f} s  (ratio {local / s:.2f})")
    print(f"  2 workers vs 1: {record['workers1_s'] / record['workers2_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
