"""The training/evaluation batch loader: torch DataLoader workers over a ``ShardStream``, plus its position.

Batches are dicts; N = (planned samples) x views, views of one sample adjacent:

- ``video`` uint8 [N, 3, T, S, S] (or ``image`` [N, 3, S, S]), not normalised: the consumer applies
  ``transforms.normalize`` on its device;
- ``label`` int64 [N] (-1 when unlabelled; a flipped training view's label follows
  ``SampleConfig.flip_label_map``), or float32 [N, K] multi-hot rows for multi-label shards,
  ``index`` int64 [N] (epoch position), ``view`` int64 [N]
  (repeat r in training, ``t * spatial_views + s`` in evaluation), ``valid`` bool [N] (False for the
  rows of a sample that failed, which hold a copy of another, and for padding), ``key`` list[str];
- ``mask`` bool [N, #MU] (True = keep) when ``SampleConfig.mask_grid`` is set;
- ``num_samples`` int (planned samples, padding excluded) and ``failures`` [(shard, key, reason)] for this batch.

Tensors stay on the CPU: the caller moves them to its device (do not hand this loader to
``accelerator.prepare``, which re-shards it).
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import re
import signal
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .plan import num_batches
from .samples import SampleConfig
from .shards import ShardSet, ShardSetError
from .sources import ShardCache
from .stream import ShardStream


class DataFailureError(RuntimeError):
    """Too many samples failed to decode."""


def reason_kind(reason: str) -> str:
    """A failure's reason without its particulars (numbers, what follows the first colon), so that failures of
    one kind count together: "sample 7 missing: shard holds 3" -> "sample N missing"."""
    return re.sub(r"\d+", "N", reason.split(":", 1)[0]).strip()


def top_reasons(reasons: dict[str, list], top: int = 5) -> str:
    """{kind: [count, (shard, key, reason) example]} -> the `top` most frequent kinds, each with an example."""
    ranked = sorted(reasons.items(), key=lambda item: -item[1][0])[:top]
    return "; ".join(f"{count} x {kind!r} (e.g. {key} in {shard}: {reason})"
                     for kind, (count, (shard, key, reason)) in ranked)


def shared_memory_for(sample: SampleConfig, batch_size: int, num_workers: int, is_image: bool,
                      prefetch_factor: int = 2) -> int:
    """Bytes of shared memory the workers of one loader may hold at once: each has up to `prefetch_factor`
    finished batches queued and one in the making, allocated in shared memory (``stream._empty``)."""
    if not num_workers:
        return 0
    views = sample.num_views * batch_size
    pixels = views * 3 * sample.crop_size**2 * (1 if is_image else sample.num_frames)
    masks = views * int(np.prod(sample.mask_grid)) if sample.mask_grid is not None else 0
    return num_workers * (prefetch_factor + 1) * (pixels + masks)


# True while the main process handles stop signals itself (engine.preemption.StopRequest, during training): its
# workers then outlive the SIGTERM or SIGUSR1 that a scheduler sends to every process of a job, which torch's
# would die of, failing the run. Otherwise they end on these signals as usual, e.g. at the terminate() of an
# exiting main process. Shared memory: workers started earlier see the change.
STOP_SIGNALS_HANDLED = multiprocessing.RawValue(ctypes.c_bool, False)


def _leave_stops_to_main(flag, worker_id: int) -> None:
    """In each worker (after torch's own handlers): SIGTERM, SIGUSR1 and SIGINT wait for `flag` to say."""
    for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(number, partial(_stop_signal_in_worker, flag))


def _stop_signal_in_worker(flag, number: int, frame) -> None:
    if flag.value:
        return
    if number == signal.SIGINT:
        raise KeyboardInterrupt  # torch's worker loop ends quietly on it
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)


def _no_collate(batch):
    return batch  # the stream yields finished batches


