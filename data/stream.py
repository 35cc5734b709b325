"""A deterministic, evenly split, resumable stream of batches over tar shards.

Why not webdataset's pipeline: its per-worker shuffle buffers and shard split (``split_by_node`` /
``split_by_worker``) make the sample order depend on the worker layout, give ranks different batch counts
when shards are uneven (a DDP hang) unless one resamples, and cannot resume mid-epoch (REFERENCE.md §6).
Here the whole epoch is planned from ``info.json`` alone (``data/plan.py``): shards and the samples in them
are permuted from (seed, epoch); each rank takes its own block of shards; each batch interleaves
``shard_mix`` lanes of the block, so it draws from that many shards; every rank gets the same number of
batches, and with ``drop_last=False`` every sample is seen exactly once (padding keeps ranks in step).

Worker w of K (global worker id ``rank * K + w``) builds batches j = start + w, start + w + K, ... of its
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

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import DecodeError
from .plan import EpochPlan, PlannedBatch, epoch_order, num_batches, rank_batches
from .samples import SampleConfig, SampleProcessor
from .shards import SampleError, ShardReader, ShardSet
from .sources import ShardCache

__all__ = ["PlannedBatch", "ShardStream", "epoch_order", "rank_batches"]


class ShardStream(IterableDataset):
    """Yields finished batches (see ``ShardLoader`` for the dict format) of one rank, from batch ``start`` of
    ``epoch`` to the end of that epoch, or on through the following epochs without end if ``endless``.
    Use with ``DataLoader(batch_size=None)``. Remote shards come through ``cache``; with
    ``fetch_errors_fatal`` a shard that cannot be fetched stops the stream instead of failing its samples."""

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
        shard_mix: int = 8,
        cache: ShardCache | None = None,
        fetch_errors_fatal: bool = False,
    ):
        self.shards, self.sample, self.seed, self.epoch, self.start = shards, sample, seed, epoch, start
        self.batch_size, self.rank, self.world_size, self.drop_last = batch_size, rank, world_size, drop_last
        self.num_batches = num_batches(shards.num_samples, batch_size, world_size, drop_last)
        self.shuffle, self.endless, self.shard_mix = shuffle, endless, shard_mix
        self.cache, self.fetch_errors_fatal = cache, fetch_errors_fatal
        self.is_image = shards.media == "image"

    @staticmethod
    def open_shards(shard_mix: int) -> int:
        """Shards a worker keeps open: a batch whose lanes cross into their next shards needs two per lane."""
        return 2 * shard_mix + 2

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        per_epoch = self.num_batches
        processor = SampleProcessor(self.sample)
        plan = None
        with ShardReader(self.shards, max_open=self.open_shards(self.shard_mix), cache=self.cache,
                         fetch_errors_fatal=self.fetch_errors_fatal) as reader:
            for j in itertools.count(self.start + worker_id, num_workers):
                if per_epoch == 0 or (j >= per_epoch and not self.endless):
                    return
                epoch = self.epoch + j // per_epoch
                if plan is None or plan.epoch != epoch:
                    plan = EpochPlan(self.shards.counts, self.batch_size, self.rank, self.world_size,
                                     seed=self.seed, epoch=epoch, shuffle=self.shuffle, drop_last=self.drop_last,
                                     shard_mix=self.shard_mix)
                yield self._batch(plan.batch(j % per_epoch), epoch, plan, reader, processor)

    def _batch(self, planned: PlannedBatch, epoch: int, order: EpochPlan, reader: ShardReader, processor) -> dict:
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
