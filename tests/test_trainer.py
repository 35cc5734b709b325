"""The shared training loop with a small in-memory task: non-finite steps, host syncs, background checkpoint
writes, schedule, accumulation."""

import json
import math
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine import checkpoint as ckpt
from engine.config import RunConfig
from engine.optimizer_step import WindowMeans
from engine.preemption import Preempted
from engine.trainer import EARLY_CHECK_STEPS, Trainer, cuda_defaults, schedule


class ListLoader:
    """The loader interface the trainer needs, over a fixed list of batches (one epoch)."""

    def __init__(self, batches):
        self.batches, self.epoch, self.consumed = batches, 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        while self.consumed < len(self.batches):
            self.consumed += 1
            yield self.batches[self.consumed - 1]
        self.epoch, self.consumed = self.epoch + 1, 0

    stats = {"samples_tried": 0, "samples_failed": 0, "failed_by_shard": {}}

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state):
        self.epoch, self.consumed = state["epoch"], state["consumed"]


class RegressionTask:
    """Fits y = 2x; batches whose `poison` flag is set give a NaN loss."""

    def __init__(self, poisoned):
        self.poisoned = poisoned

    def build_model(self, cfg):
        return torch.nn.Linear(1, 1)

    def train_loader(self, cfg, rank, world_size):
        x = torch.linspace(-1, 1, 8)[:, None]
        return ListLoader([{"x": x, "label": torch.zeros(8), "valid": torch.ones(8, dtype=torch.bool),
                            "poison": i in self.poisoned} for i in range(6)])

    def step(self, model, batch):
        loss = (model(batch["x"]) - 2 * batch["x"]).pow(2).mean()
        return {"loss": loss * float("nan") if batch["poison"] else loss}

    def encoder(self, model):
        return model.state_dict(), {"model": "linear"}

    def visualize(self, model, batch, logger, step):
        pass

    def after_pass(self, model, accelerator, logger, step):
        return {}


def config(tmp_path, log_every: int = 10, **train) -> RunConfig:
    cfg = RunConfig(output_dir=str(tmp_path))
    cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_epochs = 8, 10, 0
    cfg.train.base_lr, cfg.train.weight_decay, cfg.train.checkpoint_every = 8.0, 0.0, 100
    cfg.log.progress, cfg.log.every = False, log_every
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    trainer = Trainer(RegressionTask(poisoned={2, 3}), config(tmp_path))
    trainer.fit()
    assert trainer.progress.step == 60 and trainer.progress.nonfinite_total == 20  # 2 per pass x 10 passes
    weight = trainer.accelerator.unwrap_model(trainer.model).weight
    assert torch.isfinite(weight).all() and abs(weight.item() - 2) < 0.2


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    """Counted on the device, the run of skipped steps is read at the next logging step (here step 10)."""
    trainer = Trainer(RegressionTask(poisoned=set(range(6))), config(tmp_path, max_nonfinite_steps=4))
    with pytest.raises(FloatingPointError, match="10 optimizer steps in a row had a non-finite loss or gradients"):
        trainer.fit()
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.parametrize("optimizer_args, skips_on_device", [({}, True), ({"foreach": True}, False)])
def test_a_nonfinite_step_changes_no_weight_or_optimizer_state_and_is_logged(tmp_path, optimizer_args,
                                                                             skips_on_device):
    """AdamW is fused by default and skips on the device; the foreach kernel has no such input and the trainer
    reads the flag on the host. Either way the poisoned step (the third) leaves weights and Adam's state as they
    were, and the logging step counts it."""
    trainer = Trainer(RegressionTask(poisoned={2}), config(tmp_path, max_steps=6, optimizer_args=optimizer_args))
    assert trainer.optimizer_step.skips_on_device == skips_on_device
    after_step = {}

    def record(model, step):
        state = trainer.optimizer.state_dict()["state"]
        after_step[step] = [t.clone() for t in [*model.parameters(), *(v for s in state.values() for v in s.values())]]

    trainer.task.after_step = record
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(after_step[2], after_step[3]))
    assert not any(torch.equal(a, b) for a, b in zip(after_step[3], after_step[4]))
    assert trainer.progress.nonfinite_total == 1 and trainer.progress.nonfinite_streak == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/nonfinite_steps")] == [(6, 1.0)]
    assert math.isfinite(events.Scalars("train/loss")[0].value)


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def counted(read, reads: list):
    """`read`, a torch.Tensor method, that also appends to `reads` on each call."""
    def counting(self, *args, **kwargs):
        reads.append(read.__name__)
        return read(self, *args, **kwargs)
    return counting


