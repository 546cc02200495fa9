"""Where the image encoder runs: torch, or an exported graph (OpenVINO, ONNX Runtime).

SAM's cost is its image encoder (a ViT-L is ~2.9 TFLOP per image); the prompt encoder and
mask decoder stay in torch whatever the backend (milliseconds). An encoder backend takes
model-input pixels ``(B, 3, S, S)`` float32 and returns features ``(B, C, h, w)`` as a
torch tensor, through a generator that yields ``(done, total)`` progress and stops when
the caller stops iterating (cancel).

* ``torch``: the model's own blocks, one at a time (progress per block); any device.
* ``openvino`` (extra ``openvino``, :mod:`napari_sam._openvino`): the encoder exported
  with ``torch.export`` and converted to OpenVINO IR. CPU only.
* ``onnxruntime`` (extra ``onnxruntime``, :mod:`napari_sam._onnxruntime`): the encoder
  exported to ONNX and run on ONNX Runtime's CPU provider.

Exports are kept in :func:`napari_sam._exports.default_encoder_dir`, keyed by weights,
precision, input size and the backend's version; written atomically, checked (sizes and
SHA-256) on every read and rebuilt if damaged. Each image runs as one cancellable job;
progress is the elapsed share of the last image's time.

Precisions (``dtype``): ``fp32``; ``bf16`` and ``fp16`` where the hardware has them
natively; ``int8`` (weights and activations, calibrated on bundled images) and
``int8-weights`` (int8 weights, activations quantized on the fly), both with an exported
backend. ``"auto"`` never picks an emulated path: bf16 only where the CPU has bf16
instructions (AVX512-BF16 or AMX) and the backend runs it, int8 never (it is an opt-in
trade of accuracy for speed; docs/performance.md gives both).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._exports import ENCODERS_ENV, Progress

__all__ = ["BACKENDS", "PRECISIONS", "CACHE_NAMES", "cache_name", "ENCODERS_ENV", "backend_available", "resolve_backend",
           "resolve_precision", "cpu_has_native_bf16", "torch_dtype", "TorchEncoder", "CudaMemory", "memory_batch_size", "check_compile", "exported_encoder",
           "drop_torch_encoder"]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "openvino", "onnxruntime")
EXPORTED = ("openvino", "onnxruntime")  # run an exported graph on the CPU
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8-weights")
_EXTRAS = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
_NAMES = {"torch": "torch", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}

_ALIASES = {
    "auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "int8": "int8", "int8-weights": "int8-weights", "int8_weights": "int8-weights", "w8": "int8-weights",
}
# What the embedding cache calls each precision (fp32/bf16/fp16 keep the names earlier
# versions used, so existing caches stay valid).
CACHE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8",
               "int8-weights": "int8-weights"}


def cache_name(backend: str, precision: str) -> str:
    """The precision part of an embedding-cache key. Float precisions agree across
    backends (fp32 to 2e-6) and share entries; int8 graphs are quantized differently by
    each backend, so ONNX Runtime's get their own (OpenVINO's keep the earlier names)."""
    name = CACHE_NAMES[precision]
    return f"{name}-onnxruntime" if backend == "onnxruntime" and precision.startswith("int8") else name


def backend_available(name: str) -> bool:
    """Whether the backend's package is installed (torch always is)."""
    if name == "torch":
        return True
    return name in EXPORTED and importlib.util.find_spec(name) is not None


def resolve_backend(backend: str | None, device) -> str:
    """``"auto"`` → OpenVINO on CPU when installed, else torch (OpenVINO was the fastest
    on every CPU measured, ONNX Runtime between it and torch: docs/performance.md);
    explicit names are checked."""
    name = "auto" if backend is None else str(backend).lower()
    if name == "auto":
        return "openvino" if device.type == "cpu" and backend_available("openvino") else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if name in EXPORTED:
        if device.type != "cpu":
            raise ValueError(f"backend={name!r} runs on the CPU; device is {device.type} (use backend='torch')")
        if not backend_available(name):
            raise ValueError(f"backend={name!r} needs {name}: pip install 'napari-sam-labeler[{_EXTRAS[name]}]'")
    return name


