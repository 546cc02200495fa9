"""Batch scoring in the form of Azure ML's batch endpoint: CSV files with the real-time
request's columns in, one JSON line per row out.

Each output line is ``{"file": ..., "row_number_per_file": N, "response": {...}}`` (the
real-time response's entry for that row) or ``{"file": ..., "row_number_per_file": N,
"error": "..."}``. Rows stream through one at a time (a CSV of thousands of images never
sits in memory), each line is flushed as it is written, and a rerun with the same output
skips the rows already in it: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .scoring import COLUMNS, Scorer, ScoringError

# base64 images are far longer than the csv module's default field limit (128 KiB)
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class BatchSummary:
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0  # rows an earlier run left as errors (skipped unless retried)
    output: Path | None = None


def input_files(source: str | os.PathLike) -> list[Path]:
    """The CSV files a batch input names: the file itself, or a folder's ``*.csv`` (sorted)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path} holds no .csv file")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def _rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number, values, problem) for each data row; problem names a malformed row."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        unknown = sorted(set(header) - set(COLUMNS))
        if unknown or "image" not in header:
            raise ScoringError(f"{path.name}: header {header} must hold 'image' and only {list(COLUMNS)}")
        for n, values in enumerate(reader):
            if not values:
                continue
            if len(values) != len(header):
                yield n, None, f"row has {len(values)} values for {len(header)} columns"
            else:
                yield n, dict(zip(header, values)), None


def _count(path: Path) -> int:
    """Data rows in ``path`` (1 for a file that cannot be read: its one error line)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return max(0, sum(1 for values in csv.reader(f) if values) - 1)
    except (OSError, UnicodeDecodeError, csv.Error):
        return 1


def _done(output: Path, retry_failed: bool) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """Rows an earlier run already wrote (and those of them that failed); rewrites the file
    without a torn last line (and without its errors when they are to be retried)."""
    if output.is_dir():
        raise IsADirectoryError(f"{output} is a folder; give the JSON-lines file to write")
    if not output.exists():
        return set(), set()
    done, failed, kept = set(), set(), []
    with open(output, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                key = (record["file"], int(record["row_number_per_file"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by an interrupted run
            if "error" in record:
                if retry_failed:
                    continue
                failed.add(key)
            done.add(key)
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, output)
    return done, failed


def score_batch(scorer: Scorer, source, output, *, retry_failed: bool = False, progress: bool = True) -> BatchSummary:
    """Score every row of the CSV file(s) ``source`` into the JSON-lines file ``output``.

    A bad row (or a file whose header is wrong) is written as an ``"error"`` line and the
    run goes on. Rows already in ``output`` are skipped; with ``retry_failed`` their
    earlier errors are dropped and those rows scored again.
    """
    from tqdm import tqdm

    files = input_files(source)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done, failed_before = _done(output, retry_failed)
    summary = BatchSummary(output=output)
    counts = [_count(path) for path in files]
    bar = tqdm(total=sum(counts), unit="row", disable=not progress, file=sys.stderr)
    with open(output, "a", encoding="utf-8") as out:
        def write(record: dict) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())

        for path, count in zip(files, counts):
            name, seen = path.name, 0
            try:
                for n, values, problem in _rows(path):
                    bar.update(1)
                    seen += 1
                    if (name, n) in done:
                        summary.skipped += 1
                        summary.failed_before += (name, n) in failed_before
                        continue
                    record: dict = {"file": name, "row_number_per_file": n}
                    try:
                        if problem:
                            raise ScoringError(problem)
                        record.update(scorer.score_values(values))
                        summary.scored += 1
                    except ScoringError as exc:
                        record["error"] = str(exc)
                        summary.failed += 1
                    write(record)
            except (ScoringError, OSError, UnicodeDecodeError, csv.Error) as exc:
                bar.update(max(0, count - seen))
                if (name, -1) in done:
                    summary.skipped += 1
                    summary.failed_before += (name, -1) in failed_before
                else:
                    write({"file": name, "row_number_per_file": -1, "error": str(exc) if name in str(exc) else f"{name}: {exc}"})
                    summary.failed += 1
    bar.close()
    return summary
