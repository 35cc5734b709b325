"""The online k-NN monitor: its classifier against a brute-force one written here, the merge of sharded banks
(in one process, and over two real gloo processes), multi-label sets, and the pretraining app with it, in one and
in two real gloo processes, read back from metrics.json and the event files."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from dist_knn_shards import CASES, NUM_CLASSES, TEMPERATURE, fixed_case
from launch import cpu_launch, labelled_images, run, two_gloo_processes, write_demo_shards
from PIL import Image
from sklearn.metrics import average_precision_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import ShardSet
from engine.config import ConfigError, load_config
from engine.knn import KnnMonitor, knn_scores, merge_neighbours, neighbours, topk_percent, vote
from engine.loaders import eval_loader, media_of
from engine.tblog import TrainLogger
from models import create_model
from pretrain.knn_curve import MAP
from pretrain.main import report_knn

DEMO = "configs/pretrain/demo.yaml"


def brute_force_votes(bank: list, bank_labels: list, queries: list, num_classes: int, k: int, t: float) -> list:
    """Per query: cosine similarity to every bank row, the k most similar vote exp(sim / t) for their label. A
    multi-hot label (a list) votes for each of its classes, and a query's tallies are then divided by its sum
    of weights."""
    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    votes = []
    for query in queries:
        ranked = sorted(((cosine(query, row), i) for i, row in enumerate(bank)), reverse=True)[:k]
        tally = [0.0] * num_classes
        for similarity, i in ranked:
            classes = [c for c, y in enumerate(bank_labels[i]) if y] if isinstance(bank_labels[i], list) \
                else [bank_labels[i]]
            for c in classes:
                tally[c] += math.exp(similarity / t)
        if isinstance(bank_labels[0], list):
            total = sum(math.exp(similarity / t) for similarity, _ in ranked)
            tally = [v / total for v in tally]
        votes.append(tally)
    return votes


@pytest.mark.parametrize("k, temperature", [(20, 0.07), (3, 0.5), (100, 0.07)])
def test_knn_matches_brute_force(k, temperature):
    generator = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(50, 6, generator=generator), torch.randn(30, 6, generator=generator)
    bank_labels = torch.randint(0, 5, (50,), generator=generator)
    labels = torch.randint(0, 5, (30,), generator=generator)
    scores = knn_scores(bank, bank_labels, queries, 5, k=k, temperature=temperature, chunk=7)
    expected = torch.tensor(brute_force_votes(bank.tolist(), bank_labels.tolist(), queries.tolist(), 5, k, temperature))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=0)
    hits1 = sum(row.index(max(row)) == y for row, y in zip(expected.tolist(), labels.tolist()))
    assert topk_percent(scores, labels, 1) == pytest.approx(100 * hits1 / 30)
    assert topk_percent(scores, labels, 5) == 100.0  # 5 classes


def test_multi_hot_votes_are_each_class_share_of_the_weights():
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(30, 6, generator=generator), torch.randn(12, 6, generator=generator)
    bank_labels = (torch.rand(30, 4, generator=generator) < 0.4).float()
    scores = knn_scores(bank, bank_labels, queries, 4, k=7, temperature=0.1, chunk=5)
    expected = brute_force_votes(bank.tolist(), bank_labels.int().tolist(), queries.tolist(), 4, 7, 0.1)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    labels = torch.tensor([[1.0, 0, 0, 0], [0, 1, 1, 0]])  # top-1 of a multi-label query: any true class
    assert topk_percent(torch.tensor([[0.9, 0.5, 0, 0], [0.9, 0.5, 0, 0]]), labels, 1) == 50.0
    assert topk_percent(torch.tensor([[0.9, 0.5, 0, 0], [0.9, 0.5, 0, 0]]), labels, 2) == 100.0


@pytest.mark.parametrize("multi_hot", [False, True])
def test_merged_top_k_of_bank_shards_gives_the_whole_banks_scores(multi_hot):
    """Shards of 17, 3 (fewer than k), 0 and 20 rows: each one's own k nearest of every query, side by side,
    merged, vote as the k nearest of the whole bank do."""
    generator = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(40, 8, generator=generator), torch.randn(25, 8, generator=generator)
    bank_labels = ((torch.rand(40, 5, generator=generator) < 0.4).float() if multi_hot
                   else torch.randint(0, 5, (40,), generator=generator))
    expected = knn_scores(bank, bank_labels, queries, 5, k=10, temperature=0.1)
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    parts = [neighbours(bank[a:b], bank_labels[a:b], queries, k=10, chunk=4) for a, b in
             ((0, 17), (17, 20), (20, 20), (20, 40))]
    similarity, labels = merge_neighbours(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 10)
    scores = vote(similarity, labels, 5, 0.1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(scores.argmax(1), expected.argmax(1))


def test_two_ranks_with_a_sharded_bank_score_their_queries_as_one_process_does(tmp_path):
    """Two gloo processes, each with part of the bank and part of the queries (uneven; a bank shard smaller than
    k; a rank without queries; multi-hot labels): the scores of rank 0's queries then rank 1's are one process's
    `knn_scores` of the whole bank, so top-1 is the same; only the main process holds the gathered scores."""
    result = two_gloo_processes("tests/dist_knn_shards.py", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for seed, (name, bank_counts, query_counts, k, multi_hot) in enumerate(CASES):
        case = fixed_case(sum(bank_counts), sum(query_counts), multi_hot, seed)
        expected = knn_scores(case["bank"], case["bank_labels"], case["queries"], NUM_CLASSES, k, TEMPERATURE)
        got = torch.cat([ranks[r][name]["scores"] for r in range(2)])
        assert [len(ranks[r][name]["scores"]) for r in range(2)] == list(query_counts), name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(got.argmax(1), expected.argmax(1)), name
        on_main_scores, on_main_labels = ranks[0][name]["on_main"]
        assert torch.equal(on_main_scores, got) and torch.equal(on_main_labels, case["labels"]), name
        assert ranks[1][name]["on_main"] is None, name


class PixelFeatures(torch.nn.Module):
    """A stand-in encoder: every 4th pixel of the view, as its feature; it notes the autocast it runs under."""

    def __init__(self):
        super().__init__()
        self.autocast = set()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return x[:, :, ::4, ::4].flatten(1)


@pytest.fixture
def bf16_accelerator():
    """One process training in bf16 (accelerate's state is global: reset around the test)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_monitor_scores_multi_label_sets_by_map_under_the_runs_precision(tmp_path, bf16_accelerator, capsys):
    """Multi-label k-NN sets (whatever data.multi_label says: the monitor follows its own sets): top-1 / top-5
    count a query whose k highest classes hold one of its own, mAP is sklearn's over the classes with a positive
    query, from brute-force scores. The features run under the run's bf16 autocast. The second measurement
    replays the views kept in memory (no loader left); with keep_views_gb=0 it decodes again; all agree. The
    printed summary and the curve show mAP."""
    train, val = labelled_images(tmp_path / "train", 30, 0), labelled_images(tmp_path / "val", 13, 1)
    logger, results = TrainLogger(tmp_path / "tb", enabled=False), {}
    for keep, workers in ((2.0, 1), (0.0, 0)):
        cfg = load_config([], [f"eval.knn.train={train}", f"eval.knn.val={val}", "data.crop_size=32",
                               "eval.batch_size=4", f"data.num_workers={workers}", "eval.knn.k=5",
                               f"eval.knn.keep_views_gb={keep}", f"output_dir={tmp_path / str(keep)}"])
        (tmp_path / str(keep)).mkdir()
        monitor, model = KnnMonitor(cfg, (32, 32)), PixelFeatures()
        results[keep] = [monitor(model, bf16_accelerator, logger, step) for step in (0, 1)]
        assert (monitor.passes["train"].loader is None) == (monitor.passes["val"].loader is None) == (keep > 0)
        assert model.autocast == {(True, torch.bfloat16)}
    assert results[2.0][0] == results[2.0][1] == results[0.0][0] == results[0.0][1]

    found = {}
    for role, shards in (("train", train), ("val", val)):
        loader = eval_loader(cfg, 0, 1, (32, 32), shards=ShardSet.load(shards), views=(1, 1),
                             labels_follow_config=False)
        batches = list(loader)
        found[role] = (torch.cat([PixelFeatures().forward_features(media_of(b, loader.sample)) for b in batches]),
                       torch.cat([b["label"] for b in batches]))
    scores = torch.tensor(brute_force_votes(found["train"][0].tolist(), found["train"][1].int().tolist(),
                                            found["val"][0].tolist(), 4, 5, 0.07))
    targets = found["val"][1].numpy() > 0.5
    expected_map = 100 * np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(4)
                                  if targets[:, c].any()])
    # 4 classes: top-5 is top-4
    hits = [sum(targets[q, scores[q].topk(k).indices].any() for q in range(13)) * 100 / 13 for k in (1, 4)]
    measured = results[2.0][0]
    assert measured["knn_mAP"] == pytest.approx(expected_map, abs=1e-4)
    assert [measured["knn_top1"], measured["knn_top5"]] == pytest.approx(hits)
    metrics = json.loads((tmp_path / "2.0" / "metrics.json").read_text())
    assert [h["mAP"] for h in metrics["knn_history"]] == [measured["knn_mAP"]] * 2 and metrics["knn_chance"] is None
    report_knn(tmp_path / "2.0")  # what pretrain/main.py prints at the end, and the curve with its mAP line
    assert f"k-NN mAP: {measured['knn_mAP']:.1f}% at step 0 (the random initialisation)" in capsys.readouterr().out
    assert MAP in Image.open(tmp_path / "2.0" / "knn_curve.png").getdata()


