"""Benchmark: requests/s of `napari-sam serve`, against the scorer called in-process.

Two kinds of traffic, each measured over HTTP and, as the baseline in the same run, by
calling :class:`napari_sam.scoring.Scorer` directly (so the ratio is the server's cost):

* "same image": one image, new prompts each request: the embedding comes from the cache,
  requests cost one decoder call (what an interactive client does);
* "new image": a different image each request: every request runs the encoder.

Then the same new-image traffic from concurrent clients against 1 and 2 worker processes
(each worker holds its own model): on a machine with C cores, W workers share them.
Weights are random (nothing is downloaded); timing does not depend on their values.

    python benchmarks/serve.py                      # ViT-L, as the Azure endpoint runs
    python benchmarks/serve.py --arch vit_b
    python benchmarks/serve.py --arch tiny --same 50 --new 8   # quick
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from volume import build_model  # noqa: E402


def image_b64(seed: int, size=(768, 1024)) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), 30, np.uint8)
    for _ in range(6):
        r, c = rng.integers(0, size[0] - 150), rng.integers(0, size[1] - 150)
        img[r:r + 120, c:c + 140] = rng.integers(80, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body(image: str, i: int) -> dict:
    x, y = 100 + (i * 37) % 800, 100 + (i * 53) % 550
    return {"input_data": {"columns": ["image", "input_points", "input_boxes", "input_labels", "multimask_output"],
                           "index": [0], "data": [[image, f"[[[{x}, {y}]]]", "", "", True]]}}


def post(port: int, payload: dict) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as res:
        assert res.status == 200
        json.loads(res.read())


def start_server(model: Path, workers: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "napari_sam.cli", "serve", "--port", str(port), "--workers",
                             str(workers), "--model", str(model)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
            time.sleep(0.5)


def timed(fn, payloads, clients: int = 1) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(fn, payloads))
    return len(payloads) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_l", choices=["tiny", "vit_b", "vit_l"])
    ap.add_argument("--same", type=int, default=20, help="requests on one (cached) image")
    ap.add_argument("--new", type=int, default=2, help="requests with a new image each")
    ap.add_argument("--json", help="write the record here")
    args = ap.parse_args()

    from napari_sam import load_model
    from napari_sam.scoring import Scorer

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.arch, Path(tmp) / "model")
        same = [body(image_b64(0), i) for i in range(args.same)]
        news = [body(image_b64(100 + i), i) for i in range(args.new)]
        news2 = [body(image_b64(200 + i), i) for i in range(2 * args.new)]
        scorer = Scorer(load_model(str(model)))
        scorer.score(same[0])  # warm: the image is cached
        record = {"arch": args.arch, "cpus": os.cpu_count()}
        record["direct_same"] = timed(scorer.score, same)
        record["direct_new"] = timed(scorer.score, news)
        del scorer

        proc, port = start_server(model, 1)
        try:
            post(port, same[0])
            record["http_same"] = timed(lambda p: post(port, p), same)
            record["http_new"] = timed(lambda p: post(port, p), news)
            record["http_new_1worker_2clients"] = timed(lambda p: post(port, p), news2, clients=2)
        finally:
            proc.terminate()
            proc.wait()
        proc, port = start_server(model, 2)
        try:
            post(port, same[0])
            post(port, same[1])
            record["http_new_2workers_2clients"] = timed(lambda p: post(port, p),
                                                         [body(image_b64(300 + i), i) for i in range(2 * args.new)],
                                                         clients=2)
        finally:
            proc.terminate()
            proc.wait()

    print(f"{args.arch} on {record['cpus']} CPUs (requests/s; baseline = the scorer called in-process)")
    print(f"  same image, new prompts: HTTP {record['http_same']:.2f}/s vs direct {record['direct_same']:.2f}/s "
          f"(ratio {record['http_same'] / record['direct_same']:.2f})")
    print(f"  new image each request:  HTTP {record['http_new']:.3f}/s vs direct {record['direct_new']:.3f}/s "
          f"(ratio {record['http_new'] / record['direct_new']:.2f})")
    print(f"  new images, 2 clients: 1 worker {record['http_new_1worker_2clients']:.3f}/s, 2 workers "
          f"{record['http_new_2workers_2clients']:.3f}/s (ratio "
          f"{record['http_new_2workers_2clients'] / record['http_new_1worker_2clients']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
