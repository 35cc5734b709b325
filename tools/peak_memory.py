"""Peak memory of one MAE training step (forward + backward), with and without activation checkpointing.

    python -m tools.peak_memory [--model mae_hiera_base_224 ...] [--batch 8] [--bf16] [--device cpu]

The figure is the peak of live tensor bytes during the step, weights and gradients included. On CUDA it is
`torch.cuda.max_memory_allocated`. The CPU allocator keeps no such statistic, so there torch's MemTracker
(`torch.distributed._tools.mem_tracker`) counts it: a dispatch mode that sees every tensor storage allocated
and freed, the same quantity, split into parameters, gradients, activations and temporaries.
"""

from __future__ import annotations

import argparse

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from models import create_model

MiB = 2**20


def peak_step_bytes(model: torch.nn.Module, x: torch.Tensor, keep_idx: torch.Tensor, bf16: bool) -> int:
    """Peak live tensor bytes of one forward + backward of an MAE on x [B, C, (T,) H, W] with the kept units
    keep_idx [B, K], gradients starting from None."""
    model.zero_grad(set_to_none=True)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, keep_idx=keep_idx)["loss"]
        loss.backward()

    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        step()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device)
    tracker = MemTracker()
    tracker.track_external(model, x, keep_idx)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[x.device]["Total"]


def checkpointing_rows(name: str, batch: int, device: torch.device, bf16: bool,
                       **overrides) -> dict[str, object]:
    """One table row: the model's peak step memory without and with activation checkpointing (MiB; None
    where the step ran out of memory)."""
    torch.manual_seed(0)
    with device:  # weights made where they live (an L model initialises in seconds on a GPU, not on its CPU)
        model = create_model(name, **overrides).train()
    x = torch.randn(batch, 3, *model.encoder.config.input_size, device=device)
    keep_idx = model.keep_indices(x)
    row: dict[str, object] = {"model": name, "batch": batch, "precision": "bf16" if bf16 else "fp32"}
    for checkpointed in (False, True):
        model.set_grad_checkpointing(checkpointed)
        try:
            peak = peak_step_bytes(model, x, keep_idx, bf16) / MiB
        except torch.OutOfMemoryError:
            peak = None
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        row["checkpointing" if checkpointed else "plain"] = peak
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    def mib(value: object) -> str:
        return "out of memory" if value is None else f"{value:,.0f}"

    lines = ["| model | batch | precision | peak MiB | with activation checkpointing | saved |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        plain, checkpointed = r["plain"], r["checkpointing"]
        saved = f"{1 - checkpointed / plain:.0%}" if plain and checkpointed else "–"
        lines.append(f"| `{r['model']}` | {r['batch']} | {r['precision']} | {mib(plain)} | {mib(checkpointed)} "
                     f"| {saved} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["mae_hiera_base_224"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(markdown([checkpointing_rows(name, args.batch, device, args.bf16) for name in args.model]))


if __name__ == "__main__":
    main()