def test_monitor_refuses_a_multi_label_bank_with_single_label_queries(tmp_path):
    train, val = labelled_images(tmp_path / "train", 8, 0), labelled_images(tmp_path / "val", 8, 1, multi_label=False)
    cfg = load_config([], [f"eval.knn.train={train}", f"eval.knn.val={val}", "data.crop_size=32"])
    with pytest.raises(ConfigError, match="one has multi-label samples, the other one class per sample"):
        KnnMonitor(cfg, (32, 32))


def pretrain(shards: dict, out: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    launch, env = cpu_launch(processes)
    # With two processes, a script that also keeps what every rank's fit returned; else the app itself.
    script = "tests/dist_knn.py" if processes > 1 else "pretrain/main.py"
    command = [*launch, script, "--config", DEMO, f"data.train={shards['train']}", f"output_dir={out}",
               "data.num_workers=0", "log.progress=false", "log.visualize_every=0", "train.batch_size=8",
               f"eval.knn.train={shards['train']}", f"eval.knn.val={shards['val']}", "eval.batch_size=3", *overrides]
    return run(command, env=env)


def test_monitor_is_the_same_on_one_and_two_ranks_and_matches_brute_force(demo_shards, tmp_path):
    knn = ["train.max_steps=2", "eval.knn.every=2", "eval.knn.max_samples=13", "eval.knn.k=5"]
    runs, printed = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"ranks{processes}"
        result = pretrain(demo_shards, out, processes, *knn)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes], printed[processes] = json.loads((out / "metrics.json").read_text()), result.stdout
    fits = [json.loads((tmp_path / "ranks2" / f"fit-rank{r}.json").read_text()) for r in range(2)]
    assert fits[0]["knn_top1"] == fits[1]["knn_top1"] == runs[2]["knn_top1"]  # every rank, the same answer
    one, two = runs[1]["knn_history"], runs[2]["knn_history"]
    # The app prints the first and the last measurement and draws the curve.
    assert f"k-NN top-1: {one[0]['top1']:.1f}% at step 0 (the random initialisation), {one[1]['top1']:.1f}% at " \
           f"step 2; curve: {tmp_path / 'ranks1' / 'knn_curve.png'}" in printed[1]
    assert Image.open(tmp_path / "ranks1" / "knn_curve.png").format == "PNG"
    assert [h["step"] for h in one] == [h["step"] for h in two] == [0, 2]
    # Step 0 is the random initialisation: the same weights, whatever the process count (13 samples: one
    # rank gets a padding row, which must not count).
    assert one[0]["top1"] == two[0]["top1"] and one[0]["top5"] == two[0]["top5"]
    assert runs[1]["knn_neighbours"] == runs[2]["knn_neighbours"] == runs[2]["knn_queries"] == 13

    # The same measurement done here: the initial encoder, eval mode, one centre view, brute-force k-NN.
    cfg = load_config([DEMO], [f"eval.knn.train={demo_shards['train']}"])
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, **cfg.model.overrides()).eval()
    found = {}
    for role in ("train", "val"):
        loader = eval_loader(cfg, 0, 1, (8, 64, 64), shards=ShardSet.load(demo_shards[role]).head(13),
                             views=(1, 1))
        rows, labels = [], []
        with torch.no_grad():
            for batch in loader:
                rows += model.encoder.forward_features(media_of(batch, loader.sample)).tolist()
                labels += batch["label"].tolist()
        found[role] = rows, labels
    votes = brute_force_votes(*found["train"], found["val"][0], 4, k=5, t=0.07)
    hits = sum(row.index(max(row)) == y for row, y in zip(votes, found["val"][1]))
    assert one[0]["top1"] == pytest.approx(100 * hits / 13)

    events = EventAccumulator(str(tmp_path / "ranks2" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("knn/top1")] == [(0, pytest.approx(two[0]["top1"])),
                                                                        (2, pytest.approx(two[1]["top1"]))]
    assert len(events.Scalars("knn/top5")) == 2 and all(e.value > 0 for e in events.Scalars("perf/knn_seconds"))


def test_demo_pretraining_beats_the_random_encoder(tmp_path):
    """`make demo`'s pretraining (its data, config and 600 steps; the k-NN measured only at the start and the end,
    no viewer, neither of which changes the training): the pretrained encoder's k-NN top-1 on the demo classes,
    read back from the event files, is well above the random initialisation's (measured: 48.4% -> 84.4%,
    chance 25%)."""
    shards = write_demo_shards(tmp_path / "data", per_class=16, per_shard=16)
    out = tmp_path / "run"
    launch, _ = cpu_launch(1)
    result = run([*launch, "pretrain/main.py", "--config", DEMO, f"data.train={shards['train']}",
                  f"eval.knn.train={shards['train']}", f"eval.knn.val={shards['val']}", "eval.knn.every=600",
                  f"output_dir={out}", "log.progress=false", "log.visualize_every=0"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    (first_step, random_init), (last_step, pretrained) = [(e.step, e.value) for e in events.Scalars("knn/top1")]
    assert (first_step, last_step) == (0, 600)
    assert pretrained >= random_init + 20, (random_init, pretrained)
