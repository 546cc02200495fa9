"""`napari-sam bench` as users run it (a fresh process), on the tiny model: the record has
every row this machine can run, fp32 rows are exact, and ratios are computed from the
same-process baseline."""

from __future__ import annotations

import json

import pytest

from test_cli import run_cli


def test_bench_writes_a_complete_record(tiny_sam_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = run_cli("bench", "--model", str(tiny_sam_dir), "--device", "cpu", "--quick", "--slices", "6",
                  "-o", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(out.read_text())
    assert json.loads(res.stdout) == record
    assert record["machine"]["cores"] >= 1 and record["machine"]["torch"]
    rows = {(r["backend"], r["dtype"]): r for r in record["encoders"]}
    assert ("torch", "fp32") in rows
    assert ("openvino", "int8") not in rows  # --quick
    from napari_sam.api import resolve_runtime

    _, backend, precision = resolve_runtime("cpu")
    assert record["default"] == {"backend": backend, "dtype": precision}
    for (kind, dtype), row in rows.items():
        assert row["vs_baseline"] == pytest.approx(record["baseline_s"] / row["s_per_image"], rel=0.02)
        assert 0 <= row["mask_iou_min"] <= row["mask_iou_mean"] <= 1
        if dtype == "fp32":  # torch and OpenVINO fp32 are the baseline's function
            assert row["embedding_rel_err"] < 1e-5 and row["mask_iou_mean"] == 1.0
    if record["machine"]["openvino"]:
        assert ("openvino", "fp32") in rows and ("openvino", "int8-weights") in rows
        assert rows[("openvino", "int8-weights")]["embedding_rel_err"] > 1e-4  # really quantized
    if record["machine"]["onnxruntime"]:
        assert ("onnxruntime", "fp32") in rows and ("onnxruntime", "int8-weights") in rows
        assert rows[("onnxruntime", "int8-weights")]["embedding_rel_err"] > 1e-4
    assert set(record["batches"]) == {"1", "2", "4"}
    click = record["click_ms"]
    assert click["ratio"] == pytest.approx(click["predict"] / click["bare_decoder"], rel=0.02)
    assert 0 < record["reopen_s"] < 60 and record["peak_rss_mb"] > 100
    assert "reopen a cached 6-slice stack" in res.stderr


def test_bench_refuses_bad_numbers():
    res = run_cli("bench", "--random", "vit_b", "--repeats", "0")
    assert res.returncode == 2 and "--repeats" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("bench", "--random", "vit_b", "--backends", "openvino,tensorrt")
    assert res.returncode == 2 and "--backends" in res.stderr and "Traceback" not in res.stderr


def test_bench_measures_only_the_backends_asked_for(tiny_sam_dir):
    pytest.importorskip("onnxruntime")
    res = run_cli("bench", "--model", str(tiny_sam_dir), "--device", "cpu", "--quick", "--slices", "2",
                  "--backends", "ONNXRuntime", "--preprocessing", "medsam")
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(res.stdout)
    assert {(r["backend"], r["dtype"]) for r in record["encoders"]} == {("onnxruntime", "fp32"),
                                                                        ("onnxruntime", "int8-weights")}
    assert record["baseline_s"] > 0 and record["preprocessing"] == "medsam"


def test_bad_output_and_bad_choices_are_refused_before_any_work(tiny_sam_dir, tmp_path):
    res = run_cli("bench", "--model", str(tiny_sam_dir), "-o", str(tmp_path / "no" / "x.json"))
    assert res.returncode == 2 and "-o" in res.stderr and "baseline" not in res.stderr
    (tmp_path / "imgs").mkdir()
    import numpy as np
    import tifffile

    tifffile.imwrite(tmp_path / "imgs" / "a.tif", np.zeros((32, 32), np.uint8))
    res = run_cli("batch", str(tmp_path / "imgs"), "--point", "5,5", "-o", str(tmp_path / "out"),
                  "--model", str(tiny_sam_dir), "--dtype", "int4")
    assert res.returncode == 2 and "int4" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    res = run_cli("segment", str(tmp_path / "x.tif"), "--point", "5,5", "-o", str(tmp_path / "y.tif"),
                  "--backend", "OpenVINO", "--dtype", "int8", "--device", "cuda:7")
    assert res.returncode == 2 and "Traceback" not in res.stderr
