"""The pretraining step: masked-unit reconstruction loss, and the reconstruction viewer."""

from __future__ import annotations

import torch

from engine import checkpoint
from engine.config import ConfigError, RunConfig
from engine.exported import normalization_metadata
from engine.knn import KnnMonitor
from engine.loaders import media_of, normalization, train_loader
from engine.tblog import TrainLogger
from engine.trainer import schedule
from models import create_model, load_pretrained
from models.mae import MAEConfig, MaskedAutoencoder

from . import render


class PretrainTask:
    def build_model(self, cfg: RunConfig) -> MaskedAutoencoder:
        if not cfg.model.name.startswith("mae_"):
            raise ConfigError(f"model.name={cfg.model.name!r}: pretraining needs an MAE model (mae_<encoder>)")
        self.cfg = cfg
        self.model = create_model(cfg.model.name, **cfg.model.overrides())
        if cfg.model.pretrained:  # another run's MAE weights, with a fresh schedule and data position
            load_pretrained(self.model, cfg.model.pretrained)
        return self.model

    def train_loader(self, cfg: RunConfig, rank: int, world_size: int):
        input_size = self.model.encoder.config.input_size
        self.loader = train_loader(cfg, rank, world_size, input_size, self.model.mask_unit_grid,
                                   self.model.mask_ratio)
        knn = cfg.eval.knn
        self.knn = KnnMonitor(cfg, input_size) if knn.train and knn.val else None
        self.last_step = schedule(cfg, len(self.loader) // cfg.train.accum_steps)[0]
        return self.loader

    def step(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": model(media_of(batch, self.loader.sample), mask=batch["mask"], valid=batch["valid"])["loss"]}

    def monitor(self, model: MaskedAutoencoder, accelerator, logger: TrainLogger, step: int) -> dict[str, float]:
        """The k-NN top-1 / top-5 of the encoder's features when `eval.knn` is set and it is due: every
        `eval.knn.every` steps from step 0, and at the last step (the encoder that gets exported)."""
        due = self.knn and (self.knn.due(step) or step == self.last_step)
        return self.knn(model, accelerator, logger, step) if due else {}

    def encoder(self, model: MaskedAutoencoder) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return model.encoder_state_dict(), encoder_metadata(self.cfg)

    @torch.no_grad()
    def visualize(self, model: MaskedAutoencoder, batch: dict, logger: TrainLogger, step: int) -> None:
        count, valid = self.cfg.log.visualize_samples, batch["valid"]
        rows = valid if valid.any() else torch.ones_like(valid)  # never empty: under FSDP every rank must run
        x, mask = media_of(batch, self.loader.sample)[rows][:count], batch["mask"][rows][:count]
        model.eval()
        views = model.reconstruct(x, model(x, mask=mask))
        model.train()
        write_views(logger, views, self.loader.sample.mean, self.loader.sample.std, step)

    def after_pass(self, model, accelerator, logger, step) -> dict[str, float]:
        return {}


def encoder_metadata(cfg: RunConfig) -> dict[str, str]:
    """The encoder's registered name, its (non-MAE) overrides and the input statistics it was trained with,
    stored in the exported file."""
    overrides = {k: v for k, v in cfg.model.overrides().items() if k not in MAEConfig.__dataclass_fields__}
    return {**checkpoint.encoder_metadata(cfg.model.name.removeprefix("mae_"), overrides),
            **normalization_metadata(normalization(cfg))}


def write_views(logger: TrainLogger, views: dict[str, torch.Tensor], mean, std, step: int) -> None:
    """Image grids, or per-sample frame strips and animations, under `reconstruction/`."""
    if views["original"].dim() == 4:
        logger.image("reconstruction/grid", render.image_grid(views, mean, std), step)
        return
    for sample in range(views["original"].shape[0]):
        logger.image(f"reconstruction/frames_{sample}", render.frame_strips(views, mean, std, sample), step)
        logger.animation(f"reconstruction/clip_{sample}", render.animation(views, mean, std, sample), step)
