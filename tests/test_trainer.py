"""The shared training loop with a small in-memory task: non-finite steps, host syncs, schedule, accumulation."""

import math
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.config import RunConfig
from engine.optimizer_step import WindowMeans
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
