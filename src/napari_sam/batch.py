"""Scripted label export over many files: ``napari-sam batch PROMPTS.csv -o OUTDIR``.

The CSV has one row per prompt group, napari coordinates:

========== =============================================================================
image      path of a 2D image or 3D stack, relative to the CSV (TIFF, PNG, JPEG, .npy)
points     ``"[[row, col], ...]"`` (``[[plane, row, col], ...]`` is not used: see ``slice``)
point_labels ``"[1, 0, ...]"``: 1 object, 0 background (default all 1)
boxes      ``"[[row0, col0, row1, col1], ...]"``: each box is one object
slice      3D: the slice the prompts are on (required for a stack)
propagate  3D: ``true`` to carry the objects through the stack (default false)
========== =============================================================================

Each row needs points or boxes. Rows naming the same image add objects to the same labels
image (new ids, never painting over an earlier row's labels), written as
``OUTDIR/<stem>_labels.tif``. ``OUTDIR/summary.csv`` gets one line per image (image,
status, objects, seconds, message). A bad row or an unreadable image fails that image
only; the run goes on. Images whose output exists are skipped, so a rerun finishes what an
interrupted one left. Images run here or, with ``scheduler``, on a Dask cluster
(:mod:`napari_sam.cluster`).
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import api
from .annotate import parse_literal
from .cluster import ModelSettings, run_jobs, worker_cache, worker_engine

COLUMNS = ("image", "points", "point_labels", "boxes", "slice", "propagate")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long prompt lists are the user's to give
SUMMARY_COLUMNS = ("image", "status", "objects", "seconds", "message")


@dataclass(frozen=True)
class PromptRow:
    """One CSV row's prompts, in (row, col) pixels."""

    line: int
    points: list | None = None
    point_labels: list | None = None
    boxes: list | None = None
    slice: int | None = None
    propagate: bool = False


@dataclass
class ImageJob:
    """Everything one image needs; small and picklable (it travels to cluster workers)."""

    name: str
    path: str
    output: str
    rows: list[PromptRow] = field(default_factory=list)
    problem: str | None = None


@dataclass
class ImageResult:
    image: str
    status: str  # "ok", "failed" or "skipped"
    objects: int = 0
    seconds: float = 0.0
    message: str = ""


def _value(text: str, column: str, line: int):
    text = (text or "").strip()
    if text.lower() in ("", "null", "none", "nan"):
        return None
    try:
        return parse_literal(text)
    except ValueError:
        raise ValueError(f"line {line}: {column} {text[:60]!r} is not a list") from None


def _pairs(value, column: str, line: int, width: int) -> list | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=object)
    if arr.ndim == 1 and len(arr) == width:
        value = [value]  # one given flat
    try:
        out = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"line {line}: {column} must be a list of {width}-number lists") from None
    if out.ndim != 2 or out.shape[1] != width or len(out) == 0 or not np.isfinite(out).all():
        raise ValueError(f"line {line}: {column} must be a non-empty list of [{'row, col' if width == 2 else 'row0, col0, row1, col1'}]")
    return out.tolist()


