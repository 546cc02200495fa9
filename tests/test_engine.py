"""The engine against transformers' own SamModel + SamProcessor on the same tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_sam
from napari_sam import Prompt
from napari_sam import preprocess as pp

from conftest import build_tiny_sam, hf_to_meta_state_dict


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def tiny_pair(tiny_sam_dir):
    """The reference path: transformers' model and processor loaded from the same folder."""
    from transformers import SamModel, SamProcessor

    model = SamModel.from_pretrained(tiny_sam_dir).eval()
    processor = SamProcessor.from_pretrained(tiny_sam_dir)
    return model, processor


def reference_predict(pair, rgb, *, points=None, labels=None, box=None, multimask=False, masks_in=None):
    """Masks/scores computed with transformers directly; prompts converted to (x, y) here."""
    model, processor = pair
    kwargs = {}
    if points is not None:
        kwargs["input_points"] = [[[[float(c), float(r)] for r, c in points]]]
        kwargs["input_labels"] = [[list(labels)]]
    if box is not None:
        r0, c0, r1, c1 = box
        kwargs["input_boxes"] = [[[float(c0), float(r0), float(c1), float(r1)]]]
    inputs = processor(images=rgb, return_tensors="pt", **kwargs)
    extra = {}
    if masks_in is not None:
        extra["input_masks"] = torch.from_numpy(masks_in[None, None].astype(np.float32))
    with torch.no_grad():
        out = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs.get("input_points"),
            input_labels=inputs.get("input_labels"),
            input_boxes=inputs.get("input_boxes"),
            multimask_output=multimask,
            **extra,
        )
    masks = processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0][0].numpy()
    return masks, out.iou_scores[0, 0].numpy()


PROMPTS = {
    "point": dict(points=[[60, 70]], labels=[1]),
    "points_pos_neg": dict(points=[[60, 70], [120, 170], [10, 10]], labels=[1, 1, 0]),
    "box": dict(box=(30, 30, 90, 110)),
    "points_and_box": dict(points=[[60, 70], [85, 40]], labels=[1, 0], box=(30, 30, 90, 110)),
}


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_matches_transformers(torch_engine, tiny_pair, blob_image, name, multimask):
    tiny_engine = torch_engine  # transformers' own function at fp32 (backends: test_backends.py)
    prompt = PROMPTS[name]
    emb = tiny_engine.embed(blob_image)
    pred = tiny_engine.predict(
        emb, points=prompt.get("points"), point_labels=prompt.get("labels"),
        box=prompt.get("box"), multimask=multimask,
    )
    rgb = np.repeat(blob_image[..., None], 3, axis=-1)
    ref_masks, ref_scores = reference_predict(
        tiny_pair, rgb, points=prompt.get("points"), labels=prompt.get("labels"),
        box=prompt.get("box"), multimask=multimask,
    )
    k = 3 if multimask else 1
    assert pred.masks.shape == (k, *blob_image.shape) and pred.masks.dtype == bool
    assert pred.scores.shape == (k,)
    assert pred.logits.shape == (k, tiny_engine.low_res_size, tiny_engine.low_res_size)
    for i in range(k):
        assert iou(pred.masks[i], ref_masks[i]) >= 0.99
        assert 0 < pred.masks[i].sum() < pred.masks[i].size  # a real, non-trivial mask
    np.testing.assert_allclose(pred.scores, ref_scores, atol=1e-3)


def test_uint16_input_matches_transformers_on_mapped_image(torch_engine, tiny_pair, blob_image):
    tiny_engine = torch_engine
    img16 = blob_image.astype(np.uint16) * 200 + 1000
    emb = tiny_engine.embed(img16)
    assert emb.mapping.mode == "percentile"
    pred = tiny_engine.predict(emb, points=[[60, 70]], point_labels=[1], multimask=True)
    rgb = pp.to_rgb_uint8(img16, emb.mapping)
    ref_masks, ref_scores = reference_predict(tiny_pair, rgb, points=[[60, 70]], labels=[1], multimask=True)
    for i in range(3):
        assert iou(pred.masks[i], ref_masks[i]) >= 0.99
    np.testing.assert_allclose(pred.scores, ref_scores, atol=1e-3)