def test_steps_between_logging_steps_read_nothing_on_the_host(tmp_path, monkeypatch):
    """On CUDA each read of a device value on the host waits for the GPU. Every way of reading a tensor on the host
    is counted; past the early data checks, steps that neither log nor save must read none: no gradient norm, no
    non-finite flag (a poisoned step, 22, is among them), no counter."""
    reads = []
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), reads))
    task = RegressionTask(poisoned={3})  # every 4th step of each pass of 6
    reads_by_step = {}
    task.after_step = lambda model, step: reads_by_step.setdefault(step, len(reads))
    trainer = Trainer(task, config(tmp_path, log_every=100, max_steps=30))
    trainer.fit()
    assert reads_by_step[2] > reads_by_step[1]  # the early data checks read, and the counting sees them
    quiet = range(EARLY_CHECK_STEPS + 2, 30)
    assert {step: reads_by_step[step] - reads_by_step[step - 1] for step in quiet} == dict.fromkeys(quiet, 0)
    assert trainer.progress.nonfinite_total == 5  # steps 4, 10, 16, 22 and 28


def test_schedule_counts_effective_epochs():
    cfg = RunConfig()
    cfg.train.epochs, cfg.train.warmup_epochs, cfg.data.repeat = 800, 120, 4
    assert schedule(cfg, steps_per_pass=10) == (2000, 300)
    cfg.train.max_steps = 50
    assert schedule(cfg, steps_per_pass=10) == (50, 300)
    assert math.isclose(schedule(cfg, steps_per_pass=1)[0], 50)


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    Trainer(RegressionTask(poisoned=set()), config(tmp_path, max_steps=4, checkpoint_every=2)).fit()
    newest = tmp_path / "checkpoint-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a disk that filled up after the rename
    cfg = config(tmp_path, max_steps=6, checkpoint_every=2)
    cfg.resume = "auto"
    resumed = Trainer(RegressionTask(poisoned=set()), cfg)
    assert resumed.progress.step == 2
    assert "checkpoint-00000004: SafetensorError" in capsys.readouterr().out
    resumed.fit()
    assert resumed.progress.step == 6 and resumed.progress.samples_seen == 6 * 8


def final_state(trainer: Trainer) -> list[torch.Tensor]:
    """The trained weights and the optimizer's state."""
    state = trainer.optimizer.state_dict()["state"]
    return [*trainer.accelerator.unwrap_model(trainer.model).state_dict().values(),
            *(v for s in state.values() for v in s.values())]


def test_training_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    """The writer thread writes, renames and exports while the loop trains on: held until step 3 has trained, the
    save of step 2 is renamed into place only then. Every checkpoint ends complete, and a run resumed from the held
    one ends where the straight run did."""
    commit, release, released = ckpt.commit_save, threading.Event(), []

    def held_commit(temp, keep):
        if temp.name.endswith("00000002"):
            released.append(release.wait(timeout=20))  # a save that blocks the loop never sees step 3
        return commit(temp, keep)

    monkeypatch.setattr(ckpt, "commit_save", held_commit)
    task, renamed_at_step_3 = RegressionTask(poisoned=set()), []

    def after_step(model, step):
        if step == 3:
            renamed_at_step_3.append((tmp_path / "straight" / "checkpoint-00000002").exists())
            release.set()

    task.after_step = after_step
    straight = Trainer(task, config(tmp_path / "straight", max_steps=6, checkpoint_every=2))
    straight.fit()
    assert renamed_at_step_3 == [False] and released == [True]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "straight")] == [
        "checkpoint-00000002", "checkpoint-00000004", "checkpoint-00000006"]
    cfg = config(tmp_path / "resumed", max_steps=6, checkpoint_every=2)
    cfg.resume = str(tmp_path / "straight" / "checkpoint-00000002")
    resumed = Trainer(RegressionTask(poisoned=set()), cfg)
    resumed.fit()
    assert all(torch.equal(a, b) for a, b in zip(final_state(straight), final_state(resumed), strict=True))


