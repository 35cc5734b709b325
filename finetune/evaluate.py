"""Multi-view evaluation of a classifier: the way the papers report video accuracy.

Each validation video comes as S spatial x T temporal views (adjacent rows of one batch, sharing `index`,
the video's position in the epoch). Softmax scores are averaged over a video's views, the per-video scores
of all ranks are gathered, and top-1 / top-5 / per-class accuracy and the confusion matrix are computed from
them. Multi-label data (Charades) takes sigmoid scores, merged by their maximum over a video's views, and
reports mean average precision (`engine/average_precision.py`). The shuffled-frames evaluation runs the same views
with the frames of each clip permuted (a fixed permutation per video, seeded by its position): the accuracy it
loses measures how much the model relies on temporal order (the MViT paper's test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from engine.average_precision import merge_views_by_max, multi_label_metrics
from engine.gather import gather_rows
from engine.loaders import check_failures, media_of
from engine.tblog import TrainLogger

from .ap_chart import ap_picture
from .confusion import confusion_picture, picture_tensor


def average_views(probs: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, label: torch.Tensor,
                  by_max: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-view scores [N, K] -> per-video (indices [M] ascending, mean scores [M, K] (the maximum with
    `by_max`), labels [M] or multi-hot [M, K]).

    Rows with `valid` False (padding that keeps ranks in step) are ignored.
    """
    probs, index, label = probs[valid], index[valid], label[valid]
    videos, inverse = torch.unique(index, return_inverse=True)
    labels = label.new_empty((len(videos), *label.shape[1:])).index_copy_(0, inverse, label)  # views share it
    if by_max:
        return videos, merge_views_by_max(probs, inverse, len(videos)), labels
    sums = torch.zeros(len(videos), probs.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, inverse, probs)
    counts = torch.bincount(inverse, minlength=len(videos)).to(probs.dtype)
    return videos, sums / counts[:, None], labels


def shuffle_frames(video: torch.Tensor, index: torch.Tensor, seed: int) -> torch.Tensor:
    """[N, C, T, H, W] -> the same clips with frames permuted; the permutation is a function of (seed, index)
    only, so all views of a video and every run share it."""
    T = video.shape[2]
    orders = [np.random.default_rng([seed, i]).permutation(T) for i in index.tolist()]
    order = torch.as_tensor(np.stack(orders) if orders else np.zeros((0, T), np.int64), device=video.device)
    return video.gather(2, order[:, None, :, None, None].expand_as(video))


