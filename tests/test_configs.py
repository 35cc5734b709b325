"""Every shipped config is valid: it loads against the schema, its model builds, and data matches the model."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from engine.config import ConfigError, load_config
from engine.loaders import check_geometry
from models import create_model


def is_run_config(path: Path) -> bool:
    """Ladder files and overlays (fragments laid over other configs, with neither `_base_` nor a model name,
    like the ablation ladders' size.yaml, checked by tests/test_sweep.py) are not runs of their own."""
    raw = OmegaConf.load(path)
    return not path.name.endswith(".ladder.yaml") and ("_base_" in raw or "name" in raw.get("model", {}))


CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if is_run_config(p))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_builds(path):
    cfg = load_config([str(path)], [])
    with torch.device("meta"):
        model = create_model(cfg.model.name, **cfg.model.overrides())
    encoder = getattr(model, "encoder", model)
    check_geometry(cfg, encoder.config.input_size)


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  base_lr: 0.5\n  epochs: 3\nseed: 4\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 7\n")
    cfg = load_config([str(tmp_path / "child.yaml")], ["seed=9"])
    assert (cfg.train.base_lr, cfg.train.epochs, cfg.seed) == (0.5, 7, 9)
    (tmp_path / "typo.yaml").write_text("_base_: base.yaml\ntrain:\n  epoch: 7\n")
    with pytest.raises(ConfigError, match=r"train.epoch.*Did you mean.*epochs"):
        load_config([str(tmp_path / "typo.yaml")], [])
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["seed"])


@pytest.mark.parametrize("override,message", [
    ("train.checkpoint_every=0", "train.checkpoint_every=0: must be at least 1"),
    ("log.every=0", "log.every=0: must be at least 1"),
    ("data.repeat=0", "data.repeat=0: must be at least 1"),
    ("train.max_steps=0", "train.max_steps=0: must be at least 1"),
    ("train.mixed_precision=bf61", "train.mixed_precision='bf61': use no, bf16 or fp16"),
    ("train.fsdp_reduce_dtype=float32", "train.fsdp_reduce_dtype='float32': use fp32, bf16 or fp16"),
    ("data.sampling=tsn", "data.sampling='tsn': use clip or segment"),
    ("data.max_pixels=0", "data.max_pixels=0: must be positive"),
    ("data.flip_label_map=[[86,86]]", "data.flip_label_map: [86, 86] is not a pair of two different class ids"),
    ("data.flip_label_map=[[86,87],[87,88]]", "data.flip_label_map: class 87 is in two pairs"),
])
def test_values_the_run_cannot_use_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([], [override])
    assert load_config([], []).train.mixed_precision is None  # unset: accelerate launch's flag decides
    assert load_config([], ["data.max_pixels=8.3e6"]).data.max_pixels == 8.3e6  # a pixel count in any notation
