"""The pretraining app end to end, as users run it: real shards, real processes, real files read back."""

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from launch import kill_after, run, signal_after, two_gloo_processes
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine import checkpoint, preemption
from models import create_model, load_pretrained

DEMO = "configs/pretrain/demo.yaml"


def pretrain_command(shards: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "pretrain/main.py", "--config", DEMO, f"data.train={shards}", f"output_dir={out}",
            "data.num_workers=1", "log.progress=false", "train.warmup_epochs=1", *overrides]


def test_pretraining_end_to_end(demo_shards, tmp_path):
    out = tmp_path / "run"
    result = run(pretrain_command(demo_shards["train"], out, "train.max_steps=24",
                                  "train.checkpoint_every=12", "log.every=4", "log.visualize_every=12"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"TensorBoard logs in {out}/tb" in result.stdout

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    for tag in ("train/lr", "train/grad_norm", "perf/samples_per_s", "perf/data_wait_fraction",
                "data/samples_failed"):
        assert len(events.Scalars(tag)) == 6
    # Time to the first step, by phase: printed and logged once, at step 1.
    phases = ["launch", "model", "shards", "prepare", "resume", "trackers", "app", "first_batch", "first_step"]
    laps = {name: events.Scalars(f"startup/{name}_s") for name in [*phases, "total"]}
    assert all(len(lap) == 1 and lap[0].step == 1 and lap[0].value >= 0 for lap in laps.values())
    assert laps["total"][0].value == pytest.approx(sum(laps[name][0].value for name in phases), rel=1e-4)
    assert "first step " in result.stdout and " s after launch (launch " in result.stdout
    images = events.Tags()["images"]
    assert {"reconstruction/frames_0", "reconstruction/clip_0"} <= set(images)
    assert events.Images("reconstruction/clip_0")[-1].encoded_image_string.startswith(b"GIF89a")

    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-00000012", "checkpoint-00000024"]
    with safe_open(str(out / "encoder.safetensors"), framework="pt") as f:
        assert f.metadata()["model"] == "hiera_base_16x224"
    name, overrides = checkpoint.read_encoder_metadata(out / "encoder.safetensors")
    encoder = create_model(name, num_classes=4, **overrides)
    report = load_pretrained(encoder, out / "encoder.safetensors", strict=False)
    assert sorted(report.missing) == ["head.projection.bias", "head.projection.weight", "norm.bias", "norm.weight"]
    assert not report.unexpected and not report.mismatched

    video = next((demo_shards["train"].parents[1] / "raw" / "videos").rglob("*.mp4"))
    viewer = run([sys.executable, "-m", "pretrain.visualize", "--checkpoint", str(out / "checkpoint-00000024"),
                  "--input", str(video), "--out", str(tmp_path / "viz")])
    assert viewer.returncode == 0, viewer.stderr[-3000:]
    strip = Image.open(tmp_path / "viz" / f"{video.stem}.png")
    assert strip.size == (4 * 66 + 2, 4 * 66 + 2)  # 4 panels x 4 frames of 64 px, 2 px padding
    gif = Image.open(tmp_path / "viz" / f"{video.stem}.gif")
    assert gif.n_frames == 4 and gif.size == (4 * 64, 64)


def test_kill_or_signal_and_resume_give_identical_weights(demo_shards, tmp_path):
    """A crash (SIGKILL) and a scheduler's stop (SIGTERM, sent twice to every process, data loader workers and
    the k-NN monitor running) at a random step: the resumed runs end bit-identical to a straight one."""
    args = ("train.max_steps=20", "train.checkpoint_every=4", "model.drop_path_rate=0.2", "log.visualize_every=0",
            "log.every=1", f"eval.knn.train={demo_shards['train']}", f"eval.knn.val={demo_shards['val']}",
            "eval.knn.every=10", "eval.knn.max_samples=8", "eval.batch_size=4")
    # 16 steps between the checkpoint that triggers the stop and the end: on a quiet machine 6 were too few.
    reference = run(pretrain_command(demo_shards["train"], tmp_path / "straight", *args))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = load_file(tmp_path / "straight" / "checkpoint-00000020" / "model.safetensors")

    killed, signalled = tmp_path / "killed", tmp_path / "signalled"
    assert kill_after(pretrain_command(demo_shards["train"], killed, *args), killed / "checkpoint-00000004")
    assert checkpoint.latest_checkpoint(killed) is not None and not (killed / "checkpoint-00000020").exists()
    code = signal_after(pretrain_command(demo_shards["train"], signalled, *args), signalled / "checkpoint-00000004",
                        signals=(signal.SIGTERM, signal.SIGTERM))
    assert code == preemption.REQUEUE_EXIT_CODE
    stopped = json.loads((signalled / preemption.REQUEUE_MARKER).read_text())
    assert stopped["signal"] == "SIGTERM" and 4 < stopped["step"] < 20
    assert checkpoint.latest_checkpoint(signalled).name == stopped["checkpoint"] == f"checkpoint-{stopped['step']:08d}"

    for out in (killed, signalled):
        resumed = run(pretrain_command(demo_shards["train"], out, *args, "resume=auto"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert not (out / preemption.REQUEUE_MARKER).exists()
        got = load_file(out / "checkpoint-00000020" / "model.safetensors")
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
        # TensorBoard shows every step once: what the stopped run logged after its checkpoint is purged.
        events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = {"progress": {"step": 5}}
    temp = checkpoint.begin_save(tmp_path, 5)
    checkpoint.write_rank_state(temp, 0, {"step": 5, "data": {}})
    checkpoint.write_main_state(temp, model.state_dict(), model.state_dict(), {"model": "x"},
                                torch.optim.AdamW(model.parameters()).state_dict(), state, "seed: 0\n")
    checkpoint.commit_save(temp, keep=2)
    # The next save dies half-way: a truncated model file in the temporary directory.
    crashed = checkpoint.begin_save(tmp_path, 10)
    (crashed / "model.safetensors").write_bytes(b"\x00" * 10)
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-00000005"
    saved = checkpoint.read_checkpoint(latest, rank=0)
    assert saved["state"]["progress"]["step"] == 5 and torch.equal(saved["model"]["weight"], model.weight)
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        checkpoint.check_finite({"w": torch.tensor([float("nan")])})


@pytest.mark.parametrize("override, key, hint", [
    ("train.max_step=5", "train.max_step", "max_steps"),
    ("train.batch_size=many", "train.batch_size", "could not be converted"),
    ("modle.name=x", "modle", "model"),
])
def test_config_errors_exit_2_before_any_work(tmp_path, override, key, hint):
    out = tmp_path / "never"
    result = run(pretrain_command(tmp_path / "no-shards", out, override))
    assert result.returncode == 2
    assert key in result.stderr and hint in result.stderr
    assert not out.exists()


def test_bad_model_override_exits_2(tmp_path):
    result = run(pretrain_command(tmp_path / "no-shards", tmp_path / "o", "model.extra.embed_dims=8"))
    assert result.returncode == 2 and "did you mean 'embed_dim'" in result.stderr


def test_two_gloo_processes_train_together(demo_shards, tmp_path):
    out = tmp_path / "ddp"
    result = two_gloo_processes(
        "tests/dist_train.py", "--config", DEMO, f"data.train={demo_shards['train']}", f"output_dir={out}",
        "data.num_workers=0", "log.progress=false", "train.max_steps=4", "train.batch_size=8",
        "log.visualize_every=0", "model.drop_path_rate=0.2", "log.every=2", "train.checkpoint_minutes=1e-6")
    assert result.returncode == 0, result.stderr[-3000:]
    # Wall-time saves: rank 0's clock decides at each logging step, for both ranks.
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-00000002", "checkpoint-00000004"]
    ranks = []
    for rank in (0, 1):
        path = out / f"final-rank{rank}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"step": "4", "world": "2"}
        ranks.append(load_file(path))
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert checkpoint.latest_checkpoint(out).name == "checkpoint-00000004"
