"""Scoring in the schema of Azure ML's ``facebook-sam-vit-large`` managed endpoint.

Existing Azure ML clients send a pandas-split request::

    {"input_data": {"columns": ["image", "input_points", "input_boxes", "input_labels",
                                "multimask_output"],
                    "index": [0],
                    "data": [["<base64>", "", "[[650, 900, 1000, 1250]]", "", false]]},
     "params": {}}

and index the response ``result[0]["response"]["predictions"][0]["masks_per_prediction"][0]``.
This module turns one into the other over the engine and the embedding cache (the same
image sent twice is encoded once). It knows nothing of HTTP, MLflow or napari: the
``score``/``score-batch`` commands, the FastAPI server (:mod:`napari_sam.serve`) and the
MLflow model (:mod:`napari_sam.mlflow_model`) all call :class:`Scorer`.

Coordinates here are Azure's: ``[x, y]`` pixels and boxes ``[x1, y1, x2, y2]``; they are
turned into napari's ``(row, col)`` for the engine and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .annotate import parse_literal
from .api import EmbeddingCache, Prompt, embed_cached, resolve_intensity

COLUMNS = ("image", "input_points", "input_boxes", "input_labels", "multimask_output")
# Azure's documented default: three masks per prediction unless told otherwise.
DEFAULT_MULTIMASK = True
# input_labels values: 1 object, 0 background; -1 and -10 are transformers' padding
# labels (points that are not points), which clients pad ragged prompt sets with.
PADDING_LABELS = (-1, -10)
_ABSENT = ("", "null", "none", "nan")
# A prompt string longer than this is not a prompt (and would make literal_eval slow).
_MAX_PROMPT_CHARS = 1_000_000
# memory for one decoder call's full-size logits (the scorer splits predictions to stay under it)
_DECODE_BYTES = 256 * 2**20


class ScoringError(ValueError):
    """Bad input to the scorer. ``status`` is the HTTP status the server answers with:
    413 for a request or image over the limits, 422 for anything malformed."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's and the batch runner's guard rails)."""

    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int = 50_000_000
    max_predictions_per_row: int = 256
    max_points_per_set: int = 64
    # predictions x masks x image pixels: what one request may make the server draw
    max_mask_pixels: int = 2_000_000_000
    max_rows: int = 64
    allow_urls: bool = False
    url_timeout_s: float = 20.0
    url_max_bytes: int = 32 * 2**20


@dataclass
class Row:
    """One parsed request row: the image (base64/URL text) and its predictions' prompts."""

    image: str
    prompts: list[Prompt] = field(default_factory=list)
    multimask: bool = DEFAULT_MULTIMASK


# --- parsing ------------------------------------------------------------------------------

