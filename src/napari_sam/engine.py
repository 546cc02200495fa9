"""SAM through transformers' ``SamModel``: load, encode once, decode many.

The split follows Meta's ``SamPredictor``: :meth:`SamEngine.embed` runs the heavy image
encoder once and returns an :class:`~napari_sam._types.ImageEmbedding` that holds all
the decoder needs; :meth:`SamEngine.predict` / :meth:`SamEngine.predict_batch` turn
prompts into masks from it in milliseconds without touching the image again.

Models load from a Hugging Face id, a local ``save_pretrained`` directory, or a Meta
format ``.pth`` checkpoint (original SAM, MedSAM, micro-sam); finding and converting
those is :mod:`napari_sam.checkpoints`' job.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import preprocess as pp
from ._modelstack import guard_triton, tune_allocator
from ._types import ImageEmbedding, IntensityMapping, ModelInputSpec, Prediction, Prompt
from .annotate import checked_box, checked_points
from .backends import (EXPORTED, TorchEncoder, check_compile, drop_torch_encoder, exported_encoder, mixed_precision,
                       resolve_backend, resolve_precision, torch_dtype)
from .checkpoints import ModelSource, load_sam_model, resolve_model_source, spec_from_source, weights_fingerprint


# How many prompt sets go through the decoder in one call; bounds peak memory for
# large batches (automatic segmentation grids) without costing small ones anything.
DECODE_CHUNK = 64

# --- device and dtype -----------------------------------------------------------------


def resolve_device(device: str | Any = "auto"):
    """``"auto"`` → CUDA, else MPS, else CPU; explicit names are checked for availability."""
    guard_triton()
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).lower() if device is not None else "auto"
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available here")
        return torch.device(name)
    if name == "mps":
        if not mps_ok:
            raise ValueError("device='mps' requested but MPS is not available here")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device={device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")


def resolve_device_for(device, backend) -> Any:
    """:func:`resolve_device`, except that ``"auto"`` is the CPU for a backend that runs
    only there (asking for OpenVINO or ONNX Runtime on a CUDA machine means the CPU)."""
    if (device is None or str(device).lower() == "auto") and str(backend).lower() in EXPORTED:
        return resolve_device("cpu")
    return resolve_device(device)


def resolve_dtype(dtype: str | Any, device) -> Any:
    """The torch dtype of the precision ``dtype`` resolves to on ``device`` with torch (see
    :func:`napari_sam.backends.resolve_precision`; "auto" never picks an emulated path)."""
    return torch_dtype(resolve_precision(dtype, "torch", device))


def load_model(
    model: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    preprocessing: str | ModelInputSpec | None = None,
    config=None,
    backend: str = "auto",
    on_progress=None,
    compile: bool = False,
    export_in_subprocess: bool = False,
    cancelled=None,
) -> "SamEngine":
    """Load a SAM model and return a ready :class:`SamEngine`.

    Parameters
    ----------
    model : str or path, optional
        Hugging Face id (``"facebook/sam-vit-large"``), a local ``save_pretrained``
        directory, or a Meta-format checkpoint file (``sam_vit_l_0b3195.pth``,
        ``medsam_vit_b.pth``, micro-sam ``.pt``). Default: ``$NAPARI_SAM_MODEL``, else
        ``facebook/sam-vit-large``.
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"}
        ``"auto"`` picks CUDA, else MPS, else CPU.
    dtype : {"auto", "fp32", "bf16", "fp16", "int8", "int8-weights"}
        The image encoder's precision. ``"auto"`` is bf16 on CUDA devices and CPUs that
        have bf16 instructions (AVX512-BF16/AMX), else fp32; never an emulated path.
        int8 needs an exported backend (docs/performance.md: speed and accuracy of each).
    preprocessing : {"sam", "medsam"} or ModelInputSpec, optional
        Override the input convention; by default MedSAM is recognised by name.
    config : transformers.SamConfig, optional
        Architecture for a Meta checkpoint whose shape cannot be inferred (decoder heads).
    backend : {"auto", "torch", "openvino", "onnxruntime"}
        Where the image encoder runs. ``"auto"`` is OpenVINO on CPU when it is installed
        (the ``openvino`` extra), else torch. OpenVINO and ONNX Runtime (extra
        ``onnxruntime``) export the encoder once per model and precision into
        ``$NAPARI_SAM_ENCODERS`` (under a minute for ViT-L; int8 calibration a few more).
    on_progress : callable(str), optional
        Called with a message for slow one-time steps (exporting the encoder).
    compile : bool
        Run each encoder block through ``torch.compile`` (torch backend; opt-in: the first
        image pays the compilation, and CPU compilation needs a C++ compiler).
    export_in_subprocess : bool
        Make a missing OpenVINO/ONNX export in a child process (the widget does: tracing
        and serialising hold Python's interpreter lock for up to 0.7 s at a time).
    cancelled : callable() -> bool, optional
        Polled while that child exports; when true the child is stopped and
        ``ExportCancelled`` raised.

    Raises
    ------
    ModelNotFoundError
        When the weights are not available; the message says what was tried and how to
        provide them.
    """
    dev = resolve_device_for(device, backend)  # first: guards triton before any torch import
    tune_allocator()
    kind = resolve_backend(backend, dev)
    precision = resolve_precision(dtype, kind, dev)
    if compile and kind != "torch":
        raise ValueError(f"compile=True compiles the torch encoder; backend is {kind!r} (use backend='torch')")
    if compile:
        check_compile(dev)
    source = resolve_model_source(model)
    sam = load_sam_model(source, config=config)
    sam.eval()
    fingerprint = weights_fingerprint(sam)
    encoder_fingerprint = weights_fingerprint(sam, "vision_encoder.")
    spec = spec_from_source(source, sam, preprocessing)
    # The torch model runs the decoder, and the encoder on torch: cast to bf16 on CPU; on
    # CUDA/MPS bf16/fp16 run under autocast with fp32 weights (PyTorch's mixed precision).
    # An exported encoder's precision is its own, and the decoder stays fp32.
    mixed = torch_dtype(precision) if kind == "torch" and mixed_precision(dev, precision) else None
    dt = torch_dtype(precision) if kind == "torch" and mixed is None else torch_dtype("fp32")
    encoder = None
    if kind in EXPORTED:
        plain = config is None and (preprocessing is None or isinstance(preprocessing, str))
        request = {"model": None if model is None else str(model), "preprocessing": preprocessing}
        encoder = exported_encoder(kind, sam, fingerprint=encoder_fingerprint, precision=precision, spec=spec,
                                   say=on_progress, child_request=request if export_in_subprocess and plain else None,
                                   cancelled=cancelled)
        drop_torch_encoder(sam, kind)
    else:
        encoder = TorchEncoder(sam, dev, dt, autocast=mixed, compile=compile)
    sam.to(device=dev, dtype=dt)
    return SamEngine(sam, device=dev, dtype=dt, spec=spec, source=source, fingerprint=fingerprint,
                     encoder=encoder, precision=precision, encoder_fingerprint=encoder_fingerprint)


def drain(steps):
    """Run a progress generator to its end and return its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class SamEngine:
    """A loaded SAM model with its device, dtype and input convention.

    Create with :func:`load_model`. Methods are safe to call from a worker thread; one
    engine serves many images.
    """

    def __init__(self, model, *, device, dtype, spec: ModelInputSpec, source: ModelSource, fingerprint: str,
                 encoder=None, precision: str | None = None, encoder_fingerprint: str | None = None):
        self.model = model
        self.device = device
        self.dtype = dtype  # the torch model's (the decoder's, and the encoder's on torch)
        self.encoder = encoder if encoder is not None else TorchEncoder(model, device, dtype)
        self.precision = precision or {"bfloat16": "bf16", "float16": "fp16"}.get(str(dtype)[6:], "fp32")
        self.spec = spec
        self.source = source
        self.fingerprint = fingerprint  # all weights
        # the image encoder's weights only: what embeddings depend on (a fine-tuned
        # decoder reuses its base model's embeddings and exported encoder)
        self.encoder_fingerprint = encoder_fingerprint or fingerprint
        cfg = model.config
        self.embedding_size = int(cfg.prompt_encoder_config.image_embedding_size)
        self.low_res_size = 4 * self.embedding_size

    @property
    def model_id(self) -> str:
        """Image-encoder fingerprint plus input convention: what an embedding depends on."""
        return hashlib.sha256(f"{self.encoder_fingerprint}|{self.spec.key()}".encode()).hexdigest()[:32]

    @property
    def backend(self) -> str:
        """Where the image encoder runs: ``"torch"``, ``"openvino"`` or ``"onnxruntime"``."""
        return self.encoder.name

    def suggested_batch_size(self) -> int:
        """Images per encoder call: 1 on CPUs (batching gained nothing measurable) and
        until one image has been encoded; on CUDA what fits in free memory at the measured
        bytes per image (:func:`napari_sam.backends.memory_batch_size`, at most 16)."""
        suggest = getattr(self.encoder, "suggested_batch_size", None)
        return suggest() if suggest is not None else 1

    def __repr__(self) -> str:
        return (
            f"SamEngine({self.source.describe()}, device={self.device}, backend={self.backend}, "
            f"dtype={self.precision}, preprocessing={self.spec.kind})"
        )

    # --- encoding ---------------------------------------------------------------------

    def encode_steps(self, images: Sequence[np.ndarray]):
        """Run the image encoder on uint8 RGB images.

        A generator of ``(done, total)`` progress, so a worker can report it and stop by
        not iterating further: the torch backend yields after each transformer block,
        exported ones (OpenVINO, ONNX Runtime) every 50 ms, cancelling their run when stopped. Its return value
        (``StopIteration.value``) is the features tensor ``(B, C, h, w)``.
        """
        pixels = np.stack([pp.model_input(rgb, self.spec)[0] for rgb in images])
        features = yield from self.encoder.encode_steps(pixels)
        return features

    def encode_rgb(self, images: Sequence[np.ndarray]):
        """Encode uint8 RGB images in one go; returns features ``(B, C, h, w)``."""
        return drain(self.encode_steps(images))

    def embed_steps(
        self,
        image,
        *,
        mapping: IntensityMapping | None = None,
        window: tuple[float, float] | None = None,
        preset: str | None = None,
        percentiles: tuple[float, float] | None = None,
        channel: int | None = None,
    ):
        """:meth:`embed` as a generator of ``(done, total)`` progress; returns the embedding.

        Stop iterating to cancel: nothing is kept.
        """
        image = pp.check_image_2d(image)
        if mapping is None:
            mapping = pp.resolve_intensity(
                image, window=window, preset=preset, percentiles=percentiles, channel=channel
            )
        rgb = pp.to_rgb_uint8(image, mapping)
        features = yield from self.encode_steps([rgb])
        return self.embedding_from(features, image.shape[:2], mapping)

    def embedding_from(self, features, original_size, mapping: IntensityMapping) -> ImageEmbedding:
        """Wrap encoder ``features`` (1, C, h, w) of an image of ``original_size``."""
        size = (int(original_size[0]), int(original_size[1]))
        return ImageEmbedding(
            features=features,
            original_size=size,
            input_size=pp.resized_shape(size, self.spec),
            spec=self.spec,
            mapping=mapping,
            model_id=self.model_id,
        )

    def embed(
        self,
        image,
        *,
        mapping: IntensityMapping | None = None,
        window: tuple[float, float] | None = None,
        preset: str | None = None,
        percentiles: tuple[float, float] | None = None,
        channel: int | None = None,
    ) -> ImageEmbedding:
        """Encode one 2D image.

        Parameters
        ----------
        image : ndarray, shape (H, W) or (H, W, C)
            uint8, uint16, int16, float or bool pixels; RGB/RGBA or multichannel.
        mapping : IntensityMapping, optional
            A mapping resolved beforehand (e.g. once for a whole volume). Otherwise it is
            resolved from this image with ``window``/``preset``/``percentiles``/``channel``
            (see :func:`napari_sam.preprocess.resolve_intensity`).

        Returns
        -------
        ImageEmbedding
        """
        return drain(self.embed_steps(
            image, mapping=mapping, window=window, preset=preset, percentiles=percentiles, channel=channel
        ))

    # --- decoding ---------------------------------------------------------------------

    def _check_embedding(self, embedding: ImageEmbedding) -> None:
        if not isinstance(embedding, ImageEmbedding):
            raise TypeError(f"embedding must be an ImageEmbedding, got {type(embedding).__name__}")
        if embedding.model_id != self.model_id:
            raise ValueError(
                "embedding was computed by a different model or preprocessing "
                f"({embedding.model_id} != {self.model_id}); re-embed the image with this engine"
            )

    def _mask_logits(self, mask_input, original_size) -> np.ndarray | None:
        if mask_input is None:
            return None
        arr = np.asarray(mask_input)
        size = self.low_res_size
        if arr.dtype.kind == "f":
            if arr.shape in ((size, size), (1, size, size)):
                return arr.reshape(size, size).astype(np.float32)
            raise ValueError(
                f"mask_input of float dtype is taken as low-res logits of shape ({size}, {size}); "
                f"got {arr.shape}. Pass a bool/integer mask of the image size {tuple(original_size)} instead."
            )
        if arr.dtype.kind in "biu":
            return pp.mask_to_logits(arr, original_size, self.spec, size)
        raise TypeError(f"mask_input has unsupported dtype {arr.dtype}")

    def predict(
        self,
        embedding: ImageEmbedding,
        points=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask: bool = False,
    ) -> Prediction:
        """Decode one prompt set into masks (see :class:`~napari_sam._types.Prompt`).

        Points are ``(N, 2)`` ``(row, col)`` pixels; labels 1 = positive, 0 = negative
        (all positive if omitted). ``box`` is ``(row_min, col_min, row_max, col_max)``.
        ``mask_input`` takes earlier low-res logits or a binary mask at image size.
        Returns masks ``(K, H, W)`` bool, K = 3 with ``multimask`` else 1.
        """
        prompt = Prompt(points=points, point_labels=point_labels, box=box, mask_input=mask_input)
        return self.predict_batch(embedding, [prompt], multimask=multimask)[0]

    def predict_batch(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        multimask: bool = False,
    ) -> list[Prediction]:
        """Decode many prompt sets for one image in batched decoder calls.

        Prompt sets with the same structure (number of points, box or not, mask or not)
        run together, so each is decoded as it would be alone (to float rounding).
        """
        import torch

        from ._grid_decoder import decode_prompts  # imports torch: not at module import

        self._check_embedding(embedding)
        size = embedding.original_size
        parsed = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, Prompt):
                raise TypeError(f"prompts[{i}] must be a Prompt, got {type(prompt).__name__}")
            pts, lab = checked_points(prompt.points, prompt.point_labels, size)
            box = checked_box(prompt.box, size)
            logits = self._mask_logits(prompt.mask_input, size)
            if pts is None and box is None and logits is None:
                raise ValueError(f"prompt {i} is empty: give points, a box or a mask_input")
            parsed.append((pts, lab, box, logits))

        groups: dict[tuple, list[int]] = {}
        for i, (pts, _, box, logits) in enumerate(parsed):
            key = (0 if pts is None else len(pts), box is not None, logits is not None)
            groups.setdefault(key, []).append(i)

        results: list[Prediction | None] = [None] * len(parsed)
        feats = embedding.features.to(device=self.device, dtype=self.dtype)
        for (n_points, has_box, has_mask), members in groups.items():
            for start in range(0, len(members), DECODE_CHUNK):
                chunk = members[start:start + DECODE_CHUNK]
                b = len(chunk)
                kwargs: dict[str, Any] = dict(input_points=None, input_labels=None, input_boxes=None,
                                              input_masks=None)
                if n_points:
                    xy = np.stack([pp.points_to_model(parsed[i][0], size, self.spec) for i in chunk])
                    kwargs["input_points"] = torch.from_numpy(xy[:, None]).to(self.device)
                    kwargs["input_labels"] = torch.from_numpy(
                        np.stack([parsed[i][1] for i in chunk])[:, None]
                    ).to(self.device)
                if has_box:
                    boxes = np.stack([pp.box_to_model(parsed[i][2], size, self.spec) for i in chunk])
                    kwargs["input_boxes"] = torch.from_numpy(boxes[:, None]).to(self.device)
                if has_mask:
                    masks = np.stack([parsed[i][3] for i in chunk])[:, None]
                    kwargs["input_masks"] = torch.from_numpy(masks).to(self.device, self.dtype)
                with torch.inference_mode():
                    # transformers' prompt encoder, then its decoder without copying the
                    # image embedding per prompt (same function; 1.6x faster for a click)
                    sparse, dense = self.model.prompt_encoder(**kwargs)
                    if sparse is None:
                        sparse = feats.new_zeros((b, 1, 0, feats.shape[1]))
                    low, scores, _ = decode_prompts(self.model, feats, sparse[:, 0],
                                                    dense if has_mask else dense[:1], multimask=bool(multimask))
                low = low.reshape(b, -1, *low.shape[-2:]).float()  # (b, K, L, L)
                scores = scores.reshape(b, -1).float()  # (b, K)
                full = self.upscale_logits(low, embedding)  # (b, K, H, W)
                for j, i in enumerate(chunk):
                    results[i] = Prediction(
                        masks=(full[j] > 0).cpu().numpy(),
                        scores=scores[j].cpu().numpy().astype(np.float32),
                        logits=low[j].cpu().numpy().astype(np.float32),
                    )
        return results  # type: ignore[return-value]

    def point_candidates(self, embedding: ImageEmbedding, points, *, multimask: bool = True,
                         min_score: float | None = None):
        """Decode each point alone as a positive prompt (automatic segmentation's decoder).

        ``points`` ``(N, 2)`` ``(row, col)`` are N independent prompts decoded in one batched
        call; candidates (3 per point with ``multimask``) whose predicted IoU is not above
        ``min_score`` are dropped before anything is upsampled. Returns ``low_res`` (M, L, L)
        float32 logits (for :meth:`upscale_logits`), their ``scores`` (M,) and ``which``
        point (M,) each came from.
        """
        import torch

        self._check_embedding(embedding)
        size = embedding.original_size
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        if not np.all(np.isfinite(pts)):
            raise ValueError("points contain NaN or infinite coordinates")
        from ._grid_decoder import decode_points

        xy = torch.from_numpy(pp.points_to_model(pts, size, self.spec))
        feats = embedding.features.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            low, scores, which = decode_points(self.model, feats, xy, multimask=multimask, min_score=min_score)
        return (low, scores.cpu().numpy().astype(np.float32), which.cpu().numpy().astype(np.int64))

    def upscale_logits(self, low_res, embedding: ImageEmbedding):
        """Low-res logits ``(..., L, L)`` → logits at the original image size.

        Upsample to the model input square, drop the padding, resize to ``(H, W)``
        (what Meta's predictor and ``SamProcessor.post_process_masks`` do); a stretched
        (MedSAM) input is resized directly.
        """
        import torch
        import torch.nn.functional as F

        lead = low_res.shape[:-2]
        x = low_res.reshape(-1, 1, *low_res.shape[-2:])
        if embedding.spec.resize == "longest":
            t = embedding.spec.target_length
            x = F.interpolate(x, (t, t), mode="bilinear", align_corners=False)
            h, w = embedding.input_size
            x = x[..., :h, :w]
        # A stretched (MedSAM) input has no padding: resize straight to the image, as
        # MedSAM's own inference does.
        x = F.interpolate(x, tuple(embedding.original_size), mode="bilinear", align_corners=False)
        return x.reshape(*lead, *embedding.original_size).to(torch.float32)
