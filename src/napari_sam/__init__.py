"""napari-sam-labeler: label 2D images and 3D stacks with Segment Anything.

Importing this package is cheap: torch, transformers, napari and Qt load only when a
name that needs them is first used.

>>> import napari_sam
>>> engine = napari_sam.load_model()            # doctest: +SKIP
>>> emb = engine.embed(image)                   # doctest: +SKIP
>>> pred = engine.predict(emb, points=[[120, 80]], point_labels=[1])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_LAZY = {
    "load_model": "engine",
    "SamEngine": "engine",
    "ModelNotFoundError": "checkpoints",
    "DEFAULT_MODEL": "checkpoints",
    "resolve_model_source": "checkpoints",
    "ImageEmbedding": "_types",
    "Prediction": "_types",
    "Prompt": "_types",
    "IntensityMapping": "_types",
    "ModelInputSpec": "_types",
    "CT_PRESETS": "preprocess",
    "resolve_intensity": "preprocess",
    "to_rgb_uint8": "preprocess",
    # the scripted workflow (napari_sam.api has the full list)
    "read_image": "api",
    "open_volume": "api",
    "write_labels_tiff": "api",
    "write_labels_nifti": "api",
    "segment_2d": "api",
    "segment_volume": "api",
    "propagate_labels": "api",
    "Stack": "api",
    "StopRule": "api",
    "EmbeddingCache": "api",
    "embed_cached": "api",
    "model_status": "api",
    "segment_everything": "api",
    "segment_everything_volume": "api",
    "EverythingParams": "api",
    "finetune": "api",
    "FinetuneConfig": "api",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover  (names for type checkers; resolved lazily below)
    # ruff: noqa: F401
    from ._types import ImageEmbedding, IntensityMapping, ModelInputSpec, Prediction, Prompt
    from .checkpoints import DEFAULT_MODEL, ModelNotFoundError, resolve_model_source
    from .engine import SamEngine, load_model
    from .api import (
        EmbeddingCache, Stack, StopRule, embed_cached, model_status, open_volume, propagate_labels,
        read_image, segment_2d, segment_volume, write_labels_nifti, write_labels_tiff,
        EverythingParams, segment_everything, segment_everything_volume,
    )
    from .preprocess import CT_PRESETS, resolve_intensity, to_rgb_uint8


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