def _isa_capped_below_bf16() -> bool:
    """``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_…``) set to an instruction set without bf16."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return not (cap == "ALL" or "BF16" in cap or "AMX" in cap)


def cpu_has_native_bf16(backend: str = "torch") -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX) as the backend sees it (and as
    ``ONEDNN_MAX_CPU_ISA`` allows it to use)."""
    if _isa_capped_below_bf16():
        return False
    if backend == "openvino":
        from ._openvino import core

        return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if backend == "onnxruntime":
        return False  # its CPU provider has no bf16 kernels for these graphs
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def resolve_precision(dtype: str | Any, backend: str, device) -> str:
    """The encoder precision for ``dtype`` (``"auto"``, a name, or a torch dtype)."""
    raw = str(dtype).replace("torch.", "").lower() if dtype is not None else "auto"
    name = _ALIASES.get(raw)
    if name is None:
        raise ValueError(f"dtype={dtype!r} is not one of 'auto', {', '.join(map(repr, PRECISIONS))}")
    if name == "auto":
        if device.type == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu" and cpu_has_native_bf16(backend):
            return "bf16"
        return "fp32"
    if name in ("int8", "int8-weights") and backend not in EXPORTED:
        hint = "" if backend_available("openvino") else " (pip install 'napari-sam-labeler[openvino]')"
        raise ValueError(f"dtype={name!r} needs backend='openvino' or 'onnxruntime'{hint}")
    if name == "int8" and backend == "onnxruntime":
        raise ValueError("dtype='int8' (weights and activations) needs backend='openvino': ONNX Runtime's "
                         "calibration of a ViT-L ran out of 24 GB; use 'int8-weights' with ONNX Runtime")
    if name == "fp16" and device.type not in ("cuda", "mps"):
        raise ValueError("dtype='fp16' needs a CUDA or MPS device (CPU half precision is slow and "
                         "inaccurate); use 'fp32' or 'bf16' on CPU")
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16(backend):
        if backend == "onnxruntime":
            raise ValueError("dtype='bf16': ONNX Runtime's CPU provider runs fp32 and int8 only; "
                             "use 'fp32', 'int8-weights', or backend='openvino' on a CPU with bf16")
        if backend == "openvino":
            raise ValueError("dtype='bf16': this CPU has no bf16 instructions (OpenVINO would run fp32); "
                             "use 'fp32' or 'int8'")
        log.warning("dtype='bf16': this CPU has no bf16 instructions; torch emulates it (slower than fp32)")
    return name


def mixed_precision(device, precision: str) -> bool:
    """bf16/fp16 on CUDA or MPS run under autocast rather than as a cast model."""
    return device.type in ("cuda", "mps") and precision in ("bf16", "fp16")


def torch_dtype(precision: str):
    """The torch dtype a torch-run model uses for ``precision`` (fp32 for OpenVINO's int8:
    only the encoder is quantized; the decoder stays in torch at fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


# --- torch ----------------------------------------------------------------------------


MAX_BATCH = 16  # slices per encoder call at most, whatever memory allows


def memory_batch_size(free_bytes: int, bytes_per_image: int, *, limit: int = MAX_BATCH,
                      headroom: float = 0.8) -> int:
    """Images per encoder call that fit in ``headroom`` of ``free_bytes`` at the measured
    ``bytes_per_image`` (at least 1, at most ``limit``)."""
    if bytes_per_image <= 0:
        return 1
    return max(1, min(limit, int(free_bytes * headroom) // int(bytes_per_image)))


class CudaMemory:
    """A CUDA device's allocator statistics: what sizes batches by free memory."""

    def __init__(self, device):
        self.device = device

    def allocated(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated(self.device)

    def free(self) -> int:
        """Free on the device plus what torch's allocator holds but does not use."""
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)


def check_compile(device) -> None:
    """``torch.compile`` on ``device`` can work here: on the CPU its code generator needs a
    C++ compiler (``$CXX`` or g++/clang++), else a ValueError says so before any work."""
    import shutil

    if device.type == "cuda":
        try:
            import importlib.util

            ok = importlib.util.find_spec("triton") is not None
        except ValueError:  # hidden by napari_sam._modelstack.guard_triton (a GL process)
            ok = False
        if not ok:
            raise ValueError("compile=True on CUDA needs triton, which is not available in this process "
                             "(napari's OpenGL hides it: see NAPARI_SAM_TRITON in docs/architecture.md)")
        return
    if device.type != "cpu":
        return
    cxx = os.environ.get("CXX")
    if (cxx and shutil.which(cxx)) or (not cxx and (shutil.which("g++") or shutil.which("clang++"))):
        return
    raise ValueError(f"compile=True on the CPU needs a C++ compiler ({'$CXX=' + cxx if cxx else 'g++'} "
                     "not found); install one (e.g. apt install g++) or leave compile off")


