"""Where the image encoder runs: torch, or OpenVINO from an exported graph cached on disk.

SAM's cost is its image encoder (a ViT-L is ~2.9 TFLOP per image); the prompt encoder and
mask decoder stay in torch whatever the backend (milliseconds). An encoder backend takes
model-input pixels ``(B, 3, S, S)`` float32 and returns features ``(B, C, h, w)`` as a
torch tensor, through a generator that yields ``(done, total)`` progress and stops when
the caller stops iterating (cancel).

* ``torch``: the model's own blocks, one at a time (progress per block); any device.
* ``openvino`` (extra ``openvino``): the encoder exported once with ``torch.export``,
  converted to OpenVINO IR and kept in :func:`default_encoder_dir`, keyed by weights,
  precision, input size and OpenVINO version; written atomically, checked (sizes and
  SHA-256) on every read and rebuilt if damaged. CPU only. Runs asynchronously so a
  cancel takes effect at once; progress is the elapsed share of the last run's time.

Precisions (``dtype``): ``fp32``; ``bf16`` and ``fp16`` where the hardware has them
natively; ``int8`` (OpenVINO: weights and activations, calibrated with NNCF on bundled
images) and ``int8-weights`` (OpenVINO: int8 weights, activations quantized on the fly
by OpenVINO's CPU plugin). ``"auto"`` never picks an emulated path: bf16 only where
the CPU has bf16 instructions (AVX512-BF16 or AMX), int8 never (it is an opt-in trade of
accuracy for speed; docs/performance.md gives both).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("torch", "openvino")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8-weights")
ENCODERS_ENV = "NAPARI_SAM_ENCODERS"
FORMAT_VERSION = 3

_ALIASES = {
    "auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "int8": "int8", "int8-weights": "int8-weights", "int8_weights": "int8-weights", "w8": "int8-weights",
}
# What the embedding cache calls each precision (fp32/bf16/fp16 keep the names earlier
# versions used, so existing caches stay valid).
CACHE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8",
               "int8-weights": "int8-weights"}

Progress = Callable[[str], None]


def backend_available(name: str) -> bool:
    """Whether the backend's package is installed (torch always is)."""
    if name == "torch":
        return True
    if name == "openvino":
        return importlib.util.find_spec("openvino") is not None
    return False


def resolve_backend(backend: str | None, device) -> str:
    """``"auto"`` → OpenVINO on CPU when installed (faster in every measurement,
    docs/performance.md), else torch; explicit names are checked."""
    name = "auto" if backend is None else str(backend).lower()
    if name == "auto":
        return "openvino" if device.type == "cpu" and backend_available("openvino") else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if name == "openvino":
        if device.type != "cpu":
            raise ValueError(f"backend='openvino' runs on the CPU; device is {device.type} (use backend='torch')")
        if not backend_available("openvino"):
            raise ValueError("backend='openvino' needs OpenVINO: pip install 'napari-sam-labeler[openvino]'")
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
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
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
    if name in ("int8", "int8-weights") and backend != "openvino":
        hint = "" if backend_available("openvino") else " (pip install 'napari-sam-labeler[openvino]')"
        raise ValueError(f"dtype={name!r} needs backend='openvino'{hint}")
    if name == "fp16" and device.type not in ("cuda", "mps"):
        raise ValueError("dtype='fp16' needs a CUDA or MPS device (CPU half precision is slow and "
                         "inaccurate); use 'fp32' or 'bf16' on CPU")
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16(backend):
        if backend == "openvino":
            raise ValueError("dtype='bf16': this CPU has no bf16 instructions (OpenVINO would run fp32); "
                             "use 'fp32' or 'int8'")
        log.warning("dtype='bf16': this CPU has no bf16 instructions; torch emulates it (slower than fp32)")
    return name


