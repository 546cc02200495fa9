"""The Azure ML SAM schema: parsing, images, masks and the scorer over the tiny model."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sam.scoring import (
    COLUMNS, Limits, Scorer, ScoringError, decode_image, decode_mask, encode_mask, image_bytes, parse_request,
    parse_row,
)


def png_b64(pixels: np.ndarray, fmt: str = "PNG", newlines: bool = True) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    # Azure's samples use base64.encodebytes: a newline every 76 characters
    return (base64.encodebytes if newlines else base64.b64encode)(buf.getvalue()).decode()


def request(*rows, columns=COLUMNS, params=True) -> dict:
    body = {"input_data": {"columns": list(columns), "index": list(range(len(rows))), "data": [list(r) for r in rows]}}
    if params:
        body["params"] = {}
    return body


@pytest.fixture
def scene():
    """A 120 x 200 (H x W) RGB image: a bright rectangle at rows 30-80, cols 120-180."""
    img = np.full((120, 200, 3), 20, np.uint8)
    img[30:80, 120:180] = (220, 200, 40)
    return img


@pytest.fixture
def scorer(tiny_engine):
    return Scorer(tiny_engine)


# --- parsing ----------------------------------------------------------------------------

def test_points_and_boxes_are_x_y_turned_into_row_col():
    row = parse_row({"image": "x", "input_points": "[[[150, 40], [10, 5]]]", "input_labels": "[[1, 0]]",
                     "input_boxes": "[[120, 30, 180, 80]]", "multimask_output": False})
    (p,) = row.prompts
    np.testing.assert_array_equal(p.points, [[40, 150], [5, 10]])
    np.testing.assert_array_equal(p.point_labels, [1, 0])
    np.testing.assert_array_equal(p.box, [30, 120, 80, 180])
    assert row.multimask is False


def test_each_prompt_set_and_each_box_is_one_prediction():
    assert len(parse_row({"image": "x", "input_points": "[[[1, 2]], [[3, 4]], [[5, 6]]]"}).prompts) == 3
    assert len(parse_row({"image": "x", "input_boxes": "[[0, 0, 5, 5], [1, 1, 9, 9]]"}).prompts) == 2
    # set k pairs with box k; a single one pairs with each of the other
    both = parse_row({"image": "x", "input_points": "[[[1, 2]], [[3, 4]]]", "input_boxes": "[[0, 0, 5, 5], [1, 1, 9, 9]]"})
    np.testing.assert_array_equal(both.prompts[1].box, [1, 1, 9, 9])
    np.testing.assert_array_equal(both.prompts[1].points, [[4, 3]])
    one_box = parse_row({"image": "x", "input_points": "[[[1, 2]], [[3, 4]]]", "input_boxes": "[0, 0, 5, 5]"})
    assert [p.box.tolist() for p in one_box.prompts] == [[0, 0, 5, 5]] * 2
    with pytest.raises(ScoringError, match="2 prompt sets and 3 boxes"):
        parse_row({"image": "x", "input_points": "[[[1, 2]], [[3, 4]]]",
                   "input_boxes": "[[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 3, 3]]"})


@pytest.mark.parametrize("absent", ["", "null", "None", " NULL ", None, float("nan")])
def test_absent_values(absent):
    row = parse_row({"image": "x", "input_points": absent, "input_boxes": "[[0, 0, 5, 5]]",
                     "input_labels": absent, "multimask_output": absent})
    assert row.prompts[0].points is None and row.multimask is True  # Azure's default: three masks


def test_prompts_as_lists_python_literals_and_csv_booleans():
    a = parse_row({"image": "x", "input_points": [[[1, 2]]], "input_labels": [[1]], "multimask_output": "False"})
    b = parse_row({"image": "x", "input_points": "[[(1, 2)]]", "input_labels": "[[1]]", "multimask_output": "true"})
    np.testing.assert_array_equal(a.prompts[0].points, b.prompts[0].points)
    assert (a.multimask, b.multimask) == (False, True)


def test_padding_points_are_dropped():
    row = parse_row({"image": "x", "input_points": "[[[1, 2], [0, 0]], [[3, 4], [5, 6]]]",
                     "input_labels": "[[1, -10], [0, 1]]"})
    np.testing.assert_array_equal(row.prompts[0].points, [[2, 1]])
    np.testing.assert_array_equal(row.prompts[1].point_labels, [0, 1])
    with pytest.raises(ScoringError, match="only padding"):
        parse_row({"image": "x", "input_points": "[[[1, 2]]]", "input_labels": "[[-1]]"})


@pytest.mark.parametrize(("values", "message"), [
    ({"input_points": "[[650, 900]]"}, r"input_points\[0\] must be a non-empty list of \[x, y\]"),
    ({"input_points": "[[[1, 2, 3]]]"}, "each point is"),
    ({"input_points": "[[[1, \"a\"]]]"}, "finite number"),
    ({"input_points": "[[[1, NaN]]]"}, "finite number"),
    ({"input_points": "[[[true, 2]]]"}, "finite number"),
    ({"input_points": "__import__('os')"}, "not a JSON list"),
    ({"input_points": "[[[1, 2]]]", "input_labels": "[[1, 0]]"}, "nest like input_points"),
    ({"input_points": "[[[1, 2]]]", "input_labels": "[[2]]"}, "use 1"),
    ({"input_labels": "[[1]]", "input_boxes": "[[0, 0, 1, 1]]"}, "without input_points"),
    ({"input_boxes": "[[10, 0, 5, 5]]"}, "x1 > x2"),
    ({"input_boxes": "[[1, 2, 3]]"}, r"each box is \[x1, y1, x2, y2\]"),
    ({"input_boxes": "[]"}, "non-empty"),
    ({}, "no prompt"),
    ({"input_boxes": "[[0, 0, 1, 1]]", "multimask_output": "maybe"}, "true or false"),
])
def test_bad_prompts_are_named(values, message):
    with pytest.raises(ScoringError, match=message) as info:
        parse_row({"image": "x", **values})
    assert info.value.status == 422


def test_deeply_nested_prompts_are_422():
    for column in ("input_points", "input_boxes"):
        with pytest.raises(ScoringError, match="not a JSON list"):
            parse_row({"image": "x", column: "[" * 100_000})


def test_too_many_predictions_is_413():
    boxes = json.dumps([[0, 0, 1, 1]] * 300)
    with pytest.raises(ScoringError, match="300 predictions") as info:
        parse_row({"image": "x", "input_boxes": boxes})
    assert info.value.status == 413


@pytest.mark.parametrize(("payload", "message"), [
    ([], "JSON object"),
    ({"data": []}, "no \"input_data\""),
    ({"input_data": {"columns": ["image", "input_point"], "data": [["x", ""]]}}, r"unknown or repeated columns \['input_point'\]"),
    ({"input_data": {"columns": ["image"], "data": []}}, "non-empty list of rows"),
    ({"input_data": {"columns": ["image", "input_boxes"], "data": [["x"]]}}, "row 0 must be a list of 2"),
    ({"input_data": {"columns": ["image", "input_boxes"], "index": [0, 1], "data": [["x", "[0,0,1,1]"]]}}, "index"),
    ({"input_data": {"columns": ["image", "input_boxes"], "data": [["x", "[0,0,1,1]"], ["x", ""]]}}, "row 1: the row has no prompt"),
])
def test_bad_requests_are_named(payload, message):
    with pytest.raises(ScoringError, match=message):
        parse_request(payload)


def test_request_with_or_without_params_and_mlflow_split():
    rows = [["x", "", "[[0, 0, 1, 1]]", "", False]]
    assert len(parse_request(request(*rows))) == len(parse_request(request(*rows, params=False))) == 1
    assert len(parse_request({"dataframe_split": {"columns": list(COLUMNS), "data": rows}})) == 1


# --- images -----------------------------------------------------------------------------

def test_image_formats(scene):
    for fmt in ("PNG", "JPEG", "BMP", "WEBP"):
        pixels = decode_image(image_bytes(png_b64(scene, fmt)))
        assert pixels.shape == scene.shape and pixels.dtype == np.uint8, fmt
    assert np.array_equal(decode_image(image_bytes(png_b64(scene))), scene)
    gray16 = (np.arange(120 * 200, dtype=np.uint16) * 2).reshape(120, 200)
    buf = io.BytesIO()
    tifffile.imwrite(buf, gray16)
    assert np.array_equal(decode_image(buf.getvalue()), gray16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.moveaxis(scene, -1, 0), photometric="rgb", planarconfig="separate")
    assert np.array_equal(decode_image(buf.getvalue()), scene)
    rgba = np.dstack([scene, np.full(scene.shape[:2], 7, np.uint8)])
    assert np.array_equal(decode_image(image_bytes(png_b64(rgba))), scene)
    assert np.array_equal(decode_image(image_bytes("data:image/png;base64," + png_b64(scene, newlines=False))), scene)


def test_jpeg_orientation_follows_exif(scene):
    im = Image.fromarray(scene)
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90° clockwise for display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).shape == (200, 120, 3)


def test_bad_images_are_named():
    with pytest.raises(ScoringError, match="neither base64"):
        image_bytes("not base64 at all!")
    with pytest.raises(ScoringError, match="could not be decoded"):
        decode_image(base64.b64decode(base64.b64encode(b"\x89PNG\r\n\x1a\n garbage")))
    with pytest.raises(ScoringError, match="without --allow-urls|does not fetch URLs"):
        image_bytes("https://example.org/cat.png")
    with pytest.raises(ScoringError, match="only http and https"):
        image_bytes("file:///etc/passwd", Limits(allow_urls=True))
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((5, 16, 16), np.uint8), photometric="minisblack")
    with pytest.raises(ScoringError, match="one 2D image"):
        decode_image(buf.getvalue())


def test_pixel_limit_is_checked_before_decoding():
    big = png_b64(np.zeros((300, 400), np.uint8))
    with pytest.raises(ScoringError, match="400 x 300 pixels; at most 100000") as info:
        decode_image(image_bytes(big), Limits(max_image_pixels=100_000))
    assert info.value.status == 413


def test_a_tiff_with_many_samples_is_refused_before_decoding():
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((64, 64, 300), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ScoringError, match="300 samples per pixel"):
        decode_image(buf.getvalue())


def test_not_an_image_says_so():
    with pytest.raises(ScoringError, match="image is not a PNG, JPEG, TIFF, BMP or WebP file$"):
        decode_image(b"%PDF-1.4 not an image")


def test_mask_png_round_trip():
    mask = np.zeros((7, 11), bool)
    mask[2:5, 3:9] = True
    data = base64.b64decode(encode_mask(mask))
    im = Image.open(io.BytesIO(data))
    assert (im.format, im.mode, im.size) == ("PNG", "L", (11, 7))
    assert set(np.unique(np.asarray(im))) == {0, 255}
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)


# --- the scorer over the tiny model -----------------------------------------------------

def test_response_shape_and_masks_match_the_engine(scorer, tiny_engine, scene):
    b64 = png_b64(scene)
    out = scorer.score(request(
        [b64, "", "[[120, 30, 180, 80]]", "", False],
        [b64, "[[[150, 55]], [[20, 100]]]", "", "", True],
        [b64, "[[[150, 55], [20, 100]]]", "[[120, 30, 180, 80]]", "[[1, 0]]", False],
    ))
    assert [len(r["response"]["predictions"]) for r in out] == [1, 2, 1]
    assert [len(p["masks_per_prediction"]) for p in out[1]["response"]["predictions"]] == [3, 3]
    first = out[0]["response"]["predictions"][0]["masks_per_prediction"][0]
    assert set(first) == {"encoded_binary_mask", "iou_score"} and isinstance(first["iou_score"], float)
    for r in out:
        for p in r["response"]["predictions"]:
            for m in p["masks_per_prediction"]:
                assert decode_mask(m["encoded_binary_mask"]).shape == (120, 200)
    json.dumps(out)  # plain JSON
    # the same masks as the engine given (row, col) directly
    emb = tiny_engine.embed(scene)
    expected = tiny_engine.predict(emb, points=[[55, 150], [100, 20]], point_labels=[1, 0], box=[30, 120, 80, 180])
    got = out[2]["response"]["predictions"][0]["masks_per_prediction"][0]
    assert np.array_equal(decode_mask(got["encoded_binary_mask"]), expected.masks[0])
    assert got["iou_score"] == pytest.approx(float(expected.scores[0]), abs=1e-6)
    multi = tiny_engine.predict(emb, points=[[55, 150]], multimask=True)
    for k, m in enumerate(out[1]["response"]["predictions"][0]["masks_per_prediction"]):
        assert np.array_equal(decode_mask(m["encoded_binary_mask"]), multi.masks[k])


def test_the_same_image_is_encoded_once(scorer, scene, monkeypatch):
    calls = []
    encode = scorer.engine.encode_steps

    def counting(images):
        calls.append(len(images))
        return encode(images)

    monkeypatch.setattr(scorer.engine, "encode_steps", counting)
    b64 = png_b64(scene)
    scorer.score(request([b64, "", "[[120, 30, 180, 80]]", "", False], [b64, "[[[10, 10]]]", "", "", False]))
    scorer.score(request([png_b64(scene, newlines=False), "", "[[0, 0, 50, 50]]", "", True]))
    assert calls == [1]


def test_prompts_outside_the_image_name_x_y(scorer, scene):
    b64 = png_b64(scene)
    with pytest.raises(ScoringError, match=r"row 0: prediction 0: points \[\[150.0, 130.0\]\] \(x, y\) lie outside the 200 x 120"):
        scorer.score(request([b64, "[[[150, 130]]]", "", "", False]))
    with pytest.raises(ScoringError, match="box .* lies outside"):
        scorer.score(request([b64, "", "[[300, 0, 400, 50]]", "", False]))
    # a box that overhangs the edge means "up to the edge"
    out = scorer.score(request([b64, "", "[[150, -20, 260, 90]]", "", False]))
    assert decode_mask(out[0]["response"]["predictions"][0]["masks_per_prediction"][0]["encoded_binary_mask"]).shape == (120, 200)


def test_predictions_x_masks_x_pixels_is_bounded(tiny_engine, scene):
    scorer = Scorer(tiny_engine, limits=Limits(max_mask_pixels=10 * 120 * 200))
    b64 = png_b64(scene)
    boxes = json.dumps([[0, 0, 50, 50]] * 4)
    with pytest.raises(ScoringError, match="4 predictions x 3 masks of 200 x 120 pixels") as info:
        scorer.score(request([b64, "", boxes, "", True]))
    assert info.value.status == 413
    assert len(scorer.score(request([b64, "", boxes, "", False]))[0]["response"]["predictions"]) == 4


def test_many_predictions_decode_in_pieces_with_the_same_result(tiny_engine, scene, monkeypatch):
    import napari_sam.scoring as scoring

    b64 = png_b64(scene)
    boxes = json.dumps([[i, i, 100 + i, 60 + i] for i in range(0, 40, 4)])
    whole = Scorer(tiny_engine).score(request([b64, "", boxes, "", True]))
    monkeypatch.setattr(scoring, "_DECODE_BYTES", 3 * 120 * 200 * 4 * 3)  # three predictions a call
    calls = []
    real = tiny_engine.predict_batch
    monkeypatch.setattr(tiny_engine, "predict_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    pieces = Scorer(tiny_engine).score(request([b64, "", boxes, "", True]))
    assert calls == [3, 3, 3, 1]
    flat = [[(m["encoded_binary_mask"], m["iou_score"]) for m in p["masks_per_prediction"]]
            for r in (whole, pieces) for p in r[0]["response"]["predictions"]]
    for a, b in zip(flat[:10], flat[10:]):
        for (mask_a, iou_a), (mask_b, iou_b) in zip(a, b):
            # a different batch size may round differently in the last bits
            assert (decode_mask(mask_a) != decode_mask(mask_b)).mean() < 1e-3
            assert iou_a == pytest.approx(iou_b, abs=1e-5)


def test_grayscale_and_16_bit_images_score(scorer):
    gray = np.zeros((64, 96), np.uint16)
    gray[10:40, 20:60] = 40000
    buf = io.BytesIO()
    tifffile.imwrite(buf, gray)
    b64 = base64.b64encode(buf.getvalue()).decode()
    out = scorer.score(request([b64, "[[[30, 20]]]", "", "", False]))
    assert decode_mask(out[0]["response"]["predictions"][0]["masks_per_prediction"][0]["encoded_binary_mask"]).shape == (64, 96)


@pytest.mark.parametrize("pixels", [np.zeros((1, 1), np.uint8), np.zeros((1, 3000), np.uint8),
                                    np.ones((4, 4), np.complex64)], ids=["1x1", "1-pixel strip", "complex"])
def test_images_the_model_cannot_take_are_422(scorer, pixels):
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels)
    b64 = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(ScoringError, match="row 0: image") as info:
        scorer.score(request([b64, "[[[0, 0]]]", "", "", False]))
    assert info.value.status == 422


@pytest.mark.parametrize("pixels", [np.full((20, 20), np.nan, np.float32), np.full((30, 30), 7, np.uint16),
                                    np.ones((10, 10), bool), np.ones((10, 10, 3), np.uint16)],
                         ids=["all NaN", "constant", "bool", "16-bit RGB"])
def test_odd_but_valid_images_score(scorer, pixels):
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels)
    out = scorer.score(request([base64.b64encode(buf.getvalue()).decode(), "[[[1, 1]]]", "", "", True]))
    masks = out[0]["response"]["predictions"][0]["masks_per_prediction"]
    assert len(masks) == 3 and decode_mask(masks[0]["encoded_binary_mask"]).shape == pixels.shape[:2]


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server for URL images (nothing leaves the machine)."""
    import functools
    import http.server
    import threading

    img = np.zeros((40, 60, 3), np.uint8)
    img[10:30, 20:50] = 255
    Image.fromarray(img).save(tmp_path / "img.png")
    (tmp_path / "big.bin").write_bytes(os.urandom(200_000))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            super().do_GET()

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the client hanging up on the oversized file

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_only_when_allowed(tiny_engine, image_server):
    allowed = Scorer(tiny_engine, limits=Limits(allow_urls=True, url_max_bytes=100_000))
    out = allowed.score(request([f"{image_server}/img.png", "", "[[20, 10, 50, 30]]", "", False]))
    assert decode_mask(out[0]["response"]["predictions"][0]["masks_per_prediction"][0]["encoded_binary_mask"]).shape == (40, 60)
    with pytest.raises(ScoringError, match="larger than 100000 bytes") as info:
        allowed.score(request([f"{image_server}/big.bin", "", "[[0, 0, 1, 1]]", "", False]))
    assert info.value.status == 413
    with pytest.raises(ScoringError, match="file:///etc/passwd"):  # a redirect off http(s) is refused
        allowed.score(request([f"{image_server}/to-file", "", "[[0, 0, 1, 1]]", "", False]))
    with pytest.raises(ScoringError, match="could not be fetched"):
        allowed.score(request([f"{image_server}/missing.png", "", "[[0, 0, 1, 1]]", "", False]))
    with pytest.raises(ScoringError, match="does not fetch URLs"):
        Scorer(tiny_engine).score(request([f"{image_server}/img.png", "", "[[0, 0, 1, 1]]", "", False]))
