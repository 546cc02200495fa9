"""Intensity mapping and model-input geometry (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam import preprocess as pp
from napari_sam._types import medsam_input_spec, sam_input_spec


def test_window_maps_center_and_edges():
    hu = np.array([[-1000, -160, 40], [240, 1000, 40]], np.int16)
    m = pp.resolve_intensity(hu, window=(40, 400))
    rgb = pp.to_rgb_uint8(hu, m)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    gray = rgb[..., 0]
    np.testing.assert_array_equal(gray, [[0, 0, 128], [255, 255, 128]])
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize(
    "preset, center, width",
    [("abdomen", 40, 400), ("lung", -600, 1500), ("brain", 40, 80), ("bone", 400, 1800), ("mediastinum", 50, 350)],
)
def test_ct_presets(preset, center, width):
    hu = np.array([[center - width / 2, center, center + width / 2]] * 2, np.float32)
    m = pp.resolve_intensity(hu, preset=preset)
    assert m.mode == "window" and preset in m.label
    np.testing.assert_array_equal(pp.to_rgb_uint8(hu, m)[..., 0], [[0, 128, 255]] * 2)


def test_percentile_clip_default():
    rng = np.random.default_rng(1)
    img = rng.normal(1000, 100, (100, 100)).astype(np.uint16)
    img[0, 0] = 65000  # a hot pixel must not squash the contrast
    m = pp.resolve_intensity(img)
    assert m.mode == "percentile" and m.label == "p0.5-p99.5"
    assert m.highs[0] < 2000
    rgb = pp.to_rgb_uint8(img, m)
    assert rgb[0, 0, 0] == 255 and 100 < rgb[..., 0].mean() < 160


def test_uint8_is_identity_and_rgb_passes_through():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    m = pp.resolve_intensity(rgb)
    assert m.mode == "identity"
    np.testing.assert_array_equal(pp.to_rgb_uint8(rgb, m), rgb)
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(pp.to_rgb_uint8(rgba, pp.resolve_intensity(rgba)), rgb)
    gray = rgb[..., 0]
    out = pp.to_rgb_uint8(gray, pp.resolve_intensity(gray))
    np.testing.assert_array_equal(out, np.stack([gray] * 3, -1))


def test_nan_and_inf_are_handled():
    img = np.array([[0.0, np.nan, 1.0], [np.inf, -np.inf, 0.5]], np.float32)
    m = pp.resolve_intensity(img, percentiles=(0, 100))
    assert (m.lows[0], m.highs[0]) == (0.0, 1.0)
    gray = pp.to_rgb_uint8(img, m)[..., 0]
    np.testing.assert_array_equal(gray, [[0, 0, 255], [255, 0, 128]])


def test_constant_image_does_not_divide_by_zero():
    img = np.full((8, 8), 5.0)
    out = pp.to_rgb_uint8(img, pp.resolve_intensity(img))
    assert out.shape == (8, 8, 3) and (out == 0).all()


def test_volume_gets_one_mapping_for_all_slices():
    vol = np.stack([np.full((16, 16), 100, np.uint16), np.full((16, 16), 1000, np.uint16)])
    vol[:, 0, 0] = 0
    m = pp.resolve_intensity(vol, percentiles=(0, 100), multichannel=False)
    dark, bright = (pp.to_rgb_uint8(s, m)[5, 5, 0] for s in vol)
    assert dark < bright  # per-slice normalisation would have made them equal
    assert bright == 255 and dark == round(100 / 1000 * 255)


def test_channel_choice_and_composite():
    a = np.linspace(0, 1000, 64 * 64).reshape(64, 64)
    b = 1000 - a
    two = np.stack([a, b], -1).astype(np.float32)
    m = pp.resolve_intensity(two, channel=1)
    out = pp.to_rgb_uint8(two, m)
    assert m.channel == 1 and (out[..., 0] == out[..., 1]).all()
    assert out[0, 0, 0] == 255  # channel 1 is bright where channel 0 is dark
    comp = pp.to_rgb_uint8(two, pp.resolve_intensity(two))
    assert comp[0, 0, 1] == 255 and comp[0, 0, 0] == 0 and (comp[..., 2] == 0).all()
    five = np.stack([a] * 5, -1)
    gray = pp.to_rgb_uint8(five, pp.resolve_intensity(five))
    assert (gray[..., 0] == gray[..., 2]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="liver"), "unknown"),
        (dict(window=(40, 0)), "width > 0"),
        (dict(window=(40, 400), preset="lung"), "either window or preset"),
        (dict(percentiles=(90, 10)), "percentiles"),
        (dict(channel=0), "no channel axis"),
    ],
)
def test_bad_intensity_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pp.resolve_intensity(np.zeros((8, 8), np.float32), **kwargs)


def test_channel_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pp.resolve_intensity(np.zeros((8, 8, 2), np.float32), channel=2)


def test_sam_geometry_matches_meta_rounding():
    spec = sam_input_spec(1024)
    assert pp.resized_shape((480, 640), spec) == (768, 1024)
    assert pp.resized_shape((333, 1000), spec) == (341, 1024)
    pixels, size = pp.model_input(np.zeros((480, 640, 3), np.uint8), spec)
    assert pixels.shape == (3, 1024, 1024) and size == (768, 1024)
    # padding is zero after normalisation, like Meta's predictor
    assert (pixels[:, 768:, :] == 0).all()
    xy = pp.points_to_model(np.array([[240.0, 320.0]]), (480, 640), spec)
    np.testing.assert_allclose(xy, [[512.0, 384.0]])
    box = pp.box_to_model(np.array([0, 0, 480, 640.0]), (480, 640), spec)
    np.testing.assert_allclose(box, [0, 0, 1024, 768])


def test_medsam_geometry_stretches():
    spec = medsam_input_spec(1024)
    pixels, size = pp.model_input(np.full((100, 400, 3), 9, np.uint8), spec)
    assert size == (1024, 1024) and pixels.shape == (3, 1024, 1024)
    rng = np.random.default_rng(0)
    pixels, _ = pp.model_input(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8), spec)
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    xy = pp.points_to_model(np.array([[50.0, 200.0]]), (100, 400), spec)
    np.testing.assert_allclose(xy, [[512.0, 512.0]])


def test_mask_to_logits_places_mask_in_model_frame():
    spec = sam_input_spec(1024)
    mask = np.zeros((480, 640), bool)
    mask[:240, :320] = True  # top-left quarter of the image
    logits = pp.mask_to_logits(mask, (480, 640), spec, 256)
    assert logits.shape == (256, 256)
    assert logits[10, 10] > 5 and logits[100, 200] < -5
    assert logits[250, 10] < -5  # padding rows stay background
    with pytest.raises(ValueError, match="image size"):
        pp.mask_to_logits(mask[:10], (480, 640), spec, 256)
