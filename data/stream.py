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
shard) is reported in ``failures``; it never sleeps or retries. Its rows keep their place in the batch, filled
with a copy of a good sample and marked ``valid=False`` (see ``ShardStream._batch``), so batches keep one shape
and every rank's step still takes part in the gradient all-reduce, even when all of its samples failed.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import DecodeError
from .plan import EpochPlan, PlannedBatch, epoch_order, num_batches, rank_batches
from .samples import SampleConfig, SampleProcessor
from .shards import SampleError, ShardReader, ShardSet
from .sources import Prefetcher, ShardCache

__all__ = ["PlannedBatch", "ShardStream", "epoch_order", "rank_batches"]


class ShardStream(IterableDataset):
    """Yields finished batches (see ``ShardLoader`` for the dict format) of one rank, from batch ``start`` of
    ``epoch`` to the end of that epoch, or on through the following epochs without end if ``endless``.
    Use with ``DataLoader(batch_size=None)``. Remote shards come through ``cache``; the samples of a shard
    that cannot be fetched fail like any other (``ShardLoader`` and the trainer decide when to stop)."""

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
    ):
        self.shards, self.sample, self.seed, self.epoch, self.start = shards, sample, seed, epoch, start
        self.batch_size, self.rank, self.world_size, self.drop_last = batch_size, rank, world_size, drop_last
        self.num_batches = num_batches(shards.num_samples, batch_size, world_size, drop_last)
        self.shuffle, self.endless, self.shard_mix = shuffle, endless, shard_mix
        self.cache = cache or ShardCache()
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
        plan = window = None
        prefetcher = Prefetcher(self.cache) if self.shards.remote else None
        with ShardReader(self.shards, max_open=self.open_shards(self.shard_mix), cache=self.cache) as reader:
            try:
                for j in itertools.count(self.start + worker_id, num_workers):
                    if per_epoch == 0 or (j >= per_epoch and not self.endless):
                        return
                    epoch = self.epoch + j // per_epoch
                    if plan is None or plan.epoch != epoch:
                        plan = EpochPlan(self.shards.counts, self.batch_size, self.rank, self.world_size,
                                         seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                                         drop_last=self.drop_last, shard_mix=self.shard_mix)
                        reader.new_epoch()
                        if prefetcher is not None:
                            prefetcher.forget()
                            window = PrefetchWindow(plan, len(self.shards.counts), num_workers)
                    batch = self._batch(plan.batch(j % per_epoch), epoch, plan, reader, processor)
                    if prefetcher is not None:  # after the batch: its own shards come first
                        shards = window.entering(j % per_epoch)
                        prefetcher.want([(self.shards.urls[s], self.shards.sizes[s]) for s in shards])
                    yield batch
            finally:
                if prefetcher is not None:
                    prefetcher.close()

    def _batch(self, planned: PlannedBatch, epoch: int, order: EpochPlan, reader: ShardReader, processor) -> dict:
        """Views are written straight into the batch tensor, one fixed slot of rows per planned sample. The
        slot of a sample that fails is filled with a copy of the batch's first good sample (zeros if none)
        and marked ``valid=False``: the batch keeps its shape, so a step never sees zero rows and a compiled
        model never meets a new shape, and the loss weights such rows by zero."""
        per_sample = self.sample.num_views
        shape = self.sample.view_shape(self.is_image)
        num_rows = len(planned.positions) * per_sample
        pixels = _empty((num_rows, *shape), torch.uint8)
        masks = None if self.sample.mask_grid is None else _empty((num_rows, int(np.prod(self.sample.mask_grid))),
                                                                    torch.bool)
        index, view = (np.zeros(num_rows, dtype=np.int64) for _ in range(2))
        label = label_rows(num_rows, len(self.shards.classes) if self.shards.multi_label else None)
        valid, keys = np.zeros(num_rows, dtype=bool), []
        failures, failed_slots, donor = [], [], None
        resolved = order.resolve(planned.positions).tolist()
        for slot, (position, planned_valid) in enumerate(zip(planned.positions.tolist(), planned.valid.tolist())):
            rows = slice(slot * per_sample, (slot + 1) * per_sample)
            shard, member = resolved[slot]
            key = f"#{member}"
            index[rows], view[rows] = position, np.arange(per_sample)
            try:
                key, ext, data, meta = reader.read(shard, member)
                views = processor(data, ext, self.seed, epoch, position, out=pixels[rows],
                                  label=meta.get("label", -1))
            except (DecodeError, SampleError) as e:
                key = getattr(e, "key", None) or key
                if planned_valid:  # a padding copy's failure is already counted where the sample is planned
                    failures.append((self.shards.names[shard], key, str(e)))
                failed_slots.append(rows)
                views = [{"mask": processor.mask(self.seed, epoch, position, v)} for v in range(per_sample)
                         ] if masks is not None else []
            else:
                set_labels(label[rows], [v["label"] for v in views])
                valid[rows] = planned_valid
                donor = rows if donor is None else donor
            keys.extend([key] * per_sample)
            if masks is not None:
                torch.stack([v["mask"] for v in views], out=masks[rows])
        for rows in failed_slots:
            if donor is None:
                pixels[rows] = 0
            else:
                pixels[rows] = pixels[donor]
                label[rows] = label[donor]
        batch = {
            "image" if self.is_image else "video": pixels,
            "label": torch.from_numpy(label),
            "index": torch.from_numpy(index),
            "view": torch.from_numpy(view),
            "valid": torch.from_numpy(valid),
            "key": keys,
            "num_samples": int(planned.valid.sum()),
            "failures": failures,
        }
        if masks is not None:
            batch["mask"] = masks
        return batch


