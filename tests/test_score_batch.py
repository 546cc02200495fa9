"""Batch scoring: CSV files as Azure's batch endpoint takes them, JSON lines out, resumable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from napari_sam.score_batch import score_batch
from napari_sam.scoring import COLUMNS, Scorer, decode_mask

from test_cli import run_cli
from test_scoring import png_b64


def write_csv(path, rows):
    # exactly as Azure's batch notebook writes its input (pandas, booleans as False/True)
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False)


@pytest.fixture
def inputs(tmp_path):
    img = np.zeros((60, 90, 3), np.uint8)
    img[10:40, 30:70] = 200
    b64 = png_b64(img)
    folder = tmp_path / "in"
    folder.mkdir()
    write_csv(folder / "a.csv", [[b64, "[[[50, 25]], [[5, 5]]]", "", "", False],
                                 [b64, "", "[[30, 10, 70, 40]]", "", True],
                                 [b64, "[[[500, 25]]]", "", "", False]])  # outside the image
    write_csv(folder / "b.csv", [[b64, "[[[50, 25], [5, 5]]]", "[[30, 10, 70, 40]]", "[[1, 0]]", False]])
    (folder / "c.csv").write_text("image,input_point\nabc,[[[1, 2]]]\n")  # a typo in the header
    (folder / "notes.txt").write_text("not an input")
    return folder


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_stream_to_json_lines_and_bad_rows_are_reported(tiny_engine, inputs, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = score_batch(Scorer(tiny_engine), inputs, out, progress=False)
    assert (summary.scored, summary.failed, summary.skipped) == (3, 2, 0)
    lines = read_lines(out)
    keys = [(r["file"], r["row_number_per_file"]) for r in lines]
    assert keys == [("a.csv", 0), ("a.csv", 1), ("a.csv", 2), ("b.csv", 0), ("c.csv", -1)]
    assert "lie outside the 90 x 60 image" in lines[2]["error"]
    assert "input_point" in lines[4]["error"]
    preds = lines[0]["response"]["predictions"]
    assert len(preds) == 2 and len(preds[0]["masks_per_prediction"]) == 1
    assert len(lines[1]["response"]["predictions"][0]["masks_per_prediction"]) == 3  # "True" in the CSV
    assert decode_mask(lines[3]["response"]["predictions"][0]["masks_per_prediction"][0]["encoded_binary_mask"]).shape == (60, 90)


def test_an_interrupted_run_resumes(tiny_engine, inputs, tmp_path):
    out = tmp_path / "out.jsonl"
    scorer = Scorer(tiny_engine)
    reference = tmp_path / "reference.jsonl"
    score_batch(scorer, inputs, reference, progress=False)

    real = scorer.score_values
    calls = []

    def dies_on_the_third_row(values):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(values)

    scorer.score_values = dies_on_the_third_row
    with pytest.raises(KeyboardInterrupt):
        score_batch(scorer, inputs, out, progress=False)
    assert len(read_lines(out)) == 2
    with open(out, "a") as f:
        f.write('{"file": "a.csv", "row_numb')  # a line torn by the crash
    scorer.score_values = real
    summary = score_batch(scorer, inputs, out, progress=False)
    assert (summary.scored, summary.failed, summary.skipped) == (1, 2, 2)
    assert read_lines(out) == read_lines(reference)
    again = score_batch(scorer, inputs, out, progress=False)
    assert (again.scored, again.failed, again.skipped) == (0, 0, 5)
    retried = score_batch(scorer, inputs, out, retry_failed=True, progress=False)
    assert (retried.failed, retried.skipped) == (2, 3)
    assert len(read_lines(out)) == 5


def test_an_unreadable_file_is_one_error_line_and_the_run_goes_on(tiny_engine, inputs, tmp_path):
    (inputs / "0_latin1.csv").write_bytes("image,input_boxes\ncaf\xe9,[[0, 0, 1, 1]]\n".encode("latin-1"))
    out = tmp_path / "out.jsonl"
    summary = score_batch(Scorer(tiny_engine), inputs, out, progress=False)
    lines = read_lines(out)
    assert lines[0]["file"] == "0_latin1.csv" and lines[0]["row_number_per_file"] == -1
    assert "utf-8" in lines[0]["error"] and summary.scored == 3


def test_cli_score_batch_as_launched(tiny_sam_dir, inputs, tmp_path):
    out = tmp_path / "out.jsonl"
    res = run_cli("score-batch", str(inputs / "a.csv"), "-o", str(out), "--model", str(tiny_sam_dir), "--no-cache")
    assert res.returncode == 1, res.stderr  # one row failed
    assert "2 rows scored, 1 failed, 0 already in" in res.stdout
    assert len(read_lines(out)) == 3
    rerun = run_cli("score-batch", str(inputs / "a.csv"), "-o", str(out), "--model", str(tiny_sam_dir), "--no-cache")
    assert rerun.returncode == 1, rerun.stdout  # the failed row is still failed
    assert "0 rows scored, 0 failed, 3 already in" in rerun.stdout and "1 of them failed then" in rerun.stdout
    folder = run_cli("score-batch", str(inputs / "a.csv"), "-o", str(tmp_path), "--no-cache")
    assert folder.returncode == 2 and "is a folder" in folder.stderr
    missing = run_cli("score-batch", str(tmp_path / "nope"), "-o", str(out))
    assert missing.returncode == 2 and missing.stderr.strip().endswith("does not exist"), missing.stderr