def test_mask_input_logits_match_transformers(tiny_engine, tiny_pair, blob_image):
    emb = tiny_engine.embed(blob_image)
    first = tiny_engine.predict(emb, points=[[60, 70]], point_labels=[1])
    refined = tiny_engine.predict(emb, points=[[60, 70]], point_labels=[1], mask_input=first.logits[0])
    rgb = np.repeat(blob_image[..., None], 3, axis=-1)
    ref_masks, ref_scores = reference_predict(
        tiny_pair, rgb, points=[[60, 70]], labels=[1], masks_in=first.logits[0]
    )
    assert iou(refined.masks[0], ref_masks[0]) >= 0.99
    np.testing.assert_allclose(refined.scores, ref_scores, atol=1e-3)
    assert not np.array_equal(refined.logits, first.logits)  # the mask prompt had an effect


def test_binary_mask_input_is_accepted_and_used(tiny_engine, blob_image):
    emb = tiny_engine.embed(blob_image)
    mask = np.zeros(blob_image.shape, bool)
    mask[40:80, 40:100] = True
    with_mask = tiny_engine.predict(emb, points=[[60, 70]], mask_input=mask)
    without = tiny_engine.predict(emb, points=[[60, 70]])
    assert with_mask.masks.shape == (1, *blob_image.shape)
    assert not np.allclose(with_mask.logits, without.logits)
    # a mask alone is a valid prompt (refining an existing label)
    only = tiny_engine.predict(emb, mask_input=mask)
    assert only.masks.shape == (1, *blob_image.shape)


def test_batch_equals_one_by_one(tiny_engine, blob_image):
    emb = tiny_engine.embed(blob_image)
    prompts = [
        Prompt(points=np.array([[60, 70]]), point_labels=np.array([1])),
        Prompt(box=np.array([100, 140, 145, 200])),
        Prompt(points=np.array([[120, 170]]), point_labels=np.array([1])),
        Prompt(points=np.array([[60, 70], [10, 10]]), point_labels=np.array([1, 0]), box=np.array([30, 30, 90, 110])),
        Prompt(box=np.array([30, 30, 90, 110])),
    ]
    batch = tiny_engine.predict_batch(emb, prompts, multimask=True)
    assert len(batch) == len(prompts)
    for prompt, got in zip(prompts, batch):
        alone = tiny_engine.predict(
            emb, points=prompt.points, point_labels=prompt.point_labels, box=prompt.box, multimask=True
        )
        np.testing.assert_array_equal(got.masks, alone.masks)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-5)


def test_decode_never_touches_the_image(tiny_engine, blob_image):
    image = blob_image.copy()
    emb = tiny_engine.embed(image)
    before = tiny_engine.predict(emb, points=[[60, 70]])
    image[:] = 0  # the caller's array changes after embedding
    after = tiny_engine.predict(emb, points=[[60, 70]])
    np.testing.assert_array_equal(before.masks, after.masks)