class PrefetchWindow:
    """The shards one worker's next batches of an epoch read, for the prefetcher. After batch j of a worker that
    builds every K-th batch, the window holds its next `ahead` batches j + K, ..., j + ahead K: enough for every
    lane to reach its next shard. Consecutive windows share all but one batch, so each batch is planned once,
    when it enters the window, not again at every step that it stays in it."""

    def __init__(self, plan: EpochPlan, num_shards: int, num_workers: int):
        self.plan, self.step = plan, num_workers
        samples_per_shard = plan.length / max(1, num_shards)
        batches_to_next_shard = samples_per_shard * plan.lanes / (plan.batch_size * num_workers)
        self.ahead = min(64, max(1, math.ceil(batches_to_next_shard)))
        self.planned_until = -1  # the last batch of the epoch whose shards were handed out

    def entering(self, j: int) -> list[int]:
        """The shards, in order of need and once each, of the batches that entered the window of batch j (all
        of its batches at a worker's first call) that earlier windows did not hold."""
        end = min(self.plan.num_batches, j + (self.ahead + 1) * self.step)
        first = max(j + self.step, self.planned_until + self.step)
        entered = range(first, end, self.step)
        if not entered:
            return []
        self.planned_until = entered[-1]
        positions = np.concatenate([self.plan.batch(k).positions for k in entered])
        return list(dict.fromkeys(self.plan.shards(positions).tolist()))


def label_rows(num_rows: int, num_classes: int | None) -> np.ndarray:
    """The batch's labels, to fill: class ids int64 [N], or multi-hot float32 [N, num_classes] for multi-label
    shards (what BCE takes, and what mixup mixes)."""
    if num_classes is None:
        return np.zeros(num_rows, np.int64)
    return np.zeros((num_rows, num_classes), np.float32)


def set_labels(rows: np.ndarray, labels: list) -> None:
    """Writes one view's label per row: a class id, or a tuple of ids as ones in a multi-hot row."""
    if rows.ndim == 1:
        rows[:] = labels
        return
    for row, ids in zip(rows, labels):
        row[list(ids)] = 1


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inside a DataLoader worker, allocated in shared memory, so that sending the batch to the main
    process does not copy it again (as torch's default_collate does)."""
    out = torch.empty(shape, dtype=dtype)
    return out.share_memory_() if get_worker_info() is not None else out
