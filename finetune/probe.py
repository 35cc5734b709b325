"""Linear probing, the MAE paper's protocol (`train.mode=linear_probe`): the pretrained encoder is frozen and
kept in eval mode; only a BatchNorm without affine parameters and a linear classifier on its pooled features
train. Exported, the BatchNorm is folded into the linear layer, so the result is a plain classifier that
evaluation, `finetune.predict` and `finetune.features` load like any fine-tuned one.
"""

from __future__ import annotations

import math

import torch
from torch import nn


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
              epochs: int, batch_size: int = 256, seed: int = 0) -> ProbeHead:
    """The fast path of a linear probe without augmentation: a `ProbeHead` trained on features [N, D]
    computed once by the frozen encoder, with labels [N] (0..num_classes-1). AdamW, linear warmup over the
    first epoch then cosine to 0, shuffled mini-batches drawn from `seed`. Returns the head in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ProbeHead(features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(features) // batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    decay = max(1, total - warmup)
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / decay))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    head.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(features), generator=generator).split(batch_size):
            if len(rows) < 2:  # BatchNorm needs two rows
                continue
            loss = nn.functional.cross_entropy(head(features[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()
