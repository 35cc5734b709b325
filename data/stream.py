"""A deterministic, evenly split, resumable stream of batches over tar shards.

Why not webdataset's pipeline: its per-worker shuffle buffers and shard split (``split_by_node`` /
``split_by_worker``) make the sample order depend on the worker layout, give ranks different batch counts
when shards are uneven (a DDP hang) unless one resamples, and cannot resume mid-epoch (REFERENCE.md §6).
Here the whole epoch is planned up front from ``info.json`` alone:

1. ``epoch_order``: shards are permuted, then the samples inside each shard, from (seed, epoch) only. Epoch
   position p names one sample (shard, member); consecutive positions stay inside a shard, so reads stay local.
2. ``rank_batches``: positions are cut into global batches of ``world_size x batch_size``; rank r takes the
   r-th slice of each. Every rank gets the same number of batches. With ``drop_last=False`` the last global
   batch is split as evenly as possible, and a rank left with nothing gets one padding sample (``valid`` is
   False for it), so every sample is seen exactly once and no rank waits for another.
3. Worker w of K (global worker id ``rank * K + w``) builds batches j = start + w, start + w + K, ... of its
   rank; torch's DataLoader collects workers round-robin, so batches come out in order j = start, start+1, ...
   whatever K is. Resuming is starting at batch ``start`` = batches already consumed; nothing is replayed.
   An endless stream carries j on past the epoch's end into the next epochs (batch j is batch j mod n of
   epoch ``epoch + j // n``), so training workers live across epochs and prefetch over their boundaries.

Augmentation randomness is seeded by (seed, epoch, position, view) (``samples.position_rng``), so results
do not depend on K either. A sample that fails (corrupt, zero-byte, non-video, missing from a truncated
shard) is left out of its batch and reported in ``failures``; it never sleeps or retries. A batch whose every
sample failed comes out with zero rows, so ranks still agree on the number of batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import DecodeError
from .samples import SampleConfig, SampleProcessor
from .shards import SampleError, ShardReader, ShardSet


def epoch_order(counts: tuple[int, ...], seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """[N, 2] int64 (shard, member) for every epoch position: shards permuted, then members in each."""
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    parts = []
    for shard in shard_order:
        members = rng.permutation(counts[shard]) if shuffle else np.arange(counts[shard])
        parts.append(np.stack([np.full_like(members, shard), members], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class PlannedBatch:
    positions: np.ndarray  # [b] int64 epoch positions
    valid: np.ndarray  # [b] bool; False only for padding that keeps ranks in step


def rank_batches(
    num_samples: int, batch_size: int, rank: int, world_size: int, drop_last: bool
) -> list[PlannedBatch]:
    """The batches of ``rank`` for one epoch; every rank gets the same number."""
    per_step = batch_size * world_size
    full = num_samples // per_step
    batches = []
    for g in range(full):
        start = g * per_step + rank * batch_size
        positions = np.arange(start, start + batch_size)
        batches.append(PlannedBatch(positions, np.ones(batch_size, dtype=bool)))
    leftover = num_samples - full * per_step
    if leftover and not drop_last:
        part = np.array_split(np.arange(full * per_step, num_samples), world_size)[rank]
        if len(part):
            batches.append(PlannedBatch(part, np.ones(len(part), dtype=bool)))
        else:
            batches.append(PlannedBatch(np.array([full * per_step]), np.zeros(1, dtype=bool)))
    return batches


class ShardStream(IterableDataset):
    """Yields finished batches (see ``ShardLoader`` for the dict format) of one rank, from batch ``start`` of
    ``epoch`` to the end of that epoch, or on through the following epochs without end if ``endless``.
    Use with ``DataLoader(batch_size=None)``."""

    def __init__(
        self,
        shards: ShardSet,
        sample: SampleConfig,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        endless: bool = False,
    ):
        self.shards, self.sample, self.seed, self.epoch, self.start = shards, sample, seed, epoch, start
        self.plan = rank_batches(shards.num_samples, batch_size, rank, world_size, drop_last)
        self.shuffle, self.endless = shuffle, endless
        self.is_image = shards.media == "image"

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        per_epoch = len(self.plan)
        processor = SampleProcessor(self.sample)
        order_epoch, order = None, None
        with ShardReader(self.shards) as reader:
            for j in itertools.count(self.start + worker_id, num_workers):
                if per_epoch == 0 or (j >= per_epoch and not self.endless):
                    return
                epoch = self.epoch + j // per_epoch
                if epoch != order_epoch:
                    order_epoch, order = epoch, epoch_order(self.shards.counts, self.seed, epoch, self.shuffle)
                yield self._batch(self.plan[j % per_epoch], epoch, order, reader, processor)

    def _batch(self, planned: PlannedBatch, epoch: int, order: np.ndarray, reader: ShardReader, processor) -> dict:
        """Views are written straight into the batch tensor; the rows of a sample that fails are reused."""
        per_sample = self.sample.num_views
        shape = self.sample.view_shape(self.is_image)
        pixels = _empty((len(planned.positions) * per_sample, *shape), torch.uint8)
        rows, failures = [], []
        for position, valid in zip(planned.positions.tolist(), planned.valid.tolist()):
            shard, member = order[position]
            key = f"#{member}"
            try:
                key, ext, data, meta = reader.read(shard, member)
                out = pixels[len(rows) : len(rows) + per_sample]
                views = processor(data, ext, self.seed, epoch, position, out=out)
            except (DecodeError, SampleError) as e:
                if valid:  # a padding copy's failure is already counted where the sample is planned
                    failures.append((self.shards.names[shard], key, str(e)))
                continue
            label = int(meta.get("label", -1))
            rows.extend((v, view, label, position, key, valid) for v, view in enumerate(views))
        batch = {
            "image" if self.is_image else "video": pixels[: len(rows)],
            "label": torch.tensor([r[2] for r in rows], dtype=torch.int64),
            "index": torch.tensor([r[3] for r in rows], dtype=torch.int64),
            "view": torch.tensor([r[0] for r in rows], dtype=torch.int64),
            "valid": torch.tensor([r[5] for r in rows], dtype=torch.bool),
            "key": [r[4] for r in rows],
            "num_samples": int(planned.valid.sum()),
            "failures": failures,
        }
        if self.sample.mask_grid is not None:
            masks = _empty((len(rows), int(np.prod(self.sample.mask_grid))), torch.bool)
            batch["mask"] = torch.stack([r[1]["mask"] for r in rows], out=masks) if rows else masks
        return batch


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inside a DataLoader worker, allocated in shared memory, so that sending the batch to the main
    process does not copy it again (as torch's default_collate does)."""
    out = torch.empty(shape, dtype=dtype)
    return out.share_memory_() if get_worker_info() is not None else out
