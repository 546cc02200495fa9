"""docs/api.md is the reference generated from the docstrings, and it is up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_up_to_date():
    script = ROOT / "scripts" / "api_docs.py"
    if not script.is_file():
        pytest.skip("the generator lives in the repository")
    spec = importlib.util.spec_from_file_location("api_docs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert module.render() == committed, "docs/api.md is stale: run python scripts/api_docs.py"


def test_every_public_name_is_documented():
    from napari_sam import api

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in api.__all__ if f"### `{name}`" not in text]
    assert not missing
