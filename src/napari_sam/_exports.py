"""Exported image encoders on disk, and running them one image at a time with progress.

Shared by the OpenVINO and ONNX Runtime backends (:mod:`napari_sam.backends`). An export
is a folder in :func:`default_encoder_dir` named by a hash of its *identity* (weights,
encoder configuration, graph, input size, backend and its version, format). It is built
in a temporary folder, fsynced, described by ``manifest.json`` (identity, each file's
size and SHA-256) and renamed into place; every read checks all of it, and anything
that does not match is damage: a warning, and the caller exports again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ENCODERS_ENV = "NAPARI_SAM_ENCODERS"
FORMAT_VERSION = 3
STEPS = 100  # progress resolution of one image
POLL_MS = 50

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """The encoder could not be exported (no space anywhere, the export process killed)."""


class ExportCancelled(ExportError):
    """The user cancelled while the encoder was being exported (the export was stopped)."""


def default_encoder_dir() -> Path:
    """``$NAPARI_SAM_ENCODERS``, else ``encoders`` in the platform's user cache folder."""
    env = os.environ.get(ENCODERS_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-sam-labeler")) / "encoders"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def graph_name(precision: str) -> str:
    """fp32, bf16 and fp16 share one float graph (the precision is chosen when compiling)."""
    return precision if precision in ("int8", "int8-weights") else "float"


def encoder_identity(model, fingerprint: str, precision: str, backend: str, version: str) -> str:
    """What an export depends on: weights, the encoder's configuration (activation, norms,
    sizes), the graph (float or int8), the input size, the backend and its version."""
    config = model.config.vision_config.to_dict()
    config.pop("transformers_version", None)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    size = int(model.config.vision_config.image_size)
    return f"v{FORMAT_VERSION}|{fingerprint}|{config_hash}|{backend}|{graph_name(precision)}|{size}|{version}"


def export_folder(identity: str, directory: Path | None = None) -> Path:
    root = Path(directory) if directory is not None else default_encoder_dir()
    return root / hashlib.sha256(identity.encode()).hexdigest()[:24]


def read_verified(folder: Path, identity: str, files: Sequence[str], *, quiet: bool = False) -> Path | None:
    """``folder`` when it holds a complete, undamaged export of ``identity``, else None.

    The manifest must name this identity and exactly ``files`` with their sizes and
    SHA-256; anything else is damage (logged unless ``quiet``), and the caller rebuilds."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        if not isinstance(meta, dict) or meta.get("identity") != identity:
            raise ValueError("its manifest belongs to another model, precision or backend version")
        listed = meta.get("files")
        if not isinstance(listed, dict) or set(listed) != set(files):
            raise ValueError(f"its manifest does not list {' and '.join(files)}")
        for name, entry in listed.items():
            path = folder / name
            if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
                raise ValueError(f"{name} does not match its manifest")
    except Exception as exc:  # noqa: BLE001 - any unreadable manifest is damage, never a crash
        if not quiet:
            log.warning("the exported encoder in %s is damaged (%s); exporting it again", folder, exc)
        return None
    return folder


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _tmp_prefix() -> str:
    """``.tmp-<host>-<pid>-``: whose export a temporary folder is."""
    return f".tmp-{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def _new_tmp(root: Path) -> Path:
    """This process's temporary export folder in ``root``."""
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=root))
    os.chmod(tmp, 0o755)  # a shared cache folder stays readable by its other users
    return tmp


def _dead_here(name: str) -> bool:
    """The folder belongs to a process of this host that no longer runs."""
    parts = name.split("-")
    if len(parts) < 4 or parts[1] != socket.gethostname().replace("-", "_") or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


