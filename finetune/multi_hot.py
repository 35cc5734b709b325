"""Training targets of multi-label data: multi-hot rows [B, K] (float) that mixup / cutmix and label smoothing
act on, as timm's one-hot targets of single-label data.

timm's `Mixup` one-hot-encodes integer labels (REFERENCE.md §8), so it cannot take multi-hot rows. Here the
images are mixed by timm's own code (`Mixup._mix_batch`: its lambda draw, its cutmix box and the lambda
corrected to the box's area) and the target rows are mixed with the lambda it returns, as timm's
`mixup_target` mixes one-hot rows: row i with row B - 1 - i (the batch flipped).
"""

from __future__ import annotations

import torch
from timm.data import Mixup


def smooth(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Multi-hot [B, K] -> timm's smoothed targets: 1 - smoothing + smoothing / K where a class is present,
    smoothing / K where it is not (timm's `mixup_target` and `BinaryCrossEntropy` values)."""
    off = smoothing / targets.shape[1]
    return targets * (1 - smoothing) + off


class MultiHotMixup(Mixup):
    """timm's batch-mode Mixup for multi-hot targets: `(x [B, C, H, W], targets [B, K]) -> (x mixed in place,
    targets mixed with the same lambda and smoothed)`. B must be even (pairs are mixed)."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float):
        super().__init__(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                         mode="batch")

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            raise ValueError(f"mixup pairs the rows of a batch: got {len(x)}")
        lam = self._mix_batch(x)
        targets = smooth(targets.float(), self.label_smoothing)
        return x, targets * lam + targets.flip(0) * (1 - lam)
