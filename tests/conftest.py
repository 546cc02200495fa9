"""Shared fixtures: tiny random SAM checkpoints built on the spot (nothing is downloaded)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from napari_sam._modelstack import guard_triton

# Tests never reach the network, and the user's own model choice must not leak in.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("NAPARI_SAM_MODEL", None)

TINY_IMAGE_SIZE = 256


@pytest.fixture(autouse=True, scope="session")
def _private_encoder_folder(tmp_path_factory):
    """Exported OpenVINO encoders go to one folder for the session, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAPARI_SAM_ENCODERS", str(tmp_path_factory.mktemp("sam_encoders")))
        yield


@pytest.fixture(autouse=True)
def _private_embedding_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own embedding cache and models folder, never the user's."""
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path_factory.mktemp("sam_cache")))
    monkeypatch.setenv("NAPARI_SAM_MODELS", str(tmp_path_factory.mktemp("sam_models")))


def tiny_sam_config(image_size: int = TINY_IMAGE_SIZE):
    """A SamConfig that runs in milliseconds (see shared/STYLE.md).

    The decoder keeps Meta's 8 heads so a Meta-format export of it loads without an
    explicit config; initializer_range 0.02 avoids degenerate random embeddings.
    """
    guard_triton()  # a viewer may already be up in this process (see napari_sam._modelstack)
    from transformers import SamConfig

    vision = dict(
        hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
        window_size=14, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64,
        image_size=image_size, patch_size=16, initializer_range=0.02,
    )
    prompt = dict(hidden_size=32, mask_input_channels=4, image_size=image_size, patch_size=16)
    decoder = dict(
        hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=8,
        iou_head_hidden_dim=32,
    )
    return SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder,
        initializer_range=0.02,
    )


def build_tiny_sam(directory, seed: int = 0, image_size: int = TINY_IMAGE_SIZE):
    """Save a random tiny SamModel + matching SamProcessor with ``save_pretrained``."""
    guard_triton()
    import torch
    from transformers import SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(seed)
    model = SamModel(tiny_sam_config(image_size)).eval()
    # Random init leaves some parameters (e.g. layer norms) at trivial values; make every
    # weight informative so format conversions cannot pass by accident.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding
        )
    model.save_pretrained(directory)
    processor = SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": image_size // 4},
        )
    )
    processor.save_pretrained(directory)
    return model, processor


# --- transformers -> Meta names, written independently of napari_sam's converter -------