def _sweep_stale(root: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove temporary folders of exports that were killed: at once when the process was
    on this host, else when none has been written for hours (another machine's)."""
    now = time.time()
    for tmp in root.glob(".tmp-*"):
        try:
            if _dead_here(tmp.name) or now - tmp.stat().st_mtime > older_than_s:
                _remove(tmp)
        except OSError:
            pass


def cached_export(identity: str, files: Sequence[str], *, convert: Callable[[Path | None], Any],
                  save: Callable[[Any, Path], None], load: Callable[[Any], Any], directory: Path | None = None,
                  say: Progress, meta: dict | None = None,
                  elsewhere: Callable[[], None] | None = None) -> tuple[Any, Path | None]:
    """``(load(folder), folder)`` for a verified export of ``identity``, or for a new one:
    ``convert(workdir)`` builds it (``workdir`` is the temporary folder that becomes the
    export, for backends that write files while converting) and ``save(converted,
    workdir)`` writes ``files``; then the folder is fsynced, described and renamed into
    place atomically.

    Where the cache folder cannot hold it (read-only, full, not a folder) the result is
    ``(load(converted), None)`` with a warning: it works now and is exported again next
    time (``convert(None)`` then means "nowhere to write in the cache").

    ``elsewhere``: export in another process first (:func:`export_in_child`), so that this
    one (a GUI) keeps its interpreter lock; this process then loads what it wrote, and
    converts itself only where that failed."""
    folder = export_folder(identity, directory)
    root = folder.parent
    if read_verified(folder, identity, files) is not None:
        return load(folder), folder
    tmp = None
    try:  # a place to write, before minutes of conversion
        root.mkdir(parents=True, exist_ok=True)
        _sweep_stale(root)
        tmp = _new_tmp(root)
    except OSError as exc:
        log.warning("cannot keep the exported encoder in %s (%s; set $%s to a writable folder): "
                    "it is exported again each time", root, exc, ENCODERS_ENV)
    if elsewhere is not None and tmp is not None:  # a child could not keep it either: no child then
        shutil.rmtree(tmp, ignore_errors=True)
        elsewhere()
        if read_verified(folder, identity, files, quiet=True) is not None:
            return load(folder), folder
        log.warning("the export in a separate process left no usable copy in %s; exporting here", root)
        tmp = _new_tmp(root)
    started = time.perf_counter()

    def elsewhere_or_fail():  # nowhere in the cache: convert into a private temporary folder
        try:
            return load(convert(None)), None
        except OSError as exc:
            raise ExportError(f"cannot export the image encoder: {exc.strerror or exc} (free space in "
                               f"{tempfile.gettempdir()} or ${ENCODERS_ENV}, or use backend='torch')") from exc

    try:
        if tmp is None:
            return elsewhere_or_fail()
        try:
            converted = convert(tmp)
        except OSError as exc:  # the cache filled up while converting: convert elsewhere
            log.warning("could not write the exported encoder to %s (%s): it is exported again next time",
                        root, exc)
            shutil.rmtree(tmp, ignore_errors=True)  # free what the failed attempt wrote first
            return elsewhere_or_fail()
        try:
            save(converted, tmp)
            listed = {}
            for name in files:
                path = tmp / name
                os.chmod(path, 0o644)  # some writers create 0600: a shared cache stays readable
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                listed[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
            manifest = {"format": FORMAT_VERSION, "identity": identity, **(meta or {}), "files": listed,
                        "export_seconds": round(time.perf_counter() - started, 1)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if (folder.is_symlink() or folder.exists()) and read_verified(folder, identity, files,
                                                                          quiet=True) is None:
                _remove(folder)  # damaged, not a folder at all, or a dangling link
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same export first: use that one
                if read_verified(folder, identity, files, quiet=True) is None:
                    raise
        except (OSError, RuntimeError) as exc:  # disk full, folder vanished, ...
            log.warning("could not write the exported encoder to %s (%s): it is exported again next time",
                        root, exc)
            return load(converted), None  # before the temporary folder goes
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"Encoder ready ({time.perf_counter() - started:.0f} s, kept in {folder})")
    return load(folder), folder


CHILD_PREFIX = "napari-sam-export: "


def export_in_child(request: dict, say: Progress, cancelled: Callable[[], bool] | None = None) -> None:
    """Run ``python -m napari_sam._export_child`` on ``request`` (the :func:`load_model`
    arguments as plain values) and wait for it, forwarding its progress messages.

    Waiting reads a pipe, which holds no interpreter lock: a GUI in this process stays
    responsive while the child traces, converts and serialises the encoder. A child that
    fails is logged (the caller then exports in process); one killed by a signal (out of
    memory) is an error, since the same export here would die the same way. When
    ``cancelled()`` turns true the child is stopped (SIGTERM: it removes its temporary
    folder) and :class:`ExportCancelled` is raised."""
    try:
        child = subprocess.Popen([sys.executable, "-m", "napari_sam._export_child"], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        log.warning("could not start a process for the encoder export (%s)", exc)
        return
    try:
        child.stdin.write(json.dumps(request))
    except BrokenPipeError:
        pass  # it ended before reading: its exit code and stderr say why
    with contextlib.suppress(BrokenPipeError):
        child.stdin.close()
    tail: list[str] = []

    def read():  # on its own thread, so this one can watch for a cancel
        nonlocal tail
        for line in child.stderr:
            if line.startswith(CHILD_PREFIX):
                say(line[len(CHILD_PREFIX):].rstrip())
            else:
                tail = (tail + [line.rstrip()])[-20:]

    import threading

    reader = threading.Thread(target=read, daemon=True, name="napari-sam-export-child")
    reader.start()
    stopped = False
    while child.poll() is None:
        if cancelled is not None and cancelled():
            child.terminate()
            stopped = True
            break
        time.sleep(0.1)
    code = child.wait()
    reader.join(5)
    _sweep_stale(default_encoder_dir())  # what a killed child left (it exports into the default folder)
    if stopped:
        raise ExportCancelled("cancelled while exporting the image encoder")
    if code == -9:
        raise ExportError("the encoder export was killed (signal 9; out of memory?). Free memory, "
                          "or choose backend='torch'")
    if code < 0 or code == 143:
        raise ExportError(f"the encoder export was stopped (signal {-code if code < 0 else 15})")
    if code != 0:
        log.warning("the encoder export in a separate process failed (exit %d): %s", code, " | ".join(tail[-5:]))


def embedding_graph(model):
    """``pixels -> image embeddings`` as a module: the graph that is exported."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, sam):
            super().__init__()
            self.sam = sam

        def forward(self, pixel_values):
            return self.sam.get_image_embeddings(pixel_values)

    return Encoder(model).eval()


def calibration_pixels(spec, count: int = 4) -> list[np.ndarray]:
    """Model inputs for int8 calibration: bundled microscopy, photo and CT images."""
    from skimage import data

    from . import preprocess as pp
    from .samples import ct_phantom

    ct = ct_phantom((8, 256, 256))
    images = [data.cell(), data.coins(), data.camera(), ct[4]][:count]
    out = []
    for image in images:
        mapping = pp.resolve_intensity(image)
        out.append(pp.model_input(pp.to_rgb_uint8(image, mapping), spec)[0][None])
    return out


def run_polled(encoder, images: np.ndarray, start: Callable[[np.ndarray], Any]):
    """Run ``images`` one at a time as cancellable jobs, yielding ``(done, total)``.

    ``start(batch_of_one)`` returns a job with ``wait(ms) -> finished``, ``cancel()``
    (stop now and wait for it) and ``result() -> array``. Progress within an image is the
    elapsed share of the previous image's time (``encoder.seconds_per_image``). When the
    caller stops iterating, the running job is cancelled at once. Returns the features
    as a torch tensor."""
    import torch

    total = STEPS * len(images)
    expected = encoder.seconds_per_image or 10.0
    outputs = []
    yield 0, total
    for i, image in enumerate(images):
        started = time.perf_counter()
        job = start(np.ascontiguousarray(image[None], dtype=np.float32))
        finished = False
        try:
            while not job.wait(POLL_MS):
                share = min(0.99, (time.perf_counter() - started) / expected)
                yield i * STEPS + int(share * STEPS), total
            finished = True
        finally:
            if not finished:  # the caller stopped iterating: cancel the run now
                job.cancel()
        expected = encoder.seconds_per_image = time.perf_counter() - started
        outputs.append(job.result())
        yield (i + 1) * STEPS, total
    return torch.from_numpy(np.concatenate(outputs))