def test_meta_checkpoint_gives_same_masks(tiny_sam_dir, tiny_engine, blob_image, tmp_path):
    from transformers import SamModel

    hf = SamModel.from_pretrained(tiny_sam_dir)
    meta = hf_to_meta_state_dict(hf.state_dict())
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(meta, path)
    engine = napari_sam.load_model(path, device="cpu")
    assert engine.source.kind == "checkpoint" and engine.spec.kind == "sam"
    assert engine.fingerprint == tiny_engine.fingerprint  # identical weights after conversion
    for prompt in PROMPTS.values():
        a = tiny_engine.predict(tiny_engine.embed(blob_image), points=prompt.get("points"),
                                point_labels=prompt.get("labels"), box=prompt.get("box"), multimask=True)
        b = engine.predict(engine.embed(blob_image), points=prompt.get("points"),
                           point_labels=prompt.get("labels"), box=prompt.get("box"), multimask=True)
        for i in range(3):
            assert iou(a.masks[i], b.masks[i]) >= 0.99
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_wrapped_micro_sam_style_checkpoint(tiny_sam_dir, tiny_engine, tmp_path):
    from transformers import SamModel

    meta = hf_to_meta_state_dict(SamModel.from_pretrained(tiny_sam_dir).state_dict())
    wrapped = {"model_state": {f"sam.{k}": v for k, v in meta.items()}, "epoch": 3}
    path = tmp_path / "vit_t_finetuned.pt"
    torch.save(wrapped, path)
    engine = napari_sam.load_model(path, device="cpu")
    assert engine.fingerprint == tiny_engine.fingerprint


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.pth"):
        napari_sam.load_model(path, device="cpu")
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a Meta-format SAM checkpoint"):
        napari_sam.load_model(other, device="cpu")


def test_medsam_preprocessing_is_recognised_and_applied(tmp_path, blob_image):
    directory = tmp_path / "medsam_vit_tiny"
    model, _ = build_tiny_sam(directory, seed=1)
    engine = napari_sam.load_model(directory, device="cpu")
    assert engine.spec.kind == "medsam"
    box = (30, 30, 90, 110)
    pred = engine.predict(engine.embed(blob_image), box=box)

    # Independent MedSAM pipeline: stretch to T x T (bicubic), min-max to [0, 1],
    # box scaled per axis, logits resized straight back to (H, W).
    from PIL import Image
    import torch.nn.functional as F

    t = 256
    h, w = blob_image.shape
    rgb = np.repeat(blob_image[..., None], 3, axis=-1)
    x = np.asarray(Image.fromarray(rgb).resize((t, t), Image.BICUBIC), np.float32)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-8)
    pixels = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    boxes = torch.tensor([[[box[1] * t / w, box[0] * t / h, box[3] * t / w, box[2] * t / h]]], dtype=torch.float32)
    with torch.no_grad():
        out = model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
    ref = F.interpolate(out.pred_masks[0], (h, w), mode="bilinear", align_corners=False)[0, 0].numpy() > 0
    assert iou(pred.masks[0], ref) >= 0.99
    np.testing.assert_allclose(pred.scores, out.iou_scores[0, 0].numpy(), atol=1e-3)

    forced = napari_sam.load_model(directory, device="cpu", preprocessing="sam")
    assert forced.spec.kind == "sam"


def test_env_variable_chooses_model(tiny_sam_dir, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(tiny_sam_dir))
    assert napari_sam.resolve_model_source().location == str(tiny_sam_dir)
    engine = napari_sam.load_model(device="cpu")
    assert engine.source.kind == "hf_dir"
    monkeypatch.delenv("NAPARI_SAM_MODEL")
    src = napari_sam.resolve_model_source()
    assert (src.kind, src.location) == ("hf_id", "facebook/sam-vit-large")


def test_missing_weights_error_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(napari_sam.ModelNotFoundError) as info:
        napari_sam.load_model("no-such-org/no-such-sam-model", device="cpu")
    msg = str(info.value)
    assert "no-such-org/no-such-sam-model" in msg and "Tried" in msg
    assert "huggingface-cli download" in msg and "NAPARI_SAM_MODEL" in msg
    with pytest.raises(napari_sam.ModelNotFoundError, match="neither an existing directory"):
        napari_sam.load_model(str(tmp_path / "missing" / "sam.pth"), device="cpu")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(napari_sam.ModelNotFoundError, match="config.json"):
        napari_sam.load_model(empty, device="cpu")


