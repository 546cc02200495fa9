"""``napari-sam everything``: automatic segmentation of an image or a stack into instance labels."""

from __future__ import annotations

import csv
import sys

import numpy as np

from .api import EverythingParams

# (option, EverythingParams field, type, help)
OPTIONS = [
    ("--points-per-side", "points_per_side", int, "grid points per side (default 32: 1024 prompts)"),
    ("--points-per-batch", "points_per_batch", int, "prompts decoded together (default 64)"),
    ("--pred-iou-thresh", "pred_iou_thresh", float, "keep masks whose predicted IoU is above this (default 0.88)"),
    ("--stability-score-thresh", "stability_score_thresh", float,
     "keep masks whose stability score is at least this (default 0.95)"),
    ("--stability-score-offset", "stability_score_offset", float, "logit offset of the stability score (default 1)"),
    ("--box-nms-thresh", "box_nms_thresh", float, "box IoU above which the weaker mask goes (default 0.7)"),
    ("--crop-n-layers", "crop_n_layers", int, "extra layers of overlapping crops, each embedded (default 0)"),
    ("--crop-nms-thresh", "crop_nms_thresh", float, "box NMS threshold between crops (default 0.7)"),
    ("--crop-overlap-ratio", "crop_overlap_ratio", float, "crop overlap, fraction of the short side (default 0.34)"),
    ("--crop-n-points-downscale-factor", "crop_n_points_downscale_factor", int,
     "points per side shrink by this per crop layer (default 1)"),
    ("--min-area", "min_mask_region_area", int, "fill holes / remove islands smaller than this (pixels, default 0)"),
    ("--link-iou", "link_iou", float, "3D: IoU that links an object on one slice to the next (default 0.3)"),
]


def add_parser(sub, add_model_args, add_cache_args, add_intensity_args) -> None:
    p = sub.add_parser("everything", help="segment every object of an image or stack (automatic masks) "
                       "into an instance labels TIFF")
    p.add_argument("image", help="2D image or 3D stack: TIFF, PNG, JPEG, .npy or a zarr array folder")
    for flag, _field, kind, text in OPTIONS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--slice-range", metavar="A:B", help="3D: only slices A to B-1 (Python range, e.g. 10:20; "
                   "write --slice-range=-5: for a negative start)")
    p.add_argument("--axis", type=int, help="stack axis (default 0: Z or T); giving it reads the file as a stack")
    p.add_argument("--2d", dest="force_2d", action="store_true",
                   help="treat a 3-D array as one multichannel 2D image (Y, X, C), not a stack "
                   "(the default for up to 16 channels)")
    add_intensity_args(p)
    add_model_args(p)
    add_cache_args(p)
    p.add_argument("-o", "--output", required=True, help="labels TIFF to write (0 = background; the smallest unsigned type that holds the ids)")
    p.add_argument("--table", metavar="CSV", help="also write one row per object (id, area, scores, point, box, slices)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT (and --table) if they exist")


def _params(args) -> EverythingParams:
    chosen = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _k, _t in OPTIONS}
    return EverythingParams(**{k: v for k, v in chosen.items() if v is not None})


def _is_stack(image, args) -> bool:
    if args.force_2d:
        return False
    if args.axis is not None:  # asked for a stack axis: a stack
        return True
    if image.ndim == 4:
        return True
    # (Y, X, C) with up to 16 channels is one image (as `segment` decides); more is a stack
    return image.ndim == 3 and image.shape[-1] > 16


def _check_outputs(args, user_error) -> None:
    """Before anything loads: outputs that differ, are TIFF/CSV, are new (or --overwrite) and writable."""
    from pathlib import Path

    from ._fileio import cannot_write

    out = Path(args.output)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise user_error(f"-o {args.output}: the labels are written as TIFF; name it *.tif or *.tiff")
    if args.axis is not None and args.force_2d:
        raise user_error("--axis reads the file as a stack and --2d as one image; give one of them")
    if args.table and Path(args.table).resolve() == out.resolve():
        raise user_error(f"--table {args.table} is the labels output too; give the table its own name (*.csv)")
    if args.table is not None and Path(args.table).suffix.lower() != ".csv":
        raise user_error(f"--table {args.table!r}: the table is CSV; name it *.csv")
    paths = [("-o", out)] + ([("--table", Path(args.table))] if args.table else [])
    for flag, path in paths:
        if path.resolve() == Path(args.image).resolve():
            raise user_error(f"{flag} {path} is the input image; write the result elsewhere")
        if path.is_dir():
            raise user_error(f"{flag} {path} is a folder; give a file name")
        if path.exists() and not args.overwrite:
            raise user_error(f"{path} exists; pass --overwrite to replace it")
        folder = path.parent
        if folder.exists() and not folder.is_dir():
            raise user_error(f"{flag} {path}: {folder} is not a folder")
        if not folder.is_dir():
            raise user_error(f"{flag} {path}: the folder {folder} does not exist")
        reason = cannot_write(folder)
        if reason:
            raise user_error(f"{flag} {path}: cannot write into {folder} ({reason})")


