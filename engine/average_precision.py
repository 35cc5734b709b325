"""Multi-label evaluation: mean average precision over the classes, as SlowFast's `get_map` computes it for
Charades (REFERENCE.md §8): classes with no positive video are left out, the others' average precisions
(`sklearn.metrics.average_precision_score`) are averaged."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score


def merge_views_by_max(scores: torch.Tensor, inverse: torch.Tensor, num_videos: int) -> torch.Tensor:
    """Per-view sigmoid scores [N, K] -> per-video scores [num_videos, K]: the highest of a video's views for each
    class (SlowFast's `ENSEMBLE_METHOD: max`; the mean scores Charades far lower, SlowFast#190). `inverse` [N]
    is each view's video."""
    merged = torch.full((num_videos, scores.shape[1]), -torch.inf, dtype=scores.dtype, device=scores.device)
    return merged.scatter_reduce_(0, inverse[:, None].expand_as(scores), scores, "amax")


def multi_label_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """Scores [V, K] and multi-hot targets [V, K] -> {"mAP" (percent, NaN when no class has a positive),
    "per_class_ap" [K] (percent, None for a class without positives), "num_videos", "classes_scored"}."""
    y_true, y_score = targets.numpy() > 0.5, scores.float().numpy()
    scored = y_true.any(0)
    per_class = [None] * y_true.shape[1]
    if scored.any():
        ap = average_precision_score(y_true[:, scored], y_score[:, scored], average=None)
        for k, value in zip(np.flatnonzero(scored), np.atleast_1d(ap)):
            per_class[k] = float(value) * 100
    values = [a for a in per_class if a is not None]
    return {"mAP": float(np.mean(values)) if values else float("nan"), "per_class_ap": per_class,
            "num_videos": len(y_true), "classes_scored": int(scored.sum())}
