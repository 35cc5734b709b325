"""Multi-view evaluation of a classifier: the way the papers report video accuracy.

Each validation video comes as S spatial x T temporal views (adjacent rows of one batch, sharing `index`,
the video's position in the epoch). Softmax scores are averaged over a video's views, the per-video scores
of all ranks are gathered, and top-1 / top-5 / per-class accuracy and the confusion matrix are computed from
them. The shuffled-frames evaluation runs the same views with the frames of each clip permuted (a fixed
permutation per video, seeded by its position): the accuracy it loses measures how much the model relies on
temporal order (the MViT paper's test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from engine.gather import gather_rows
from engine.loaders import check_failures, media_of
from engine.tblog import TrainLogger

from .confusion import confusion_picture, picture_tensor


def average_views(probs: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                  label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-view scores [N, K] -> per-video (indices [M] ascending, mean scores [M, K], labels [M]).

    Rows with `valid` False (padding that keeps ranks in step) are ignored.
    """
    probs, index, label = probs[valid], index[valid], label[valid]
    videos, inverse = torch.unique(index, return_inverse=True)
    sums = torch.zeros(len(videos), probs.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, inverse, probs)
    counts = torch.bincount(inverse, minlength=len(videos)).to(probs.dtype)
    labels = torch.empty_like(videos).scatter_(0, inverse, label)  # the views of a video share its label
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
    """Per-video scores collected over batches (all views of a video lie in one batch)."""

    indices: list[torch.Tensor]
    probs: list[torch.Tensor]
    labels: list[torch.Tensor]

    @classmethod
    def empty(cls) -> VideoScores:
        return cls([], [], [])

    def add(self, logits: torch.Tensor, batch: dict) -> None:
        device = logits.device
        videos, probs, labels = average_views(logits.float().softmax(-1), batch["index"].to(device),
                                              batch["valid"].to(device), batch["label"].to(device))
        self.indices.append(videos)
        self.probs.append(probs)
        self.labels.append(labels)

    def gather(self, accelerator: Accelerator, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' videos, in index order: (scores [V, K], labels [V]) on the CPU."""
        device = accelerator.device
        cat = lambda parts, empty: torch.cat(parts) if parts else empty  # noqa: E731
        indices = cat(self.indices, torch.zeros(0, dtype=torch.long, device=device))
        probs = cat(self.probs, torch.zeros(0, num_classes, device=device))
        labels = cat(self.labels, torch.zeros(0, dtype=torch.long, device=device))
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
    `shuffle_seed` and video input, {"shuffled": ...}, each as classification_metrics."""
    was_training = model.training
    model.eval()
    video = loader.shards.media == "video"
    scores = {"plain": VideoScores.empty()}
    if shuffle_seed is not None and video:
        scores["shuffled"] = VideoScores.empty()
    for batch in loader:
        x = media_of(batch, loader.sample, accelerator.device)
        with accelerator.autocast():
            scores["plain"].add(model(x), batch)
            if "shuffled" in scores:
                scores["shuffled"].add(model(shuffle_frames(x, batch["index"], shuffle_seed)), batch)
    model.train(was_training)
    check_failures(loader, accelerator, "evaluation")
    return {name: classification_metrics(*s.gather(accelerator, num_classes)) for name, s in scores.items()}


def summary(results: dict[str, dict], views: int) -> dict:
    """The metrics.json content: top1, top5, top1_shuffled (percent; None without a shuffled run), the chance
    level (percent: one over the class count), ..."""
    shuffled = results.get("shuffled", {})
    return {"top1": results["plain"]["top1"], "top5": results["plain"]["top5"],
            "top1_shuffled": shuffled.get("top1"), "top5_shuffled": shuffled.get("top5"),
            "chance": 100 / len(results["plain"]["per_class"]),
            "num_videos": results["plain"]["num_videos"], "views_per_video": views}


def per_class_table(per_class: list[float | None], classes: list[str]) -> str:
    """Markdown table of per-class accuracy, worst first (what TensorBoard's text tab renders)."""
    names = classes if len(classes) == len(per_class) else [str(i) for i in range(len(per_class))]
    rows = sorted((a, n) for a, n in zip(per_class, names) if a is not None)
    return "| class | top-1 (%) |\n|---|---|\n" + "\n".join(f"| {n} | {a:.1f} |" for a, n in rows)


def write_results(results: dict[str, dict], classes: list[str], views: int, logger: TrainLogger,
                  output_dir: str | Path, step: int) -> dict:
    """TensorBoard scalars, the confusion matrix picture and the per-class table; metrics.json and
    confusion_matrix.png (main process only: pass `output_dir` None elsewhere). Returns the summary."""
    metrics = summary(results, views)
    logger.scalars({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
    logger.text("eval/per_class_top1", per_class_table(results["plain"]["per_class"], classes), step)
    if output_dir is not None:
        picture = confusion_picture(results["plain"]["confusion"], classes)
        logger.image("eval/confusion_matrix", picture_tensor(picture), step)
        picture.save(Path(output_dir) / "confusion_matrix.png")
        names = classes if len(classes) == len(results["plain"]["per_class"]) else None
        per_class = dict(zip(names, results["plain"]["per_class"])) if names else results["plain"]["per_class"]
        content = {**metrics, "step": step, "per_class_top1": per_class}
        (Path(output_dir) / "metrics.json").write_text(json.dumps(content, indent=2))
    return metrics
