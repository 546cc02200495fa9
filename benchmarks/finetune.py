"""Benchmark: what a fine-tuning step costs, against one click's decode in the same process.

A random SAM model (ViT-B or ViT-L: the decoder is the same size for both, the embeddings
too) fine-tunes on synthetic labelled images: the images are embedded once (timed apart,
as the cache would hold them), then ``--epochs`` epochs train. The baseline is a click's
``engine.predict`` on one of the same embeddings (the decoder a user waits for in the
widget), measured in the same run; the ratios are printed, so a noisy machine shows.

    python benchmarks/finetune.py                     # ViT-B, 8 images of 512x512 with 6 objects
    python benchmarks/finetune.py --arch vit_l --images 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def scenes(n: int, size: int, objects: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    rr, cc = np.mgrid[:size, :size]
    for _ in range(n):
        img = rng.normal(60, 12, (size, size))
        lab = np.zeros((size, size), np.uint16)
        for k in range(1, objects + 1):
            r, c = rng.integers(size // 8, size - size // 8, 2)
            m = (rr - r) ** 2 + (cc - c) ** 2 <= rng.integers(size // 24, size // 10) ** 2
            img[m & (lab == 0)] = rng.normal(170, 12, int((m & (lab == 0)).sum()))
            lab[m & (lab == 0)] = k
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(lab)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b", choices=["vit_b", "vit_l"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--objects", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()

    from napari_sam import api
    from napari_sam.bench import random_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model(args.arch, Path(tmp) / "model")
        engine = api.load_model(model_dir, device="cpu", dtype="fp32", backend="auto")
        images, labels = scenes(args.images, args.size, args.objects)
        cache = api.EmbeddingCache(Path(tmp) / "cache")
        t = time.perf_counter()
        embeddings = [api.embed_cached(engine, im, mapping=api.resolve_intensity(im), cache=cache) for im in images]
        embed_s = time.perf_counter() - t

        emb = embeddings[0]
        engine.predict(emb, points=[[args.size // 2, args.size // 2]])  # warm
        t = time.perf_counter()
        for i in range(args.clicks):
            engine.predict(emb, points=[[args.size // 2, 10 + i]])
        click_s = (time.perf_counter() - t) / args.clicks

        steps, stamps = [], []
        config = api.FinetuneConfig(epochs=args.epochs, patience=args.epochs, val_fraction=0.25)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        gen = api.finetune_steps(engine, images, labels, Path(tmp) / "out", config=config, cache=cache)
        while True:
            try:
                p = next(gen)
            except StopIteration as done:
                result = done.value
                break
            stamps.append((p.phase, time.perf_counter()))
            if p.phase == "train":
                steps.append(time.perf_counter())
        total_s = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step_s = float(np.median(np.diff(steps))) if len(steps) > 2 else float("nan")
        validate = [b - a for (pa, a), (pb, b) in zip(stamps, stamps[1:]) if pb == "validate" and pa == "train"]
        batch = config.batch_size

    print(f"{args.arch}: {args.images} images {args.size}x{args.size}, {result.train_objects} training / "
          f"{result.val_objects} validation objects, {result.steps} steps")
    print(f"  embedding (once, then cached): {embed_s:.1f} s ({embed_s / args.images:.2f} s/image)")
    print(f"  baseline: one click's decode (engine.predict)      {click_s * 1000:8.1f} ms")
    print(f"  one training step ({batch} objects, median)        {step_s * 1000:8.1f} ms   "
          f"{step_s / click_s:6.1f}x a click, {step_s / batch / click_s:5.2f}x a click per object")
    if validate:
        print(f"  validation after an epoch ({result.val_objects} objects x 2 prompts)   "
              f"{np.median(validate) * 1000:8.1f} ms   {np.median(validate) / click_s:6.1f}x a click")
    print(f"  whole fine-tune (cached embeddings, save included) {total_s:8.1f} s")
    print(f"  peak RSS growth during the fine-tune: {(rss1 - rss0) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