def test_device_and_dtype_choices(tiny_sam_dir, blob_image):
    from napari_sam.engine import resolve_device, resolve_dtype

    auto = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert auto.type == expected
    cpu = torch.device("cpu")
    from napari_sam.backends import cpu_has_native_bf16

    # "auto" never picks an emulated precision
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    engine = napari_sam.load_model(tiny_sam_dir, device="cpu", dtype="bf16", backend="torch")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    pred = engine.predict(engine.embed(blob_image), points=[[60, 70]], multimask=True)
    assert pred.masks.shape == (3, *blob_image.shape) and pred.scores.dtype == np.float32


def test_sdpa_attention_is_used(tiny_engine):
    from transformers import SamModel

    if not getattr(SamModel, "_supports_sdpa", False):
        pytest.skip("this transformers has no SDPA for SAM (< 4.47): its eager default is used")
    assert tiny_engine.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((2, 3, 4, 5), np.uint8), "2D"),
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((5, 64, 64), np.uint8), "image"),  # (Z, Y, X) is not a channel image
        (np.array([["a", "b"], ["c", "d"]]), "dtype"),
    ],
)
def test_bad_images_are_rejected(tiny_engine, image, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_engine.embed(image)


def test_stack_shaped_image_error_suggests_slicing(tiny_engine):
    with pytest.raises(ValueError, match="3D stack"):
        tiny_engine.embed(np.zeros((40, 64, 64), np.uint8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(points=[[500, 10]]), "outside the image"),
        (dict(points=[[10, -20]]), "outside the image"),
        (dict(points=[[10, 10], [20, 20]], point_labels=[1]), "point_labels has 1 entries"),
        (dict(points=[[10, 10]], point_labels=[2]), "point_labels must be 1"),
        (dict(points=[[np.nan, 10]]), "NaN"),
        (dict(points=[1, 2, 3]), "points must have shape"),
        (dict(box=(50, 10, 20, 40)), "box has min > max"),
        (dict(box=(10, 10, 20)), "box must be"),
        (dict(box=(500, 500, 600, 600)), "outside the image"),
        (dict(), "empty"),
        (dict(point_labels=[1]), "without points"),
        (dict(mask_input=np.zeros((10, 10), np.float32)), "low-res logits"),
        (dict(mask_input=np.zeros((10, 10), bool)), "mask_input has shape"),
    ],
)
def test_bad_prompts_name_the_parameter(tiny_engine, blob_image, kwargs, match):
    emb = tiny_engine.embed(blob_image)
    with pytest.raises(ValueError, match=match):
        tiny_engine.predict(emb, **kwargs)


def test_box_overhanging_the_border_is_clipped(tiny_engine, blob_image):
    emb = tiny_engine.embed(blob_image)
    h, w = blob_image.shape
    over = tiny_engine.predict(emb, box=(-20, -30, 90, 110))
    edge = tiny_engine.predict(emb, box=(-0.5, -0.5, 90, 110))
    np.testing.assert_array_equal(over.masks, edge.masks)


def test_embedding_from_another_model_is_refused(tiny_engine, blob_image, tmp_path):
    other_dir = tmp_path / "other"
    build_tiny_sam(other_dir, seed=5)
    other = napari_sam.load_model(other_dir, device="cpu")
    with pytest.raises(ValueError, match="different model"):
        tiny_engine.predict(other.embed(blob_image), points=[[60, 70]])
    with pytest.raises(TypeError, match="ImageEmbedding"):
        tiny_engine.predict(blob_image, points=[[60, 70]])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64, bool])
def test_embed_accepts_dtypes_and_channels(tiny_engine, blob_image, dtype):
    img = (blob_image > 100) if dtype is bool else blob_image.astype(dtype)
    for arr in (img, np.stack([img] * 3, -1), np.stack([img, img[::-1]], -1)):
        emb = tiny_engine.embed(arr)
        assert emb.original_size == blob_image.shape
        pred = tiny_engine.predict(emb, points=[[60, 70]])
        assert pred.masks.shape == (1, *blob_image.shape)


