"""``python -m napari_sam._export_child``: export an encoder into the shared export cache.

Reads the :func:`napari_sam.load_model` arguments as JSON on stdin, loads the model the
same way (so the export lands under the same identity) and writes progress lines to
stderr for :func:`napari_sam._exports.export_in_child`, which started it so that the
parent process (a GUI) is not held up by the export."""

from __future__ import annotations

import json
import signal
import sys


def main() -> int:
    # SIGTERM ends like Ctrl+C: cleanups run and the temporary export folder is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    request = json.loads(sys.stdin.read())
    from ._exports import CHILD_PREFIX
    from .engine import load_model

    def say(message: str) -> None:
        print(CHILD_PREFIX + message, file=sys.stderr, flush=True)

    load_model(request.get("model"), device="cpu", dtype=request["dtype"], backend=request["backend"],
               preprocessing=request.get("preprocessing"), on_progress=say)
    return 0


if __name__ == "__main__":
    sys.exit(main())
