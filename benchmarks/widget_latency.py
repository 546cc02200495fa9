"""Benchmark: what a user of the widget feels, in a real napari viewer (issue 15).

* Event-loop gaps: a 20 ms QTimer on the GUI thread records when it fires while the widget
  loads the model and embeds the first image, embeds another image, embeds a stack and
  propagates a label through it. A gap is the time between two ticks; a frozen GUI shows
  as a gap (target: none over 100 ms).
* Click → preview: a point is added to the prompts layer as a click adds it; the time until
  the preview layer holds the mask and napari has processed the events that follow
  (median of 20 clicks), against the bare decoder call (``SamModel`` with cached image
  embeddings, low-res logits only) and ``engine.predict`` (full-size mask) timed in the
  same process. Target: ≤ 1.2 × bare decoder + one frame (16 ms).

Run under a display (``xvfb-run -a python benchmarks/widget_latency.py``). Weights are
random (nothing is downloaded); ``--arch vit_b`` is the issue's setting.

    xvfb-run -a -s "-screen 0 1366x768x24" python benchmarks/widget_latency.py --arch vit_b
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def gaps_ms(ticks) -> dict:
    d = np.diff(np.asarray(ticks)) * 1000
    if len(d) == 0:
        return {"ticks": len(ticks), "max_ms": None}
    return {"ticks": len(ticks), "max_ms": round(float(d.max()), 1), "p99_ms": round(float(np.percentile(d, 99)), 1),
            "over_100ms": int((d > 100).sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_b", choices=["tiny", "vit_b", "vit_l"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--fresh-export", action="store_true",
                        help="an empty $NAPARI_SAM_ENCODERS: the first load exports the encoder")
    parser.add_argument("-o", "--output", help="JSON record")
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_sam.bench import _median_ms as median_ms
    from napari_sam.bench import random_model

    tmp = Path(tempfile.mkdtemp(prefix="napari-sam-latency-"))
    if args.arch == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import build_tiny_sam

        build_tiny_sam(tmp / "model")
        model_dir = tmp / "model"
    else:
        model_dir = random_model(args.arch, tmp / "model")
    import os

    os.environ.setdefault("NAPARI_SAM_CACHE", str(tmp / "cache"))
    if args.fresh_export:
        os.environ["NAPARI_SAM_ENCODERS"] = str(tmp / "encoders")
    from skimage import data

    viewer = napari.Viewer(show=True)
    image = data.coins()
    viewer.add_image(image, name="coins")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
    widget.model.model_edit.setText(str(model_dir))
    widget.model.backend_combo.setCurrentText(args.backend)
    widget.model.dtype_combo.setCurrentText(args.dtype)
    app = QApplication.instance()
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)

    idle = QEventLoop.ProcessEventsFlag.AllEvents | QEventLoop.ProcessEventsFlag.WaitForMoreEvents

    def wait(predicate, timeout=1800):
        """Run the event loop as napari does, idle between events (no busy polling)."""
        end = time.perf_counter() + timeout
        while not predicate():
            app.processEvents(idle)  # the 20 ms timer guarantees a wake-up
            if "Error" in widget.status.text():
                raise RuntimeError(widget.status.text())
            if time.perf_counter() > end:
                raise TimeoutError("the widget did not finish")

    def phase(name, start_fn, done_fn):
        ticks.clear()
        start = time.perf_counter()
        start_fn()
        wait(done_fn)
        seconds = time.perf_counter() - start
        record["phases"][name] = {"seconds": round(seconds, 2), **gaps_ms(ticks)}
        print(f"{name}: {seconds:.1f} s, event-loop gaps {record['phases'][name]}", flush=True)

    record = {"arch": args.arch, "phases": {}}
    state = widget.state
    phase("load model + first embedding", widget.compute_embedding, lambda: state.current_embedding() is not None)
    engine = state.engine
    record["engine"] = repr(engine)

    # click -> preview
    points = state.points
    rng = np.random.default_rng(0)
    clicks = []
    for _ in range(args.clicks):
        points.data = np.empty((0, 2))
        app.processEvents()
        seen = []
        state.preview_ready.connect(seen.append)
        r, c = rng.uniform(20, image.shape[0] - 20), rng.uniform(20, image.shape[1] - 20)
        start = time.perf_counter()
        points.add([[r, c]])
        wait(lambda: bool(seen))
        app.processEvents()  # the repaint and what else the preview update queued
        clicks.append(time.perf_counter() - start)
        state.preview_ready.disconnect(seen.append)
    embedding = state.current_embedding()
    import torch

    from napari_sam import preprocess as pp

    feats = embedding.features.to(engine.device, engine.dtype)
    xy = torch.from_numpy(pp.points_to_model(np.array([[150.0, 190.0]]), image.shape, engine.spec)[None, None])
    labels = torch.ones((1, 1, 1), dtype=torch.int64)

    def bare():
        with torch.inference_mode():
            engine.model(image_embeddings=feats, input_points=xy, input_labels=labels, multimask_output=False)

    # napari's own cost of a click: a point added to a plain Points layer and repainted
    plain = viewer.add_points(np.empty((0, 2)), name="plain")
    floor = []
    for _ in range(args.clicks):
        start = time.perf_counter()
        plain.add([[rng.uniform(20, 280), rng.uniform(20, 360)]])
        app.processEvents()
        floor.append(time.perf_counter() - start)
    viewer.layers.remove(plain)
    napari_ms = 1000 * statistics.median(floor)
    bare_ms = median_ms(bare, 20)
    predict_ms = median_ms(lambda: engine.predict(embedding, points=[[150, 190]]), 20)
    click_ms = 1000 * statistics.median(clicks)
    record["click"] = {"preview_median_ms": round(click_ms, 1), "bare_decoder_ms": round(bare_ms, 1),
                       "predict_ms": round(predict_ms, 1), "target_ms": round(1.2 * bare_ms + 16, 1),
                       "ratio_to_bare": round(click_ms / bare_ms, 2), "napari_click_ms": round(napari_ms, 1),
                       "ours_beyond_napari_ms": round(click_ms - napari_ms, 1)}
    print(f"click→preview median {click_ms:.1f} ms; bare decoder {bare_ms:.1f} ms; predict {predict_ms:.1f} ms; "
          f"target ≤ {1.2 * bare_ms + 16:.1f} ms; napari's own click+repaint {napari_ms:.1f} ms "
          f"(so preview − napari = {click_ms - napari_ms:.1f} ms)", flush=True)
    points.data = np.empty((0, 2))

    # another image
    cam = data.camera()[::2, ::2]
    layer = viewer.add_image(cam, name="camera")
    state.image_combo.select(layer)
    phase("embed a second image", widget.compute_embedding, lambda: state.current_embedding() is not None)

    # a stack: embed, then propagate a label
    vol = np.stack([np.roll(cam, 3 * i, axis=1) for i in range(args.slices)])
    stack = viewer.add_image(vol, name="stack")
    state.image_combo.select(stack)
    viewer.dims.set_current_step(0, 0)
    app.processEvents()
    widget.stack.show_for(stack)
    phase("embed stack", widget.stack.embed_stack, lambda: state.stack_worker is None)
    seen = []
    state.preview_ready.connect(seen.append)
    widget.prompts.ensure_layers(stack)
    state.points.add([[0, 128, 128]])
    wait(lambda: bool(seen) and state.current_embedding() is not None)
    widget.labels.commit()
    widget.stack.min_iou_spin.setValue(0.0)  # random weights: carry the label through every slice
    app.processEvents()
    phase("propagate", widget.propagate, lambda: state.stack_worker is None)
    record["propagate_status"] = widget.status.text()
    print("after propagating:", widget.status.text(), flush=True)
    timer.stop()
    viewer.close()
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
