"""``napari-sam`` command line: a thin layer over :mod:`napari_sam.api`.

User errors (bad arguments, unreadable files, missing weights) print one
``napari-sam: error: ...`` line (plus hints where they help) and exit with code 2;
only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._version import __version__

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by the user's input; reported in one line, exit code 2."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} must be comma-separated numbers") from None
    if len(values) not in n:
        raise argparse.ArgumentTypeError(f"{what} {text!r} needs {' or '.join(map(str, n))} numbers")
    return values


def _point(text: str) -> list[float]:
    values = _floats(text, (2, 3), "--point")
    if len(values) == 3 and values[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point {text!r}: LABEL must be 1 (positive) or 0 (negative)")
    return values


def _box(text: str) -> list[float]:
    return _floats(text, (4,), "--box")


def _window(text: str) -> list[float]:
    return _floats(text, (2,), "--window")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face id, save_pretrained folder or Meta .pth "
                   "(default: $NAPARI_SAM_MODEL, else facebook/sam-vit-large)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA with bf16, else fp32), fp32, bf16, fp16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-sam",
        description="Segment Anything labeling for 2D images and 3D stacks.",
    )
    parser.add_argument("--version", action="version", version=f"napari-sam-labeler {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment a 2D image from point/box prompts into a labels TIFF")
    seg.add_argument("image", help="2D image: TIFF, PNG, JPEG or .npy")
    seg.add_argument("--point", action="append", type=_point, default=[], metavar="ROW,COL[,LABEL]",
                     help="a point prompt in pixels; LABEL 1 = object (default), 0 = background; repeatable")
    seg.add_argument("--box", action="append", type=_box, default=[], metavar="R0,C0,R1,C1",
                     help="a box (row_min,col_min,row_max,col_max); each box is one object and points join "
                     "the box that contains them; repeatable")
    seg.add_argument("--multimask", action="store_true",
                     help="decode 3 candidates per object and keep the one with the best predicted IoU")
    intensity = seg.add_mutually_exclusive_group()
    intensity.add_argument("--window", type=_window, metavar="CENTER,WIDTH", help="intensity window, e.g. 40,400")
    intensity.add_argument("--preset", help="CT window preset: abdomen, lung, brain, bone, mediastinum")
    intensity.add_argument("--percentiles", type=_window, metavar="LOW,HIGH",
                           help="percentile clip for non-uint8 data (default 0.5,99.5)")
    seg.add_argument("--channel", type=int, help="channel to use from a multichannel image")
    _add_model_args(seg)
    seg.add_argument("-o", "--output", required=True, help="labels TIFF to write")
    seg.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    info = sub.add_parser("info", help="print versions, device and where the model resolves to")
    info.add_argument("--model", help="model to resolve (default: $NAPARI_SAM_MODEL, else facebook/sam-vit-large)")

    demo = sub.add_parser("demo", help="start napari with the SAM Labeler and a sample image")
    demo.add_argument("--model", help="model for the session (default as for `info`)")
    demo.add_argument("--sample", default="cell", choices=["cell", "ct_phantom"], help="sample to open")
    demo.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the window and quit (for docs/tests)")
    return parser


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # logging tweaks are cosmetic
        pass


def _load_engine(args):
    from .engine import load_model

    _quiet_transformers()
    print(f"loading model {args.model or '(default)'} ...", file=sys.stderr)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def cmd_segment(args) -> int:
    from . import api

    if not args.point and not args.box:
        raise UserError("give at least one --point or --box")
    image = api.read_image(args.image)
    if image.ndim == 3 and image.shape[-1] > 16 or image.ndim > 3:
        raise UserError(
            f"{args.image} is a stack of shape {image.shape}; `segment` takes one 2D image "
            "(H, W) or (H, W, C)",
        )
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"{args.output} exists; pass --overwrite to replace it")
    points = [p[:2] for p in args.point] or None
    labels = [int(p[2]) if len(p) == 3 else 1 for p in args.point] or None
    intensity = {"window": args.window, "preset": args.preset, "channel": args.channel,
                 "percentiles": tuple(args.percentiles) if args.percentiles else None}
    engine = _load_engine(args)
    print(f"{engine}; embedding {args.image} {image.shape} ...", file=sys.stderr)
    label_image, objects = api.segment_2d(
        engine, image, points=points, point_labels=labels, boxes=args.box or None,
        multimask=args.multimask, **intensity,
    )
    api.write_labels_tiff(args.output, label_image, overwrite=args.overwrite)
    for obj in objects:
        print(f"label {obj.label}: {int(obj.mask.sum())} pixels, predicted IoU {obj.score:.3f}")
    print(f"wrote {args.output} {label_image.shape} {label_image.dtype}")
    return 0


def cmd_info(args) -> int:
    import platform

    from . import api

    print(f"napari-sam-labeler {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    try:
        import torch

        from .engine import resolve_device, resolve_dtype

        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
        print(f"torch {torch.__version__} (CUDA: {cuda}, MPS: {'yes' if mps else 'no'})")
        dev = resolve_device("auto")
        print(f"device (auto): {dev}, dtype (auto): {str(resolve_dtype('auto', dev)).replace('torch.', '')}")
    except ImportError as exc:
        print(f"torch: not importable ({exc})")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError as exc:
        print(f"transformers: not importable ({exc})")
    status = api.model_status(args.model)
    print(f"model: {status.requested} (from {status.origin})")
    state = "available" if status.available else "NOT AVAILABLE"
    lines = status.detail.splitlines()
    print(f"  {state}: {lines[0]}")
    for line in lines[1:]:
        print(f"  {line}")
    return 0


def cmd_demo(args) -> int:
    from . import api

    status = api.model_status(args.model)
    if not status.available:
        print(f"napari-sam: model {status.requested} is not available here: {status.detail}", file=sys.stderr)
        print("napari opens anyway; load a model from the widget once the weights are present.",
              file=sys.stderr)
    from ._qt.demo import run_demo

    return run_demo(sample=args.sample, model=args.model, status=status, screenshot=args.screenshot)


COMMANDS = {"segment": cmd_segment, "info": cmd_info, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    from .engine import ModelNotFoundError

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on usage errors
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except ModelNotFoundError as exc:
        first, _, rest = str(exc).partition("\n")
        print(f"napari-sam: error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return EXIT_USAGE
    except UserError as exc:
        print(f"napari-sam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        # Our validation raises these with messages that name the parameter.
        print(f"napari-sam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("napari-sam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
