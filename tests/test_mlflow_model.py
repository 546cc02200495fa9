"""The exported MLflow model: predict(DataFrame) equals `napari-sam score` on the same
request, nothing pickled, and `mlflow models serve` serves it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from test_cli import run_cli
from test_scoring import png_b64, request


@pytest.fixture(scope="module")
def exported(tiny_sam_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlflow") / "sam-model"
    res = run_cli("export-mlflow", "-o", str(out), "--model", str(tiny_sam_dir))
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def azure_request():
    img = np.full((90, 130, 3), 10, np.uint8)
    img[20:70, 30:100] = 230
    b64 = png_b64(img)
    return request([b64, "", "[[30, 20, 100, 70]]", "", False],
                   [b64, "[[[60, 40]], [[5, 5]]]", "", "", True],
                   [b64, "[[[60, 40], [5, 5]]]", "[[30, 20, 100, 70]]", "[[1, 0]]", "False"])


def test_export_is_self_contained_and_not_pickled(exported):
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert {"MLmodel", "input_example.json", "requirements.txt"} <= files
    assert any(f.startswith("artifacts/") and f.endswith("model.safetensors") for f in files)
    assert "code/napari_sam/scoring.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pyc"))]
    mlmodel = (exported / "MLmodel").read_text()
    assert "signature" in mlmodel and "input_points" in mlmodel and "code_model" in mlmodel
    again = run_cli("export-mlflow", "-o", str(exported))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_overwrite_replaces_only_a_model_and_only_when_the_new_one_is_written(exported, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "important.txt").write_text("keep me")
    res = run_cli("export-mlflow", "-o", str(precious), "--overwrite", "--model", str(exported / "artifacts" / "tiny_sam0"))
    assert res.returncode == 2 and "is not an MLflow model" in res.stderr
    assert (precious / "important.txt").read_text() == "keep me"
    before = (exported / "MLmodel").read_text()
    res = run_cli("export-mlflow", "-o", str(exported), "--overwrite", "--model", str(tmp_path / "no-such-model"))
    assert res.returncode == 2
    assert (exported / "MLmodel").read_text() == before  # the old model is untouched


def test_predict_equals_napari_sam_score(exported, azure_request, tiny_sam_dir, tmp_path):
    req_file = tmp_path / "request.json"
    req_file.write_text(json.dumps(azure_request))
    scored = run_cli("score", str(req_file), "--model", str(tiny_sam_dir), "--no-cache")
    assert scored.returncode == 0, scored.stderr
    frame = pd.DataFrame(azure_request["input_data"]["data"], columns=azure_request["input_data"]["columns"])
    model = mlflow.pyfunc.load_model(str(exported))
    out = model.predict(frame)
    assert list(out.columns) == ["response"]
    assert json.loads(json.dumps(out.to_dict(orient="records"))) == json.loads(scored.stdout)


def test_mlflow_models_serve(exported, azure_request):
    """`mlflow models serve` (the way any MLflow host runs it) answers the same rows."""
    exe = shutil.which("mlflow")
    if exe is None:
        pytest.skip("the mlflow command is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_ENV_CREATION": "true"}
    proc = subprocess.Popen([exe, "models", "serve", "-m", str(exported), "--env-manager", "local", "-p", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline
                time.sleep(0.5)
        body = {"dataframe_split": {"columns": azure_request["input_data"]["columns"],
                                    "data": azure_request["input_data"]["data"]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as res:
            served = json.loads(res.read())["predictions"]
        model = mlflow.pyfunc.load_model(str(exported))
        frame = pd.DataFrame(body["dataframe_split"]["data"], columns=body["dataframe_split"]["columns"])
        assert served == json.loads(json.dumps(model.predict(frame).to_dict(orient="records")))
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_bad_rows_name_the_row(exported):
    model = mlflow.pyfunc.load_model(str(exported))
    frame = pd.DataFrame([["iVBORw0K", "[[[1, 2]]]", "", "", False]],
                         columns=["image", "input_points", "input_boxes", "input_labels", "multimask_output"])
    with pytest.raises(Exception, match="row 0: image is not a PNG"):
        model.predict(frame)


def test_served_model_needs_no_napari_or_qt(exported):
    """What an MLflow host runs, in a fresh process: the input example scores without
    napari, Qt or vispy being imported."""
    code = (
        "import sys, mlflow.pyfunc, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({str(exported)!r})\n"
        f"out = m.predict(pd.read_json({str(exported / 'input_example.json')!r}, orient='split'))\n"
        "assert len(out) == 2\n"
        "print(sorted(k for k in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'vispy') if k in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
