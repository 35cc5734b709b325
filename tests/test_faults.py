"""Faults under two gloo ranks, with workers, checkpoints and resume: data that fails on one node, ranks that
see different checkpoints, a changed world size, an output_dir that is not shared, and shared memory.

`${oc.env:LOCAL_RANK}` in a path gives each rank its own copy of the shards (node-local disks), so that one
rank's data can fail while the other's does not."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from launch import run, two_gloo_processes
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.config import ConfigError, load_config
from engine.trainer import Trainer
from pretrain.task import PretrainTask

DEMO = "configs/pretrain/demo.yaml"
PER_RANK = "${oc.env:LOCAL_RANK}"


def node_copies(shards: Path, root: Path) -> str:
    """Two copies of the shard directory, node0 and node1; returns the data.train value that picks its own."""
    for node in (0, 1):
        shutil.copytree(shards, root / f"node{node}")
    return f"data.train={root}/node{PER_RANK}"


def train(out: Path, *args: str, timeout: float = 300):
    return two_gloo_processes("tests/dist_train.py", "--config", DEMO, f"output_dir={out}", "data.num_workers=1",
                              "log.progress=false", "log.visualize_every=0", "train.batch_size=4", "log.every=1",
                              "train.checkpoint_every=2", *args, timeout=timeout)


def final_weights(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / f"final-rank{rank}.safetensors") for rank in (0, 1)]


def test_shards_lost_on_one_node_mid_run(demo_shards, tmp_path):
    """Every sample of rank 1 fails after the resume: its batches are stand-ins with zero loss weight, both
    ranks still step together, and the failures logged are the sum over ranks."""
    data = node_copies(demo_shards["train"], tmp_path)
    out = tmp_path / "run"
    first = train(out, data, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    for shard in (tmp_path / "node1").glob("*.tar"):
        shard.unlink()
    resumed = train(out, data, "train.max_steps=6", "resume=auto", "data.max_fail_fraction=0.6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = final_weights(out)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) and torch.isfinite(ranks[0][k]).all() for k in ranks[0])
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    failed = {e.step: e.value for e in events.Scalars("data/samples_failed")}
    assert failed[2] == 0 and failed[6] == 4 * 2  # rank 1: 4 steps x 2 videos (batch 4, 2 clips each)


def test_one_rank_past_the_failure_limit_stops_every_rank(demo_shards, tmp_path):
    data = node_copies(demo_shards["train"], tmp_path)
    for shard in (tmp_path / "node1").glob("*.tar"):
        shard.write_bytes(b"\0" * 10)
    result = train(tmp_path / "run", data, "train.max_steps=100", "train.batch_size=16",
                   "data.max_fail_fraction=0.3", timeout=180)
    assert result.returncode != 0
    # Checked before every early optimizer step: rank 1's 8 clips of the first step, of 16, already stop it.
    message = ("DataFailureError: before step 1, all 2 ranks: 8 of 16 samples failed to load (more than "
               "data.max_fail_count=5 and data.max_fail_fraction=30% allow)")
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # both ranks, the same step


def test_ranks_agree_on_the_checkpoint_to_resume_and_its_layout(demo_shards, tmp_path):
    """Rank 1 cannot read its own files of the newest checkpoint (a stale listing, a damaged file): both
    ranks fall back to the one before it, instead of resuming at different steps."""
    out = tmp_path / "run"
    first = train(out, f"data.train={demo_shards['train']}", "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "checkpoint-00000004" / "rank1.json").unlink()
    resumed = train(out, f"data.train={demo_shards['train']}", "train.max_steps=6", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank 1: cannot resume from" in resumed.stdout and "rank1.json" in resumed.stdout
    for rank in (0, 1):
        assert f"[rank {rank}] resumed from {out}/checkpoint-00000002 at step 2" in resumed.stdout
    ranks = final_weights(out)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # One process cannot continue what two began: the data position counts batches of two ranks.
    alone = run([sys.executable, "pretrain/main.py", "--config", DEMO, f"data.train={demo_shards['train']}",
                 f"output_dir={out}", "train.batch_size=4", "resume=auto", "log.progress=false"])
    assert alone.returncode == 2
    assert "was written with another layout (num_processes 2 -> 1)" in alone.stderr
    # What the message proposes instead: a new run that starts from these weights.
    cfg = load_config([DEMO], [f"model.pretrained={out}/checkpoint-00000006/model.safetensors"])
    started = PretrainTask().build_model(cfg).state_dict()
    assert all(torch.equal(started[k], ranks[0][k]) for k in ranks[0])


def test_an_output_dir_that_is_not_shared_fails_at_start(demo_shards, tmp_path):
    result = train(tmp_path / f"node{PER_RANK}", f"data.train={demo_shards['train']}", "train.max_steps=2")
    assert result.returncode != 0
    assert f"output_dir={tmp_path}/node1 is not shared: rank(s) [1] cannot read" in result.stderr
    assert not list(tmp_path.glob("node*/checkpoint-*"))


def test_shared_memory_is_checked_at_start(demo_shards, tmp_path):
    cfg = load_config([DEMO], [f"data.train={demo_shards['train']}", f"output_dir={tmp_path}",
                               "data.num_workers=64", "data.num_frames=16", "data.crop_size=1024",
                               "model.input_size=[16,1024,1024]"])  # 64 workers x 3 batches x 805 MB
    with pytest.raises(ConfigError, match=r"rank 0: the data workers of this node's 1 rank\(s\) may need .* GiB "
                                          r"of shared memory .* but /dev/shm has .* lower data.num_workers=64 or "
                                          r"train.batch_size=16"):
        Trainer(PretrainTask(), cfg)


def test_shared_memory_counts_every_local_rank_and_the_evaluation_loader(demo_shards, tmp_path, monkeypatch):
    """What one rank's training workers need fits; the node's ranks together, or with the k-NN monitor's
    evaluation loader of each rank, do not."""
    free = shutil.disk_usage("/dev/shm").free
    base = [f"data.train={demo_shards['train']}", f"output_dir={tmp_path}", "data.num_workers=2",
            "train.batch_size=4"]  # 3 batches x 4 clips x 3 x 8 x 64 x 64 bytes a worker: about 1.2 MB
    Trainer(PretrainTask(), load_config([DEMO], base))  # fits
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(free // 100_000))
    with pytest.raises(ConfigError, match=r"this node's \d+ rank\(s\)"):
        Trainer(PretrainTask(), load_config([DEMO], base))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    knn = [f"eval.knn.train={demo_shards['train']}", f"eval.knn.val={demo_shards['val']}"]
    huge_eval = f"eval.batch_size={free // (2 * 3 * 3 * 8 * 64 * 64) + 1}"  # its 2 workers alone exceed it
    with pytest.raises(ConfigError, match=r"for evaluation per rank.* eval.batch_size="):
        Trainer(PretrainTask(), load_config([DEMO], [*base, *knn, huge_eval]))
