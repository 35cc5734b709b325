"""The training loop, shared by pretraining and fine-tuning. An app supplies a `Task`: its model, loader,
step (the loss) and optional hooks; everything else (accelerate, optimizer, schedule, accumulation,
clipping, non-finite steps, checkpoints, exact resume, logging, progress) lives here once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, broadcast_object_list, gather_object
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.distributed.fsdp import MixedPrecisionPolicy, register_fsdp_forward_method
from tqdm import tqdm

from . import checkpoint as ckpt
from . import sharded, tracking
from .config import ConfigError, RunConfig, flatten, to_yaml
from .loaders import check_failures, shared_memory_shortfall
from .optimizer_step import OptimizerStep, WindowMeans, fused_by_default
from .preemption import REQUEUE_EXIT_CODE, Preempted, StopRequest, clear_marker, signal_numbers, write_marker
from .startup import StartupClock
from .tblog import TrainLogger


class Task(Protocol):
    def build_model(self, cfg: RunConfig) -> torch.nn.Module: ...

    def train_loader(self, cfg: RunConfig, rank: int, world_size: int) -> Any:
        """A loader with `len()`, iteration over the rest of the epoch, `state_dict`/`load_state_dict`
        and `stats` (data.ShardLoader)."""

    def step(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Forward pass of one batch: {"loss": scalar, other scalars to log...}. Rows whose `batch["valid"]`
        is False stand in for samples that failed to load: they must weigh nothing in the loss, and a batch
        without valid rows must still give a loss (0) whose backward reaches every parameter."""

    def encoder(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The encoder's state dict and its metadata (checkpoint.encoder_metadata), for the export."""

    def visualize(self, model: torch.nn.Module, batch: dict, logger: TrainLogger, step: int) -> None:
        """Main process only, on the unwrapped model; every rank under FSDP (the logger writes on rank 0 only),
        where it must run the model's forward on every rank."""

    def after_pass(self, model: torch.nn.Module, accelerator: Accelerator, logger: TrainLogger,
                   step: int) -> dict[str, float]:
        """After each pass over the data (all ranks): e.g. evaluation; returns metrics for hparams."""

    # Optional hooks, called only when the task defines them:
    #   after_step(model, step)        after every optimizer step (all ranks, unwrapped model): e.g. an EMA;
    #   final_model(model) -> module   what is exported (e.g. the EMA), given to `encoder` (default: the model);
    #   shard_copies(shard)            under FSDP, after the model was sharded: shard the task's own copies
    #                                  of it (an EMA) with `shard(module) -> module`, so they update shard by shard;
    #   monitor(model, accelerator, logger, step) -> metrics
    #                                  before the first step of a fresh run and after every optimizer step (all
    #                                  ranks, unwrapped model): e.g. the k-NN monitor; its time is left out of
    #                                  the throughput figures. Under FSDP it may call the model's forward and
    #                                  `forward_features` (registered with FSDP), not its submodules;
    #   state_dict() -> {name: tensor} extra state kept in each checkpoint (task.safetensors), and
    #   load_state_dict(state)         its restoration on resume.


@dataclass
class Progress:
    step: int = 0
    nonfinite_total: int = 0  # skipped steps; these two are counted on the device, read at logging steps and saves
    nonfinite_streak: int = 0
    samples_seen: int = 0
    best_step: int = -1  # the step whose evaluation scored best by `eval.metric` so far (-1: none yet)
    best_value: float | None = None


# Optimizer steps at the start of a run before each of which the data failures of all ranks are checked (later,
# at log steps): data that is mostly garbage stops the run before it trains on it, or overwrites anything.
EARLY_CHECK_STEPS = 20


def cuda_defaults(cfg: RunConfig, device: torch.device) -> None:
    """On CUDA: TF32 for fp32 matmuls and convolutions (`train.tf32`; bf16 autocast regions are unaffected) and
    cuDNN's autotuner (`train.cudnn_benchmark`), as the reference codebases train. Elsewhere: nothing."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def set_fsdp_reduce_dtype(plugin: FullyShardedDataParallelPlugin, name: str) -> None:
    """Make FSDP2 reduce-scatter gradients in `name` (`train.fsdp_reduce_dtype`), before `prepare` shards the model.
    Under bf16 (fp16) mixed precision accelerate's policy computes and reduces in bf16 (fp16): the sum of the ranks'
    gradients is rounded to 8 (11) bits of mantissa, where DDP sums the fp32 gradients. Parameters stay gathered
    and computed in the policy's dtype."""
    policy = plugin.mixed_precision_policy or MixedPrecisionPolicy()
    plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=REDUCE_DTYPES[name])


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def schedule(cfg: RunConfig, steps_per_pass: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps); epochs count effective epochs (passes x data.repeat)."""
    steps_per_effective_epoch = steps_per_pass / cfg.data.repeat
    total = math.ceil(cfg.train.epochs * steps_per_effective_epoch)
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    return max(total, 1), round(cfg.train.warmup_epochs * steps_per_effective_epoch)


class Trainer:
    def __init__(self, task: Task, cfg: RunConfig):
        self.task, self.cfg = task, cfg
        self.startup = StartupClock()
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                       gradient_accumulation_steps=cfg.train.accum_steps,
                                       log_with=tracking.log_with(cfg) or None)
        self.is_main = self.accelerator.is_main_process
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.output_dir = Path(cfg.output_dir)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(to_yaml(cfg))
            clear_marker(self.output_dir)
        if self.world > 1:
            self._check_shared_output_dir()

        cuda_defaults(cfg, self.accelerator.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = task.build_model(cfg)
        self.startup.lap("model")
        if cfg.train.activation_checkpointing:
            model.set_grad_checkpointing()  # every block of our models; must precede compilation
        self.loader = task.train_loader(cfg, self.rank, self.world)
        self._check_shared_memory()
        self.startup.lap("shards")
        self.steps_per_pass = len(self.loader) // cfg.train.accum_steps
        if self.steps_per_pass == 0:
            raise ConfigError(f"{cfg.data.train}: {len(self.loader)} batches of {cfg.train.batch_size}, fewer than "
                              f"train.accum_steps={cfg.train.accum_steps}: lower train.accum_steps or "
                              "train.batch_size, or add data")
        self.total_steps, warmup = schedule(cfg, self.steps_per_pass)
        total_batch = cfg.train.batch_size * self.world * cfg.train.accum_steps
        lr = cfg.train.base_lr * total_batch / 256
        # Parameters that do not require grad (a linear probe's frozen encoder) are left out by timm; betas
        # are dropped by timm for optimizers without them (LARS).
        optimizer = create_optimizer_v2(model, cfg.train.optimizer, lr=lr, weight_decay=cfg.train.weight_decay,
                                        betas=tuple(cfg.train.betas), layer_decay=cfg.train.layer_decay,
                                        **fused_by_default(cfg.train.optimizer, cfg.train.optimizer_args))
        self.scheduler = CosineLRScheduler(optimizer, t_initial=max(self.total_steps - warmup, 1),
                                           lr_min=cfg.train.min_lr, warmup_t=warmup, warmup_lr_init=0.0,
                                           warmup_prefix=True, t_in_epochs=False)
        self.sharded = self._check_sharding()
        # A sharded model has no whole copy anywhere: the export fills this one on the main process.
        self.export_model = copy.deepcopy(model) if self.sharded and self.is_main else None
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.sharded and hasattr(model, "forward_features"):
            # Called outside forward (the k-NN monitor): FSDP must gather the root's shards around it as around
            # forward, and initialise from the root if it runs first (at step 0), not from the first block.
            register_fsdp_forward_method(self.model, "forward_features")
        if self.sharded and hasattr(task, "shard_copies"):  # e.g. an EMA: sharded like the model
            task.shard_copies(lambda module: fsdp2_prepare_model(self.accelerator, module))
        self.forward_model = self._compiled(self.model) if cfg.model.compile else self.model
        # Drop path (torch) and timm's mixup (numpy, random) differ across ranks, reproducibly.
        torch.manual_seed(cfg.seed + 1000 * self.rank)
        np.random.seed(cfg.seed + 1000 * self.rank)
        random.seed(cfg.seed + 1000 * self.rank)
        self.progress = Progress()
        self.stop_request = StopRequest(signal_numbers(cfg.train.stop_signals))
        self.last_save = time.monotonic()
        self.writer = ckpt.BackgroundWriter()  # rank 0's checkpoint and export files, off the training thread
        self.host_copies = ckpt.HostCopies()  # what the writer reads
        self.startup.lap("prepare")
        self._maybe_resume()
        self.optimizer_step = OptimizerStep(self.accelerator, self.model, self.optimizer, cfg.train.clip_grad,
                                            cfg.train.max_nonfinite_steps, self.progress.nonfinite_total,
                                            self.progress.nonfinite_streak)
        self.startup.lap("resume")
        # After a resume, what the interrupted run logged past its checkpoint is purged, not shown twice.
        self.logger = TrainLogger.for_run(self.accelerator, cfg,
                                          purge_step=self.progress.step + 1 if self.progress.step else None)
        self.startup.lap("trackers")

    def _check_sharding(self) -> bool:
        """Whether accelerate shards the model (FSDP2, from `accelerate launch --use_fsdp` or a config file in
        configs/accelerate/), and whether this run can be sharded; sets the dtype of its gradient reduction."""
        if self.accelerator.distributed_type != DistributedType.FSDP:
            return False
        if not self.accelerator.is_fsdp2:
            raise ConfigError("FSDP: use fsdp_version: 2 (configs/accelerate/1node_8gpu_fsdp.yaml); checkpoints of "
                              "version 1's flat parameters are not supported")
        plugin = self.accelerator.state.fsdp_plugin
        if plugin.cpu_ram_efficient_loading:  # `--use_fsdp` alone turns it on
            raise ConfigError("FSDP: set fsdp_cpu_ram_efficient_loading: false (configs/accelerate/1node_8gpu_fsdp.yaml"
                              "); accelerate loads that way only Hugging Face Transformers models (it calls their "
                              "get_parameter_or_buffer), and every rank builds the same initial weights here anyway")
        set_fsdp_reduce_dtype(plugin, self.cfg.train.fsdp_reduce_dtype)
        return True

    def _compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """One process: the whole model as one graph (fullgraph). Under DDP, dynamo steps over the wrapper's own
        Python (its logging cannot be traced, so fullgraph would fail) and DDPOptimizer splits the model's graph
        at the gradient buckets, so that their all-reduces overlap the backward pass; the model's own code is
        graph-break free, as the single-process tests show."""
        return torch.compile(model, fullgraph=self.world == 1)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        """Rank 0 lists the checkpoints and proposes them, newest first; one is taken only when every rank can
        read it, so a stale directory listing or a damaged per-rank file on one node makes all ranks fall back
        together instead of resuming at different steps."""
        resume = self.cfg.resume
        if not resume:
            return
        candidates = ckpt.list_checkpoints(self.output_dir)[::-1] if resume == "auto" else [Path(resume)]
        candidates = broadcast_object_list([candidates])[0]
        if not candidates:
            self._print(f"resume=auto: no checkpoint in {self.output_dir}, starting fresh")
            return
        for path in candidates:
            try:
                saved, error = ckpt.read_checkpoint(path, self.rank), None
            except RuntimeError as err:
                saved, error = None, f"rank {self.rank}: {err}"
            errors = [e for e in gather_object([error]) if e]
            if not errors:
                break
            if resume != "auto":
                raise RuntimeError("; ".join(errors))
            self._print(f"warning: {'; '.join(errors)}; trying the checkpoint before it")
        else:
            raise RuntimeError(f"resume=auto: none of the {len(candidates)} checkpoints in {self.output_dir} is "
                               f"readable by every rank")
        state = saved["state"]
        self._check_same_layout(state, path)
        if saved["model"] is None:  # every rank reads its shards, resharded to this run's layout
            sharded.load_sharded(path / ckpt.SHARDED_DIR, self.model, self.optimizer, state["optimizer_groups"],
                                 self._task_state())
        elif self.sharded:
            raise ConfigError(f"{path} was written without FSDP: resume it without FSDP, or start a sharded run "
                              f"from its weights with model.pretrained={path}/model.safetensors")
        else:
            self.accelerator.unwrap_model(self.model).load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        if saved["task"] is not None:
            self.task.load_state_dict(saved["task"])
        self.loader.load_state_dict(saved["rank"]["data"])
        self.progress = Progress(**state["progress"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.scheduler.step_update(self.progress.step)
        ckpt.restore_rng(saved["rng"])
        steps = gather_object([(self.progress.step, saved["rank"]["step"])])
        if len(set(steps)) != 1:
            raise RuntimeError(f"{path}: ranks restored different steps (step, rank file step) {steps}")
        print(f"[rank {self.rank}] resumed from {path} at step {self.progress.step}", flush=True)

    def _layout(self) -> dict[str, int]:
        """What the data position and the lr of a checkpoint depend on."""
        return {"num_processes": self.world, "batch_size": self.cfg.train.batch_size,
                "accum_steps": self.cfg.train.accum_steps, "repeat": self.cfg.data.repeat,
                "shard_mix": self.cfg.data.shard_mix}

    def _check_same_layout(self, state: dict, path: Path) -> None:
        """A checkpoint's data position counts batches of its own layout: with another number of processes or
        another batch, the same count would name other samples (and the lr scaling would change), so stop."""
        saved, now = state.get("layout", {}), self._layout()
        changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise ConfigError(
                f"{path} was written with another layout ({', '.join(changed)}); its data position and lr "
                f"schedule are only valid for the same one. Resume with the saved values, or start a new "
                f"output_dir that loads these weights with model.pretrained={path}/model.safetensors")

    def _check_shared_memory(self) -> None:
        """Every rank asks its node; all stop together (a node stopping alone leaves the others waiting)."""
        short = shared_memory_shortfall(self.cfg, self.loader, "train.batch_size") if hasattr(
            self.loader, "shared_memory_needed") else None
        found = [f"rank {rank}: {message}" for rank, message in enumerate(gather_object([short])) if message]
        if found:
            raise ConfigError(found[0] if len(found) == 1 else f"{found[0]} (and {len(found) - 1} more ranks)")

    def _check_shared_output_dir(self) -> None:
        """Checkpoints are written by rank 0 and read by every rank: fail at start, not at the first resume,
        when the ranks do not see one output_dir (node-local disks on many nodes)."""
        token = broadcast_object_list([f"{time.time_ns()}-{random.getrandbits(64)}"])[0]
        marker = self.output_dir / ".shared-check"
        if self.is_main:
            marker.write_text(token)
        self.accelerator.wait_for_everyone()
        seen = marker.read_text() if marker.exists() else None
        blind = [rank for rank, ok in enumerate(gather_object([seen == token])) if not ok]
        self.accelerator.wait_for_everyone()
        if blind:
            raise ConfigError(f"output_dir={self.output_dir} is not shared: rank(s) {blind} cannot read what rank "
                              f"0 wrote there. Checkpoints need a filesystem that every node sees.")

    def save_checkpoint(self) -> None:
        """All ranks: a checkpoint of this step. The training thread writes each rank's own small files (and under
        FSDP its shards) and copies the rest to host memory; rank 0's writer thread writes that, renames the
        checkpoint into place and exports the encoder while training goes on."""
        self._read_nonfinite()
        step = self.progress.step
        model = self.accelerator.unwrap_model(self.model)
        if self.sharded:  # each rank checks its shards; the verdict is shared, so all stop together
            ckpt.refuse_nonfinite(sharded.nonfinite(model))
        else:
            ckpt.check_finite(model.state_dict())
        self._wait_for_writer()  # one background write at a time (the same step may be saved again)
        temp = self.output_dir / f"{ckpt.TEMP_PREFIX}{step:08d}"
        if self.is_main:
            ckpt.begin_save(self.output_dir, step)
        self.accelerator.wait_for_everyone()
        ckpt.write_rank_state(temp, self.rank, {"step": step, "data": self.loader.state_dict()})
        state = {"progress": vars(self.progress), "layout": self._layout(),
                 "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
                 "scheduler": self.scheduler.state_dict(), "total_steps": self.total_steps}
        model_state = optimizer_state = task_state = None
        if self.sharded:  # the task's state is sharded too (an EMA), so it goes with the shards
            state["optimizer_groups"] = sharded.save_sharded(temp / ckpt.SHARDED_DIR, model, self.optimizer,
                                                             self._task_state())
        elif self.is_main:
            model_state, optimizer_state, task_state = model.state_dict(), self.optimizer.state_dict(), \
                self._task_state()
        exported = self._whole_final_model()
        self.accelerator.wait_for_everyone()  # every rank's files are in `temp` before rank 0 may rename it
        if self.is_main:
            model_state, optimizer_state, task_state, (encoder_state, encoder_meta) = self.host_copies.copy(
                "checkpoint", (model_state, optimizer_state, task_state, self.task.encoder(exported)))
            state, config_yaml, keep = copy.deepcopy(state), to_yaml(self.cfg), self.cfg.train.keep_checkpoints

            def write() -> None:
                ckpt.write_main_state(temp, model_state, encoder_state, encoder_meta, optimizer_state, state,
                                      config_yaml, task_state)
                ckpt.commit_save(temp, keep)
                ckpt.export_encoder(self.output_dir / "encoder.safetensors", encoder_state, encoder_meta)

            self.writer.start(temp.name, write)
        self.last_save = time.monotonic()

    def _wait_for_writer(self) -> None:
        """All ranks: rank 0 waits for its background write. When that failed, every rank raises (one broadcast)
        instead of the others waiting for rank 0 in their next collective."""
        failure = None
        if self.is_main:
            try:
                self.writer.wait()
            except RuntimeError as err:
                failure = err
        message = broadcast_object_list([str(failure) if failure else None])[0]
        if failure is not None:
            raise failure
        if message:
            raise RuntimeError(f"rank 0: {message}")

    def _whole_final_model(self) -> torch.nn.Module | None:
        """What is exported (the task's `final_model`, e.g. its EMA), whole, on the main process; None elsewhere.
        Under FSDP every rank must call it: the shards are gathered."""
        model = self.accelerator.unwrap_model(self.model)
        exported = self.task.final_model(model) if hasattr(self.task, "final_model") else model
        if not self.sharded:
            return exported if self.is_main else None
        whole = sharded.full_model_state(exported)
        if not self.is_main:
            return None
        self.export_model.load_state_dict(whole)
        return self.export_model

    def _after_pass(self) -> dict[str, float]:
        """The task's `after_pass` (an evaluation); when it scored best so far by `eval.metric` (higher is
        better), its model is exported to best/encoder.safetensors (all ranks: a sharded model is gathered)."""
        metrics = self.task.after_pass(self.accelerator.unwrap_model(self.model), self.accelerator, self.logger,
                                       self.progress.step)
        value, progress = metrics.get(self.cfg.eval.metric), self.progress
        if value is None or (progress.best_value is not None and value <= progress.best_value):
            return metrics
        progress.best_step, progress.best_value = progress.step, value
        exported = self._whole_final_model()
        self._wait_for_writer()
        if self.is_main:  # written in the background, like a checkpoint
            encoder_state, encoder_meta = self.host_copies.copy(ckpt.BEST_DIR, self.task.encoder(exported))
            encoder_meta |= {"step": str(progress.step), self.cfg.eval.metric: str(value)}
            (self.output_dir / ckpt.BEST_DIR).mkdir(exist_ok=True)
            path = self.output_dir / ckpt.BEST_DIR / "encoder.safetensors"
            self.writer.start(f"{ckpt.BEST_DIR}/{path.name}", lambda: ckpt.export_encoder(path, encoder_state,
                                                                                          encoder_meta))
        return metrics

    def _finish_export(self) -> None:
        """Main process, at the end: `eval.export=best` puts the best evaluated model in encoder.safetensors
        (instead of the last); metrics.json, when the task wrote one, records which step was best."""
        if not self.is_main or self.progress.best_step < 0:
            return
        cfg, progress = self.cfg, self.progress
        if cfg.eval.export == "best":
            best = self.output_dir / ckpt.BEST_DIR / "encoder.safetensors"
            ckpt.copy_atomically(best, self.output_dir / "encoder.safetensors")
        path = self.output_dir / "metrics.json"
        if path.exists():
            content = json.loads(path.read_text())
            content["best"] = {"step": progress.best_step, "metric": cfg.eval.metric, "value": progress.best_value,
                               "exported": cfg.eval.export}
            path.write_text(json.dumps(content, indent=2))

    def _task_state(self) -> dict[str, torch.Tensor] | None:
        return self.task.state_dict() if hasattr(self.task, "state_dict") else None

    # -- stopping for a scheduler ------------------------------------------------------------------------------
    def _agree_to_save(self) -> tuple[str | None, bool]:
        """(the signal that asks to stop or None, save now) at a logging step: the largest signal number any rank
        received, and whether rank 0's clock says that `train.checkpoint_minutes` passed since the last save.
        One small all-reduce, so that every rank takes the same decision at the same step; it also carries whether
        rank 0's background write failed, which then stops every rank here."""
        minutes = self.cfg.train.checkpoint_minutes
        due = self.is_main and minutes is not None and time.monotonic() - self.last_save >= 60 * minutes
        received = self.stop_request.received
        votes = torch.tensor([received.value if received else 0, int(due), int(self.writer.failed)],
                             device=self.accelerator.device)
        if self.world > 1:
            torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        number, due, write_failed = votes.tolist()
        if write_failed:
            self._wait_for_writer()
        return signal.Signals(number).name if number else None, bool(due)

    def _stop_for_requeue(self, cause: str, bar: tqdm) -> NoReturn:
        """After the checkpoint of a signalled stop: leave the marker, then exit with the requeue code together
        (a launcher stops the other ranks when one exits, perhaps before rank 0 wrote the marker)."""
        step = self.progress.step
        bar.close()
        self.logger.close()
        self._wait_for_writer()  # the checkpoint is in place before the marker names it and the process exits
        if self.is_main:
            saved = self.output_dir / ckpt.checkpoint_name(step)
            write_marker(self.output_dir, step, cause, saved)
            tqdm.write(f"stopped by {cause} at step {step} of {self.total_steps}, saved in {saved}; continue with "
                       f"resume=auto (exit code {REQUEUE_EXIT_CODE}: requeue)")
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        raise Preempted()

    # -- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to the end, or to a signalled stop (engine.preemption: then Preempted, a SystemExit)."""
        with self.stop_request:
            try:
                return self._fit()
            finally:  # after another error: the write in progress still completes, and its own failure is shown
                self.writer.close()

    def _fit(self) -> dict[str, float]:
        cfg, acc, progress = self.cfg, self.accelerator, self.progress
        bar = tqdm(total=self.total_steps, initial=progress.step, disable=not (self.is_main and cfg.log.progress),
                   dynamic_ncols=True, desc=Path(cfg.output_dir).name)
        metrics: dict[str, float] = {}
        self.startup.lap("app")
        if progress.step == 0 and hasattr(self.task, "monitor"):  # the curve starts from the initial weights
            metrics |= self.task.monitor(acc.unwrap_model(self.model), acc, self.logger, 0)
            self.startup.lap("monitor at step 0")
        window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
        failed_shown = 0
        means = WindowMeans()
        self.model.train()
        evaluated_at = -1
        while progress.step < self.total_steps:
            fetched = time.perf_counter()
            for batch in self.loader:
                data_wait += time.perf_counter() - fetched
                if "first batch" not in self.startup.seconds:
                    self.startup.lap("first batch")
                batch = to_device(batch, acc.device)
                with acc.accumulate(self.model):
                    with acc.autocast():
                        out = self.task.step(self.forward_model, batch)
                    acc.backward(out["loss"])
                    means.add(out, weight=batch["valid"].any())
                    self.optimizer_step.add_loss(out["loss"])
                    if acc.sync_gradients:
                        if progress.step < EARLY_CHECK_STEPS:
                            check_failures(self.loader, acc, f"before step {progress.step + 1}")
                        skipped, grad_norm = self.optimizer_step.step(wants_norm=self._logs_at(progress.step + 1))
                        means.commit(skipped)
                window_samples += len(batch["label"]) * self.world
                progress.samples_seen += len(batch["label"]) * self.world
                fetched = time.perf_counter()
                if not acc.sync_gradients:
                    continue
                progress.step += 1
                if not self.startup.done:
                    self.logger.scalars(self.startup.finish(), progress.step)
                    self._print(self.startup.line())
                self.scheduler.step_update(progress.step)
                if hasattr(self.task, "after_step"):
                    self.task.after_step(acc.unwrap_model(self.model), progress.step)
                if hasattr(self.task, "monitor"):
                    began = time.perf_counter()
                    metrics |= self.task.monitor(acc.unwrap_model(self.model), acc, self.logger, progress.step)
                    window_start += time.perf_counter() - began
                logs = self._logs_at(progress.step)
                stop, save_now = None, False
                if logs:
                    self._read_nonfinite()
                    elapsed = time.perf_counter() - window_start
                    failed = check_failures(self.loader, acc, f"step {progress.step}")
                    if failed > failed_shown:  # shown as it grows, with or without the progress bar
                        self._print(f"step {progress.step}: {failed} samples failed to load so far (all ranks); "
                                    f"the run stops past data.max_fail_count / data.max_fail_fraction")
                        failed_shown = failed
                    scalars = {f"train/{k}": v for k, v in means.read(acc).items()}
                    # The largest lr: with layer decay, the head's group (group 0 is the most decayed).
                    top_lr = max(g["lr"] for g in self.optimizer.param_groups)
                    scalars |= {"train/lr": top_lr, "train/grad_norm": grad_norm.item(),
                                "perf/samples_per_s": window_samples / elapsed,
                                "perf/data_wait_fraction": data_wait / elapsed,
                                "data/samples_failed": failed,
                                "train/nonfinite_steps": progress.nonfinite_total}
                    self.logger.scalars(scalars, progress.step)
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{scalars['train/lr']:.2e}",
                                    **({"failed": failed} if failed else {}))
                    metrics["final_loss"] = scalars["train/loss"]
                    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                    stop, save_now = self._agree_to_save()
                bar.update(1)
                # A sharded model's forward is a collective: then every rank runs it (only rank 0 writes).
                visualizes = self.is_main or self.sharded
                if visualizes and cfg.log.visualize_every and progress.step % cfg.log.visualize_every == 0:
                    self.task.visualize(acc.unwrap_model(self.model), batch, self.logger, progress.step)
                if stop or save_now or progress.step % cfg.train.checkpoint_every == 0 or \
                        progress.step == self.total_steps:
                    if not logs:  # a logging step has checked already
                        check_failures(self.loader, acc, f"step {progress.step}")
                    self.save_checkpoint()
                if stop:
                    self._stop_for_requeue(stop, bar)
                if progress.step >= self.total_steps:
                    break
            else:  # a whole pass over the data
                metrics |= self._after_pass()
                evaluated_at = progress.step
        if evaluated_at != progress.step:
            metrics |= self._after_pass()
        self._wait_for_writer()
        self._finish_export()
        bar.close()
        self.logger.hparams(flatten(cfg), {f"hparam/{k}": v for k, v in metrics.items()})
        self.logger.close()
        acc.end_training()
        return metrics

    def _logs_at(self, step: int) -> bool:
        """Whether optimizer step `step` logs scalars (the last one always does)."""
        return step % self.cfg.log.every == 0 or step == self.total_steps

    def _read_nonfinite(self) -> None:
        """The device's counts of skipped steps into `progress` (at logging steps and saves); too many skipped in a
        row stop the run here (engine/optimizer_step.py)."""
        progress = self.progress
        progress.nonfinite_total, progress.nonfinite_streak = self.optimizer_step.read(progress.step)

    def _print(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)