def hf_to_meta_state_dict(state: dict) -> dict:
    """Rename a transformers SamModel state dict to Meta's segment_anything names."""
    out = {}
    for key, value in state.items():
        if key.startswith("shared_image_embedding."):
            continue  # tied copy of the prompt encoder's gaussian matrix
        k = key
        k = k.replace("vision_encoder.", "image_encoder.")
        k = k.replace("image_encoder.layers.", "image_encoder.blocks.")
        k = k.replace("patch_embed.projection.", "patch_embed.proj.")
        for i, name in enumerate(["conv1", "layer_norm1", "conv2", "layer_norm2"]):
            k = k.replace(f"neck.{name}.", f"neck.{i}.")
        k = k.replace("shared_embedding.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix")
        k = k.replace("prompt_encoder.point_embed.", "prompt_encoder.point_embeddings.")
        for i, name in [(0, "conv1"), (1, "layer_norm1"), (3, "conv2"), (4, "layer_norm2"), (6, "conv3")]:
            k = k.replace(f"mask_embed.{name}.", f"mask_downscaling.{i}.")
        for i, name in [(0, "upscale_conv1"), (1, "upscale_layer_norm"), (3, "upscale_conv2")]:
            k = k.replace(f"mask_decoder.{name}.", f"mask_decoder.output_upscaling.{i}.")
        k = re.sub(r"\.layer_norm(\w*)\.", r".norm\1.", k)
        m = re.match(r"^(.*\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\.(.*)$", k)
        if m:
            base, part, idx, rest = m.groups()
            depth = 3  # SamFeedForward depth used by SAM's heads
            n = 0 if part == "proj_in" else depth - 1 if part == "proj_out" else int(idx) + 1
            k = f"{base}.layers.{n}.{rest}"
        out[k] = value
    import torch

    # Real Meta files carry these buffers; the loader must ignore them.
    out["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    out["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return out


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory):
    """A ``save_pretrained`` folder of a tiny random SAM (model + processor)."""
    directory = tmp_path_factory.mktemp("tiny_sam")
    build_tiny_sam(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_engine(tiny_sam_dir):
    import napari_sam

    # The choices users get (OpenVINO when installed, bf16 where the CPU has it): the CLI,
    # the widget and the servers load the same, so their outputs compare exactly.
    return napari_sam.load_model(tiny_sam_dir, device="cpu")


@pytest.fixture(scope="session")
def torch_engine(tiny_sam_dir):
    """The tiny model in torch at fp32: for comparisons with transformers itself."""
    import napari_sam

    return napari_sam.load_model(tiny_sam_dir, device="cpu", dtype="fp32", backend="torch")


@pytest.fixture
def blob_image():
    """A 2D uint8 image with two bright ellipses on a textured background."""
    rng = np.random.default_rng(0)
    rr, cc = np.mgrid[:180, :240]
    img = rng.normal(40, 8, (180, 240))
    img[((rr - 60) / 30) ** 2 + ((cc - 70) / 40) ** 2 < 1] = 200
    img[((rr - 120) / 25) ** 2 + ((cc - 170) / 30) ** 2 < 1] = 150
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def labeler(make_napari_viewer, tiny_sam_dir, qtbot):
    """``make(data, **layer_kwargs)`` -> (viewer, SAM Labeler dock) on an image "img", tiny model on CPU."""
    from napari_sam._qt.widget import SamLabelerWidget

    def make(data, **layer_kwargs):
        viewer = make_napari_viewer()
        viewer.add_image(data, name="img", **layer_kwargs)
        # Through the manifest, as users get it: napari passes the widget a proxy viewer.
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-labeler")
        assert isinstance(widget, SamLabelerWidget)
        widget.model.model_edit.setText(str(tiny_sam_dir))
        widget.model.device_combo.setCurrentText("cpu")  # encoder and dtype stay "auto", as users get them
        return viewer, widget

    yield make


@pytest.fixture
def blob_volume(blob_image):
    """(5, H, W): the blob image shifted a little on every slice."""
    return np.stack([np.roll(blob_image, 3 * z, axis=1) for z in range(5)])


# --- fine-tuning: a tiny model that can learn where a prompt is, and labelled scenes ----


@pytest.fixture(scope="session")
def ft_dir(tmp_path_factory):
    """The tiny model with SAM's positional encoding at Meta's scale (N(0, 1) frequencies).

    transformers initialises it with std = hidden/2 (16 here): at that scale the encoding of
    neighbouring positions is uncorrelated, so a random decoder cannot learn where a prompt
    is. Trained SAM weights carry their own; only a model trained from scratch needs this.
    """
    import torch

    folder = tmp_path_factory.mktemp("ft_tiny")
    model, _ = build_tiny_sam(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        pe = torch.randn(2, 16)
        model.shared_image_embedding.positional_embedding.copy_(pe)
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(pe)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def ft_engine(ft_dir):
    import napari_sam

    return napari_sam.load_model(ft_dir, device="cpu", dtype="fp32", backend="torch")


def scene(rng, size=96, n=2):
    """Bright disks on a noisy darker background, labelled 1..n."""
    img = rng.normal(60, 12, (size, size))
    lab = np.zeros((size, size), np.uint16)
    rr, cc = np.mgrid[:size, :size]
    for k in range(1, n + 1):
        for _ in range(100):
            r, c = rng.integers(12, size - 12, 2)
            m = (rr - r) ** 2 + (cc - c) ** 2 <= rng.integers(5, 11) ** 2
            if not lab[m].any():
                break
        img[m] = rng.normal(170, 12, m.sum())
        lab[m] = k
    return np.clip(img, 0, 255).astype(np.uint8), lab


def dataset(n_images=12, seed=0, n=2):
    rng = np.random.default_rng(seed)
    pairs = [scene(rng, n=n) for _ in range(n_images)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
