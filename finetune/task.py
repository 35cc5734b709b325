"""The fine-tuning task: a classifier initialised from a pretrained checkpoint, trained with the recipe of
REFERENCE.md §4 (mixup / cutmix with label smoothing, optional EMA; layer-wise lr decay, warmup + cosine and
clipping come from the engine) and evaluated with multi-view testing after passes over the data. With
`data.multi_label` (Charades) the targets are multi-hot rows and the loss is binary cross-entropy on the logits
(REFERENCE.md §8), through the same step and evaluation."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn import functional as F

from data import ShardSet
from engine import checkpoint
from engine.config import ConfigError, RunConfig
from engine.exported import encoder_file, normalization_metadata
from engine.loaders import eval_loader, media_of, normalization, train_loader
from engine.tblog import TrainLogger
from engine.trainer import schedule
from models import CheckpointError, LoadReport, create_model, load_pretrained

from .evaluate import evaluate, write_results
from .multi_hot import MultiHotMixup, smooth
from .probe import LinearProbe

# Keys a pretrained encoder may lack and that start fresh: the classifier, and the final norm (an MAE fuses
# its stages and normalises them with its own `encoder_norm` instead).
FRESH_OK = ("head.", "norm.")
RANDOM = "random"  # model.pretrained=random: say explicitly that the encoder starts from its random initialisation


def architecture(cfg: RunConfig, classes: tuple[str, ...]) -> tuple[str, dict]:
    """(registered encoder name, create_model overrides) for this run.

    Our exported encoders carry their name and overrides: `model.name` (an `mae_` prefix is ignored) must
    name the same architecture, and `model.*` keys override what the file says. The input size is this
    run's (`model.input_size`, else the name's default), not the pretraining one: recipes fine-tune at other
    sizes (MViTv2-L pretrains at 16x224, fine-tunes at 40x312), and loading resamples the position tables.
    The class count is `model.num_classes`, else that of the data, else the checkpoint's.
    """
    name = cfg.model.name.removeprefix("mae_")
    overrides = {}
    exported = encoder_file(cfg.model.pretrained) if cfg.model.pretrained else None
    saved = checkpoint.read_encoder_metadata(exported) if exported else None
    if saved is not None:
        if saved[0] != name:
            raise ConfigError(f"model.pretrained={cfg.model.pretrained} holds a {saved[0]} encoder but "
                              f"model.name={cfg.model.name}: set model.name={saved[0]}")
        overrides = {k: v for k, v in saved[1].items() if k != "input_size"}
    overrides |= cfg.model.overrides()
    if cfg.model.num_classes is None and classes:
        overrides["num_classes"] = len(classes)
    return name, overrides


def initialise(model: nn.Module, source: str, need_head: bool) -> LoadReport:
    """Load `source` into `model`. Only FRESH_OK keys may stay freshly initialised (a head of another class
    count is re-initialised); with `need_head` (evaluation) none may. Raises CheckpointError otherwise."""
    report = load_pretrained(model, source, strict=False)
    fresh = newly_initialised(report)
    wrong = report.unexpected + [k for k in fresh if need_head or not k.startswith(FRESH_OK)]
    if wrong:
        hint = " (evaluation needs a fine-tuned classifier)" if need_head else ""
        raise CheckpointError(f"{source} does not fit {type(model).__name__}{hint}: "
                              f"{', '.join(wrong[:12])}\n{report.summary()}")
    return report


def newly_initialised(report: LoadReport) -> list[str]:
    return report.missing + [m.split(":")[0] for m in report.mismatched]


def describe(report: LoadReport | None) -> str:
    """The initialisation report printed at start and written to TensorBoard."""
    if report is None:
        return "no model.pretrained: every weight is randomly initialised"
    fresh = newly_initialised(report)
    return (f"{report.summary()}\n  newly initialised ({len(fresh)}): {', '.join(fresh) or 'none'}\n"
            f"  dropped ({len(report.dropped)}): pretraining-only weights, unused by the classifier")


class FinetuneTask:
    report: LoadReport | None = None

    def build_model(self, cfg: RunConfig) -> nn.Module:
        self.cfg = cfg
        self.classes = class_names(cfg)
        self.name, self.overrides = architecture(cfg, self.classes)
        model = create_model(self.name, **self.overrides)
        if not hasattr(model, "head"):
            raise ConfigError(f"model.name={cfg.model.name}: fine-tuning needs a classifier encoder")
        self.num_classes, self.input_size = model.config.num_classes, model.config.input_size
        random_init = cfg.model.pretrained == RANDOM
        if cfg.eval_only and (random_init or not cfg.model.pretrained):
            raise ConfigError("eval_only=true needs model.pretrained (a fine-tuned checkpoint)")
        if cfg.model.pretrained and not random_init:
            self.report = initialise(model, cfg.model.pretrained, need_head=cfg.eval_only)
        if cfg.train.mode == "linear_probe" and not cfg.eval_only:
            if not cfg.model.pretrained:
                raise ConfigError(f"train.mode=linear_probe needs model.pretrained: the encoder to probe, or "
                                  f"{RANDOM} for the architecture's random initialisation (a baseline)")
            if cfg.train.layer_decay is not None:
                raise ConfigError("train.layer_decay does not apply to train.mode=linear_probe (one layer trains)")
            model = LinearProbe(model)
        t = cfg.train
        self.mixup = None
        if (t.mixup > 0 or t.cutmix > 0) and cfg.data.multi_label:
            self.mixup = MultiHotMixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing)
        elif t.mixup > 0 or t.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                               num_classes=self.num_classes)
        # timm's recipe (mode "pixel": normal noise in normalised space, one box); built on the first step, where
        # the device is known.
        self.erase = None
        # The EMA starts from the initialised weights; it is what gets evaluated and exported when enabled.
        self.ema = ModelEmaV3(model, decay=t.ema_decay) if t.ema_decay else None
        self.ema_on_device = False
        return model

    def train_loader(self, cfg: RunConfig, rank: int, world_size: int):
        self.loader = train_loader(cfg, rank, world_size, self.input_size)
        return self.loader

    def step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The loss of one batch: cross-entropy on class ids [B], or on mixup's soft targets [B, K]; with
        `data.multi_label`, binary cross-entropy on multi-hot targets [B, K], smoothed and mixed as timm's."""
        x, labels, valid = media_of(batch, self.loader.sample), batch["label"], batch["valid"].float()
        multi_label = self.cfg.data.multi_label
        if self.cfg.data.random_erase > 0:
            if self.erase is None:
                self.erase = RandomErasing(self.cfg.data.random_erase, mode="pixel", device=x.device)
            # On a 4-D view with time folded into channels, timm erases one box through every frame of a clip
            # (SlowFast's "cube" mode); the view shares x's memory and timm erases in place.
            self.erase(x.flatten(1, 2) if x.dim() == 5 else x)
        if self.mixup is not None:
            even = len(x) // 2 * 2  # pairs are mixed: an odd batch leaves its last row out
            x, labels, valid = x[:even], labels[:even], valid[:even]
            # timm's Mixup boxes the last two dims of a 4-D batch: time folded into channels, as for erasing.
            folded, labels = self.mixup(x.flatten(1, 2) if x.dim() == 5 else x, labels)
            x = folded.view_as(x)
        elif multi_label:
            labels = smooth(labels, self.cfg.train.label_smoothing)
        logits = model(x)
        if multi_label:  # the mean over classes, as BCEWithLogitsLoss's mean over a batch's elements
            losses = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none").mean(1)
            return {"loss": valid_mean(losses, valid)}
        if self.mixup is not None:
            return {"loss": valid_mean(F.cross_entropy(logits, labels, reduction="none"), valid)}
        losses = F.cross_entropy(logits, labels, label_smoothing=self.cfg.train.label_smoothing, reduction="none")
        hits = (logits.argmax(-1) == labels).float()
        return {"loss": valid_mean(losses, valid), "acc": valid_mean(hits, valid)}

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.ema is not None:
            self._place_ema(model)
            self.ema.update(model, step=step)

    def _place_ema(self, model: nn.Module) -> None:
        """The EMA is built on the CPU before accelerate moves the model; it follows the model's device, also
        when a finished run is resumed and evaluated without a step."""
        if not self.ema_on_device:
            self.ema.module.to(next(model.parameters()).device)
            self.ema_on_device = True

    def shard_copies(self, shard) -> None:
        """Under FSDP: the EMA is sharded like the model, so that it updates shard by shard (an FSDP module
        cannot be deep-copied, hence the copy made before sharding, sharded now)."""
        if self.ema is not None:
            self.ema.module = shard(self.ema.module)
            self.ema_on_device = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v for k, v in self.ema.module.state_dict().items()} if self.ema else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.ema is not None:
            self.ema.module.load_state_dict({k.removeprefix("ema."): v for k, v in state.items()})

    def final_model(self, model: nn.Module) -> nn.Module:
        if self.ema is None:
            return model
        self._place_ema(model)
        return self.ema.module

    def encoder(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The whole classifier to export, `final_model`'s (a linear probe as the plain classifier it equals):
        `eval_only=true model.pretrained=<output_dir>` evaluates it."""
        state = model.classifier_state_dict() if isinstance(model, LinearProbe) else model.state_dict()
        # The class names travel with the weights, and whether the classes are independent (multi-label):
        # finetune.predict names its answers from them and scores them by sigmoid or softmax; and the input
        # statistics, which predict, features and a later fine-tuning feed it.
        return state, {**checkpoint.encoder_metadata(self.name, self.overrides),
                       **normalization_metadata(normalization(self.cfg)),
                       "classes": json.dumps(list(self.classes)), "multi_label": json.dumps(self.cfg.data.multi_label)}

    def visualize(self, model, batch, logger, step) -> None:
        """Nothing to draw during fine-tuning: evaluation writes its images after passes."""

    def after_pass(self, model: nn.Module, accelerator: Accelerator, logger: TrainLogger,
                   step: int) -> dict[str, float]:
        """Multi-view evaluation every `eval.every_epochs` passes and at the end of training."""
        cfg = self.cfg
        steps_per_pass = len(self.loader) // cfg.train.accum_steps
        final = step >= schedule(cfg, steps_per_pass)[0]
        if not cfg.data.val or not (final or round(step / steps_per_pass) % cfg.eval.every_epochs == 0):
            return {}
        return self.evaluate(self.final_model(model), accelerator, logger, step, final)

    def evaluate(self, model: nn.Module, accelerator: Accelerator, logger: TrainLogger, step: int,
                 final: bool = True) -> dict:
        """The multi-view metrics (written out); with frames shuffled too at the final evaluation
        (`eval.shuffled`) or at every one (`eval.shuffled_every`)."""
        cfg = self.cfg
        loader = eval_loader(cfg, accelerator.process_index, accelerator.num_processes, self.input_size)
        shuffled = cfg.eval.shuffled and (final or cfg.eval.shuffled_every)
        results = evaluate(model, loader, accelerator, self.num_classes, shuffle_seed=cfg.seed if shuffled else None)
        views = loader.sample.num_views
        output_dir = cfg.output_dir if accelerator.is_main_process else None
        metrics = write_results(results, list(self.classes), views, logger, output_dir, step)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}


def valid_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of per-row values [N] over the valid rows (weights [N] in {0, 1}); 0, with gradients, when none is:
    rows standing in for failed samples count for nothing, and the step still takes part in the all-reduce."""
    return (values * valid).sum() / valid.sum().clamp(min=1)


def class_names(cfg: RunConfig) -> tuple[str, ...]:
    """The class names of the data (training shards, or validation shards when only evaluating)."""
    train = ShardSet.load(cfg.data.train).classes if cfg.data.train and not cfg.eval_only else ()
    val = ShardSet.load(cfg.data.val).classes if cfg.data.val else ()
    if train and val and train != val:
        raise ConfigError(f"data.train and data.val have different classes ({len(train)} vs {len(val)}): "
                          f"make both shard sets from one class list")
    return train or val
