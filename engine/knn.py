"""Weighted k-NN classification of frozen features, and the online monitor that runs it during pretraining.

The DINO protocol (after Wu et al. 2018): features are L2-normalised; each query's k nearest neighbours in
the labelled "train" set, by cosine similarity, vote for their own labels with weight exp(sim / T); the class
with the largest sum of votes wins (k = 20, T = 0.07). No training, so it tracks what the encoder's features
are worth while the MAE loss alone says little about them. Multi-label sets (multi-hot labels) score each class
by the neighbours' weighted share that carries it, and are judged by mean average precision.

Across ranks the bank stays sharded: every rank finds each query's nearest neighbours in its own shard, and the
query's rank merges the candidates (`sharded_neighbours`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn

from data import SampleConfig, ShardSet

from .average_precision import multi_label_metrics
from .config import ConfigError, RunConfig
from .gather import gather_on_main, gather_rows, row_counts
from .loaders import RepeatedEvalPass, check_failures, media_of
from .tblog import TrainLogger


def neighbours(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
               chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, N) rows of `bank` [N, D] most similar (cosine; rows L2-normalised) to each of `queries` [Q, D],
    most similar first: (similarity [Q, k'], their labels [Q, k'], or [Q, k', K] where `bank_labels` are
    multi-hot rows [N, K]). Queries go in chunks so that the [chunk, N] similarity matrix, not [Q, N], bounds
    the memory."""
    k = min(k, len(bank))
    similarity, labels = [], []
    for part in queries.split(chunk):
        top, row = (part @ bank.T).topk(k, dim=1)  # [q, k] each
        similarity.append(top)
        labels.append(bank_labels[row])
    if not similarity:
        return queries.new_zeros(0, k), bank_labels.new_zeros(0, k, *bank_labels.shape[1:])
    return torch.cat(similarity), torch.cat(labels)


