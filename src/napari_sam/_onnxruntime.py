"""The image encoder in ONNX Runtime (extra ``onnxruntime``): exported with
``torch.onnx.export`` (its ``torch.export`` route where ``onnxscript`` is installed, as the
extra does; else the older tracing route), optionally quantized with ONNX Runtime's own tools, cached on disk
(:mod:`napari_sam._exports`) as ``encoder.onnx`` + ``encoder.onnx.data`` and run on the
CPU execution provider.

Precisions: ``fp32``; ``int8-weights`` (``quantize_dynamic``: int8 weights of every
MatMul, activations quantized per run). Full int8 (``quantize_static``) is not offered:
its calibration of a ViT-L ran a 24 GB machine out of memory, with or without the
attention products (OpenVINO's NNCF does it in less). ONNX Runtime's CPU provider has no
bf16 kernels for these graphs, so bf16 is refused rather than emulated.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from ._exports import Progress, cached_export, embedding_graph, encoder_identity, run_polled

log = logging.getLogger(__name__)

FILES = ("encoder.onnx", "encoder.onnx.data")
OPSET = 18  # the dynamo exporter's lowest
INPUT = "pixel_values"


class _Run:
    """One ``session.run`` in a thread, as a job for :func:`run_polled`; ``cancel``
    sets ONNX Runtime's terminate flag, which stops the run between operators."""

    def __init__(self, session, image: np.ndarray):
        import onnxruntime as ort

        self.options = ort.RunOptions()
        self.output = self.error = None
        self.thread = threading.Thread(target=self._run, args=(session, image), daemon=True,
                                       name="napari-sam-onnxruntime")
        self.thread.start()

    def _run(self, session, image):
        try:
            self.output = session.run(None, {INPUT: image}, self.options)[0]
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self.error = exc

    def wait(self, ms: int) -> bool:
        self.thread.join(ms / 1000)
        return not self.thread.is_alive()

    def cancel(self) -> None:
        self.options.terminate = True
        self.thread.join()

    def result(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        return self.output


class OnnxRuntimeEncoder:
    """An ONNX Runtime session of the encoder; each image is one cancellable run."""

    name = "onnxruntime"

    def __init__(self, session, precision: str, path: Path | None = None):
        self.session, self.precision, self.path = session, precision, path
        self.seconds_per_image: float | None = None  # the last run's time, for progress

    def encode_steps(self, pixels: np.ndarray):
        return (yield from run_polled(self, pixels, lambda image: _Run(self.session, image)))


def exporter() -> str:
    """``"torchscript"``, torch's tracing exporter, while torch has it; else ``"dynamo"``
    (``torch.export`` based; needs ``onnxscript``, in the extra). Measured on random ViT-L,
    same process: the traced graph ran 14.6 s fp32 and 9.0 s int8-weights in ONNX Runtime,
    the dynamo graph 15.8 s and 12.8 s (its export is faster, 38 s against 64 s, but that
    is paid once)."""
    import importlib.util

    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 9) or importlib.util.find_spec("torch.onnx._internal.torchscript_exporter"):
        return "torchscript"
    return "dynamo" if importlib.util.find_spec("onnxscript") else "torchscript"


def identity(model, fingerprint: str, precision: str) -> str:
    import onnxruntime as ort
    import torch

    # the graph comes from torch's exporter: its route and version are part of what was exported
    version = f"{ort.__version__}+opset{OPSET}+torch{torch.__version__.split('+')[0]}+{exporter()}"
    return encoder_identity(model, fingerprint, precision, "onnxruntime", version)


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Exporters' own notes (registrations, optimisation passes) at warning level and below."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@contextlib.contextmanager
def _root_logging_above(level: int):
    root = logging.getLogger()
    before = root.level
    root.setLevel(level + 10)
    try:
        yield
    finally:
        root.setLevel(before)


def _export(model, input_size: int, precision: str, spec, say: Progress, out: Path) -> Path:
    """Write ``encoder.onnx`` + ``encoder.onnx.data`` for ``precision`` into ``out``."""
    import onnx
    import torch

    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        raw = work / "raw.onnx"
        say("Exporting the image encoder to ONNX (once per model and precision) …")
        example = torch.zeros(2, 3, input_size, input_size)
        with (torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()),
              _quiet("torch.onnx", "torch._dynamo", "torch.export")):
            warnings.simplefilter("ignore")  # tracer notes from transformers' SAM code
            if exporter() == "dynamo":
                torch.onnx.export(embedding_graph(model), (example,), str(raw), input_names=[INPUT],
                                  output_names=["embeddings"], opset_version=OPSET, dynamo=True,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                                  external_data=True, verbose=False)
            else:
                torch.onnx.export(embedding_graph(model), (example,), str(raw), input_names=[INPUT],
                                  output_names=["embeddings"], opset_version=OPSET, dynamo=False,
                                  dynamic_axes={INPUT: {0: "batch"}, "embeddings": {0: "batch"}})
        if precision == "int8-weights":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = work / "quantized.onnx"
            say("Quantizing the encoder's weights to int8 …")
            # its tool logs advice on the root logger and prints on stdout (which carries results)
            with contextlib.redirect_stdout(sys.stderr), _root_logging_above(logging.WARNING):
                quantize_dynamic(raw, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                                 use_external_data_format=True)
            raw = quantized
        graph = onnx.load(str(raw), load_external_data=True)
        # one layout whatever the size (a ViT-H is over protobuf's 2 GB): graph + one data file
        onnx.save_model(graph, str(out / FILES[0]), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=FILES[1], size_threshold=1024)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def onnxruntime_encoder(model, *, fingerprint: str, precision: str, spec, directory: Path | None = None,
                        say: Progress | None = None, elsewhere=None) -> OnnxRuntimeEncoder:
    """Export (or read the cached export of) ``model``'s encoder and open an ONNX Runtime
    session on it."""
    import onnxruntime as ort

    say = say or (lambda message: log.info(message))
    input_size = int(model.config.vision_config.image_size)
    scratch: list[Path] = []

    def convert(workdir: Path | None) -> Path:
        if workdir is None:  # the cache cannot hold it: export to a private temporary folder
            workdir = Path(tempfile.mkdtemp(prefix="napari-sam-onnx-"))
            scratch.append(workdir)
        return _export(model, input_size, precision, spec, say, workdir)

    def load(folder: Path):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(folder / FILES[0]), options, providers=["CPUExecutionProvider"])

    try:
        session, folder = cached_export(
            identity(model, fingerprint, precision), FILES, convert=convert,
            save=lambda converted, folder: None, load=load, directory=directory, say=say,
            elsewhere=elsewhere,
            meta={"backend": "onnxruntime", "version": ort.__version__, "input_size": input_size})
    finally:
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
    return OnnxRuntimeEncoder(session, precision, folder)
