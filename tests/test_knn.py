"""The online k-NN monitor: its classifier against a brute-force one written here, and the pretraining app
with it, in one and in two real gloo processes, read back from metrics.json and the event files."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from launch import cpu_launch, run, write_demo_shards
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import ShardSet
from engine.config import load_config
from engine.knn import knn_scores, topk_percent
from engine.loaders import eval_loader, media_of
from models import create_model

DEMO = "configs/pretrain/demo.yaml"


def brute_force_votes(bank: list, bank_labels: list, queries: list, num_classes: int, k: int, t: float) -> list:
    """Per query: cosine similarity to every bank row, the k most similar vote exp(sim / t) for their label."""
    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    votes = []
    for query in queries:
        ranked = sorted(((cosine(query, row), label) for row, label in zip(bank, bank_labels)), reverse=True)
        tally = [0.0] * num_classes
        for similarity, label in ranked[:k]:
            tally[label] += math.exp(similarity / t)
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
