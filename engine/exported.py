"""The exported encoder file (`output_dir/encoder.safetensors`) and what its metadata says besides the
architecture (engine.checkpoint): the input normalisation it was trained with.

    metadata {"model": name, "overrides": JSON, "mean": "[0.45, 0.45, 0.45]", "std": "[0.225, 0.225, 0.225]", ...}

Exports written before the normalisation was stored name their model but carry no statistics; every run of
those versions normalised with ImageNet's, so that is what they are read as.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from models import IMAGENET, Normalization


def encoder_file(source: str | Path) -> Path | None:
    """The exported-encoder file of `source` (our checkpoint or output dir, or the file itself), if any."""
    path = Path(source)
    if path.is_dir():
        path = path / "encoder.safetensors"
    return path if path.suffix == ".safetensors" and path.is_file() else None


def normalization_metadata(normalization: Normalization) -> dict[str, str]:
    """The metadata entries that record `normalization` in an exported file."""
    return {"mean": json.dumps(list(normalization.mean)), "std": json.dumps(list(normalization.std))}


def saved_normalization(path: str | Path) -> Normalization | None:
    """The normalisation an exported encoder was trained with; None for a safetensors file that is no export of
    ours (no model name in its metadata), whose statistics it cannot say."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "mean" in metadata and "std" in metadata:
        return Normalization(tuple(json.loads(metadata["mean"])), tuple(json.loads(metadata["std"])))
    return IMAGENET if "model" in metadata else None
