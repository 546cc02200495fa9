"""Import torch and transformers safely in a process that already draws with OpenGL.

The default torch wheel on Linux brings ``triton``, and ``from transformers import
SamModel`` imports it (through ``torch._dynamo``). triton's ``libtriton.so`` carries its
own LLVM. Where OpenGL is Mesa (llvmpipe under Xvfb, VMs, remote desktops, most
AMD/Intel desktops), creating napari's GL context has already mapped Mesa's
``libLLVM-*.so`` into the process with global symbols; loading triton's LLVM after it
crashes the process with a segmentation fault. Loading triton *before* Mesa is fine.

Nothing in this package needs triton: SAM runs eagerly on CPU, CUDA and MPS (only the
opt-in ``torch.compile`` on CUDA does, and it is refused where triton is hidden). So before the first model import, :func:`guard_triton`
checks whether a foreign LLVM is already mapped; if so it hides triton from this process
(``sys.modules["triton"] = None``), which torch and transformers read as "triton not
installed", exactly the state of a CPU-only torch wheel. Where no foreign LLVM is loaded
(NVIDIA's GL, the CLI, scripts), triton stays importable. ``NAPARI_SAM_TRITON`` overrides
the decision: ``block`` always hides it, ``allow`` never does.

See docs/architecture.md ("Model imports in a GL process") for the measurements.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

TRITON_ENV = "NAPARI_SAM_TRITON"
_CHOICES = ("auto", "block", "allow")

log = logging.getLogger(__name__)

# The last decision, for `napari-sam info` and tests: "absent", "imported", "allowed",
# "blocked" (or None before the first model import).
decision: str | None = None


def foreign_llvm(maps_path: str = "/proc/self/maps") -> list[str]:
    """Shared LLVM libraries mapped into this process that are not triton's own.

    Mesa loads ``libLLVM-NN.so`` (Debian/Ubuntu/Fedora) or ``libLLVM.so.NN`` for llvmpipe,
    radeonsi and the gallium megadriver; numba's ``libllvmlite.so`` embeds LLVM too.
    Returns an empty list where ``/proc`` is not available (macOS, Windows).
    """
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    found = set()
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        path = parts[5].strip()
        name = os.path.basename(path).lower()
        if (name.startswith("libllvm") and ".so" in name) or name.startswith("libllvmlite"):
            if f"{os.sep}triton{os.sep}" not in path:
                found.add(path)
    return sorted(found)


def triton_setting() -> str:
    """``$NAPARI_SAM_TRITON`` checked: ``auto`` (default), ``block`` or ``allow``; else ValueError."""
    choice = os.environ.get(TRITON_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{TRITON_ENV}={choice!r} is not one of {', '.join(_CHOICES)}")
    return choice


def guard_triton() -> str:
    """Decide, once per process, whether triton may be imported; call before torch/transformers.

    Returns the decision: ``"absent"`` (triton not installed), ``"imported"`` (already
    imported, or already hidden, before this call), ``"allowed"`` or ``"blocked"``.

    Raises
    ------
    ValueError
        When ``NAPARI_SAM_TRITON`` is not one of ``auto``, ``block``, ``allow``.
    """
    global decision
    choice = triton_setting()
    if "triton" in sys.modules:
        decision = "blocked" if sys.modules["triton"] is None else "imported"
        return decision
    if choice == "allow":
        decision = "allowed"
        return decision
    if importlib.util.find_spec("triton") is None:
        decision = "absent"
        return decision
    llvm = foreign_llvm()
    if choice == "block" or llvm:
        sys.modules["triton"] = None  # import triton -> ImportError; find_spec -> None
        why = f"{TRITON_ENV}=block" if choice == "block" else f"{llvm[0]} is already loaded (OpenGL)"
        log.info("napari-sam: triton hidden from this process (%s); SAM runs without it", why)
        decision = "blocked"
        return decision
    decision = "allowed"
    return decision


def quiet_transformers(errors_only: bool = True) -> None:
    """Hide transformers' weight-loading progress bar (it breaks into our own progress
    output) and, with ``errors_only``, its warnings. Cosmetic: never fails."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if errors_only:
            hf_logging.set_verbosity_error()
    except Exception:  # logging tweaks are cosmetic
        pass


MALLOC_ENV = "NAPARI_SAM_MALLOC"
_malloc_tuned = False


def tune_allocator() -> bool:
    """Keep glibc from handing the decoder's buffers back to the kernel after every click.

    A decode allocates a few 4-8 MB tensors; glibc serves such sizes with fresh ``mmap``
    or trims them off the heap when freed, so every click page-faults them in again.
    Measured on random ViT-B, same process: a click's ``predict`` 35-42 ms with glibc's
    defaults, 26 ms with an mmap threshold of 64 MB and a trim threshold of 256 MB (at
    most 256 MB of freed heap kept; resident memory +20-45 MB). Linux/glibc only, once
    per process; ``NAPARI_SAM_MALLOC=default`` (or off/0/no/false) leaves glibc alone.
    Returns whether set."""
    global _malloc_tuned
    declined = os.environ.get(MALLOC_ENV, "").strip().lower() in ("default", "off", "0", "no", "false")
    if _malloc_tuned or declined or not sys.platform.startswith("linux"):
        return _malloc_tuned
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _malloc_tuned = bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):  # musl and others have no mallopt
        _malloc_tuned = False
    return _malloc_tuned