class ShardLoader:
    """Iterates the rest of the current epoch, then moves to the next one; ``len()`` is batches per epoch.

    With ``persistent`` (training), the workers live across epochs and prefetch over the boundaries; otherwise
    (evaluation) they stop after each pass. ``state_dict()`` after consuming k batches, restored with
    ``load_state_dict`` into a fresh loader with the same arguments (any ``num_workers``), continues with
    exactly batch k + 1 of that epoch.
    Failures are checked from the first batch on: more than ``max(max_fail_count, max_fail_fraction x samples
    tried)`` failed samples, or a start where not one sample loaded, raises ``DataFailureError`` naming the
    shards and the most frequent reasons (``max_fail_fraction`` 0: the first failure does). Unless
    ``check_failures`` is False: then the caller decides from ``stats`` (the trainer does, with the counts of
    all ranks, so that every rank stops at the same step).
    """

    def __init__(
        self,
        shards: str | Path | ShardSet,
        sample: SampleConfig,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        max_fail_fraction: float = 0.05,
        max_fail_count: int = 5,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        persistent: bool = False,
        check_failures: bool = True,
        shard_mix: int = 8,
        cache: ShardCache | None = None,
    ):
        self.cache = cache or ShardCache()
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.load(shards, self.cache.retries)
        self.shard_mix = shard_mix
        if self.shards.remote:
            largest = max((size or 0 for size in self.shards.sizes), default=0)
            self.cache.check_room(largest, ShardStream.open_shards(shard_mix))
        self.sample, self.batch_size, self.seed = sample, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle, self.drop_last, self.persistent = shuffle, drop_last, persistent
        self.check_failures = check_failures
        self.max_fail_fraction, self.max_fail_count = max_fail_fraction, max_fail_count
        self.loader_kwargs = {"pin_memory": pin_memory}
        self.prefetch_factor = prefetch_factor
        if num_workers:
            self.loader_kwargs["prefetch_factor"] = prefetch_factor
        self.epoch = 0
        self.consumed = 0  # batches of ``epoch`` already handed out
        self.tried = 0
        self.failed: Counter[str] = Counter()  # shard name -> failed samples
        self.reasons: dict[str, list] = {}  # reason_kind -> [count, first (shard, key, reason)], this process
        self._batches = None  # the workers' batch iterator, from (epoch, consumed) on
        self._len = num_batches(self.shards.num_samples, batch_size, world_size, drop_last)
        if self._len == 0 and self.shards.num_samples:
            raise ShardSetError(
                f"{self.shards.spec}: {self.shards.num_samples} samples are fewer than one global batch of "
                f"{batch_size} samples per rank x {world_size} ranks = {batch_size * world_size}"
                + (f" (each sample gives {sample.num_views} clips: data.repeat)" if sample.num_views > 1 else "")
                + ": use more data, a smaller batch size or fewer processes")

    def __len__(self) -> int:
        return self._len

    @property
    def num_classes(self) -> int:
        return len(self.shards.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed, self._batches = epoch, 0, None

    def __iter__(self):
        if self._batches is None and self.consumed < len(self):
            self._batches = self._start_workers()
        while self.consumed < len(self):
            batch = next(self._batches)
            self.consumed += 1
            self._count(batch)
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0
        if not self.persistent:
            self._batches = None

    def _start_workers(self):
        # A shard that cannot be fetched stops the run at once when no failure is allowed; otherwise its
        # samples fail and are counted like bad samples.
        stream = ShardStream(self.shards, self.sample, self.batch_size, self.seed, self.epoch, self.consumed,
                             self.rank, self.world_size, self.shuffle, self.drop_last, endless=self.persistent,
                             shard_mix=self.shard_mix, cache=self.cache)
        if self.num_workers:
            # Garbage must not cross the fork: a PyAV object that owns threads (a filter graph, a threaded
            # codec) freed by the garbage collector of a forked worker waits forever for threads it lost.
            gc.collect()
        # A private generator: creating an iterator must not draw from torch's global RNG, whose state
        # (drop path) a resumed run restores exactly.
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_no_collate,
                               generator=torch.Generator().manual_seed(self.seed),
                               worker_init_fn=partial(_leave_stops_to_main, STOP_SIGNALS_HANDLED),
                               **self.loader_kwargs))

    def _count(self, batch: dict) -> None:
        self.tried += batch["num_samples"]
        self.failed.update(shard for shard, _, _ in batch["failures"])
        for failure in batch["failures"]:
            self.reasons.setdefault(reason_kind(failure[2]), [0, tuple(failure)])[0] += 1
        message = self.failure_message(self.tried, self.failed, self.reasons) if self.check_failures else None
        if message:
            raise DataFailureError(message)

    def failure_message(self, tried: int, failed: Counter[str], reasons: dict[str, list]) -> str | None:
        """Why the run must stop, if it must: more than max(``max_fail_count``, ``max_fail_fraction`` x
        ``tried``) samples failed, or all of them did. ``failed`` counts failures by shard and ``reasons`` by
        kind (this loader's, or all ranks' summed)."""
        total = sum(failed.values())
        allowed = 0 if self.max_fail_fraction == 0 else max(self.max_fail_count, self.max_fail_fraction * tried)
        if total == 0 or (total <= allowed and total < tried):
            return None
        why = "not one sample loaded" if total == tried else (
            f"more than data.max_fail_count={self.max_fail_count} and data.max_fail_fraction="
            f"{self.max_fail_fraction:.0%} allow")
        worst = ", ".join(f"{name} ({n})" for name, n in failed.most_common(5))
        return (f"{total} of {tried} samples failed to load ({why}). Most frequent reasons: "
                f"{top_reasons(reasons)}. Failures by shard: {worst}{', ...' * (len(failed) > 5)}. Fix or "
                f"remove those samples (python -m data.make_shards rewrites shards and lists what it skips), or "
                f"raise data.max_fail_fraction")

    def shared_memory_needed(self) -> int:
        """Bytes of shared memory the workers may hold at once (`shared_memory_for`)."""
        return shared_memory_for(self.sample, self.batch_size, self.num_workers, self.shards.media == "image",
                                 self.prefetch_factor)

    @property
    def stats(self) -> dict:
        """Counts for logging: samples tried and failed since construction (or the restored state)."""
        return {"samples_tried": self.tried, "samples_failed": sum(self.failed.values()),
                "failed_by_shard": dict(self.failed), "reasons": self.reasons}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "tried": self.tried,
                "failed": dict(self.failed), "shards": self.shards.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ShardSetError(f"data state was saved with seed {state['seed']}, this loader has {self.seed}")
        if state.get("shards", self.shards.fingerprint) != self.shards.fingerprint:
            raise ShardSetError(
                f"the checkpoint's data position belongs to another shard list (fingerprint {state['shards']}; "
                f"{self.shards.spec} has {self.shards.fingerprint}: shards added, removed or rewritten), so "
                f"resuming would not continue the same epoch. Point the data at the original shards, or "
                f"start a new output_dir")
        self.epoch, self.consumed, self._batches = state["epoch"], state["consumed"], None
        self.tried, self.failed = state["tried"], Counter(state["failed"])