def _run_block(layer, hidden):
    out = layer(hidden)
    return out[0] if isinstance(out, tuple) else out  # older transformers return (hidden_states,)


@functools.cache
def _compiled_block():
    """One compiled block function for every block of every model (modules are inputs)."""
    import torch

    return torch.compile(_run_block, dynamic=False)


class TorchEncoder:
    """The model's own image encoder, run block by block (progress and cancel per block).

    ``autocast``: run the encoder under ``torch.autocast`` in this dtype (bf16/fp16 on
    CUDA and MPS: weights and the decoder stay fp32). ``compile``: each block through
    ``torch.compile`` (opt-in; the first image pays the compilation). ``memory``: the
    device's allocator statistics (:class:`CudaMemory` on CUDA), from which the bytes an
    image takes are measured and :meth:`suggested_batch_size` derived.
    """

    name = "torch"

    def __init__(self, model, device, dtype, *, autocast=None, compile: bool = False, memory="auto"):
        self.model, self.device, self.dtype = model, device, dtype
        self.autocast, self.compiled = autocast, bool(compile)
        self.memory = (CudaMemory(device) if device.type == "cuda" else None) if memory == "auto" else memory
        self.bytes_per_image: int | None = None
        self._block = _compiled_block() if compile else _run_block

    def _mode(self):
        import torch

        modes = contextlib.ExitStack()
        modes.enter_context(torch.inference_mode())
        if self.autocast is not None:
            modes.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
        return modes

    def encode_steps(self, pixels: np.ndarray):
        import torch

        encoder = self.model.vision_encoder
        total = len(encoder.layers) + 2
        if self.memory is not None:
            self.memory.reset_peak()
            before = self.memory.allocated()
        with self._mode():
            hidden = encoder.patch_embed(torch.from_numpy(pixels).to(device=self.device, dtype=self.dtype))
            if encoder.pos_embed is not None:
                hidden = hidden + encoder.pos_embed
        yield 1, total
        if self.compiled:
            import torch._dynamo

            # one graph for every batch size (else each new size recompiles, and after
            # dynamo's recompile limit the blocks silently run uncompiled)
            torch._dynamo.maybe_mark_dynamic(hidden, 0)
        for i, layer in enumerate(encoder.layers):
            with self._mode():
                hidden = self._block(layer, hidden)
            yield i + 2, total
        with self._mode():
            features = encoder.neck(hidden)
        if self.autocast is not None:
            features = features.to(self.dtype)  # the decoder reads the model's dtype
        if self.memory is not None:
            self.bytes_per_image = max(1, (self.memory.peak() - before) // len(pixels))
        yield total, total
        return features

    def suggested_batch_size(self) -> int:
        """1 until an image has been measured, and off CUDA (batches gained nothing
        measurable on CPUs); else what fits in free device memory."""
        if self.memory is None or self.bytes_per_image is None:
            return 1
        return memory_batch_size(self.memory.free(), self.bytes_per_image)


# --- exported backends ------------------------------------------------------------------


def exported_encoder(backend: str, model, *, fingerprint: str, precision: str, spec,
                     directory: Path | None = None, say: Progress | None = None, child_request: dict | None = None,
                     cancelled=None):
    """The encoder of ``model`` exported to ``backend`` ("openvino" or "onnxruntime"),
    from the on-disk export cache or exported now (:mod:`napari_sam._exports`); with
    ``child_request`` (the load arguments as plain values) a missing export is made in
    a separate process (:func:`napari_sam._exports.export_in_child`)."""
    if backend == "openvino":
        from ._openvino import openvino_encoder as make
    elif backend == "onnxruntime":
        from ._onnxruntime import onnxruntime_encoder as make
    else:
        raise ValueError(f"backend {backend!r} runs the model's own encoder")
    elsewhere = None
    if child_request is not None:
        from ._exports import export_in_child

        def elsewhere():
            export_in_child({**child_request, "backend": backend, "dtype": precision},
                            say or (lambda message: log.info(message)), cancelled)
    return make(model, fingerprint=fingerprint, precision=precision, spec=spec, directory=directory, say=say,
                elsewhere=elsewhere)


def drop_torch_encoder(model, backend: str) -> None:
    """Free the torch encoder's weights once another backend runs it (1.2 GB for ViT-L)."""
    import torch

    class Detached(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError(f"this engine's image encoder runs in {_NAMES[backend]}; "
                               "use engine.encode_steps / embed")

    model.vision_encoder = Detached()
