"""Linear probing, the MAE paper's protocol (`train.mode=linear_probe`): the pretrained encoder is frozen and
kept in eval mode; only a BatchNorm without affine parameters and a linear classifier on its pooled features
train. Exported, the BatchNorm is folded into the linear layer, so the result is a plain classifier that
evaluation, `finetune.predict` and `finetune.features` load like any fine-tuned one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from torch import nn

from data import ShardSet
from engine import checkpoint
from engine.config import RunConfig
from engine.knn import extract_features
from engine.loaders import eval_loader
from engine.tblog import TrainLogger


class ProbeHead(nn.Module):
    """[B, D] features -> [B, K] logits: BatchNorm1d(affine=False) then Linear (MAE: weights trunc-normal
    std 0.01, bias 0). The norm matters because MAE features are not scaled for a linear classifier."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.projection = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.projection.weight, std=0.01)
        nn.init.zeros_(self.projection.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.norm(x))

    def folded(self) -> dict[str, torch.Tensor]:
        """The eval-mode head as one linear layer: W' = W / sqrt(var + eps) (per input), b' = b - W' mean."""
        scale = (self.norm.running_var + self.norm.eps).rsqrt()
        weight = self.projection.weight * scale
        return {"weight": weight, "bias": self.projection.bias - weight @ self.norm.running_mean}


class LinearProbe(nn.Module):
    """A classifier (Hiera or MViTv2, already loaded with pretrained weights) whose head is replaced by a
    `ProbeHead`; every other weight is frozen (requires_grad False, so the optimizer never sees it) and stays
    in eval mode whatever `train()` says, so dropout, drop path and the features do not change."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        num_classes = classifier.config.num_classes
        classifier.head = nn.Identity()
        classifier.requires_grad_(False)
        self.encoder = classifier
        self.head = ProbeHead(classifier.num_features, num_classes)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, (T,) H, W] -> the frozen encoder's pooled features [B, D] (no autograd graph: nothing to
        train there)."""
        with torch.no_grad():
            return self.encoder.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, (T,) H, W] -> logits [B, K]."""
        return self.head(self.forward_features(x))

    def classifier_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the plain classifier this probe is equal to in eval mode (the encoder's weights
        and the folded head under `head.projection.`)."""
        folded = self.head.folded()
        return {**self.encoder.state_dict(), "head.projection.weight": folded["weight"].detach(),
                "head.projection.bias": folded["bias"].detach()}


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float, weight_decay: float,
              epochs: float, batch_size: int = 256, seed: int = 0, warmup_epochs: float = 1.0,
              optimizer: str = "adamw", optimizer_args: dict | None = None, max_steps: int | None = None,
              betas: tuple[float, float] = (0.9, 0.999), min_lr: float = 0.0) -> tuple[ProbeHead, int]:
    """The fast path of a linear probe without augmentation: a `ProbeHead` trained on features [N, D] that the
    frozen encoder computed once, with labels [N] (0..num_classes-1). Any timm optimizer (`betas` are dropped
    for those without), linear warmup then cosine to `min_lr` (the trainer's schedule), mini-batches shuffled
    from `seed`. Returns (the head in eval mode, the optimizer steps taken)."""
    if len(features) < 2:
        raise ValueError(f"a linear probe needs at least two labelled samples, got {len(features)}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ProbeHead(features.shape[1], num_classes)
    opt = create_optimizer_v2(head, opt=optimizer, lr=lr, weight_decay=weight_decay, betas=betas,
                              **(optimizer_args or {}))
    steps_per_epoch = -(-len(features) // batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    total = min(total, max_steps) if max_steps else total
    warmup = round(warmup_epochs * steps_per_epoch)
    floor = min_lr / lr if lr else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    head.train()
    step = 0
    while step < total:
        for rows in torch.randperm(len(features), generator=generator).split(batch_size):
            if step == total:
                break
            if len(rows) < 2:  # BatchNorm needs two rows: the epoch's last, single row waits for the next
                continue
            loss = nn.functional.cross_entropy(head(features[rows].float()), labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            step += 1
    return head.eval(), total


def features_suffice(cfg: RunConfig) -> bool:
    """A linear probe of images that asked for no augmentation (crop scale [1, 1], no flip, RandAugment,
    random erasing, mixup, cutmix or repeats) and nothing that `fit_probe` leaves out (label smoothing,
    clipping, EMA): each training image then has one set of frozen features, computed once from its centre
    view as evaluation cuts it. (Video is left to the training loop: its clips start at random times; so is
    multi-label data, whose binary cross-entropy `fit_probe` does not fit.)"""
    d, t = cfg.data, cfg.train
    if t.mode != "linear_probe" or cfg.eval_only or not d.train or d.multi_label:
        return False
    plain = (list(d.scale) == [1.0, 1.0] and d.hflip == 0 and not d.rand_augment and d.random_erase == 0
             and t.mixup == 0 and t.cutmix == 0 and d.repeat == 1 and t.label_smoothing == 0
             and t.clip_grad is None and t.ema_decay is None)
    return plain and ShardSet.load(d.train).media == "image"


def probe_on_features(task, model: LinearProbe, cfg: RunConfig, accelerator: Accelerator,
                      logger: TrainLogger) -> dict[str, float]:
    """`train.mode=linear_probe` when `features_suffice`: the features of `data.train` (gathered from all ranks;
    every rank then fits the same head), `fit_probe` with the run's optimizer, lr (base_lr x batch x ranks x
    accum_steps / 256, as the trainer scales it), betas, weight decay, min lr, epochs, warmup and batch size,
    then fine-tuning's evaluation on `data.val` and the export of the plain classifier. No checkpoints: the
    fit takes seconds to minutes."""
    model = model.to(accelerator.device).eval()
    loader = eval_loader(cfg, accelerator.process_index, accelerator.num_processes, task.input_size,
                         shards=cfg.data.train, views=(1, 1))
    features, labels = extract_features(model, loader, accelerator)
    keep = labels >= 0
    t = cfg.train
    total_batch = t.batch_size * accelerator.num_processes * t.accum_steps
    head, steps = fit_probe(features[keep], labels[keep], task.num_classes, t.base_lr * total_batch / 256,
                            t.weight_decay, t.epochs, total_batch, cfg.seed, t.warmup_epochs, t.optimizer,
                            dict(t.optimizer_args), t.max_steps, tuple(t.betas), t.min_lr)
    model.head.load_state_dict(head.state_dict())
    metrics = task.evaluate(model, accelerator, logger, steps) if cfg.data.val else {}
    if accelerator.is_main_process:
        checkpoint.export_encoder(Path(cfg.output_dir) / "encoder.safetensors", *task.encoder(model))
    return metrics
