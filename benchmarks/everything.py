"""Benchmark: automatic segmentation ("segment everything") against transformers' pipeline.

The same image, model and parameters go through transformers' ``mask-generation``
pipeline (the baseline: it cannot reuse an embedding) and through
``napari_sam.segment_everything`` cold (encoder + decoder) and from the cached embedding,
in one run; the ratios are printed. The masks are compared too: the pipeline's masks are
pasted with our rule (best predicted IoU first, no pixel twice) and matched to ours by IoU.

Weights are random (nothing is downloaded), so two parameter sets are run:
``reference`` (Meta's defaults; a random model's candidates all fail the IoU filter, so
this times the prompt-to-score path) and ``permissive`` (thresholds that let a random
model's masks through, so every prompt is also upsampled and post-processed: the worst
case for us). A trained model sits in between.

transformers' pipeline imports torchvision (its NMS), which this project does not need;
run the benchmark where both are installed, e.g. a virtual environment with the matching
pair ``pip install torch==2.14.1 torchvision==0.29.1`` and this package:

    python benchmarks/everything.py                  # ViT-L, 32 points per side (~5 min on 2 cores)
    python benchmarks/everything.py --arch vit_b --points-per-side 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from volume import build_model  # noqa: E402

SETTINGS = {
    "reference": {},
    # random weights: predicted IoU ~ +-0.05 and logits ~ +-0.03, so no mask is stable at
    # Meta's offset; every candidate with a positive predicted IoU is kept, upsampled and NMS'd
    "permissive": {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "stability_score_offset": 0.001},
}


def pipeline_run(model_dir: Path, image: np.ndarray, points_per_side: int, options: dict):
    from PIL import Image
    from transformers import pipeline

    generator = pipeline("mask-generation", model=str(model_dir), device="cpu")
    t = time.perf_counter()
    out = generator(Image.fromarray(image), points_per_batch=64, points_per_crop=points_per_side, **options)
    seconds = time.perf_counter() - t
    masks = [np.asarray(m, bool) for m in out["masks"]]
    scores = [float(s) for s in out["scores"]]
    return seconds, masks, scores


def pasted(shape, masks, scores):
    """The pipeline's overlapping masks, pasted with our rule."""
    from napari_sam import everything as ev

    cands = []
    for m, s in zip(masks, scores):
        box = ev.mask_box(m)
        if box is None:
            continue
        cands.append(ev._Candidate(box=box, mask=m[box[0]:box[2], box[1]:box[3]], predicted_iou=s,
                                   stability=1.0, point=(0.0, 0.0), crop=(0, 0, *shape)))
    return ev.paste(shape, cands)[0]


def our_candidates(engine, image, params) -> list[np.ndarray]:
    """Our masks after NMS and before the paste: what the pipeline returns (full-size bool)."""
    from napari_sam import everything as ev

    emb = engine.embed(image)
    steps = ev._decode_crop(engine, emb, (0, 0, *image.shape[:2]), image.shape[:2], 0, params, lambda: False)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            cands = stop.value
            break
    out = []
    for c in cands:
        m = np.zeros(image.shape[:2], bool)
        m[c.box[0]:c.box[2], c.box[1]:c.box[3]] = c.mask
        out.append(m)
    return out


def compare_sets(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict:
    """Greedy one-to-one matching of two lists of (overlapping) masks by IoU."""
    pairs = []
    for i, m in enumerate(ours):
        for j, t in enumerate(theirs):
            inter = np.count_nonzero(m & t)
            if inter:
                pairs.append((inter / np.count_nonzero(m | t), i, j))
    return _match(pairs, len(ours), len(theirs))


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Greedy one-to-one matching of instances by IoU."""
    a_ids = [i for i in np.unique(ours) if i]
    b_ids = [i for i in np.unique(theirs) if i]
    pairs = []
    for i in a_ids:
        m = ours == i
        for j in np.unique(theirs[m]):
            if j:
                t = theirs == j
                pairs.append(((m & t).sum() / (m | t).sum(), i, j))
    out = _match(pairs, len(a_ids), len(b_ids))
    out["pixel_agreement"] = float(((ours > 0) == (theirs > 0)).mean())
    return out


def _match(pairs, n_ours, n_theirs) -> dict:
    pairs.sort(reverse=True)
    used_a, used_b, ious = set(), set(), []
    for iou, i, j in pairs:
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        ious.append(float(iou))
    matched = sum(iou >= 0.9 for iou in ious)
    return {"ours": n_ours, "pipeline": n_theirs, "matched_iou_0.9": int(matched),
            "median_iou": round(float(np.median(ious)), 4) if ious else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_l", choices=["tiny", "vit_b", "vit_l"])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--settings", default="reference,permissive")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a missing or broken torchvision (see the docstring)
        sys.exit(f"transformers' mask-generation pipeline needs torchvision ({exc}); see this file's docstring")
    import skimage.data
    import torch

    import napari_sam
    from transformers import SamImageProcessor

    image = np.stack([skimage.data.coins()] * 3, axis=-1)
    work = Path(tempfile.mkdtemp(prefix="sam-everything-"))
    model_dir = build_model(args.arch, work / "model")
    if not (model_dir / "preprocessor_config.json").exists():
        SamImageProcessor().save_pretrained(model_dir)  # the pipeline needs one
    engine = napari_sam.load_model(model_dir, device="cpu", dtype="fp32")
    print(f"model: random {args.arch}, image coins {image.shape[:2]}, {args.points_per_side}² points, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    results = {}
    for name in args.settings.split(","):
        options = SETTINGS[name]
        base, masks, scores = pipeline_run(model_dir, image, args.points_per_side, options)
        cache = napari_sam.EmbeddingCache(False)
        params = dict(points_per_side=args.points_per_side, **options)
        t = time.perf_counter()
        cold = napari_sam.segment_everything(engine, image, cache=cache, **params)
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        warm = napari_sam.segment_everything(engine, image, cache=cache, **params)
        t_warm = time.perf_counter() - t
        assert np.array_equal(cold.labels, warm.labels)
        cmp = compare(warm.labels, pasted(image.shape[:2], masks, scores))
        sets = compare_sets(our_candidates(engine, image, napari_sam.EverythingParams(**params)), masks)
        results[name] = {"pipeline_s": base, "ours_cold_s": t_cold, "ours_cached_s": t_warm,
                         "cold_ratio": base / t_cold, "cached_ratio": base / t_warm, "labels": cmp,
                         "masks_before_paste": sets}
        print(f"[{name}] pipeline {base:.1f} s | ours cold {t_cold:.1f} s ({base / t_cold:.1f}x) | "
              f"ours from the cached embedding {t_warm:.1f} s ({base / t_warm:.1f}x)")
        print(f"[{name}] masks after NMS: ours {sets['ours']}, pipeline {sets['pipeline']}, matched at "
              f"IoU>=0.9 {sets['matched_iou_0.9']}, median matched IoU {sets['median_iou']}")
        print(f"[{name}] instance labels (both pasted best first): ours {cmp['ours']}, pipeline {cmp['pipeline']}, "
              f"matched at IoU>=0.9 {cmp['matched_iou_0.9']}, median matched IoU {cmp['median_iou']}, "
              f"foreground agreement {cmp['pixel_agreement']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