def torch_dtype(precision: str):
    """The torch dtype a torch-run model uses for ``precision`` (fp32 for OpenVINO's int8:
    only the encoder is quantized; the decoder stays in torch at fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


# --- torch ----------------------------------------------------------------------------


class TorchEncoder:
    """The model's own image encoder, run block by block (progress and cancel per block)."""

    name = "torch"

    def __init__(self, model, device, dtype):
        self.model, self.device, self.dtype = model, device, dtype

    def encode_steps(self, pixels: np.ndarray):
        import torch

        encoder = self.model.vision_encoder
        total = len(encoder.layers) + 2
        with torch.inference_mode():
            hidden = encoder.patch_embed(torch.from_numpy(pixels).to(device=self.device, dtype=self.dtype))
            if encoder.pos_embed is not None:
                hidden = hidden + encoder.pos_embed
        yield 1, total
        for i, layer in enumerate(encoder.layers):
            with torch.inference_mode():
                hidden = layer(hidden)
                if isinstance(hidden, tuple):  # older transformers return (hidden_states,)
                    hidden = hidden[0]
            yield i + 2, total
        with torch.inference_mode():
            features = encoder.neck(hidden)
        yield total, total
        return features


# --- OpenVINO -------------------------------------------------------------------------

STEPS = 100  # progress resolution of one OpenVINO run
POLL_MS = 50


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
        import torch

        images = np.ascontiguousarray(pixels, dtype=np.float32)
        total = STEPS * len(images)
        expected = self.seconds_per_image or 10.0
        outputs = []
        yield 0, total
        for i, image in enumerate(images):
            request = self.compiled.create_infer_request()
            start = time.perf_counter()
            request.start_async({0: image[None]})
            finished = False
            try:
                while not request.wait_for(POLL_MS):
                    share = min(0.99, (time.perf_counter() - start) / expected)
                    yield i * STEPS + int(share * STEPS), total
                finished = True
            finally:
                if not finished:  # the caller stopped iterating: cancel the run now
                    request.cancel()
                    try:
                        request.wait()
                    except RuntimeError:
                        pass  # "Infer Request was canceled"
            expected = self.seconds_per_image = time.perf_counter() - start
            outputs.append(request.get_output_tensor(0).data.copy())
            yield (i + 1) * STEPS, total
        return torch.from_numpy(np.concatenate(outputs))


