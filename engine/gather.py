"""Collecting per-sample rows from every rank, in sample order: what evaluation, the k-NN monitor and
feature extraction need once each rank has processed its share of a non-shuffled loader."""

from __future__ import annotations

import torch
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