def test_a_failed_background_write_stops_the_run_with_its_error(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_main_state", full_disk)
    trainer = Trainer(RegressionTask(poisoned=set()), config(tmp_path, log_every=1, max_steps=6, checkpoint_every=2))
    with pytest.raises(RuntimeError, match="writing .tmp-checkpoint-00000002 failed: OSError: .*No space left") as err:
        trainer.fit()
    assert isinstance(err.value.__cause__, OSError)
    assert trainer.progress.step in (3, 4)  # seen at the next logging step, or at the latest by the next save
    assert not ckpt.list_checkpoints(tmp_path)


def test_a_signalled_stop_exits_after_its_checkpoint_is_in_place(tmp_path, monkeypatch):
    commit = ckpt.commit_save

    def slow_commit(temp, keep):
        time.sleep(1.0)
        return commit(temp, keep)

    monkeypatch.setattr(ckpt, "commit_save", slow_commit)
    task = RegressionTask(poisoned=set())
    trainer = Trainer(task, config(tmp_path, log_every=2, max_steps=6))
    task.after_step = lambda model, step: setattr(trainer.stop_request, "received", signal.SIGTERM)
    with pytest.raises(Preempted):
        trainer.fit()
    assert json.loads((tmp_path / "requeue.json").read_text())["checkpoint"] == "checkpoint-00000002"
    assert ckpt.read_checkpoint(tmp_path / "checkpoint-00000002", rank=0)["state"]["progress"]["step"] == 2


def test_host_copies_are_independent_of_training_and_reuse_their_memory():
    weight, step = torch.ones(3, 2), torch.tensor(1.0)
    copies = ckpt.HostCopies()
    first = copies.copy("checkpoint", ({"weight": weight}, [step, "adamw"]))
    weight.add_(1.0)  # training goes on in place
    assert torch.equal(first[0]["weight"], torch.ones(3, 2)) and first[1] == [step, "adamw"]
    second = copies.copy("checkpoint", ({"weight": weight}, [step, "adamw"]))
    assert second[0]["weight"].data_ptr() == first[0]["weight"].data_ptr()  # the previous save's buffer
    assert torch.equal(second[0]["weight"], weight) and second[0]["weight"] is not weight


def test_check_finite_refuses_nan_and_inf_but_not_a_norm_that_overflows():
    ckpt.check_finite({"big": torch.full((4,), 1e30), "steps": torch.tensor([3])})  # norm inf, values finite
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FloatingPointError, match=r"non-finite weights \(w\)"):
            ckpt.check_finite({"ok": torch.ones(2), "w": torch.tensor([1.0, bad])})


def test_numpy_and_python_rngs_are_seeded_for_timms_mixup(tmp_path):
    draws = []
    for run in ("a", "b"):
        Trainer(RegressionTask(poisoned=set()), config(tmp_path / run))
        draws.append((np.random.random(), random.random()))
    assert draws[0] == draws[1]


def test_logged_scalars_are_window_means_without_skipped_steps_or_empty_batches():
    means, valid, empty = WindowMeans(), torch.tensor(True), torch.tensor(False)
    for loss, acc, weight, skipped in [(1.0, 0.5, valid, 0.0), (float("nan"), 0.25, valid, 1.0),
                                       (0.0, 0.9, empty, 0.0), (3.0, 0.0, valid, 0.0)]:
        means.add({"loss": torch.tensor(loss), "acc": torch.tensor(acc), "per_sample": torch.ones(2)}, weight)
        means.commit(torch.tensor(skipped))
    assert means.read(Accelerator(cpu=True)) == {"acc": 0.25, "loss": 2.0}
    means.add({"loss": torch.tensor(float("inf"))}, valid)
    means.commit(torch.tensor(1.0))
    assert math.isnan(means.read(Accelerator(cpu=True))["loss"])


def test_cuda_defaults_set_tf32_and_cudnn_autotuning_only_on_cuda(tmp_path):
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        cuda_defaults(config(tmp_path), torch.device("cpu"))
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == before
        cuda_defaults(config(tmp_path), torch.device("cuda"))  # setting flags needs no GPU
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
        cuda_defaults(config(tmp_path, tf32=False, cudnn_benchmark=False), torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before[1:]