def parse_prompt_row(values: dict, line: int) -> PromptRow:
    """One CSV row (column → text) into a :class:`PromptRow`; ``ValueError`` names the line."""
    points = _pairs(_value(values.get("points"), "points", line), "points", line, 2)
    boxes = _pairs(_value(values.get("boxes"), "boxes", line), "boxes", line, 4)
    labels = _value(values.get("point_labels"), "point_labels", line)
    if points is None and boxes is None:
        raise ValueError(f"line {line}: give points or boxes")
    if labels is not None:
        if points is None:
            raise ValueError(f"line {line}: point_labels without points")
        labels = list(np.atleast_1d(labels))
        if len(labels) != len(points) or any(v not in (0, 1) or isinstance(v, bool) for v in labels):
            raise ValueError(f"line {line}: point_labels must be one 1 or 0 per point ({len(points)} points)")
        labels = [int(v) for v in labels]
    z = _value(values.get("slice"), "slice", line)
    if z is not None and (isinstance(z, bool) or not isinstance(z, int) or z < 0):
        raise ValueError(f"line {line}: slice must be a whole number >= 0, got {values.get('slice')!r}")
    flag = (values.get("propagate") or "").strip().lower()
    if flag not in ("", "true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"line {line}: propagate must be true or false, got {values.get('propagate')!r}")
    return PromptRow(line, points, labels, boxes, z, flag in ("true", "1", "yes"))


def read_jobs(csv_path, outdir) -> list[ImageJob]:
    """The images a prompts CSV names, in first-mention order, each with its rows."""
    csv_path, outdir = Path(csv_path), Path(outdir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} does not exist")
    jobs: dict[str, ImageJob] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        unknown = sorted(set(header) - set(COLUMNS))
        if "image" not in header or unknown:
            raise ValueError(f"{csv_path.name}: columns {header}; expected 'image' and any of {list(COLUMNS[1:])}"
                             + (f" (unknown: {unknown})" if unknown else ""))
        for values in reader:
            line = reader.line_num
            name = (values.get("image") or "").strip()
            if not name:
                raise ValueError(f"{csv_path.name} line {line}: the image column is empty")
            path = str((Path(name) if Path(name).is_absolute() else csv_path.parent / name).resolve())
            job = jobs.get(path)  # "a.tif" and "./a.tif" are one image: one job, one output
            if job is None:
                job = jobs[path] = ImageJob(name, path, "")
            try:
                if values.get(None):
                    raise ValueError(f"line {line}: more values than the header has columns")
                job.rows.append(parse_prompt_row(values, line))
            except ValueError as exc:
                job.problem = job.problem or str(exc)
    _name_outputs(list(jobs.values()), outdir)
    return list(jobs.values())


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")


def folder_jobs(folder, outdir, row: PromptRow) -> list[ImageJob]:
    """The same prompts on every image of ``folder`` (``napari-sam batch FOLDER --box ...``),
    in name order; sub-folders are not entered."""
    folder, outdir = Path(folder), Path(outdir)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    jobs = [ImageJob(p.name, str(p.resolve()), "", [row]) for p in files]
    _name_outputs(jobs, outdir)
    return jobs


def _name_outputs(jobs: list[ImageJob], outdir: Path) -> None:
    """``<stem>_labels.tif``; images whose stems collide are told apart by their path, and
    any name still taken gets a number: no two images ever write one file."""
    stems: dict[str, int] = {}
    for job in jobs:
        stem = _stem(job.name)
        stems[stem] = stems.get(stem, 0) + 1
    for job in jobs:
        stem = _stem(job.name)
        if stems[stem] > 1:
            stem = "_".join(Path(job.name).with_suffix("").parts).replace("..", "up").lstrip("_/")
        job.output = stem
    taken: set[str] = set()
    for job in jobs:
        name, k = job.output, 1
        while name.lower() in taken:
            k += 1
            name = f"{job.output}_{k}"
        taken.add(name.lower())
        job.output = str(outdir.resolve() / f"{name}_labels.tif")


def _stem(name: str) -> str:
    stem = Path(name).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".npy", ".png", ".jpg", ".jpeg"):
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return Path(stem).stem


def _is_stack(data, rows: list[PromptRow]) -> bool:
    if data.ndim == 2 or (data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4):
        if any(r.slice is not None for r in rows):
            raise ValueError(f"the image is 2D {tuple(data.shape)} (gray or colour): a slice is for stacks")
        return False
    if any(r.slice is not None for r in rows):
        return True
    return data.ndim == 4 or (data.ndim == 3 and data.shape[-1] > 16)