@dataclass
class VideoScores:
    """Per-video scores collected over batches (all views of a video lie in one batch): softmax scores averaged
    over the views, or for `multi_label` data sigmoid scores and their maximum over the views."""

    indices: list[torch.Tensor]
    probs: list[torch.Tensor]
    labels: list[torch.Tensor]
    multi_label: bool = False

    @classmethod
    def empty(cls, multi_label: bool = False) -> VideoScores:
        return cls([], [], [], multi_label)

    def add(self, logits: torch.Tensor, batch: dict) -> None:
        device = logits.device
        scores = logits.float().sigmoid() if self.multi_label else logits.float().softmax(-1)
        videos, probs, labels = average_views(scores, batch["index"].to(device), batch["valid"].to(device),
                                              batch["label"].to(device), by_max=self.multi_label)
        self.indices.append(videos)
        self.probs.append(probs)
        self.labels.append(labels)

    def gather(self, accelerator: Accelerator, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' videos, in index order: (scores [V, K], labels [V] or multi-hot [V, K]) on the CPU."""
        device = accelerator.device
        cat = lambda parts, empty: torch.cat(parts) if parts else empty  # noqa: E731
        indices = cat(self.indices, torch.zeros(0, dtype=torch.long, device=device))
        probs = cat(self.probs, torch.zeros(0, num_classes, device=device))
        no_labels = torch.zeros(0, num_classes, device=device) if self.multi_label else torch.zeros(
            0, dtype=torch.long, device=device)
        labels = cat(self.labels, no_labels)
        return gather_rows(accelerator, indices, probs, labels)[1:]


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Scores [V, K] and labels [V] -> top-1 / top-5 (percent), per-class accuracy (percent, None for a class
    without videos) and the confusion matrix [K, K] (rows: true class, columns: prediction). Unlabelled
    videos (label -1) are left out."""
    K = probs.shape[1]
    probs, labels = probs[labels >= 0], labels[labels >= 0]
    topk = probs.topk(min(5, K), dim=1).indices
    hits = topk == labels[:, None]
    confusion = torch.bincount(labels * K + topk[:, 0], minlength=K * K).view(K, K)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1) * 100
    percent = lambda x: float(x.float().mean() * 100) if len(labels) else float("nan")  # noqa: E731
    return {"top1": percent(hits[:, 0]), "top5": percent(hits.any(1)), "num_videos": len(labels),
            "per_class": [float(a) if n else None for a, n in zip(per_class, confusion.sum(1))],
            "confusion": confusion}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator: Accelerator, num_classes: int,
             shuffle_seed: int | None = None) -> dict[str, dict]:
    """Multi-view metrics of `model` over `loader` (engine.loaders.eval_loader): {"plain": ...} and, with a
    `shuffle_seed` and video input, {"shuffled": ...}, each as classification_metrics (multi_label_metrics for
    multi-label shards)."""
    was_training = model.training
    model.eval()
    video, multi_label = loader.shards.media == "video", loader.shards.multi_label
    scores = {"plain": VideoScores.empty(multi_label)}
    if shuffle_seed is not None and video:
        scores["shuffled"] = VideoScores.empty(multi_label)
    for batch in loader:
        x = media_of(batch, loader.sample, accelerator.device)
        with accelerator.autocast():
            scores["plain"].add(model(x), batch)
            if "shuffled" in scores:
                scores["shuffled"].add(model(shuffle_frames(x, batch["index"], shuffle_seed)), batch)
    model.train(was_training)
    check_failures(loader, accelerator, "evaluation")
    metrics = multi_label_metrics if multi_label else classification_metrics
    return {name: metrics(*s.gather(accelerator, num_classes)) for name, s in scores.items()}


def summary(results: dict[str, dict], views: int) -> dict:
    """The metrics.json content: top1, top5, top1_shuffled (percent; None without a shuffled run), the chance
    level (percent: one over the class count), ...; for multi-label results mAP and mAP_shuffled (percent) and
    the number of classes with a positive video, which the mean runs over."""
    shuffled = results.get("shuffled", {})
    if "mAP" in results["plain"]:
        return {"mAP": results["plain"]["mAP"], "mAP_shuffled": shuffled.get("mAP"),
                "classes_scored": results["plain"]["classes_scored"], "num_videos": results["plain"]["num_videos"],
                "views_per_video": views}
    return {"top1": results["plain"]["top1"], "top5": results["plain"]["top5"],
            "top1_shuffled": shuffled.get("top1"), "top5_shuffled": shuffled.get("top5"),
            "chance": 100 / len(results["plain"]["per_class"]),
            "num_videos": results["plain"]["num_videos"], "views_per_video": views}


def class_labels(per_class: list, classes: list[str]) -> list[str]:
    """The names of the classes, or their indices where the data's names do not fit the model's outputs."""
    return classes if len(classes) == len(per_class) else [str(i) for i in range(len(per_class))]


def per_class_table(per_class: list[float | None], classes: list[str], column: str = "top-1 (%)") -> str:
    """Markdown table of a per-class score, worst first (what TensorBoard's text tab renders)."""
    rows = sorted((a, n) for a, n in zip(per_class, class_labels(per_class, classes)) if a is not None)
    return f"| class | {column} |\n|---|---|\n" + "\n".join(f"| {n} | {a:.1f} |" for a, n in rows)


def write_results(results: dict[str, dict], classes: list[str], views: int, logger: TrainLogger,
                  output_dir: str | Path, step: int) -> dict:
    """TensorBoard scalars, the per-class table and picture (the confusion matrix; for multi-label results the
    per-class average precision); metrics.json and the picture's png (main process only: pass `output_dir` None
    elsewhere). Returns the summary."""
    metrics, plain = summary(results, views), results["plain"]
    logger.scalars({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
    multi_label = "mAP" in plain
    key, column = ("per_class_ap", "AP (%)") if multi_label else ("per_class", "top-1 (%)")
    tag = "per_class_ap" if multi_label else "per_class_top1"
    logger.text(f"eval/{tag}", per_class_table(plain[key], classes, column), step)
    if output_dir is not None:
        if multi_label:
            picture, name = ap_picture(plain[key], class_labels(plain[key], classes)), "per_class_ap"
        else:
            picture, name = confusion_picture(plain["confusion"], classes), "confusion_matrix"
        logger.image(f"eval/{name}", picture_tensor(picture), step)
        picture.save(Path(output_dir) / f"{name}.png")
        per_class = dict(zip(classes, plain[key])) if len(classes) == len(plain[key]) else plain[key]
        content = {**metrics, "step": step, tag: per_class}
        (Path(output_dir) / "metrics.json").write_text(json.dumps(content, indent=2))
    return metrics
