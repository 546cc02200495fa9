"""``napari-sam`` command line: a thin layer over :mod:`napari_sam.api`.

User errors (bad arguments, unreadable files, missing weights) print one
``napari-sam: error: ...`` line (plus hints where they help) and exit with code 2;
only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from collections.abc import Sequence

from . import _cli_batch, _cli_everything, _cli_finetune, _cli_serving
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


def _batch_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'auto' or a whole number >= 1")
    return value


def _backend_list(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("torch", "openvino", "onnxruntime")]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: give backends from torch, openvino, onnxruntime, "
                                         "separated by commas")
    return names


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face id, save_pretrained folder or Meta .pth "
                   "(default: $NAPARI_SAM_MODEL, else facebook/sam-vit-large)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto",
                   help="encoder precision: auto (bf16 on CUDA and on CPUs with bf16 instructions, else fp32), "
                   "fp32, bf16, fp16 (CUDA/MPS), int8, int8-weights (OpenVINO, ONNX Runtime); docs/performance.md")
    p.add_argument("--backend", default="auto", type=str.lower, choices=["auto", "torch", "openvino", "onnxruntime"],
                   help="where the image encoder runs: auto (OpenVINO on CPU when installed, else torch)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder's blocks (torch backend; the first image pays the compilation)")


def _add_intensity_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--window", type=_window, metavar="CENTER,WIDTH", help="intensity window, e.g. 40,400")
    group.add_argument("--preset", help="CT window preset: abdomen, lung, brain, bone, mediastinum")
    group.add_argument("--percentiles", type=_window, metavar="LOW,HIGH",
                       help="percentile clip for non-uint8 data (default 0.5,99.5)")
    p.add_argument("--channel", type=int, help="channel to use from a multichannel image")


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR", help="embedding cache folder "
                   "(default: $NAPARI_SAM_CACHE or the user cache folder)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")


def _open_cache(args):
    from .api import EmbeddingCache

    if getattr(args, "no_cache", False):
        return None
    return EmbeddingCache(args.cache)


def _slices(text: str | None, n: int, option: str = "--slices"):
    if text is None:
        return None
    try:
        parts = [int(p) if p else None for p in text.split(":")]
    except ValueError:
        raise UserError(f"{option} {text!r} must look like START:STOP") from None
    if len(parts) != 2:
        raise UserError(f"{option} {text!r} must look like START:STOP")
    chosen = range(n)[slice(*parts)]
    if len(chosen) == 0:
        raise UserError(f"{option} {text!r} selects no slice of the stack's {n} (0 to {n - 1})")
    return chosen


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
    _add_intensity_args(seg)
    _add_model_args(seg)
    seg.add_argument("--slice", type=int, metavar="Z", help="for a 3D stack: the slice the prompts are on")
    seg.add_argument("--axis", type=int, default=0, help="stack axis (default 0: Z or T)")
    seg.add_argument("--propagate", action="store_true",
                     help="3D: propagate the objects from --slice through the stack")
    seg.add_argument("--direction", default="both", choices=["both", "up", "down"],
                     help="propagation direction ('up' = increasing slice index)")
    seg.add_argument("--min-iou", type=float, default=0.5, help="stop an object below this predicted IoU")
    _add_cache_args(seg)
    seg.add_argument("-o", "--output", required=True, help="labels TIFF to write")
    seg.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    emb = sub.add_parser("embed", help="embed the slices of a stack into the cache (resumable)")
    emb.add_argument("volume", help="3D stack: TIFF (memory-mapped when possible), .npy or zarr folder")
    emb.add_argument("--axis", type=int, default=0, help="stack axis (default 0)")
    emb.add_argument("--slices", metavar="START:STOP", help="only these slices (Python range, e.g. 10:20)")
    emb.add_argument("--batch-size", type=_batch_size, default="auto",
                     help="slices per encoder call: auto (1 on CPU; on CUDA what fits in free memory) or N")
    _add_intensity_args(emb)
    _cli_batch.add_scheduler_arg(emb)
    _add_model_args(emb)
    _add_cache_args(emb)
    _cli_batch.add_parser(sub, _add_model_args, _add_cache_args, _add_intensity_args, _point, _box)
    _cli_everything.add_parser(sub, _add_model_args, _add_cache_args, _add_intensity_args)
    _cli_finetune.add_parser(sub, _add_model_args, _add_cache_args, _add_intensity_args)

    bench = sub.add_parser("bench", help="measure encoder backends/precisions, click→mask and reopen on this "
                           "machine against plain SamModel fp32 (docs/performance.md)")
    bench.add_argument("--model", help="model to measure (default as for `info`)")
    bench.add_argument("--random", choices=["vit_b", "vit_l", "vit_h"],
                       help="measure randomly initialised weights of this size instead (nothing is downloaded)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    bench.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (the best is kept)")
    bench.add_argument("--slices", type=int, default=100, help="slices of the cached stack that is reopened")
    bench.add_argument("--preprocessing", choices=["sam", "medsam"],
                       help="input convention (default: from the model; medsam = MedSAM's stretched 1024² input)")
    bench.add_argument("--quick", action="store_true", help="skip full int8 (its calibration takes minutes)")
    bench.add_argument("--backends", type=_backend_list, metavar="NAME,...",
                       help="measure only these backends (torch, openvino, onnxruntime); the baseline always runs")
    bench.add_argument("-o", "--output", metavar="JSON", help="also write the record to this file")

    cache = sub.add_parser("cache", help="inspect or clear the embedding cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--cache", metavar="DIR", help="cache folder (default: $NAPARI_SAM_CACHE or the user cache)")

    info = sub.add_parser("info", help="print versions, device and where the model resolves to")
    info.add_argument("--model", help="model to resolve (default: $NAPARI_SAM_MODEL, else facebook/sam-vit-large)")
    for name in ("--device", "--dtype", "--backend"):
        info.add_argument(name, default="auto", help="the choice to resolve (default auto)")

    demo = sub.add_parser("demo", help="start napari with the SAM Labeler and a sample image")
    demo.add_argument("--model", help="model for the session (default as for `info`)")
    demo.add_argument("--sample", default="cell", choices=["cell", "ct_phantom", "ct_phantom_dicom"],
                      help="sample to open (the DICOM one carries series geometry for DICOM-SEG export)")
    demo.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the window and quit (for docs/tests)")
    _cli_serving.add_parsers(sub, _add_model_args, _add_cache_args)
    return parser


def _load_engine(args):
    from .api import load_model

    from ._modelstack import quiet_transformers

    quiet_transformers()
    print(f"loading model {args.model or os.environ.get('NAPARI_SAM_MODEL') or '(default)'} ...", file=sys.stderr)
    return load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                      compile=getattr(args, "compile", False), on_progress=lambda message: print(message, file=sys.stderr, flush=True))


def _intensity(args) -> dict:
    return {"window": args.window, "preset": args.preset, "channel": args.channel,
            "percentiles": tuple(args.percentiles) if args.percentiles else None}


def cmd_segment(args) -> int:
    from . import api

    if not args.point and not args.box:
        raise UserError("give at least one --point or --box")
    image = api.read_image(args.image)
    stack_like = image.ndim == 4 or (image.ndim == 3 and image.shape[-1] > 16)
    if stack_like and args.slice is None:
        raise UserError(
            f"{args.image} is a stack of shape {image.shape}; pass --slice Z for the slice the "
            "prompts are on (and --propagate to follow the objects through the stack)",
        )
    if not stack_like and image.ndim == 3 and args.slice is not None:
        stack_like = True  # a short stack whose last axis could pass for channels
    if not stack_like and (args.slice is not None or args.propagate):
        raise UserError(f"--slice/--propagate need a 3D stack; {args.image} is 2D {image.shape}")
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"{args.output} exists; pass --overwrite to replace it")
    points = [p[:2] for p in args.point] or None
    labels = [int(p[2]) if len(p) == 3 else 1 for p in args.point] or None
    # Every index, axis, range and channel is checked before the model loads (minutes for ViT-L).
    if stack_like:
        stack = api.Stack(image, axis=args.axis, **_intensity(args))
        if not 0 <= args.slice < len(stack):
            raise UserError(f"--slice {args.slice} is outside the stack: it has {len(stack)} slices "
                            f"(0 to {len(stack) - 1}) along axis {args.axis}")
    else:
        api.resolve_intensity(image, **_intensity(args))  # --channel/--window/--preset checked now
    engine = _load_engine(args)
    cache = _open_cache(args)
    if stack_like:
        print(f"{engine}; slice {args.slice} of {args.image} {image.shape} ...", file=sys.stderr)
        label_image, objects, summary = api.segment_volume(
            engine, stack, args.slice, points=points, point_labels=labels, boxes=args.box or None,
            multimask=args.multimask, propagate_objects=args.propagate, cache=cache,
            direction=args.direction, rule=api.StopRule(min_iou=args.min_iou),
        )
    else:
        print(f"{engine}; embedding {args.image} {image.shape} ...", file=sys.stderr)
        label_image, objects = api.segment_2d(
            engine, image, points=points, point_labels=labels, boxes=args.box or None,
            multimask=args.multimask, cache=cache, **_intensity(args),
        )
        summary = None
    api.write_labels_tiff(args.output, label_image, overwrite=args.overwrite)
    for obj in objects:
        line = f"label {obj.label}: {int(obj.mask.sum())} pixels, predicted IoU {obj.score:.3f}"
        if summary is not None:
            reached = sorted(summary.slices.get(obj.label, []) + [args.slice])
            stops = "; ".join(f"stopped at {z}: {why}" for z, why in summary.stops.get(obj.label, []))
            line += f"; slices {reached[0]}-{reached[-1]}" + (f" ({stops})" if stops else "")
        print(line)
    print(f"wrote {args.output} {label_image.shape} {label_image.dtype}")
    return 0


def cmd_embed(args) -> int:
    from . import api

    data = api.open_volume(args.volume)
    stack = api.Stack(data, axis=args.axis, **_intensity(args))
    indices = _slices(args.slices, len(stack))
    if args.scheduler:
        return _cli_batch.cmd_embed_on_cluster(args, stack, indices)
    cache = _open_cache(args)
    if cache is None:  # before minutes of model loading
        raise UserError("`embed` fills the cache; it cannot run with --no-cache")
    engine = _load_engine(args)
    from tqdm import tqdm

    total = len(stack) if indices is None else len(indices)
    bar = tqdm(total=total, unit="slice", desc="embedding", file=sys.stderr)
    cached = 0
    for step in stack.encode(engine, cache, indices, batch_size=args.batch_size):
        if step.fraction == 1.0:
            cached += step.cached
            bar.update(1)
            bar.set_postfix(slice=step.index, cached=cached)
    bar.close()
    print(f"{total} slices of {args.volume} in {cache.directory} ({cached} were already cached)")
    return 0


def cmd_cache(args) -> int:
    from .api import EmbeddingCache

    cache = EmbeddingCache(args.cache)
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed} cached embeddings from {cache.directory}")
        return 0
    stats = cache.stats()
    print(f"cache: {stats.directory}")
    print(f"entries: {stats.entries}, {stats.bytes / 2**20:.1f} MiB "
          f"(cap {cache.disk_bytes / 2**30:.0f} GiB)")
    for model, count in sorted(stats.models.items(), key=lambda kv: -kv[1]):
        print(f"  model {model}: {count}")
    return 0


def cmd_info(args) -> int:
    import platform

    from . import api

    print(f"napari-sam-labeler {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    try:
        import torch

        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
        print(f"torch {torch.__version__} (CUDA: {cuda}, MPS: {'yes' if mps else 'no'})")
        try:
            import openvino

            print(f"openvino {openvino.get_version()}")
        except ImportError:
            print("openvino: not installed (pip install 'napari-sam-labeler[openvino]' for a faster CPU encoder)")
        try:
            import onnxruntime

            print(f"onnxruntime {onnxruntime.__version__}")
        except ImportError:
            print("onnxruntime: not installed (optional: pip install 'napari-sam-labeler[onnxruntime]')")
        try:
            dev, backend, precision = api.resolve_runtime(args.device, args.dtype, args.backend)
            print(f"device: {dev}, backend: {backend}, dtype: {precision} (from --device {args.device}, "
                  f"--backend {args.backend}, --dtype {args.dtype})")
        except ValueError as exc:
            print(f"device/backend/dtype: {exc}")
    except ImportError as exc:
        print(f"torch: not importable ({exc})")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError as exc:
        print(f"transformers: not importable ({exc})")
    print(f"triton: {_triton_line()}")
    status = api.model_status(args.model)
    print(f"model: {status.requested} (from {status.origin})")
    state = "available" if status.available else "NOT AVAILABLE"
    lines = status.detail.splitlines()
    print(f"  {state}: {lines[0]}")
    for line in lines[1:]:
        print(f"  {line}")
    return 0


def _triton_line() -> str:
    """What `info` says about triton: installed or not, and the GL-process rule (issue 9)."""
    from importlib import metadata

    from ._modelstack import TRITON_ENV

    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "not installed (not needed)"
    choice = os.environ.get(TRITON_ENV, "auto")
    return (f"{version} installed, not needed; hidden from napari where OpenGL's LLVM is loaded "
            f"({TRITON_ENV}={choice})")


def cmd_demo(args) -> int:
    from . import api
    from ._qt.display import display_problem

    from ._modelstack import triton_setting

    triton_setting()  # a bad NAPARI_SAM_TRITON fails here, not at the first click
    # Qt aborts the process (no exception) when it cannot open a window: ask first.
    problem = display_problem()
    if problem:
        raise UserError(f"demo: {problem}")
    status = api.model_status(args.model)
    if not status.available:
        print(f"napari-sam: model {status.requested} is not available here: {status.detail}", file=sys.stderr)
        print("napari opens anyway; load a model from the widget once the weights are present.",
              file=sys.stderr)
    from ._qt.demo import run_demo

    return run_demo(sample=args.sample, model=args.model, status=status, screenshot=args.screenshot)


COMMANDS = {"segment": cmd_segment, "embed": cmd_embed, "cache": cmd_cache, "info": cmd_info, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    from .api import ExportError, ModelNotFoundError

    import warnings

    # warnings (a cache that cannot be written, irregular slices) as one line each
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"napari-sam: warning: {message}\n"
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on usage errors
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if hasattr(args, "backend") and args.command != "info":
            # A choice this machine cannot run is a usage error now, not a failure per image
            # (batch) or a server that does not start (serve).
            from .api import resolve_runtime

            device, backend, _ = resolve_runtime(args.device, args.dtype, args.backend)
            if getattr(args, "compile", False):
                if backend != "torch":
                    raise UserError(f"--compile compiles the torch encoder; the backend here is {backend} "
                                    "(add --backend torch)")
                from .api import check_compile

                check_compile(device)
        if args.command == "everything":
            return _cli_everything.cmd_everything(
                args, UserError, _load_engine, _open_cache,
                {k: v for k, v in _intensity(args).items() if v is not None}, _slices)
        if args.command == "finetune":
            return _cli_finetune.cmd_finetune(
                args, UserError, _load_engine, _open_cache, {k: v for k, v in _intensity(args).items() if v is not None})
        if args.command == "batch":
            return _cli_batch.cmd_batch(args, {k: v for k, v in _intensity(args).items() if v is not None})
        if args.command == "bench":
            from . import bench

            if args.repeats < 1 or args.slices < 1:
                raise UserError("bench: --repeats and --slices must be at least 1")
            if args.output and (Path(args.output).is_dir() or not Path(args.output).parent.is_dir()):
                raise UserError(f"bench: -o {args.output}: not a file in an existing folder")
            return bench.main(args)
        if args.command in _cli_serving.COMMANDS:
            return _cli_serving.COMMANDS[args.command](args, _load_engine, _open_cache)
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
    except ExportError as exc:  # no space, or killed: the machine's state, not the command
        print(f"napari-sam: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ModuleNotFoundError, ConnectionError) as exc:
        # Our validation raises these with messages that name the parameter.
        print(f"napari-sam: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("napari-sam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