def _absent(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True  # pandas' missing value
    return isinstance(value, str) and value.strip().lower() in _ABSENT


def _literal(value, column: str):
    """A JSON list, or a string holding one (JSON, else a Python literal; never eval)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, str):
        return value
    if len(value) > _MAX_PROMPT_CHARS:
        raise ScoringError(f"{column} is {len(value)} characters long; at most {_MAX_PROMPT_CHARS}")
    try:
        return parse_literal(value)
    except ValueError as exc:
        reason = f" ({exc})" if "digits" in str(exc) else ""
        raise ScoringError(f"{column} is not a JSON list of numbers{reason}: {_short(value)}") from None


def _short(value, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _number(v, column: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ScoringError(f"{column} holds {_short(v)} where a finite number belongs")
    return float(v)


def _point_sets(value, limits: Limits) -> list[list[tuple[float, float]]] | None:
    if _absent(value):
        return None
    sets = _literal(value, "input_points")
    example = 'e.g. "[[[650, 900], [700, 950]]]" (a list of prompt sets, each a list of [x, y])'
    if not isinstance(sets, (list, tuple)) or not sets:
        raise ScoringError(f"input_points must be a non-empty list of prompt sets, {example}")
    out = []
    for k, s in enumerate(sets):
        if not isinstance(s, (list, tuple)) or not s or not all(isinstance(p, (list, tuple)) for p in s):
            raise ScoringError(f"input_points[{k}] must be a non-empty list of [x, y] points, {example}")
        if len(s) > limits.max_points_per_set:
            raise ScoringError(f"input_points[{k}] has {len(s)} points; at most {limits.max_points_per_set} per "
                               "prompt set", 413)
        pts = []
        for p in s:
            if len(p) != 2:
                raise ScoringError(f"input_points[{k}] holds {_short(p)}; each point is [x, y]")
            pts.append((_number(p[0], "input_points"), _number(p[1], "input_points")))
        out.append(pts)
    return out


def _label_sets(value, point_sets) -> list[list[int]] | None:
    if _absent(value):
        return None
    if point_sets is None:
        raise ScoringError("input_labels given without input_points")
    sets = _literal(value, "input_labels")
    shape = [len(s) for s in point_sets]
    if (not isinstance(sets, (list, tuple)) or len(sets) != len(point_sets)
            or any(not isinstance(s, (list, tuple)) or len(s) != n for s, n in zip(sets, shape))):
        raise ScoringError(
            f"input_labels must nest like input_points: {len(shape)} set(s) of {shape} label(s); got {_short(sets)}"
        )
    out = []
    for s in sets:
        labels = []
        for v in s:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (1, 0, *PADDING_LABELS):
                raise ScoringError(f"input_labels holds {_short(v)}; use 1 (object), 0 (background), "
                                   "or -1/-10 for padding points")
            labels.append(int(v))
        out.append(labels)
    return out


def _boxes(value) -> list[tuple[float, ...]] | None:
    if _absent(value):
        return None
    boxes = _literal(value, "input_boxes")
    if isinstance(boxes, (list, tuple)) and len(boxes) == 4 and not any(isinstance(b, (list, tuple)) for b in boxes):
        boxes = [boxes]  # one box given flat: unambiguous
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise ScoringError('input_boxes must be a non-empty list of [x1, y1, x2, y2], e.g. "[[650, 900, 1000, 1250]]"')
    out = []
    for k, b in enumerate(boxes):
        if not isinstance(b, (list, tuple)) or len(b) != 4:
            raise ScoringError(f"input_boxes[{k}] is {_short(b)}; each box is [x1, y1, x2, y2]")
        x1, y1, x2, y2 = (_number(v, "input_boxes") for v in b)
        if x1 > x2 or y1 > y2:
            raise ScoringError(f"input_boxes[{k}] = {_short(b)} has x1 > x2 or y1 > y2")
        out.append((x1, y1, x2, y2))
    return out


def _multimask(value) -> bool:
    if _absent(value):
        return DEFAULT_MULTIMASK
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ScoringError(f"multimask_output must be true or false; got {_short(value)}")


def parse_row(values: Mapping[str, Any], limits: Limits = Limits()) -> Row:
    """Parse one row (column name → value) into prompts in (row, col) pixels.

    Each prompt set of ``input_points`` is one prediction, as is each box; given both,
    set *k* goes with box *k* (a single set or box is paired with every one of the other).
    Image bounds are checked later, against the decoded image.
    """
    image = values.get("image")
    if not isinstance(image, str) or _absent(image):
        raise ScoringError("image must be a base64-encoded PNG/JPEG/TIFF (or an http(s) URL)")
    points = _point_sets(values.get("input_points"), limits)
    labels = _label_sets(values.get("input_labels"), points)
    boxes = _boxes(values.get("input_boxes"))
    if points is None and boxes is None:
        raise ScoringError("the row has no prompt: give input_points, input_boxes or both")
    n_points, n_boxes = len(points or []), len(boxes or [])
    if points and boxes and n_points != n_boxes and 1 not in (n_points, n_boxes):
        raise ScoringError(f"{n_points} prompt sets and {n_boxes} boxes: give as many of each "
                           "(set k goes with box k), or one of either")
    n = max(n_points, n_boxes)
    if n > limits.max_predictions_per_row:
        raise ScoringError(f"the row asks for {n} predictions; at most {limits.max_predictions_per_row}", 413)
    prompts = []
    for k in range(n):
        pts = lab = box = None
        if points:
            i = k if n_points > 1 else 0
            keep = range(len(points[i])) if labels is None else \
                [j for j, v in enumerate(labels[i]) if v not in PADDING_LABELS]
            if keep:
                pts = np.array([points[i][j][::-1] for j in keep], float)  # (x, y) -> (row, col)
                lab = np.array([1 if labels is None else labels[i][j] for j in keep], np.int64)
            elif not boxes:
                raise ScoringError(f"input_points[{i}] holds only padding points (labels -1/-10)")
        if boxes:
            x1, y1, x2, y2 = boxes[k if n_boxes > 1 else 0]
            box = np.array([y1, x1, y2, x2], float)
        prompts.append(Prompt(points=pts, point_labels=lab, box=box))
    return Row(image=image, prompts=prompts, multimask=_multimask(values.get("multimask_output")))


def parse_request(payload, limits: Limits = Limits()) -> list[Row]:
    """Parse a whole request: ``{"input_data": {"columns", "index", "data"}, "params": {}}``.

    ``"params"`` may be missing; MLflow's ``"dataframe_split"`` is taken for ``"input_data"``.
    """
    if not isinstance(payload, Mapping):
        raise ScoringError('the request must be a JSON object with "input_data"')
    frame = payload.get("input_data", payload.get("dataframe_split"))
    if not isinstance(frame, Mapping):
        raise ScoringError('the request has no "input_data" object (pandas split: columns, index, data)')
    columns, data = frame.get("columns"), frame.get("data")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ScoringError('"input_data.columns" must be a list of column names')
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown or len(set(columns)) != len(columns):
        raise ScoringError(f"unknown or repeated columns {unknown or columns}; the columns are {list(COLUMNS)}")
    if not isinstance(data, list) or not data:
        raise ScoringError('"input_data.data" must be a non-empty list of rows')
    if len(data) > limits.max_rows:
        raise ScoringError(f"the request has {len(data)} rows; at most {limits.max_rows} per request", 413)
    index = frame.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(data)):
        raise ScoringError('"input_data.index" must list one entry per row of "data"')
    rows = []
    for i, values in enumerate(data):
        if not isinstance(values, list) or len(values) != len(columns):
            raise ScoringError(f"row {i} must be a list of {len(columns)} values, one per column")
        try:
            rows.append(parse_row(dict(zip(columns, values)), limits))
        except ScoringError as exc:
            raise ScoringError(f"row {i}: {exc}", exc.status) from None
    return rows


# --- images -------------------------------------------------------------------------------

def _fetch(url: str, limits: Limits) -> bytes:
    class _HttpOnly(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not newurl.lower().startswith(("http://", "https://")):
                raise ScoringError(f"image URL redirects to {_short(newurl)}; only http(s) is fetched")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(_HttpOnly)
    try:
        with opener.open(url, timeout=limits.url_timeout_s) as response:
            data = response.read(limits.url_max_bytes + 1)
    except ScoringError:
        raise
    except Exception as exc:  # network failures of every kind are the client's URL's problem
        raise ScoringError(f"image URL could not be fetched: {exc}") from None
    if len(data) > limits.url_max_bytes:
        raise ScoringError(f"image at the URL is larger than {limits.url_max_bytes} bytes", 413)
    return data


def image_bytes(value: str, limits: Limits = Limits()) -> bytes:
    """The encoded image a row's ``image`` names: base64 text, a data URL, or (when the
    limits allow URLs) an http/https URL."""
    text = value.strip()
    if "://" in text[:16]:
        if not text.lower().startswith(("http://", "https://")):
            raise ScoringError(f"image URL {_short(text)}: only http and https are fetched")
        if not limits.allow_urls:
            raise ScoringError("image is a URL, and this scorer does not fetch URLs "
                               "(start the server with --allow-urls, or send the image as base64)")
        return _fetch(text, limits)
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ScoringError("image is neither base64 nor an http(s) URL") from None


def decode_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """Decode PNG/JPEG/TIFF/BMP/WebP bytes into ``(H, W)`` or ``(H, W, 3)`` pixels.

    Orientation follows EXIF (as transformers' ``load_image`` does), alpha is dropped,
    palettes become RGB; 16-bit and float grayscale keep their values. The pixel limit is
    checked before the pixels are decoded.
    """
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _decode_tiff(data, limits)
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the pixel limit below is this scorer's own
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            _check_pixels(im.width * im.height, f"{im.width} x {im.height}", limits)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("1", "L", "I;16", "I;16B", "I;16L", "I", "F"):
                pixels = np.asarray(im)
            elif im.mode == "LA":
                pixels = np.asarray(im.getchannel("L"))
            else:
                pixels = np.asarray(im.convert("RGB"))
    except ScoringError:
        raise
    except Image.DecompressionBombError:
        raise ScoringError(f"image is larger than {limits.max_image_pixels} pixels", 413) from None
    except UnidentifiedImageError:
        raise ScoringError("image is not a PNG, JPEG, TIFF, BMP or WebP file") from None
    except Exception as exc:  # Pillow raises many types for damaged or unknown data
        raise ScoringError(f"image could not be decoded as PNG/JPEG/TIFF: {exc}") from None
    return pixels.astype(np.uint8) if pixels.dtype == bool else pixels


def _check_pixels(n: int, size: str, limits: Limits) -> None:
    if n > limits.max_image_pixels:
        raise ScoringError(f"image is {size} pixels; at most {limits.max_image_pixels} pixels", 413)


def _decode_tiff(data: bytes, limits: Limits) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            axes, shape = series.axes, tuple(series.shape)
            extra = {a: n for a, n in zip(axes, shape) if a not in "YXS" and n > 1}
            if extra or "Y" not in axes or "X" not in axes:
                raise ScoringError(f"TIFF holds {shape} ({axes}); the scorer takes one 2D image")
            h, w = shape[axes.index("Y")], shape[axes.index("X")]
            samples = shape[axes.index("S")] if "S" in axes else 1
            if samples > 4:
                raise ScoringError(f"TIFF has {samples} samples per pixel; the scorer takes gray, RGB or RGBA")
            _check_pixels(h * w, f"{w} x {h}", limits)
            pixels = series.asarray()
    except ScoringError:
        raise
    except Exception as exc:
        raise ScoringError(f"image could not be decoded as TIFF: {exc}") from None
    kept = "".join(a for a in axes if a in "YXS")
    pixels = pixels.reshape([n for a, n in zip(axes, shape) if a in "YXS"])
    if "S" in kept:
        pixels = np.moveaxis(pixels, kept.index("S"), -1)[..., :3]  # planar or interleaved; no alpha
    return pixels.astype(np.uint8) if pixels.dtype == bool else pixels


def encode_mask(mask: np.ndarray) -> str:
    """A boolean mask as base64 of an 8-bit PNG, 0 background and 255 object."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """The inverse of :func:`encode_mask`: a response's ``encoded_binary_mask`` as a bool array."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))) > 127


def _check_bounds(prompts: Sequence[Prompt], shape) -> None:
    h, w = shape
    for k, p in enumerate(prompts):
        if p.points is not None:
            bad = (p.points[:, 0] < -0.5) | (p.points[:, 0] > h - 0.5) | \
                (p.points[:, 1] < -0.5) | (p.points[:, 1] > w - 0.5)
            if bad.any():
                xy = p.points[bad][:, ::-1].tolist()
                raise ScoringError(f"prediction {k}: points {xy} (x, y) lie outside the {w} x {h} image")
        if p.box is not None:
            r0, c0, r1, c1 = (float(v) for v in p.box)
            if r1 < -0.5 or c1 < -0.5 or r0 > h - 0.5 or c0 > w - 0.5:
                raise ScoringError(f"prediction {k}: box {[c0, r0, c1, r1]} (x1, y1, x2, y2) lies outside "
                                   f"the {w} x {h} image")


# --- scoring ------------------------------------------------------------------------------

class Scorer:
    """Answers Azure-schema requests with one loaded model.

    Parameters
    ----------
    engine : SamEngine
        From :func:`napari_sam.load_model`.
    cache : EmbeddingCache, optional
        Where embeddings are kept; default: 512 MiB in memory, nothing on disk (a server
        does not keep its clients' images unless told to).
    limits : Limits, optional

    Thread-safe: concurrent calls decode images and encode PNGs in parallel and take turns
    on the model.
    """

    def __init__(self, engine, cache: EmbeddingCache | None = None, limits: Limits = Limits()):
        self.engine = engine
        self.cache = cache if cache is not None else EmbeddingCache(False, memory_bytes=512 * 2**20)
        self.limits = limits
        self._model_lock = threading.Lock()

    def score(self, payload) -> list[dict]:
        """A parsed JSON request → the JSON response (a list, one entry per row)."""
        rows = parse_request(payload, self.limits)
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(self.score_row(row))
            except ScoringError as exc:
                raise ScoringError(f"row {i}: {exc}", exc.status) from None
        return out

    def score_values(self, values: Mapping[str, Any]) -> dict:
        """One row given as column → value (a CSV row, a DataFrame row)."""
        return self.score_row(parse_row(values, self.limits))

    def score_row(self, row: Row) -> dict:
        """One parsed row → ``{"response": {"predictions": [...]}}``."""
        image = decode_image(image_bytes(row.image, self.limits), self.limits)
        h, w = image.shape[:2]
        _check_bounds(row.prompts, (h, w))
        masks = 3 if row.multimask else 1
        drawn = len(row.prompts) * masks * h * w
        if drawn > self.limits.max_mask_pixels:
            raise ScoringError(f"{len(row.prompts)} predictions x {masks} masks of {w} x {h} pixels is {drawn} mask "
                               f"pixels; at most {self.limits.max_mask_pixels} per row (fewer prompts or a smaller "
                               "image)", 413)
        # decoded a few predictions at a time: full-size float logits are 4 bytes a pixel
        step = max(1, _DECODE_BYTES // (masks * h * w * 4))
        out, embedding = [], None
        for start in range(0, len(row.prompts), step):
            with self._model_lock:
                try:  # an image or prompt the preprocessing or the engine refuses is the client's
                    if embedding is None:
                        embedding = embed_cached(self.engine, image, mapping=resolve_intensity(image),
                                                 cache=self.cache)
                    predictions = self.engine.predict_batch(embedding, row.prompts[start:start + step],
                                                            multimask=row.multimask)
                except (ValueError, TypeError) as exc:
                    raise ScoringError(str(exc)) from None
            out += [{"masks_per_prediction": [
                {"encoded_binary_mask": encode_mask(mask), "iou_score": float(score)}
                for mask, score in zip(p.masks, p.scores)
            ]} for p in predictions]
        return {"response": {"predictions": out}}
