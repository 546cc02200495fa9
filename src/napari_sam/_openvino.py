"""The image encoder in OpenVINO (extra ``openvino``): exported with ``torch.export``,
converted to OpenVINO IR, optionally compressed or quantized with NNCF, cached on disk
(:mod:`napari_sam._exports`) and compiled for the CPU."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from ._exports import Progress, cached_export, calibration_pixels, embedding_graph, encoder_identity, run_polled

log = logging.getLogger(__name__)

FILES = ("encoder.xml", "encoder.bin")


@functools.cache
def core():
    """One OpenVINO runtime per process (creating one loads its plugins)."""
    import openvino as ov

    return ov.Core()


class _Request:
    """One OpenVINO infer request as a job for :func:`run_polled`."""

    def __init__(self, compiled, image: np.ndarray):
        self.request = compiled.create_infer_request()
        self.request.start_async({0: image})

    def wait(self, ms: int) -> bool:
        return self.request.wait_for(ms)

    def cancel(self) -> None:
        self.request.cancel()
        try:
            self.request.wait()
        except RuntimeError:
            pass  # "Infer Request was canceled"

    def result(self) -> np.ndarray:
        return self.request.get_output_tensor(0).data.copy()


class OpenVINOEncoder:
    """A compiled OpenVINO encoder; each image runs as one asynchronous, cancellable request.

    Always one image per request: batching gained ~6 % on the CPUs measured, while
    cancelling a request of one batch size and then running another size could fail
    inside OpenVINO's dynamic-shape attention.
    """

    name = "openvino"

    def __init__(self, compiled, precision: str, path: Path | None = None):
        self.compiled, self.precision, self.path = compiled, precision, path
        self.seconds_per_image: float | None = None  # the last run's time, for progress

    def encode_steps(self, pixels: np.ndarray):
        return (yield from run_polled(self, pixels, lambda image: _Request(self.compiled, image)))


def identity(model, fingerprint: str, precision: str) -> str:
    import openvino as ov

    return encoder_identity(model, fingerprint, precision, "openvino", ov.get_version().split("-")[0])


def _convert(model, input_size: int, precision: str, spec, say: Progress):
    import openvino as ov
    import torch

    example = torch.zeros(2, 3, input_size, input_size)  # batch 2: a batch of 1 would be baked in
    batch = torch.export.Dim("batch", min=1, max=1024)
    say("Exporting the image encoder to OpenVINO (once per model and precision) …")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes from transformers' SAM code
        exported = torch.export.export(embedding_graph(model), (example,), dynamic_shapes=({0: batch},))
        converted = ov.convert_model(exported)
    # Batch stays dynamic in the graph (measured: a graph fixed at batch 1 ran 18 % slower);
    # OpenVINOEncoder still feeds it one image per request.
    converted.reshape({converted.inputs[0]: ov.PartialShape([-1, 3, input_size, input_size])})
    if precision in ("int8", "int8-weights"):
        import nncf

        logging.getLogger("nncf").setLevel(logging.WARNING)  # its tables are for NNCF users
        # NNCF draws progress bars on stdout, which carries results (bench JSON, score output)
        with contextlib.redirect_stdout(sys.stderr):
            if precision == "int8-weights":
                say("Compressing the encoder's weights to int8 …")
                converted = nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)
            else:
                pixels = calibration_pixels(spec)
                say(f"Calibrating int8 on {len(pixels)} bundled images (a few minutes, once) …")
                converted = nncf.quantize(converted, nncf.Dataset(pixels), model_type=nncf.ModelType.TRANSFORMER,
                                          subset_size=len(pixels))
    return converted


def openvino_encoder(model, *, fingerprint: str, precision: str, spec, directory: Path | None = None,
                     say: Progress | None = None, elsewhere=None) -> OpenVINOEncoder:
    """Export (or read the cached export of) ``model``'s encoder and compile it for the CPU."""
    import openvino as ov

    say = say or (lambda message: log.info(message))
    input_size = int(model.config.vision_config.image_size)
    hint = "bf16" if precision == "bf16" else "f32"

    def load(source):  # a cached folder, or the converted model where none could be written
        model_or_path = str(source / FILES[0]) if isinstance(source, Path) else source
        return core().compile_model(model_or_path, "CPU", {"INFERENCE_PRECISION_HINT": hint})

    compiled, folder = cached_export(
        identity(model, fingerprint, precision), FILES,
        convert=lambda workdir: _convert(model, input_size, precision, spec, say),
        save=lambda converted, folder: ov.save_model(converted, str(folder / FILES[0]), compress_to_fp16=False),
        load=load, directory=directory, say=say, elsewhere=elsewhere,
        meta={"backend": "openvino", "version": ov.get_version(), "input_size": input_size})
    return OpenVINOEncoder(compiled, precision, folder)