def test_stepwise_encoder_equals_transformers_and_reports_progress(torch_engine, tiny_pair, blob_image):
    tiny_engine = torch_engine
    model, _ = tiny_pair
    rgb = np.repeat(blob_image[..., None], 3, axis=-1)
    steps = tiny_engine.embed_steps(blob_image)
    progress = []
    while True:
        try:
            progress.append(next(steps))
        except StopIteration as done:
            emb = done.value
            break
    total = len(tiny_engine.model.vision_encoder.layers) + 2
    assert progress == [(i, total) for i in range(1, total + 1)]
    pixels = torch.from_numpy(pp.model_input(rgb, tiny_engine.spec)[0][None])
    with torch.no_grad():
        expected = model.get_image_embeddings(pixels)
    torch.testing.assert_close(emb.features, expected, rtol=1e-5, atol=1e-5)
    # stopping early (cancel) leaves nothing behind and raises nothing
    steps = tiny_engine.embed_steps(blob_image)
    next(steps)
    steps.close()


@pytest.fixture(scope="module")
def mask_engine(tmp_path_factory):
    """The tiny model with Meta's 16 mask-input channels: with the tiny config's 4 the mask
    path has one channel, which LayerNorm turns into a constant (every mask_input alike)."""
    from conftest import tiny_sam_config
    from transformers import SamModel

    import napari_sam

    config = tiny_sam_config()
    config.prompt_encoder_config.mask_input_channels = 16
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("mask16")
    SamModel(config).save_pretrained(folder)
    return napari_sam.load_model(folder, device="cpu", dtype="fp32", backend="torch")


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_decoder_logits_equal_samodel_on_the_same_embedding(mask_engine, blob_image, multimask):
    """predict_batch runs transformers' prompt encoder and SAM's decoder without copying the
    image embedding per prompt: the low-res logits and scores are SamModel's own."""
    from napari_sam._types import Prompt

    engine = mask_engine
    emb = engine.embed(blob_image)
    first = engine.predict(emb, points=[[60, 70]])
    prompts = [Prompt(points=[[60, 70]]), Prompt(points=[[120, 170]]),  # one group of two
               Prompt(points=[[60, 70], [10, 10]], point_labels=[1, 0]),
               Prompt(box=[30, 30, 90, 110]), Prompt(points=[[60, 70]], box=[30, 30, 90, 110]),
               Prompt(points=[[60, 70]], mask_input=first.logits[0]),
               Prompt(points=[[90, 90]], mask_input=np.random.default_rng(1).normal(0, 20, first.logits[0].shape))]
    got = engine.predict_batch(emb, prompts, multimask=multimask)
    size = blob_image.shape
    for prompt, pred in zip(prompts, got):
        kwargs = {}
        if prompt.points is not None:
            xy = pp.points_to_model(np.asarray(prompt.points, float), size, engine.spec)
            kwargs["input_points"] = torch.from_numpy(xy[None, None])
            labels = prompt.point_labels if prompt.point_labels is not None else [1] * len(prompt.points)
            kwargs["input_labels"] = torch.tensor([[labels]])
        if prompt.box is not None:
            kwargs["input_boxes"] = torch.from_numpy(pp.box_to_model(np.asarray(prompt.box, float), size,
                                                                     engine.spec)[None, None])
        if prompt.mask_input is not None:
            kwargs["input_masks"] = torch.from_numpy(np.asarray(prompt.mask_input, np.float32)[None, None])
        with torch.inference_mode():
            out = engine.model(image_embeddings=emb.features, multimask_output=multimask, **kwargs)
        np.testing.assert_allclose(pred.logits, out.pred_masks[0, 0].numpy(), atol=1e-5)
        np.testing.assert_allclose(pred.scores, out.iou_scores[0, 0].numpy(), atol=1e-5)
