"""Write docs/api.md: the conventions (by hand, below) and a reference generated from the
public API's numpydoc docstrings (napari_sam.api.__all__, plus the scoring, batch and
cluster entry points). tests/test_api_docs.py fails when the file is out of date.

    python scripts/api_docs.py          # rewrite docs/api.md
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INTRO = """# Python API reference

Generated from the docstrings by `python scripts/api_docs.py` (the test suite checks it is
up to date). `import napari_sam` is cheap: torch, transformers and Qt load when first used.
Everything below is importable from `napari_sam.api`; the most used names also from
`napari_sam` itself. A worked example: [tutorial.ipynb](tutorial.ipynb).

## Coordinates: napari's (row, col), and Azure's (x, y)

The Python API, the CLI's `segment`/`batch` and the widget use napari's order everywhere. Only
the Azure ML scoring schema (`napari-sam score`, `serve`, `export-mlflow`;
[serving.md](serving.md)) speaks (x, y), as its clients do; `napari_sam.scoring` converts at
its boundary and nowhere else.

| | Python API, CLI, widget (napari order) | Azure ML scoring schema |
|---|---|---|
| a point | `[row, col]` = `[y, x]` | `[x, y]` |
| a box | `[row_min, col_min, row_max, col_max]` | `[x1, y1, x2, y2]` |
| 3D prompts | the slice index `z` as its own argument, points and boxes in that slice's `(row, col)` | 2D images only |
| point labels | `1` object, `0` background | `1` object, `0` background, `-1`/`-10` padding |
| prompts per object | every box is one object; points join the box that contains them | each prompt set, or each box, is one prediction |
| masks | `bool` arrays `(H, W)` | base64 8-bit PNG, 0/255, with `iou_score` |

The same object both ways: a box around rows 100-200 and columns 300-450 is
`boxes=[[100, 300, 200, 450]]` in `segment_2d` and `"input_boxes": "[[300, 100, 450, 200]]"`
in an Azure request.

Images are `(H, W)` or `(H, W, C)` (uint8, uint16, int16, float, bool); volumes `(Z, H, W)`
(or `(T, H, W)`, any axis via `Stack(axis=...)`). Intensities stay in their units (HU);
the `window`/`preset`/`percentiles`/`channel` arguments only shape what SAM sees.
"""

MORE = [
    ("napari_sam.scoring", ["Scorer", "Limits", "ScoringError", "parse_request", "encode_mask", "decode_mask"]),
    ("napari_sam.batch", ["run_batch", "read_jobs", "segment_image"]),
    ("napari_sam.cluster", ["ModelSettings", "run_jobs", "worker_engine", "embed_slices"]),
]


def _entry(module: str, name: str, obj) -> str:
    kind = "class" if inspect.isclass(obj) else ("function" if callable(obj) else "constant")
    lines = [f"### `{name}`", ""]
    if kind == "constant":
        lines += [f"`{module}.{name} = {obj!r}`", ""]
        return "\n".join(lines)
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    lines += ["```python", f"{module}.{name}{sig}" if kind == "function" else f"class {module}.{name}{sig}", "```", ""]
    doc = inspect.getdoc(obj) or ""
    if kind == "class" and doc.startswith(f"{name}("):  # dataclass default docstring
        doc = ""
    if doc:
        lines += ["```text", doc, "```", ""]
    if kind == "class":
        methods = [(m, f) for m, f in vars(obj).items() if not m.startswith("_") and callable(f) and inspect.getdoc(f)]
        for m, f in methods:
            try:
                msig = str(inspect.signature(f))
            except (TypeError, ValueError):
                msig = "(...)"
            lines += [f"* `{name}.{m}{msig}`: {inspect.getdoc(f).splitlines()[0]}"]
        if methods:
            lines.append("")
    return "\n".join(lines)


def render() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    import importlib

    import napari_sam.api as api

    parts = [INTRO, "## `napari_sam.api`", ""]
    for name in api.__all__:
        parts.append(_entry("napari_sam.api", name, getattr(api, name)))
    for module, names in MORE:
        mod = importlib.import_module(module)
        parts += [f"## `{module}`", "", (inspect.getdoc(mod) or "").split("\n\n")[0], ""]
        for name in names:
            parts.append(_entry(module, name, getattr(mod, name)))
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    (ROOT / "docs" / "api.md").write_text(render(), encoding="utf-8")
    print("wrote docs/api.md")