def merge_neighbours(similarity: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of each query from several bank shards, side by side (similarity [Q, M], labels [Q, M] or
    [Q, M, K]) -> the k most similar, as `neighbours` of the whole bank gives them (up to ties)."""
    similarity, pick = similarity.topk(min(k, similarity.shape[1]), dim=1)
    return similarity, torch.take_along_dim(labels, pick if labels.dim() == 2 else pick[..., None], dim=1)


def vote(similarity: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Each query's scores [Q, num_classes] from its neighbours (`neighbours`): with class ids [Q, k], the sums of
    the weights exp(sim / T) per class; with multi-hot rows [Q, k, K], the share of the weights whose neighbour
    carries the class (a class score comparable across queries, as average precision ranks them)."""
    if labels.dim() == 3:
        weight = ((similarity - similarity[:, :1]) / temperature).exp()  # the first is the largest: no overflow
        return (weight[..., None] * labels.float()).sum(1) / weight.sum(1, keepdim=True).clamp_min(1e-30)
    weight = (similarity / temperature).exp()
    return torch.zeros(len(labels), num_classes, device=labels.device).scatter_add_(1, labels, weight)


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Scores [Q, num_classes] (`vote`) of `queries` [Q, D] among `bank` [N, D] with class ids [N]
    (0..num_classes-1) or multi-hot rows [N, num_classes]; features need not be normalised."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    return vote(*neighbours(bank, bank_labels, queries, k, chunk), num_classes, temperature)


def sharded_neighbours(accelerator: Accelerator, bank: torch.Tensor, bank_labels: torch.Tensor,
                       queries: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`neighbours` of this rank's `queries` [q_r, D] among the bank rows of all ranks, each rank holding its shard
    (`bank` [n_r, D], `bank_labels`; rows L2-normalised, on the accelerator's device). Every rank scores all
    queries against its shard only, then sends each query's k best to the query's rank, which merges them: per
    rank, the queries [Q, D] and the candidates of its own queries [R x q_r, k] travel, and similarities cost
    Q x n_r; nothing grows with the number of ranks but the k-per-rank candidates of the merge."""
    if accelerator.num_processes == 1:
        return neighbours(bank, bank_labels, queries, k, chunk)
    counts = row_counts(accelerator, queries)
    k = min(k, int(accelerator.reduce(torch.tensor(len(bank), device=bank.device), reduction="sum")))
    padded, longest = accelerator.gather(accelerator.pad_across_processes(queries)), max(counts)
    every_query = torch.cat([padded[r * longest: r * longest + n] for r, n in enumerate(counts)])
    similarity, labels = neighbours(bank, bank_labels, every_query, k, chunk)
    missing = k - similarity.shape[1]  # a shard of fewer than k rows: candidates that never win
    similarity = F.pad(similarity, (0, missing), value=-torch.inf)
    labels = torch.cat([labels, labels.new_zeros(len(labels), missing, *labels.shape[2:])], dim=1)
    multi_hot = labels.dim() == 3
    if multi_hot:
        labels = labels.to(torch.uint8)  # 0 / 1: a quarter of float32's bytes on the wire
    ranks, mine = len(counts), len(queries)
    received = []
    for sent in (similarity, labels):
        into = sent.new_empty(ranks * mine, *sent.shape[1:])
        dist.all_to_all_single(into, sent.contiguous(), [mine] * ranks, counts)
        # [ranks x mine, k, ...] in source-rank order -> [mine, ranks x k, ...]: each query's candidates in a row
        received.append(into.view(ranks, mine, *sent.shape[1:]).transpose(0, 1).reshape(mine, ranks * k,
                                                                                           *sent.shape[2:]))
    similarity, labels = merge_neighbours(*received, k)
    return similarity, labels.float() if multi_hot else labels


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Rows of `scores` [Q, K] with a true class among their k highest: `labels` class ids [Q] or multi-hot [Q, K]."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hit = labels.gather(1, top) > 0.5 if labels.dim() == 2 else top == labels[:, None]
    return int(hit.any(1).sum())


def topk_percent(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percent of rows of `scores` [Q, K] with a true class among their k highest (`topk_hits`)."""
    return topk_hits(scores, labels, k) * 100 / len(labels) if len(labels) else float("nan")


@torch.no_grad()
def local_features(model: nn.Module, batches: Iterable[dict], sample: SampleConfig,
                   accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index [n], `model.forward_features` float32 [n, D], labels [n] or multi-hot [n, K]) of the decoded samples
    of this rank's `batches` (one view each, cut as `sample` says), on the accelerator's device, under the run's
    autocast (bf16 where it trains in bf16). Stand-ins for failed samples and padding are left out. The model is
    used as it is: put it in eval mode first."""
    index, rows, labels = [], [], []
    device = accelerator.device
    for batch in batches:
        valid = batch["valid"].to(device)  # False: padding, or a stand-in for a failed sample
        with accelerator.autocast():
            rows.append(model.forward_features(media_of(batch, sample, device)).float()[valid])
        index.append(batch["index"].to(device)[valid])
        labels.append(batch["label"].to(device)[valid])
    return torch.cat(index), torch.cat(rows), torch.cat(labels)


def extract_features(model: nn.Module, loader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(`model.forward_features` [N, D], labels [N]) of every sample of a one-view, non-shuffled `loader`
    (engine.loaders.eval_loader), gathered from all ranks in sample order, on the CPU (`local_features`).
    Samples that fail to decode are left out (too many stop every rank: engine.loaders.check_failures)."""
    found = local_features(model, loader, loader.sample, accelerator)
    check_failures(loader, accelerator, "features")
    return gather_rows(accelerator, *found)[1:]


class KnnMonitor:
    """Pretraining's online k-NN: at step 0, every `eval.knn.every` steps and the last step (the task decides
    when), the MAE's `forward_features` (the encoder's pooled last stage) of the `eval.knn.train` and
    `eval.knn.val` samples (one centre view each; eval mode, no grad, no mask) classify the val samples. Each
    rank keeps its share of both sets: decoded views in memory between measurements (`eval.knn.keep_views_gb`),
    features in a bank shard (`sharded_neighbours`). Top-1 / top-5 (multi-label: a true class among the k
    highest scored, and mAP) go to TensorBoard (`knn/top1`, `knn/top5`, `knn/mAP`, `perf/knn_seconds`) and
    `output_dir/metrics.json` (with the whole curve), written by the main process; every rank returns the same
    few numbers. Under FSDP the trainer registers `forward_features` as a forward method."""

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
        if self.sets["train"].multi_label != self.sets["val"].multi_label:
            raise ConfigError(f"eval.knn.train={knn.train} and eval.knn.val={knn.val}: one has multi-label samples, "
                              f"the other one class per sample; make both with the same labels")
        self.num_classes = len(self.sets["train"].classes)
        self.multi_label = self.sets["train"].multi_label
        self.passes: dict[str, RepeatedEvalPass] = {}  # made at the first measurement, on the run's ranks

    def due(self, step: int) -> bool:
        return step % self.cfg.eval.knn.every == 0

    def __call__(self, model: nn.Module, accelerator: Accelerator, logger: TrainLogger,
                 step: int) -> dict[str, float]:
        """Measure (all ranks at once); returns {"knn_top1", "knn_top5"} (and "knn_mAP" for multi-label) in
        percent."""
        began = time.perf_counter()
        was_training = model.training
        model.eval()
        if not self.passes:
            self._start_passes(accelerator)
        found = {role: self._features(role, model, accelerator) for role in self.sets}
        model.train(was_training)
        (bank, bank_labels), (queries, labels) = found["train"], found["val"]
        knn = self.cfg.eval.knn
        similarity, neighbour_labels = sharded_neighbours(accelerator, F.normalize(bank, dim=1), bank_labels,
                                                          F.normalize(queries, dim=1), knn.k)
        scores = vote(similarity, neighbour_labels, self.num_classes, knn.temperature)
        totals = accelerator.reduce(torch.tensor([topk_hits(scores, labels, 1), topk_hits(scores, labels, 5),
                                                  len(labels), len(bank)], device=accelerator.device),
                                    reduction="sum").tolist()
        hits1, hits5, num_queries, num_bank = totals
        result = {"knn_top1": hits1 * 100 / num_queries if num_queries else float("nan"),
                  "knn_top5": hits5 * 100 / num_queries if num_queries else float("nan")}
        if self.multi_label:
            result["knn_mAP"] = self._mean_ap(accelerator, scores, labels)
        seconds = time.perf_counter() - began
        logger.scalars({f"knn/{name.removeprefix('knn_')}": value for name, value in result.items()}
                       | {"perf/knn_seconds": seconds}, step)
        if accelerator.is_main_process:
            self._write(step, result, seconds, num_bank, num_queries)
        return result

    def _start_passes(self, accelerator: Accelerator) -> None:
        """This rank's share of each set; `eval.knn.keep_views_gb` keeps the bank's decoded views if they fit,
        then the queries' if they fit in what is left."""
        budget = self.cfg.eval.knn.keep_views_gb * 2**30
        for role, shards in self.sets.items():
            self.passes[role] = RepeatedEvalPass(self.cfg, accelerator.process_index, accelerator.num_processes,
                                                 self.input_size, shards, budget, f"k-NN features (eval.knn.{role})")
            budget -= self.passes[role].kept_bytes

    def _features(self, role: str, model: nn.Module, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (features [n, D], labels) of one set's labelled samples."""
        passes = self.passes[role]
        _, rows, labels = local_features(model, passes.batches(accelerator), passes.sample, accelerator)
        if self.multi_label:
            return rows, labels
        labelled = labels >= 0  # -1: a sample without a label (as Kinetics test lists have)
        return rows[labelled], labels[labelled]

    def _mean_ap(self, accelerator: Accelerator, scores: torch.Tensor, labels: torch.Tensor) -> float:
        """mAP (percent) over the classes with a positive query (SlowFast's `get_map`), computed by the main
        process from the scores of all ranks; every rank returns it."""
        gathered = gather_on_main(accelerator, scores, labels)
        value = multi_label_metrics(*gathered)["mAP"] if gathered else 0.0
        return float(broadcast(torch.tensor([value], device=accelerator.device, dtype=torch.float64))[0])

    def _write(self, step: int, result: dict[str, float], seconds: float, neighbours: int, queries: int) -> None:
        """metrics.json: the latest measurement and the curve; a resumed run drops what the interrupted one
        measured after its checkpoint, as TensorBoard does."""
        path = Path(self.cfg.output_dir) / "metrics.json"
        history = json.loads(path.read_text()).get("knn_history", []) if path.is_file() else []
        entry = {"step": step, "top1": result["knn_top1"], "top5": result["knn_top5"],
                 **({"mAP": result["knn_mAP"]} if "knn_mAP" in result else {}), "seconds": round(seconds, 3)}
        history = [h for h in history if h["step"] < step] + [entry]
        content = {**result, "step": step, "knn_neighbours": neighbours, "knn_queries": queries,
                   "knn_k": self.cfg.eval.knn.k, "knn_temperature": self.cfg.eval.knn.temperature,
                   "knn_chance": None if self.multi_label else 100 / self.num_classes, "knn_history": history}
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps(content, indent=2))
        temp.replace(path)
