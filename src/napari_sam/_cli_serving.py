"""The ``score``, ``score-batch``, ``serve`` and ``export-mlflow`` subcommands (part of the
command line; :mod:`napari_sam.cli` registers them). Thin over :mod:`napari_sam.scoring`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is a whole number from 1 to 65535")
    return port

def _limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-urls", action="store_true",
                   help="fetch images given as http(s) URLs (off by default: the scorer then reads no network)")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, help="largest image accepted (pixels)")


def add_parsers(sub, add_model_args, add_cache_args) -> None:
    score = sub.add_parser("score", help="answer an Azure ML SAM request (JSON file, or - for stdin)")
    score.add_argument("request", help="request JSON: {\"input_data\": {\"columns\", \"index\", \"data\"}}")
    score.add_argument("-o", "--output", help="write the response here instead of printing it")
    _limit_args(score)
    add_model_args(score)
    add_cache_args(score)

    batch = sub.add_parser("score-batch", help="score CSV rows in the Azure request's columns into JSON lines")
    batch.add_argument("input", help="a CSV file, or a folder of them")
    batch.add_argument("-o", "--output", required=True, help="JSON-lines file; a rerun resumes it")
    batch.add_argument("--retry-failed", action="store_true", help="score rows that failed in an earlier run again")
    _limit_args(batch)
    add_model_args(batch)
    add_cache_args(batch)

    serve = sub.add_parser("serve", help="HTTP scoring server in the Azure ML SAM schema (needs the serve extra)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    serve.add_argument("--port", type=_port, default=5001, help="TCP port, 1-65535 (default 5001)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model")
    serve.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body (MiB)")
    serve.add_argument("--cache", metavar="DIR",
                       help="also keep embeddings on disk here (default: in memory only)")
    _limit_args(serve)
    add_model_args(serve)

    export = sub.add_parser("export-mlflow", help="write an MLflow pyfunc model (needs the mlflow extra)")
    export.add_argument("-o", "--output", required=True, help="model directory to create")
    export.add_argument("--model", help="model to package (default: $NAPARI_SAM_MODEL, else facebook/sam-vit-large)")
    export.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def _limits(args, **extra):
    from .scoring import Limits

    from PIL import Image

    pillow_cap = 2 * (Image.MAX_IMAGE_PIXELS or 0) or None  # Pillow refuses larger images itself
    if args.max_image_pixels < 1 or (pillow_cap and args.max_image_pixels > pillow_cap):
        raise ValueError(f"--max-image-pixels must be between 1 and {pillow_cap} (Pillow's own limit), "
                         f"got {args.max_image_pixels}")
    return Limits(allow_urls=args.allow_urls, max_image_pixels=args.max_image_pixels, **extra)


def _scorer(args, load_engine, open_cache):
    from .api import EmbeddingCache
    from .scoring import Scorer

    limits = _limits(args)
    cache = open_cache(args)
    return Scorer(load_engine(args), cache if cache is not None else EmbeddingCache(False), limits)


def _need(extra: str, module: str) -> None:
    from importlib.util import find_spec

    if find_spec(module) is None:
        raise ModuleNotFoundError(f"this command needs the {extra} extra: pip install \"napari-sam-labeler[{extra}]\"")


def cmd_score(args, load_engine, open_cache) -> int:
    from .scoring import ScoringError

    try:
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the request {args.request}: {exc}") from None
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{args.request} is not JSON: {exc}") from None
    from .scoring import parse_request

    parse_request(payload)  # a malformed request fails before the model loads
    try:
        response = _scorer(args, load_engine, open_cache).score(payload)
    except ScoringError as exc:
        raise ValueError(str(exc)) from None
    text = json.dumps(response)
    if args.output:
        from ._fileio import atomic_write

        with atomic_write(Path(args.output)) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    else:
        print(text)
    return 0


def cmd_score_batch(args, load_engine, open_cache) -> int:
    from .score_batch import input_files, score_batch

    input_files(args.input)  # a missing input or a folder as output fails before the model loads
    if Path(args.output).is_dir():
        raise ValueError(f"{args.output} is a folder; give the JSON-lines file to write")
    summary = score_batch(_scorer(args, load_engine, open_cache), args.input, args.output,
                          retry_failed=args.retry_failed)
    line = f"{summary.scored} rows scored, {summary.failed} failed, {summary.skipped} already in {args.output}"
    if summary.failed_before:
        line += f" ({summary.failed_before} of them failed then: --retry-failed scores them again)"
    print(line)
    return 1 if summary.failed or summary.failed_before else 0


def cmd_serve(args, load_engine, open_cache) -> int:
    _need("serve", "fastapi")
    _need("serve", "uvicorn")
    from .api import model_status

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.max_request_mb <= 0:
        raise ValueError(f"--max-request-mb must be positive, got {args.max_request_mb}")
    status = model_status(args.model)
    if not status.available:
        raise FileNotFoundError(f"model {status.requested}: {status.detail}")
    limits = _limits(args, max_request_bytes=int(args.max_request_mb * 2**20))
    config = {"model": args.model, "device": args.device, "dtype": args.dtype, "backend": args.backend,
              "compile": getattr(args, "compile", False), "cache": args.cache,
              "limits": {"allow_urls": limits.allow_urls, "max_image_pixels": limits.max_image_pixels,
                         "max_request_bytes": limits.max_request_bytes}}
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"napari-sam: serving on {args.host}: anyone who reaches port {args.port} can use the model "
              "(there is no authentication; put a proxy with TLS and auth in front)", file=sys.stderr)
    from .serve import run

    run(config, host=args.host, port=args.port, workers=args.workers)
    return 0


def cmd_export_mlflow(args, load_engine, open_cache) -> int:
    _need("mlflow", "mlflow")
    from .mlflow_model import export

    out = export(args.output, args.model, overwrite=args.overwrite)
    print(f"wrote the MLflow model {out} (serve it with: mlflow models serve -m {out} --env-manager local)")
    return 0


COMMANDS = {"score": cmd_score, "score-batch": cmd_score_batch, "serve": cmd_serve,
            "export-mlflow": cmd_export_mlflow}
