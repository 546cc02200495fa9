"""Where SAM weights come from, and how other formats become a transformers ``SamModel``.

* :func:`resolve_model_source`: a Hugging Face id, a ``save_pretrained`` folder or a Meta
  checkpoint file (``$NAPARI_SAM_MODEL``, else :data:`DEFAULT_MODEL`), decided without loading.
* :func:`load_sam_model`: the weights as a ``SamModel`` on the CPU: the local Hugging Face
  cache first, the Hub only when it can be reached, and Meta-format checkpoints (original
  SAM, MedSAM, micro-sam) converted by the rules of transformers' ``convert_sam_to_hf.py``.
* :func:`spec_from_source`: the input convention (SAM or MedSAM) a model expects.

Every failure to find weights is a :class:`ModelNotFoundError` that says what was tried and
how to provide the weights. :mod:`napari_sam.engine` puts the result on a device and runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._finetune_store import spec_from_sidecar
from ._modelstack import guard_triton
from ._types import ModelInputSpec, medsam_input_spec, sam_input_spec

DEFAULT_MODEL = "facebook/sam-vit-large"
MODEL_ENV = "NAPARI_SAM_MODEL"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")

class ModelNotFoundError(FileNotFoundError):
    """Weights could not be found; the message lists what was tried and how to fix it."""


def how_to_get_weights(model: str) -> str:
    return (
        "How to provide weights:\n"
        f"  * on a machine with internet: `huggingface-cli download {model}` (or run once "
        "online) fills the Hugging Face cache; copy that cache (HF_HOME, default "
        "~/.cache/huggingface) to this machine, or\n"
        "  * save a local copy with `SamModel.from_pretrained(...).save_pretrained(DIR)` and "
        f"pass DIR (or set {MODEL_ENV}=DIR), or\n"
        "  * download a Meta checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, "
        "sam_vit_h_4b8939.pth from https://github.com/facebookresearch/segment-anything"
        "#model-checkpoints, or MedSAM's medsam_vit_b.pth) and pass its path "
        f"(or set {MODEL_ENV}=/path/to/file.pth)."
    )

# --- locating weights -----------------------------------------------------------------


@dataclass
class ModelSource:
    """Where a model resolves to: ``kind`` is ``"hf_dir"``, ``"hf_id"`` or ``"checkpoint"``."""

    requested: str
    kind: str
    location: str
    tried: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.kind}: {self.location}"


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name)) and not name.endswith(
        CHECKPOINT_SUFFIXES
    )


def resolve_model_source(model: str | os.PathLike | None = None) -> ModelSource:
    """Decide where ``model`` comes from, without loading it.

    ``None`` reads ``$NAPARI_SAM_MODEL``, else :data:`DEFAULT_MODEL`. An existing
    directory is a ``save_pretrained`` folder, an existing file a Meta checkpoint,
    anything shaped like ``org/name`` a Hugging Face id.
    """
    if model is None:
        model = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    requested = os.fspath(model)
    path = Path(requested).expanduser()
    tried = [f"local path {path}"]
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {path} has no config.json; expected a transformers "
                "`save_pretrained` folder of a SamModel.\n" + how_to_get_weights(DEFAULT_MODEL)
            )
        return ModelSource(requested, "hf_dir", str(path), tried)
    if path.is_file():
        return ModelSource(requested, "checkpoint", str(path), tried)
    if _looks_like_hub_id(requested):
        return ModelSource(requested, "hf_id", requested, tried)
    raise ModelNotFoundError(
        f"model {requested!r} is neither an existing directory, an existing checkpoint "
        f"file, nor a Hugging Face id (org/name). Tried: {', '.join(tried)}.\n"
        + how_to_get_weights(DEFAULT_MODEL)
    )


def hub_cache_path(model_id: str) -> str | None:
    """The local snapshot folder of a Hugging Face id, if it is in the cache."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached (or hub lib missing): the caller reports it
        return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection (no request is sent).

    Checked before a download so that an offline machine gets the clear error at once
    instead of minutes of retries.
    """
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # hub library layout changed: assume the default endpoint
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- Meta checkpoint conversion -------------------------------------------------------

# Ordered (pattern, replacement) rules from Meta's segment-anything module names to
# transformers' SamModel names (same mapping as transformers' convert_sam_to_hf.py).
_META_TO_HF_RULES: list[tuple[str, str]] = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
     "prompt_encoder.shared_embedding.positional_embedding"),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    # norm1, norm2, norm_final_attn, ... → layer_norm1, ... (vision and two-way blocks)
    (r"\.norm(\w*)\.", r".layer_norm\1."),
]
_MLP_RE = re.compile(r"^(.*\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.*)$")


def _unwrap_state_dict(obj: Any, path: str) -> dict:
    """Find the SAM weights inside what ``torch.load`` returned (bare or wrapped)."""
    import torch

    if isinstance(obj, dict):
        for key in ("model_state", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {path} does not contain a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    anchor = next((k for k in tensors if "image_encoder.patch_embed" in k), None)
    if anchor is None:
        raise ValueError(
            f"checkpoint {path} has no 'image_encoder.patch_embed' weights: not a Meta-format "
            "SAM checkpoint (first keys: " + ", ".join(list(tensors)[:5]) + ")"
        )
    # Wrappers such as micro-sam's trainer or DataParallel prefix every key ("sam.", "module.").
    prefix = anchor[: anchor.index("image_encoder.")]
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def meta_to_hf_state_dict(state: dict) -> dict:
    """Rename Meta ``segment_anything`` weights to transformers ``SamModel`` names."""
    out = {}
    mlp_depths: dict[str, int] = {}
    for key in state:
        m = _MLP_RE.match(key)
        if m:
            mlp_depths[m.group(1)] = max(mlp_depths.get(m.group(1), 0), int(m.group(2)) + 1)
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue  # preprocessing is ours (ModelInputSpec), not a weight
        m = _MLP_RE.match(key)
        if m:
            base, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            depth = mlp_depths[base]
            name = "proj_in" if idx == 0 else "proj_out" if idx == depth - 1 else f"layers.{idx - 1}"
            key = f"{base}.{name}.{rest}"
        for pattern, repl in _META_TO_HF_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    pe = "prompt_encoder.shared_embedding.positional_embedding"
    if pe in out:
        out["shared_image_embedding.positional_embedding"] = out[pe]
    return out


def config_from_meta_state(state: dict, decoder_heads: int = 8):
    """Build a ``SamConfig`` from the shapes in a Meta-format state dict.

    Everything is read from tensor shapes except the mask decoder's attention heads,
    which no weight reveals; all Meta SAM variants (and MedSAM, micro-sam) use 8.
    """
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    patch = state["image_encoder.patch_embed.proj.weight"]
    hidden, channels, patch_size = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[2])
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")})
    if "image_encoder.pos_embed" in state:
        grid = int(state["image_encoder.pos_embed"].shape[1])
    else:
        raise ValueError("checkpoint lacks image_encoder.pos_embed; cannot infer the image size")
    image_size = grid * patch_size
    rel = state.get("image_encoder.blocks.0.attn.rel_pos_h")
    if rel is None:
        raise ValueError("checkpoint lacks relative position weights (rel_pos_h)")
    heads = hidden // int(rel.shape[1])
    global_idx, window = [], 14
    for i in layers:
        n = int(state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0])
        if n == 2 * grid - 1:
            global_idx.append(i)
        else:
            window = (n + 1) // 2
    out_channels = int(state["image_encoder.neck.0.weight"].shape[0])
    vision = SamVisionConfig(
        hidden_size=hidden,
        output_channels=out_channels,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        num_channels=channels,
        image_size=image_size,
        patch_size=patch_size,
        mlp_dim=int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]),
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        window_size=window,
        global_attn_indexes=global_idx,
        num_pos_feats=int(state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1]),
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=out_channels,
        image_size=image_size,
        patch_size=patch_size,
        mask_input_channels=int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
    )
    dec_hidden = int(state["mask_decoder.iou_token.weight"].shape[1])
    dec_layers = {int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers.")}
    iou_layers = {int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.iou_prediction_head.layers.")}
    q = state["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"]
    decoder = SamMaskDecoderConfig(
        hidden_size=dec_hidden,
        mlp_dim=int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        num_hidden_layers=len(dec_layers),
        num_attention_heads=decoder_heads,
        attention_downsample_rate=dec_hidden // int(q.shape[0]),
        num_multimask_outputs=int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
    )
    return SamConfig(
        vision_config=vision.to_dict(),
        prompt_encoder_config=prompt.to_dict(),
        mask_decoder_config=decoder.to_dict(),
    )


def _set_sdpa(config) -> None:
    """Ask for PyTorch SDPA attention where transformers supports it for SAM."""
    try:
        config._attn_implementation = "sdpa"
    except Exception:  # older transformers without the setter keep their default
        pass


def load_meta_checkpoint(path: str | os.PathLike, config=None):
    """Load a Meta-format SAM checkpoint (``weights_only=True``) into a ``SamModel``."""
    guard_triton()
    import torch
    from transformers import SamModel

    path = os.fspath(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint {path} as a PyTorch weights file "
            f"(loaded with weights_only=True): {exc}"
        ) from exc
    meta = _unwrap_state_dict(raw, path)
    if config is None:
        config = config_from_meta_state(meta)
    _set_sdpa(config)
    try:
        model = SamModel(config)
    except ValueError as exc:  # transformers < 4.47: no SDPA for SAM, keep its default
        if "scaled_dot_product_attention" not in str(exc):
            raise
        config._attn_implementation = "eager"
        model = SamModel(config)
    hf = meta_to_hf_state_dict(meta)
    result = model.load_state_dict(hf, strict=False)
    missing = [k for k in result.missing_keys]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not match the SAM architecture inferred from it: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def spec_from_source(source: ModelSource, model, preprocessing) -> ModelInputSpec:
    target = int(model.config.vision_config.image_size)
    if isinstance(preprocessing, ModelInputSpec):
        return preprocessing
    if preprocessing is not None:
        name = str(preprocessing).lower()
        if name == "sam":
            return sam_input_spec(target)
        if name == "medsam":
            return medsam_input_spec(target)
        raise ValueError(f"preprocessing={preprocessing!r} is not 'sam', 'medsam' or a ModelInputSpec")
    if source.kind == "hf_dir":
        recorded = spec_from_sidecar(source.location)  # a fine-tune keeps its base's convention
        if recorded is not None:
            if recorded.target_length != target:
                raise ValueError(f"{source.location}: napari_sam.json records input size {recorded.target_length}, "
                                 f"the model's config {target}")
            return recorded
    names = [source.requested, source.location, str(getattr(model.config, "_name_or_path", ""))]
    if any("medsam" in n.lower() for n in names):
        return medsam_input_spec(target)
    spec = sam_input_spec(target)
    if source.kind == "hf_dir":
        proc = Path(source.location) / "preprocessor_config.json"
        if proc.is_file():
            cfg = json.loads(proc.read_text())
            if cfg.get("do_normalize", True) and "image_mean" in cfg and "image_std" in cfg:
                spec = ModelInputSpec(
                    kind="sam", target_length=target,
                    mean=tuple(float(v) for v in cfg["image_mean"]),
                    std=tuple(float(v) for v in cfg["image_std"]),
                )
    return spec


def load_sam_model(source: ModelSource, config=None):
    """Load the weights ``source`` points to as a ``SamModel`` (CPU, float32, train mode).

    Raises
    ------
    ModelNotFoundError
        When the weights cannot be found or read; the message says what was tried.
    """
    guard_triton()  # before the first torch/transformers import in a GL process
    from transformers import SamModel

    if source.kind == "checkpoint":
        sam = load_meta_checkpoint(source.location, config=config)
    else:
        kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
        location = source.location
        if source.kind == "hf_id":
            cached = hub_cache_path(location)
            source.tried.append(f"Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')})")
            if cached is not None:
                location = cached
            elif os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                raise ModelNotFoundError(
                    f"model {source.requested!r} is not in the Hugging Face cache and "
                    f"HF_HUB_OFFLINE is set. Tried: {', '.join(source.tried)}.\n"
                    + how_to_get_weights(source.requested)
                )
            elif not hub_reachable():
                source.tried.append("the Hugging Face Hub (unreachable from here)")
                raise ModelNotFoundError(
                    f"model {source.requested!r} is not in the Hugging Face cache and the Hub "
                    f"cannot be reached. Tried: {', '.join(source.tried)}.\n"
                    + how_to_get_weights(source.requested)
                )
            else:
                source.tried.append("download from the Hugging Face Hub")
        try:
            try:
                sam = SamModel.from_pretrained(location, **kwargs)
            except ValueError as exc:
                # transformers < 4.47 has no SDPA for SAM and refuses the request: its default
                if "scaled_dot_product_attention" not in str(exc):
                    raise
                sam = SamModel.from_pretrained(location)
        except (OSError, ValueError) as exc:
            if source.kind == "hf_dir":
                raise ModelNotFoundError(
                    f"cannot load a SamModel from directory {location}: {exc}\n"
                    + how_to_get_weights(DEFAULT_MODEL)
                ) from exc
            raise ModelNotFoundError(
                f"model {source.requested!r} could not be loaded (offline or not cached). "
                f"Tried: {', '.join(source.tried)}. Last error: {str(exc).splitlines()[0]}\n"
                + how_to_get_weights(source.requested)
            ) from exc
    return sam


def weights_fingerprint(model, prefix: str = "") -> str:
    """A stable identity of the weights: names, shapes and a sample of every tensor.

    Cheap even for ViT-H (it reads at most 2 MiB per tensor), and it changes whenever a
    fine-tune changes weights. ``prefix="vision_encoder."`` covers only the image
    encoder: what an embedding (and an exported encoder) depends on, so that a model whose
    decoder was fine-tuned reuses the embeddings of the model it came from.
    """
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(prefix):
            continue
        t = tensor.detach().to("cpu").contiguous().float().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        n = t.numel()
        sample = t if n <= 2 * 262144 else torch.cat([t[:262144], t[-262144:]])
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
