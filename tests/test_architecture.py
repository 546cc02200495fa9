"""The layering in pyproject.toml's import-linter contracts holds, and the check can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import napari_sam

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
# Lint the checkout when there is one, else the installed package (same files in CI).
SRC = REPO / "src" if (REPO / "src" / "napari_sam").is_dir() else Path(napari_sam.__file__).parents[1]

pytestmark = pytest.mark.skipif(not PYPROJECT.is_file(), reason="the contracts live in the repository's pyproject.toml")


def lint(src: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(config), "--no-cache"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=src)


def test_contracts_kept():
    res = lint(SRC, PYPROJECT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout and "6 kept" in res.stdout, res.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("cache.py", "from .engine import load_model", "it never imports the model"),
    ("_qt/labels_panel.py", "from ..volume import Stack", "use the public API"),
    ("api.py", "import qtpy", "Only napari_sam._qt imports Qt"),
    ("engine.py", "from .api import segment_2d", "Layers:"),
    ("io/nifti.py", "import torch", "do not need the model"),
    ("scoring.py", "import fastapi", "no web framework or MLflow inside it"),
    ("serve.py", "from .engine import SamEngine", "use the public API"),
    ("scoring.py", "from .serve import create_app", "Layers:"),
])
def test_a_violation_is_reported(tmp_path, module, line, contract):
    shutil.copytree(SRC / "napari_sam", tmp_path / "napari_sam", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "napari_sam" / module, "a") as f:
        f.write(f"\n{line}  # injected violation\n")
    res = lint(tmp_path, PYPROJECT)
    assert res.returncode != 0
    broken = [row for row in res.stdout.splitlines() if row.endswith("BROKEN")]
    assert len(broken) >= 1 and contract in res.stdout.split("Broken contracts")[-1], res.stdout


def test_modules_stay_small():
    """No module over 500 lines; the widget's parts under 300, readable in one sitting (issue 11)."""
    too_long = []
    for path in sorted((SRC / "napari_sam").rglob("*.py")):
        n = len(path.read_text().splitlines())
        limit = 300 if "_qt" in path.parts else 500
        if n > limit:
            too_long.append(f"{path.relative_to(SRC)}: {n} lines (limit {limit})")
    assert not too_long, "\n".join(too_long)