def write_table(path, records) -> None:
    from ._fileio import atomic_write

    columns = ["id", "area", "predicted_iou", "stability", "point_row", "point_col",
               "box_row0", "box_col0", "box_row1", "box_col1", "slice", "first_slice", "last_slice"]

    def rows():
        for r in records:
            yield [r.id, r.area, r.predicted_iou, r.stability, r.point[0], r.point[1], *r.box,
                   "" if r.z is None else r.z,
                   "" if r.slices is None else r.slices[0], "" if r.slices is None else r.slices[1]]

    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(columns)
        out.writerows(rows())


def cmd_everything(args, user_error, load_engine, open_cache, intensity, slices) -> int:
    from tqdm import tqdm

    from . import api

    from .preprocess import check_image_2d

    params = _params(args)  # ValueError naming the option's field before anything loads
    _check_outputs(args, user_error)
    image = api.open_volume(args.image)  # a stack is read slice by slice (memory-mapped TIFF/.npy, zarr)
    stack = None
    if not _is_stack(image, args):
        image = np.asarray(image)
    if _is_stack(image, args):
        if image.ndim < 3:
            raise user_error(f"--axis {args.axis}: {args.image} is 2D {image.shape}, not a stack")
        stack = api.Stack(image, axis=args.axis or 0, **intensity)
        chosen = slices(args.slice_range, len(stack), "--slice-range") if args.slice_range else range(len(stack))
        z_range = (chosen.start, chosen.stop)
        params.check_image(stack.slice_shape)
    else:
        if args.slice_range:
            raise user_error(f"--slice-range needs a 3D stack; {args.image} is 2D {image.shape}")
        if image.ndim == 3 and args.force_2d and image.shape[-1] > 16:
            raise user_error(f"--2d: {args.image} {image.shape} has {image.shape[-1]} values per pixel; "
                             "a 2D image has at most 16 channels (drop --2d to segment it as a stack)")
        check_image_2d(image)
        params.check_image(image.shape[:2])  # too small, or crops under 2 pixels: said now, not after the model
        api.resolve_intensity(image, **intensity)  # --channel/--window checked before the model loads
    engine = load_engine(args)
    cache = open_cache(args)
    if stack is None:
        print(f"{engine}; segmenting everything in {args.image} {image.shape} ...", file=sys.stderr)
        steps = api.segment_everything_steps(engine, image, params=params, cache=cache, **intensity)
        bar = tqdm(total=1, unit="batch", desc="segment everything", file=sys.stderr)
    else:
        n = z_range[1] - z_range[0]
        print(f"{engine}; segmenting everything in slices {z_range[0]}-{z_range[1] - 1} of {args.image} "
              f"{image.shape} ...", file=sys.stderr)
        steps = api.segment_everything_volume_steps(engine, stack, z_range=z_range, params=params, cache=cache)
        bar = tqdm(total=n, unit="slice", desc="segment everything", file=sys.stderr)
    try:
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                result = stop.value
                break
            if stack is None and step.stage == "decoding":
                bar.total = step.total
                bar.n = step.done
                bar.refresh()
            elif step.stage == "linking":
                bar.n = step.done
                bar.refresh()
            if step.stage != "linking":
                bar.set_postfix_str(step.stage if step.z is None else f"slice {step.z}: {step.stage}")
    finally:
        bar.close()
    from ._fileio import storable_labels

    for path, write in ((args.output, lambda: api.write_labels_tiff(args.output, result.labels, overwrite=args.overwrite)),
                        (args.table, lambda: write_table(args.table, result.records))):
        if path:
            try:
                write()
            except OSError as exc:  # the folder changed since the check (full disk, permissions)
                raise user_error(f"cannot write {path}: {exc.strerror or exc}") from None
    stored = storable_labels(result.labels, args.output).dtype
    print(f"{len(result.records)} objects; wrote {args.output} {result.labels.shape} {stored}"
          + (f" and {args.table}" if args.table else ""))
    return 0
