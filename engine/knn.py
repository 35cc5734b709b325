"""Weighted k-NN classification of frozen features, and the online monitor that runs it during pretraining.

The DINO protocol (after Wu et al. 2018): features are L2-normalised; each query's k nearest neighbours in
the labelled "train" set, by cosine similarity, vote for their own labels with weight exp(sim / T); the class
with the largest sum of votes wins (k = 20, T = 0.07). No training, so it tracks what the encoder's features
are worth while the MAE loss alone says little about them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from data import ShardSet

from .config import ConfigError, RunConfig
from .gather import gather_rows
from .loaders import check_failures, eval_loader, media_of
from .tblog import TrainLogger


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Vote sums [Q, num_classes] of `queries` [Q, D] among `bank` [N, D] with labels [N] (0..num_classes-1).

    Queries go in chunks so that the [chunk, N] similarity matrix, not [Q, N], bounds the memory."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, len(bank))
    votes = []
    for part in queries.split(chunk):
        similarity, neighbour = (part @ bank.T).topk(k, dim=1)  # [q, k] each
        weight = (similarity / temperature).exp()
        votes.append(torch.zeros(len(part), num_classes, device=part.device)
                     .scatter_add_(1, bank_labels[neighbour], weight))
    return torch.cat(votes) if votes else torch.zeros(0, num_classes, device=queries.device)


def topk_percent(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows of `scores` [Q, K] whose `labels` [Q] is among their k highest."""
    if len(labels) == 0:
        return float("nan")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean() * 100)


@torch.no_grad()
def extract_features(model: nn.Module, loader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(`model.forward_features` [N, D], labels [N]) of every sample of a one-view, non-shuffled `loader`
    (engine.loaders.eval_loader), gathered from all ranks in sample order, on the CPU. Samples that fail to
    decode are left out (too many stop every rank: engine.loaders.check_failures). The model is used as it
    is: put it in eval mode first."""
    index, rows, labels = [], [], []
    for batch in loader:
        valid = batch["valid"].to(accelerator.device)  # False: padding, or a stand-in for a failed sample
        with accelerator.autocast():
            rows.append(model.forward_features(media_of(batch, loader.sample, accelerator.device)).float()[valid])
        index.append(batch["index"].to(accelerator.device)[valid])
        labels.append(batch["label"].to(accelerator.device)[valid])
    check_failures(loader, accelerator, "k-NN features")
    return gather_rows(accelerator, torch.cat(index), torch.cat(rows), torch.cat(labels))[1:]


class KnnMonitor:
    """Pretraining's online k-NN: at step 0, every `eval.knn.every` steps and the last step (the task decides
    when), the MAE's `forward_features` (the encoder's pooled last stage) of the `eval.knn.train` and
    `eval.knn.val` samples (one centre view each; eval mode, no grad, no mask), from all ranks, classify the val
    samples. Every rank computes the same top-1 / top-5, which go to TensorBoard (`knn/top1`, `knn/top5`,
    `perf/knn_seconds`) and `output_dir/metrics.json` (with the whole curve). Under FSDP the trainer registers
    `forward_features` as a forward method."""

    def __init__(self, cfg: RunConfig, input_size: tuple[int, ...]):
        knn = cfg.eval.knn
        self.cfg, self.input_size = cfg, input_size
        self.sets = {}
        for role in ("train", "val"):
            path = getattr(knn, role)
            try:
                shards = ShardSet.load(path)
            except (OSError, ValueError) as err:
                raise ConfigError(f"eval.knn.{role}={path}: not a shard directory ({err})") from err
            if not shards.classes:
                raise ConfigError(f"eval.knn.{role}={path}: its info.json names no classes; the k-NN monitor "
                                  f"needs labelled shards")
            self.sets[role] = shards.head(knn.max_samples)
        if self.sets["train"].classes != self.sets["val"].classes:
            raise ConfigError("eval.knn.train and eval.knn.val have different classes: make both shard sets from "
                              "one class list")
        self.num_classes = len(self.sets["train"].classes)

    def due(self, step: int) -> bool:
        return step % self.cfg.eval.knn.every == 0

    def __call__(self, model: nn.Module, accelerator: Accelerator, logger: TrainLogger,
                 step: int) -> dict[str, float]:
        """Measure (all ranks at once); returns {"knn_top1", "knn_top5"} in percent."""
        began = time.perf_counter()
        was_training = model.training
        model.eval()
        found = {}
        for role, shards in self.sets.items():
            loader = eval_loader(self.cfg, accelerator.process_index, accelerator.num_processes, self.input_size,
                                 shards=shards, views=(1, 1))
            found[role] = extract_features(model, loader, accelerator)
        model.train(was_training)
        (bank, bank_labels), (queries, labels) = found["train"], found["val"]
        knn, device = self.cfg.eval.knn, accelerator.device
        bank, bank_labels = bank[bank_labels >= 0], bank_labels[bank_labels >= 0]
        queries, labels = queries[labels >= 0], labels[labels >= 0]
        scores = knn_scores(bank.to(device), bank_labels.to(device), queries.to(device), self.num_classes,
                            knn.k, knn.temperature).cpu()
        result = {"knn_top1": topk_percent(scores, labels, 1), "knn_top5": topk_percent(scores, labels, 5)}
        seconds = time.perf_counter() - began
        logger.scalars({"knn/top1": result["knn_top1"], "knn/top5": result["knn_top5"],
                        "perf/knn_seconds": seconds}, step)
        if accelerator.is_main_process:
            self._write(step, result, seconds, len(bank), len(queries))
        return result

    def _write(self, step: int, result: dict[str, float], seconds: float, neighbours: int, queries: int) -> None:
        """metrics.json: the latest measurement and the curve; a resumed run drops what the interrupted one
        measured after its checkpoint, as TensorBoard does."""
        path = Path(self.cfg.output_dir) / "metrics.json"
        history = json.loads(path.read_text()).get("knn_history", []) if path.is_file() else []
        entry = {"step": step, "top1": result["knn_top1"], "top5": result["knn_top5"], "seconds": round(seconds, 3)}
        history = [h for h in history if h["step"] < step] + [entry]
        content = {**result, "step": step, "knn_neighbours": neighbours, "knn_queries": queries,
                   "knn_k": self.cfg.eval.knn.k, "knn_temperature": self.cfg.eval.knn.temperature,
                   "knn_chance": 100 / self.num_classes, "knn_history": history}
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps(content, indent=2))
        temp.replace(path)
