"""The HTTP face of :mod:`napari_sam.scoring`: FastAPI + uvicorn (the ``serve`` extra).

``POST /score`` takes the Azure ML SAM request and answers its response; ``GET /health``
says which model is loaded; ``/openapi.json`` and ``/docs`` describe both. One model per
worker process; concurrent requests decode their images in parallel and take turns on the
model. Bad input is answered 4xx with a message naming the problem, never 5xx:
413 for a request or image over the limits, 422 for anything malformed.

Scale-out is more replicas of this stateless process (``--workers N`` on one machine,
more containers behind a load balancer elsewhere); docs/serving.md has the numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ._version import __version__
from .scoring import COLUMNS, Limits, Scorer, ScoringError

CONFIG_ENV = "NAPARI_SAM_SERVE_CONFIG"


class InputData(BaseModel):
    """pandas' "split" orientation of the request rows."""

    columns: list[str] = Field(examples=[list(COLUMNS)])
    index: list[Any] | None = None
    data: list[list[Any]] = Field(
        description="one list per row, in the order of `columns`: image (base64 PNG/JPEG/TIFF), "
        "input_points ('[[[x, y], ...], ...]'), input_boxes ('[[x1, y1, x2, y2], ...]'), "
        "input_labels ('[[1, 0, ...], ...]'), multimask_output (bool)")


class ScoreRequest(BaseModel):
    """Azure's ``input_data`` (or MLflow's ``dataframe_split``), and optional ``params``."""

    input_data: InputData | None = None
    dataframe_split: InputData | None = None
    params: dict[str, Any] | None = None


class MaskOut(BaseModel):
    encoded_binary_mask: str = Field(description="base64 of an 8-bit PNG of the image's size, 0 or 255")
    iou_score: float


class PredictionOut(BaseModel):
    masks_per_prediction: list[MaskOut]


class ResponseOut(BaseModel):
    predictions: list[PredictionOut]


class RowOut(BaseModel):
    response: ResponseOut


class Problem(BaseModel):
    detail: str = Field(description="what is wrong, naming the row and column")


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` with 413 before anything parses them
    (declared Content-Length or counted as it streams in)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope, receive, send, status: int, detail: str):
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body is larger than {self.max_bytes} bytes (the server's --max-request-mb)"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(scope, receive, send, 400, "Content-Length is not a number")
            if int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send, 413, too_big)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send, 413, too_big)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(scorer: Scorer | Callable[[], Scorer], limits: Limits | None = None) -> FastAPI:
    """The FastAPI app over ``scorer`` (or a function that makes one when the app starts,
    so that each worker process loads its own model)."""
    from contextlib import asynccontextmanager

    state: dict[str, Scorer] = {}
    if isinstance(scorer, Scorer):
        state["scorer"] = scorer
        limits = limits or scorer.limits
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app):
        if "scorer" not in state:
            state["scorer"] = scorer()
        yield

    app = FastAPI(
        title="napari-sam-labeler scoring",
        version=__version__,
        description="Segment Anything masks in the schema of Azure ML's facebook-sam-vit-large endpoint.",
        lifespan=lifespan,
    )
    refusals = {413: {"model": Problem, "description": "request or image over the limits"},
                422: {"model": Problem, "description": "malformed request"},
                400: {"model": Problem, "description": "malformed HTTP request"}}

    @app.post("/score", response_model=list[RowOut], responses=refusals)
    def score(request: ScoreRequest) -> list[dict]:
        """Masks for each row's prompts: one entry per row, one prediction per prompt set or box."""
        try:
            return state["scorer"].score(request.model_dump(exclude_none=True))
        except ScoringError as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None

    @app.exception_handler(RequestValidationError)
    async def one_line(request, exc: RequestValidationError):
        # FastAPI's default echoes the whole input back (megabytes of base64); say where
        # and what, in one line, as the scorer's own errors do
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "the request body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        detail = "; ".join(problems)
        if "json" not in (request.headers.get("content-type") or "").lower():
            detail += " (send the request as JSON with Content-Type: application/json)"
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/health", responses={400: {"model": Problem, "description": "malformed HTTP request"}})
    def health() -> dict:
        """Liveness and what is loaded."""
        engine = state["scorer"].engine
        return {"status": "ok", "model": engine.source.location, "model_key": engine.model_id,
                "device": str(engine.device),
                "backend": engine.backend, "dtype": engine.precision, "version": __version__}

    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    return app


def scorer_from_config(config: dict) -> Scorer:
    """Load the model and cache a ``serve`` configuration names (one per worker process)."""
    from .api import EmbeddingCache, load_model

    limits = Limits(**config.get("limits", {}))
    engine = load_model(config.get("model"), device=config.get("device", "auto"), dtype=config.get("dtype", "auto"),
                        backend=config.get("backend", "auto"), compile=config.get("compile", False))
    cache_dir = config.get("cache")
    cache = EmbeddingCache(cache_dir, memory_bytes=512 * 2**20) if cache_dir else None
    return Scorer(engine, cache, limits)


def app_from_env() -> FastAPI:
    """uvicorn's app factory for worker processes: the configuration comes in
    ``$NAPARI_SAM_SERVE_CONFIG`` (JSON), the model loads as each worker starts."""
    config = json.loads(os.environ.get(CONFIG_ENV) or "{}")
    return create_app(lambda: scorer_from_config(config), Limits(**config.get("limits", {})))


def run(config: dict, host: str = "127.0.0.1", port: int = 5001, workers: int = 1) -> None:
    """Serve until interrupted (what ``napari-sam serve`` runs)."""
    import uvicorn

    os.environ[CONFIG_ENV] = json.dumps(config)
    uvicorn.run("napari_sam.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="info")
