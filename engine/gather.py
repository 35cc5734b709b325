"""Collecting per-sample rows from every rank: in sample order on every rank (what evaluation and feature
extraction need once each rank has processed its share of a non-shuffled loader), or on the main process only
(results that the others never read)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator


def gather_rows(accelerator: Accelerator, index: torch.Tensor,
                *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`index` [N] int64 (a sample's epoch position, unique over all ranks) and `rows` [N, ...] of this rank ->
    (index [M], *rows [M, ...]) of all ranks, ordered by index, on the CPU; every rank gets the same result.

    Ranks hold different numbers of rows: they are padded to the longest (index -1), gathered, and the
    padding is dropped."""
    index = accelerator.gather(accelerator.pad_across_processes(index, pad_index=-1)).cpu()
    gathered = [accelerator.gather(accelerator.pad_across_processes(r)).cpu() for r in rows]
    real = index >= 0
    order = index[real].argsort()
    return index[real][order], *(r[real][order] for r in gathered)


def row_counts(accelerator: Accelerator, rows: torch.Tensor) -> list[int]:
    """len(rows) of every rank, in rank order (every rank gets them)."""
    return accelerator.gather(torch.tensor([len(rows)], device=accelerator.device)).tolist()


def gather_on_main(accelerator: Accelerator, *rows: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """`rows` [n_r, ...] of each rank -> on the main process, those of all ranks [sum n_r, ...] in rank order
    (on the CPU); None on the others, which never hold more than their own."""
    if accelerator.num_processes == 1:
        return tuple(r.cpu() for r in rows)
    counts = row_counts(accelerator, rows[0])
    gathered = []
    for r in rows:
        padded = torch.zeros((max(counts), *r.shape[1:]), dtype=r.dtype, device=r.device)
        padded[: len(r)] = r
        parts = [torch.empty_like(padded) for _ in counts] if accelerator.is_main_process else None
        dist.gather(padded, parts, dst=0)
        if parts is not None:
            gathered.append(torch.cat([p[:n] for p, n in zip(parts, counts)]).cpu())
    return tuple(gathered) if accelerator.is_main_process else None
