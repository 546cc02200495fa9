"""The ``batch`` subcommand and ``embed --scheduler`` (part of the command line;
:mod:`napari_sam.cli` registers them). Thin over :mod:`napari_sam.batch` and
:mod:`napari_sam.cluster`."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, add_model_args, add_cache_args, add_intensity_args, point_arg, box_arg) -> None:
    batch = sub.add_parser("batch", help="segment many images from a prompts CSV into labels TIFFs")
    batch.add_argument("prompts", help="CSV: image, points, point_labels, boxes, slice, propagate (docs/usage.md); "
                       "or a FOLDER of images, all given the prompts below")
    batch.add_argument("--point", action="append", type=point_arg, default=[], metavar="ROW,COL[,LABEL]",
                       help="with a FOLDER: a point prompt for every image; repeatable")
    batch.add_argument("--box", action="append", type=box_arg, default=[], metavar="R0,C0,R1,C1",
                       help="with a FOLDER: a box for every image; repeatable")
    batch.add_argument("--slice", type=int, metavar="Z", help="with a FOLDER of stacks: the slice the prompts are on")
    batch.add_argument("--propagate", action="store_true", help="with a FOLDER of stacks: propagate from --slice")
    batch.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                       help="folder for <stem>_labels.tif and summary.csv")
    batch.add_argument("--overwrite", action="store_true", help="redo images whose output exists (default: skip)")
    batch.add_argument("--multimask", action="store_true", help="keep the best of 3 candidates per object")
    add_intensity_args(batch)
    add_scheduler_arg(batch)
    add_model_args(batch)
    add_cache_args(batch)


def add_scheduler_arg(p) -> None:
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="spread the work over this Dask scheduler's workers (tcp://host:8786); "
                   "they must see the same files and cache folder")


def settings(args):
    from .cluster import ModelSettings

    import os

    from .api import MODEL_ENV

    cache = "" if getattr(args, "no_cache", False) else (str(Path(args.cache).resolve()) if args.cache else None)
    # the workers get the model this machine would load: $NAPARI_SAM_MODEL and relative
    # paths are resolved here, not in each worker's environment and folder
    model = args.model or os.environ.get(MODEL_ENV) or None
    if model and Path(model).exists():
        model = str(Path(model).resolve())
    if args.scheduler and cache is None:
        from .api import EmbeddingCache

        cache = str(EmbeddingCache().directory)  # the workers get this machine's default folder by name
    return ModelSettings(model=model, device=args.device, dtype=args.dtype, backend=args.backend,
                         compile=getattr(args, "compile", False), cache=cache)


def _source(args):
    """The jobs (a FOLDER with --point/--box) or the CSV path; checked before any model loads."""
    from .batch import PromptRow, folder_jobs, read_jobs

    given = args.point or args.box or args.slice is not None or args.propagate
    if Path(args.prompts).is_dir():
        if not (args.point or args.box):
            raise ValueError(f"{args.prompts} is a folder: give the prompts for every image (--point/--box)")
        row = PromptRow(0, [p[:2] for p in args.point] or None,
                        [int(p[2]) if len(p) == 3 else 1 for p in args.point] or None, args.box or None,
                        args.slice, args.propagate)
        return folder_jobs(args.prompts, args.output, row)
    if given:
        raise ValueError("--point/--box/--slice/--propagate go with a FOLDER of images; a CSV has its own prompts")
    read_jobs(args.prompts, args.output)  # a missing or malformed CSV fails now
    return args.prompts


def _writable(folder: Path) -> None:
    """The output folder exists (or is made) and takes files: checked before any model loads."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write into the output folder {folder}: {exc.strerror or exc}") from None


def cmd_batch(args, intensity: dict) -> int:
    from .batch import run_batch

    source = _source(args)
    _writable(Path(args.output))
    results = run_batch(source, args.output, settings(args), intensity=intensity,
                        multimask=args.multimask, scheduler=args.scheduler, overwrite=args.overwrite)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
    for r in results:
        if r.status == "failed":
            print(f"failed: {r.image}: {r.message}", file=sys.stderr)
    print(f"{counts['ok']} images labelled, {counts['failed']} failed, {counts['skipped']} skipped "
          f"(outputs exist); summary in {args.output}/summary.csv")
    return 1 if counts["failed"] else 0


def cmd_embed_on_cluster(args, stack, indices) -> int:
    """`embed --scheduler`: one task per slice (or per --batch-size slices) on the cluster."""
    from tqdm import tqdm

    from .cluster import embed_slices, run_jobs

    if getattr(args, "no_cache", False):
        raise ValueError("`embed` fills the cache; it cannot run with --no-cache")
    conf = settings(args)
    order = list(range(len(stack))) if indices is None else list(indices)
    per_task = 1 if args.batch_size == "auto" else args.batch_size  # auto: each worker sizes its own calls
    chunks = [order[i:i + per_task] for i in range(0, len(order), per_task)]
    jobs = [(str(Path(args.volume).resolve()), args.axis, chunk, stack.mapping, conf, args.batch_size) for chunk in chunks]
    bar = tqdm(total=len(order), unit="slice", desc="embedding", file=sys.stderr)
    cached = 0
    for _, (done, already) in run_jobs(embed_slices, jobs, scheduler=args.scheduler):
        cached += already
        bar.update(done)
    bar.close()
    print(f"{len(order)} slices of {args.volume} in {conf.cache} ({cached} were already cached)")
    return 0