def default_encoder_dir() -> Path:
    """``$NAPARI_SAM_ENCODERS``, else ``encoders`` in the platform's user cache folder."""
    env = os.environ.get(ENCODERS_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-sam-labeler")) / "encoders"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _graph(precision: str) -> str:
    """fp32, bf16 and fp16 share one float graph (the precision is chosen when compiling)."""
    return precision if precision in ("int8", "int8-weights") else "float"


def encoder_identity(model, fingerprint: str, precision: str) -> str:
    """What an export depends on: weights, the encoder's configuration (activation, norms,
    sizes), the graph (float or int8) and the OpenVINO version."""
    import openvino as ov

    config = model.config.vision_config.to_dict()
    config.pop("transformers_version", None)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    version = ov.get_version().split("-")[0]
    size = int(model.config.vision_config.image_size)
    return f"v{FORMAT_VERSION}|{fingerprint}|{config_hash}|openvino|{_graph(precision)}|{size}|{version}"


def read_verified(folder: Path, identity: str, *, quiet: bool = False) -> Path | None:
    """``encoder.xml`` of a complete, undamaged export of ``identity`` in ``folder``, else None.

    The manifest must name this identity and both files with their sizes and SHA-256;
    anything else is damage (logged unless ``quiet``), and the caller rebuilds."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        if not isinstance(meta, dict) or meta.get("identity") != identity:
            raise ValueError("its manifest belongs to another model, precision or OpenVINO version")
        files = meta.get("files")
        if not isinstance(files, dict) or set(files) != {"encoder.xml", "encoder.bin"}:
            raise ValueError("its manifest does not list encoder.xml and encoder.bin")
        for name, entry in files.items():
            path = folder / name
            if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
                raise ValueError(f"{name} does not match its manifest")
    except Exception as exc:  # noqa: BLE001 - any unreadable manifest is damage, never a crash
        if not quiet:
            log.warning("the exported encoder in %s is damaged (%s); exporting it again", folder, exc)
        return None
    return folder / "encoder.xml"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sweep_stale(root: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove temporary folders of exports that were killed (none is written for hours)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                _remove(tmp)
        except OSError:
            pass


def _embedding_graph(model):
    """``pixels -> image embeddings`` as a module, the graph exported to OpenVINO."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, sam):
            super().__init__()
            self.sam = sam

        def forward(self, pixel_values):
            return self.sam.get_image_embeddings(pixel_values)

    return Encoder(model).eval()


def calibration_pixels(spec, count: int = 4) -> list[np.ndarray]:
    """Model inputs for int8 calibration: bundled microscopy, photo and CT images."""
    from skimage import data

    from . import preprocess as pp
    from .samples import ct_phantom

    ct = ct_phantom((8, 256, 256))
    images = [data.cell(), data.coins(), data.camera(), ct[4]][:count]
    out = []
    for image in images:
        mapping = pp.resolve_intensity(image)
        out.append(pp.model_input(pp.to_rgb_uint8(image, mapping), spec)[0][None])
    return out


def _convert(model, input_size: int, precision: str, spec, say: Progress):
    import openvino as ov
    import torch

    example = torch.zeros(2, 3, input_size, input_size)  # batch 2: a batch of 1 would be baked in
    batch = torch.export.Dim("batch", min=1, max=1024)
    say("Exporting the image encoder to OpenVINO (once per model and precision) …")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes from transformers' SAM code
        exported = torch.export.export(_embedding_graph(model), (example,), dynamic_shapes=({0: batch},))
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


def export_openvino(model, *, fingerprint: str, precision: str, spec, directory: Path | None = None,
                    say: Progress | None = None):
    """The IR of ``model``'s encoder at ``precision``: the path of a verified export in the
    cache folder, or a new export written there atomically. Where the folder cannot hold
    it (read-only, full, not a folder) the converted model itself is returned, with a
    warning: it works now and is exported again next time."""
    import openvino as ov

    say = say or (lambda message: log.info(message))
    input_size = int(model.config.vision_config.image_size)
    identity = encoder_identity(model, fingerprint, precision)
    root = Path(directory) if directory is not None else default_encoder_dir()
    folder = root / hashlib.sha256(identity.encode()).hexdigest()[:24]
    found = read_verified(folder, identity)
    if found is not None:
        return found
    tmp = None
    try:  # a place to write, before minutes of conversion
        root.mkdir(parents=True, exist_ok=True)
        _sweep_stale(root)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        os.chmod(tmp, 0o755)  # a shared cache folder stays readable by its other users
    except OSError as exc:
        log.warning("cannot keep the exported encoder in %s (%s; set $%s to a writable folder): "
                    "it is exported again each time", root, exc, ENCODERS_ENV)
    started = time.perf_counter()
    converted = _convert(model, input_size, precision, spec, say)
    if tmp is None:
        return converted
    try:
        ov.save_model(converted, str(tmp / "encoder.xml"), compress_to_fp16=False)
        files = {}
        for name in ("encoder.xml", "encoder.bin"):
            path = tmp / name
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format": FORMAT_VERSION, "identity": identity, "fingerprint": fingerprint,
                    "graph": _graph(precision), "input_size": input_size, "openvino": ov.get_version(),
                    "files": files, "export_seconds": round(time.perf_counter() - started, 1)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if folder.exists() and read_verified(folder, identity, quiet=True) is None:
            _remove(folder)  # damaged, or not a folder at all
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same export first: use that one
            if read_verified(folder, identity, quiet=True) is None:
                raise
    except (OSError, RuntimeError) as exc:  # disk full, folder vanished, ...
        log.warning("could not write the exported encoder to %s (%s): it is exported again next time",
                    root, exc)
        return converted
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"OpenVINO encoder ready ({time.perf_counter() - started:.0f} s, kept in {folder})")
    return folder / "encoder.xml"


def openvino_encoder(model, *, fingerprint: str, precision: str, spec, directory: Path | None = None,
                     say: Progress | None = None) -> OpenVINOEncoder:
    """Export (or read the cached export of) ``model``'s encoder and compile it for the CPU."""
    import openvino as ov

    ir = export_openvino(model, fingerprint=fingerprint, precision=precision, spec=spec,
                         directory=directory, say=say)
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(str(ir) if isinstance(ir, Path) else ir, "CPU",
                                       {"INFERENCE_PRECISION_HINT": hint})
    return OpenVINOEncoder(compiled, precision, ir.parent if isinstance(ir, Path) else None)


def drop_torch_encoder(model) -> None:
    """Free the torch encoder's weights once another backend runs it (1.2 GB for ViT-L)."""
    import torch

    class Detached(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("this engine's image encoder runs in OpenVINO; use engine.encode_steps / embed")

    model.vision_encoder = Detached()