def segment_image(job: ImageJob, settings: ModelSettings, intensity: dict, multimask: bool = False) -> ImageResult:
    """Segment one image's rows and write its labels TIFF (what each worker runs)."""
    t0 = time.perf_counter()
    try:
        if job.problem:
            raise ValueError(job.problem)
        if not os.path.exists(job.path):
            raise FileNotFoundError(f"image not found: {job.path}")
        data = api.open_volume(job.path)
        stacked = _is_stack(data, job.rows)
        if stacked and any(r.slice is None for r in job.rows):
            raise ValueError(f"{job.name} is a stack of shape {tuple(data.shape)}: every row needs a slice (the CSV's slice column, or --slice)")
        if not stacked and any(r.propagate for r in job.rows):
            raise ValueError(f"{job.name} is 2D {tuple(data.shape)}: propagate needs a stack")
        engine, cache = worker_engine(settings), worker_cache(settings)
        labels, objects = _segment_rows(engine, cache, data, job.rows, stacked, intensity, multimask)
        api.write_labels_tiff(job.output, labels, overwrite=True)
        return ImageResult(job.name, "ok", objects, time.perf_counter() - t0)
    except (OSError, ValueError, TypeError, IndexError, MemoryError) as exc:
        message = str(exc) or type(exc).__name__
        if job.name not in message and Path(job.name).name not in message and not message.startswith("line "):
            message = f"{job.name}: {message}"
        return ImageResult(job.name, "failed", 0, time.perf_counter() - t0, message)


def _segment_rows(engine, cache, data, rows, stacked, intensity, multimask):
    stack = api.Stack(data, **intensity) if stacked else None
    shape = stack.spatial_shape if stacked else np.asarray(data).shape[:2]
    labels = np.zeros(shape, np.uint32)
    next_id = 1
    for row in rows:
        try:
            found, objs = _segment_row(engine, cache, data, stack, row, intensity, multimask)
        except (ValueError, IndexError) as exc:
            where = f"line {row.line}" if row.line else "the prompts"  # line 0: given on the command line
            raise ValueError(f"{where}: {exc}") from None
        free = (labels == 0) & (found > 0)  # an earlier row's labels are kept
        labels[free] = found[free].astype(np.uint32) + (next_id - 1)
        next_id += len(objs)
    present = np.unique(labels)
    return labels, int((present > 0).sum())


def _segment_row(engine, cache, data, stack, row, intensity, multimask):
    prompts = dict(points=row.points, point_labels=row.point_labels, boxes=row.boxes, multimask=multimask,
                   cache=cache)
    if stack is not None:
        if not 0 <= row.slice < len(stack):
            raise IndexError(f"slice {row.slice} is outside the stack's {len(stack)} slices")
        found, objs, _ = api.segment_volume(engine, stack, row.slice, propagate_objects=row.propagate, **prompts)
    else:
        found, objs = api.segment_2d(engine, np.asarray(data), **prompts, **intensity)
    return found, objs


def run_batch(source, outdir, settings: ModelSettings = ModelSettings(), *, intensity: dict | None = None,
              multimask: bool = False, scheduler: str | None = None, overwrite: bool = False,
              progress: bool = True) -> list[ImageResult]:
    """Run every image of ``source`` (a prompts CSV, or jobs from :func:`folder_jobs`);
    write the labels and ``OUTDIR/summary.csv``."""
    from tqdm import tqdm

    outdir = Path(outdir)
    jobs = list(source) if isinstance(source, list) else read_jobs(source, outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    results: list[ImageResult | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        if not overwrite and os.path.exists(job.output):
            results[i] = ImageResult(job.name, "skipped", message=f"{Path(job.output).name} exists")
        else:
            todo.append(i)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="image", disable=not progress)
    for k, result in run_jobs(segment_image, [(jobs[i], settings, intensity or {}, multimask) for i in todo],
                              scheduler=scheduler):
        results[todo[k]] = result
        bar.update(1)
        bar.set_postfix(failed=sum(r is not None and r.status == "failed" for r in results))
    bar.close()
    write_summary(outdir / "summary.csv", results)
    return results


def write_summary(path: Path, results) -> None:
    from ._fileio import atomic_write

    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_COLUMNS)
        for r in results:
            writer.writerow([r.image, r.status, r.objects, f"{r.seconds:.2f}", r.message])
