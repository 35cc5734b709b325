"""Every shipped config is valid: it loads against the schema, its model builds, and data matches the model."""

from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.loaders import check_geometry
from models import create_model

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                 if not p.name.endswith(".ladder.yaml"))


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
