"""The optimizer step and the scalars it logs, with no host sync between logging steps.

Why: on CUDA, reading a device value on the host (`.item()`, `float()`, `bool()`, `.tolist()`) waits until the GPU
has run everything queued so far, so the host cannot queue the next step's kernels ahead of the GPU. Such a read
in every step idles the GPU for the host's per-step work (data hand-off, Python, kernel launches). Here values stay
on the device and are read only at logging steps and saves.

- The gradient norm is computed only when something uses it: clipping (`train.clip_grad`), a logging step
  (`train/grad_norm`), or fp16, whose grad scaler passes over the gradients to unscale them anyway. Otherwise the
  pass over the gradients is skipped.
- One non-finite check per optimizer step, on the device: the step is skipped when a micro-batch's loss on any
  rank was not finite (the flag is all-reduced: one 4-byte collective, so all ranks skip together) or, where it
  was computed, the gradient norm is not finite (it is the same on every rank). That one flag decides the skip,
  the counters and which micro-batches the logged means leave out.
- The skip happens on the device where the optimizer can do it: torch's fused optimizers take the flag as the
  grad scaler hands it to them (`optimizer.found_inf`): their kernel leaves parameters and state alone and takes
  the step count back. The trainer asks for the fused kernel where the optimizer has one (`fused_by_default`:
  Adam, AdamW, SGD). Other optimizers (timm's LARS, Lamb, ...) have no such input: for them the flag is read on
  the host before each step, one sync per step, the simplest way that is exact (a device-side alternative would
  keep a copy of the weights and optimizer state to restore). Under fp16 the grad scaler skips overflowing steps
  itself, as it always did (it reads its flag on the host, unless the optimizer is fused).
- The counters of skipped steps (all of them, the current run, the longest run since the last read) stay on the
  device; `read` brings them to the host at logging steps and saves, and stops the run there when more than
  `train.max_nonfinite_steps` steps in a row were skipped. Skipped steps change nothing, so stopping a few steps
  after the limit was passed costs only their compute.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator
from timm.optim import get_optimizer_class

from .sharded import full_norm

# torch's optimizers whose fused kernel runs on CPU and CUDA alike and takes the grad scaler's `found_inf`
# (Adagrad's fused kernel is CPU-only).
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def fused_by_default(name: str, optimizer_args: dict[str, Any]) -> dict[str, Any]:
    """`optimizer_args` with `fused=True` added when the timm optimizer `name` is one of FUSED_OPTIMIZERS and
    neither `fused` nor `foreach` was chosen: one kernel per step, and the kind that skips a non-finite step without
    a host sync."""
    chosen = "fused" in optimizer_args or "foreach" in optimizer_args
    if chosen or not issubclass(get_optimizer_class(name, bind_defaults=False), FUSED_OPTIMIZERS):
        return dict(optimizer_args)
    return {**optimizer_args, "fused": True}


class WindowMeans:
    """Means of a step's scalar outputs (loss, accuracy) over the micro-batches of a logging window and over the
    ranks. Sums stay on the device until `read`. A micro-batch's values wait in `pending` until its optimizer step
    says whether it was skipped (`commit`): those of skipped steps (counted on their own) are left out, and so are
    batches added with weight 0 (every sample failed to load: their zero loss is not a value)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}  # name -> [sum of weighted values, sum of weights]
        self.pending: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """One micro-batch's outputs (0-dim ones are logged); `weight` is a 0-dim tensor, 0 or 1."""
        for name, value in out.items():
            if value.dim() == 0:
                entry = torch.stack([value.detach().float() * weight, weight.float()])
                self.pending[name] = self.pending[name] + entry if name in self.pending else entry

    def commit(self, skipped: torch.Tensor) -> None:
        """At an optimizer step: its micro-batches join the window unless the step was skipped (0-dim, 1 = skipped;
        `where` rather than a product, as a skipped step's values may be NaN)."""
        for name, entry in self.pending.items():
            kept = torch.where(skipped.bool(), 0.0, entry)
            self.sums[name] = self.sums[name] + kept if name in self.sums else kept
        self.pending = {}

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        names = sorted(self.sums)
        totals = accelerator.reduce(torch.stack([self.sums[n] for n in names]), reduction="sum").tolist()
        self.sums = {}
        return {n: total / count if count else float("nan") for n, (total, count) in zip(names, totals)}


class OptimizerStep:
    """Clipping, the non-finite check and the optimizer step of the trainer (module docstring). Call `add_loss` for
    every micro-batch, `step` at every optimizer step, `read` at logging steps and saves."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 clip_grad: float | None, max_nonfinite_steps: int, skipped_before: int = 0, streak_before: int = 0):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.clip_grad, self.max_nonfinite_steps = clip_grad, max_nonfinite_steps
        self.inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
        self.skips_on_device = accelerator.scaler is None and getattr(self.inner, "_step_supports_amp_scaling", False)
        device = accelerator.device
        self.bad_loss = torch.zeros((), device=device)  # 1 once a micro-batch of this step had a non-finite loss
        # [skipped steps in all, skipped steps in a row now, longest such run since the last read]
        self.counters = torch.tensor([skipped_before, streak_before, streak_before], dtype=torch.float32,
                                     device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss = torch.maximum(self.bad_loss, (~torch.isfinite(loss.detach())).float())

    def step(self, wants_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip, then step unless the step is not finite. Returns (skipped: 0-dim, 1. or 0., the gradient norm
        before clipping, or None when nothing needed it), both on the device."""
        acc = self.accelerator
        skipped, self.bad_loss = self.bad_loss, torch.zeros_like(self.bad_loss)
        if acc.num_processes > 1:
            torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX)
        norm = None
        if self.clip_grad or wants_norm or acc.scaler is not None:
            norm = full_norm(acc.clip_grad_norm_(self.model.parameters(), self.clip_grad or math.inf))
            skipped = torch.maximum(skipped, (~torch.isfinite(norm)).float())
        if acc.scaler is not None:
            self.optimizer.step()  # fp16: the grad scaler skips the update and lowers its scale
        elif self.skips_on_device:
            self.inner.found_inf, self.inner.grad_scale = skipped, None  # the GradScaler protocol
            try:
                self.optimizer.step()
            finally:
                del self.inner.found_inf, self.inner.grad_scale
        elif not skipped.item():  # the one host sync per step, for optimizers that cannot skip on the device
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, streak, longest = self.counters.unbind()
        streak = (streak + 1) * skipped
        self.counters = torch.stack([total + skipped, streak, torch.maximum(longest, streak)])
        return skipped, norm

    def read(self, step: int) -> tuple[int, int]:
        """(skipped steps in all, skipped steps in a row now), read on the host. Raises FloatingPointError when
        more than `max_nonfinite_steps` steps in a row were skipped since the last read."""
        total, streak, longest = (int(v) for v in self.counters.tolist())
        self.counters[2] = streak
        if longest > self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{longest} optimizer steps in a row had a non-finite loss or gradients (seen at step {step}; "
                f"train.max_nonfinite_steps={self.max_nonfinite_steps}); stopping. Lower train.base_lr, set "
                f"train.clip_grad, or use bf16.")
        return total, streak
