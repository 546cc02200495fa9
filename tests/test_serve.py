"""The HTTP server: the Azure schema through FastAPI, limits, 4xx-not-5xx, and the
``napari-sam serve`` command launched as a user launches it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from napari_sam.scoring import Limits, Scorer, decode_mask
from napari_sam.serve import create_app

from test_scoring import png_b64, request


@pytest.fixture(scope="module")
def scene_b64():
    img = np.full((150, 240, 3), 15, np.uint8)
    img[40:110, 60:200] = (200, 210, 90)
    return png_b64(img)


@pytest.fixture(scope="module")
def app(tiny_engine):
    return create_app(Scorer(tiny_engine, limits=Limits(max_request_bytes=2 * 2**20, max_image_pixels=200_000)))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def test_azure_sample_request(client, scene_b64):
    body = request(
        [scene_b64, "", "[[60, 40, 200, 110]]", "", False],              # one box
        [scene_b64, "[[[100, 70]], [[20, 20]]]", "", "", True],          # a mask per point, multimask
        [scene_b64, "[[[100, 70], [20, 20]]]", "", "[[1, 0]]", False],   # one mask from two points
        [scene_b64, "[[[100, 70]]]", "[[60, 40, 200, 110]]", "[[0]]", True],
    )
    res = client.post("/score", json=body)
    assert res.status_code == 200, res.text
    result = res.json()
    assert isinstance(result, list) and len(result) == 4
    # what Azure's clients index
    first = result[0]["response"]["predictions"][0]["masks_per_prediction"][0]
    assert isinstance(first["iou_score"], float)
    assert [len(r["response"]["predictions"]) for r in result] == [1, 2, 1, 1]
    assert [len(p["masks_per_prediction"]) for r in result for p in r["response"]["predictions"]] == [1, 3, 3, 1, 3]
    for r in result:
        for p in r["response"]["predictions"]:
            for m in p["masks_per_prediction"]:
                assert decode_mask(m["encoded_binary_mask"]).shape == (150, 240)
    # "params" may be left out
    without = client.post("/score", json=request([scene_b64, "", "[[60, 40, 200, 110]]", "", False], params=False))
    assert without.status_code == 200 and without.json()[0] == result[0]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"input_data": {"columns": ["image", "input_boxes"], "data": [["AAAA", "[[0, 0, 1, 1]]"]]}}, 422, "image is not a PNG, JPEG, TIFF, BMP or WebP file"),
    ({"input_data": {"columns": ["image", "input_boxes"], "data": [["???", "[[0, 0, 1, 1]]"]]}}, 422, "neither base64"),
    ({"input_data": {"columns": ["image", "input_boxes"], "data": [["https://example.org/a.png", "[[0, 0, 1, 1]]"]]}},
     422, "--allow-urls"),
    ({"input_data": {"columns": ["picture"], "data": [["x"]]}}, 422, "unknown or repeated columns"),
    ({"inputs": []}, 422, "input_data"),
])
def test_bad_input_is_4xx_with_a_message(client, body, status, message):
    res = client.post("/score", json=body)
    assert res.status_code == status and message in json.dumps(res.json()["detail"]), res.text


def test_prompt_errors_name_the_row(client, scene_b64):
    res = client.post("/score", json=request([scene_b64, "", "[[60, 40, 200, 110]]", "", False],
                                              [scene_b64, "[[[900, 10]]]", "", "", False]))
    assert res.status_code == 422
    assert res.json()["detail"].startswith("row 1: prediction 0: points [[900.0, 10.0]] (x, y) lie outside")


def test_not_json_and_wrong_shapes_are_422(client):
    assert client.post("/score", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    assert client.post("/score", json={"input_data": {"columns": "image", "data": 5}}).status_code == 422
    deep = "[" * 100_000 + "]" * 100_000
    assert client.post("/score", content=deep.encode(), headers={"Content-Type": "application/json"}).status_code < 500


def test_validation_errors_are_one_line_without_the_input(client, scene_b64):
    res = client.post("/score", json={"input_data": {"columns": ["image"], "data": [scene_b64]}})
    detail = res.json()["detail"]
    assert res.status_code == 422 and isinstance(detail, str) and detail.startswith("input_data.data.0")
    assert scene_b64[:100] not in detail  # the input is not echoed back
    res = client.post("/score", content=json.dumps({"input_data": 1}).encode(), headers={"Content-Type": "text/plain"})
    assert res.status_code == 422 and "Content-Type: application/json" in res.json()["detail"]


def test_mlflow_split_is_accepted_too(client, scene_b64):
    body = {"dataframe_split": {"columns": ["image", "input_boxes"], "data": [[scene_b64, "[[60, 40, 200, 110]]"]]}}
    res = client.post("/score", json=body)
    assert res.status_code == 200 and len(res.json()[0]["response"]["predictions"]) == 1


def test_hostile_prompts_are_4xx(client, scene_b64):
    deep = client.post("/score", json=request([scene_b64, "[" * 100_000, "", "", False]))
    assert deep.status_code == 422 and "not a JSON list" in deep.json()["detail"]
    many = json.dumps([[[i % 200, 20] for i in range(65)]])
    res = client.post("/score", json=request([scene_b64, many, "", "", False]))
    assert res.status_code == 413 and "65 points; at most 64" in res.json()["detail"]


def test_limits_are_413(client, scene_b64):
    big = base64.b64encode(os.urandom(3 * 2**20)).decode()
    res = client.post("/score", json=request([big, "", "[[0, 0, 1, 1]]", "", False]))
    assert res.status_code == 413 and "larger than 2097152 bytes" in res.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(4):
            yield b" " * 2**20

    assert client.post("/score", content=chunks(), headers={"Content-Type": "application/json"}).status_code == 413
    huge = png_b64(np.zeros((500, 500), np.uint8))
    res = client.post("/score", json=request([huge, "", "[[0, 0, 1, 1]]", "", False]))
    assert res.status_code == 413 and "500 x 500 pixels; at most 200000" in res.json()["detail"]


def test_health_and_openapi(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    spec = client.get("/openapi.json").json()
    assert {"/score", "/health"} <= set(spec["paths"])
    assert {"200", "413", "422"} <= set(spec["paths"]["/score"]["post"]["responses"])


def test_concurrent_requests_take_turns_on_the_model(client, scene_b64):
    bodies = [request([scene_b64, f"[[[{60 + 10 * i}, 70]]]", "", "", False]) for i in range(6)]
    serial = [client.post("/score", json=b).json() for b in bodies]
    results = [None] * len(bodies)

    def post(i):
        results[i] = client.post("/score", json=bodies[i]).json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_for_any_request(case):
    """A bounded property-based run against the OpenAPI spec: never a 5xx, always a
    documented status and a response that matches the spec."""
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance])


# --- as launched -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _docs_client() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    blocks = text.split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if "df_from_json" in b)


def test_napari_sam_serve_as_launched(tiny_sam_dir, tmp_path, scene_b64):
    """`napari-sam serve --workers 2` in a fresh process, then the Azure request over HTTP;
    the answer equals `napari-sam score` on the same request file."""
    from test_cli import run_cli

    body = request([scene_b64, "[[[100, 70]]]", "[[60, 40, 200, 110]]", "", True])
    req_file = tmp_path / "request.json"
    req_file.write_text(json.dumps(body))
    scored = run_cli("score", str(req_file), "--model", str(tiny_sam_dir), "--no-cache")
    assert scored.returncode == 0, scored.stderr

    port = _free_port()
    exe = shutil.which("napari-sam")
    cmd = [exe] if exe else [sys.executable, "-m", "napari_sam.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd + ["serve", "--port", str(port), "--workers", "2", "--model", str(tiny_sam_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as res:
                    health = json.loads(res.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        assert health["status"] == "ok"
        status, answer = _post(f"http://127.0.0.1:{port}/score", body)
        assert status == 200 and answer == json.loads(scored.stdout)
        status, problem = _post(f"http://127.0.0.1:{port}/score", {"input_data": {"columns": ["image"], "data": [["x"]]}})
        assert status == 422 and "no prompt" in problem["detail"]
        # the Python client in docs/serving.md, as written but for the URL and the file
        snippet = _docs_client()
        assert "http://127.0.0.1:5001/score" in snippet and '"cells.png"' in snippet
        cells = tmp_path / "cells.png"
        from PIL import Image
        Image.fromarray(np.full((480, 640, 3), 90, np.uint8)).save(cells)
        namespace: dict = {}
        exec(snippet.replace("http://127.0.0.1:5001", f"http://127.0.0.1:{port}")
             .replace('"cells.png"', repr(str(cells))), namespace)
        assert namespace["mask"].size == (640, 480) and isinstance(namespace["mask_iou"], float)
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "Traceback" not in out, out
