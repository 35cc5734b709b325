"""The order of an epoch, planned from the shards' sample counts alone, without reading a shard.

1. Epoch positions. The shards are permuted from (seed, epoch) and laid end to end; position p is the p-th
   sample of that sequence, where the samples of each shard are permuted from (seed, epoch, shard). Positions
   name samples in the batches (``index``) and seed their augmentation (``samples.position_rng``).
2. Rank blocks. Rank r of W takes the contiguous positions from ``r * N // W``: its own block of whole shards,
   except the at most W - 1 shards that a block boundary cuts, which two ranks read. A node therefore fetches
   about 1/W of the data per epoch per rank, not all of it. Every rank gets the same number of batches:
   ``(N // W) // B`` when dropping the remainder (training); otherwise ``ceil(ceil(N / W) / B)``, the blocks
   differ by at most one sample and a rank whose block runs out first gets one padding sample (``valid``
   False) per missing batch, so every sample is seen exactly once and no rank waits for another.
3. Mixed batches. A block is cut into ``shard_mix`` lanes (contiguous runs of it) and batch j takes its
   samples round-robin from the lanes: sample i of the block's batch order q = j * B + i comes from lane
   ``q % M`` at lane offset ``q // M``. So each batch draws from about M shards far apart in the block, and
   the batch a worker builds needs only the M shards at its lanes' current offsets (M open shards per
   worker, read nearly in order).

Everything is a pure function of (counts, seed, epoch, rank, W, B, shard_mix): the plan of batch j does not
depend on which worker builds it or how many workers there are, and resuming needs only the number of
batches consumed. Planning costs O(#shards) per epoch plus O(B) per batch; members are permuted only for the
shards a rank touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MEMBER_STREAM = 0x4D454D  # keeps the member permutations' seeds apart from the shard order's and the views'


@dataclass(frozen=True)
class PlannedBatch:
    positions: np.ndarray  # [b] int64 epoch positions
    valid: np.ndarray  # [b] bool; False only for padding that keeps ranks in step


def num_batches(num_samples: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches per epoch, the same on every rank."""
    if drop_last:
        return (num_samples // world_size) // batch_size
    per_rank = -(-num_samples // world_size)  # ceil: the largest block
    return -(-per_rank // batch_size)


class EpochPlan:
    """One epoch of one rank: ``batch(j)`` gives its planned batches; ``resolve(positions)`` the (shard, member)
    of epoch positions (the stream's lookup, a batch at a time), ``shards(positions)`` their shards alone."""

    def __init__(self, counts: tuple[int, ...], batch_size: int, rank: int = 0, world_size: int = 1, *,
                 seed: int, epoch: int, shuffle: bool = True, drop_last: bool = True, shard_mix: int = 8):
        self.counts, self.seed, self.epoch, self.shuffle = counts, seed, epoch, shuffle
        self.batch_size = batch_size
        rng = np.random.default_rng([seed, epoch])
        self.shard_order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
        ordered = np.asarray(counts, dtype=np.int64)[self.shard_order]
        self.ends = np.cumsum(ordered)  # position just past each shard of the sequence
        self.starts = self.ends - ordered
        total = int(self.ends[-1]) if len(counts) else 0
        self.num_batches = num_batches(total, batch_size, world_size, drop_last)
        if drop_last:
            self.start = rank * (total // world_size)
            self.length = self.num_batches * batch_size
        else:
            self.start = rank * total // world_size
            self.length = (rank + 1) * total // world_size - self.start
        lanes = max(1, min(shard_mix, self.length))
        lane_lengths = (self.length - np.arange(lanes) + lanes - 1) // lanes  # q with q % M == lane
        self.lanes = lanes
        self.lane_starts = np.concatenate([[0], np.cumsum(lane_lengths)[:-1]]).astype(np.int64)
        self._members: dict[int, np.ndarray] = {}

    def batch(self, j: int) -> PlannedBatch:
        """Batch j (0 <= j < num_batches) of this rank."""
        q = np.arange(j * self.batch_size, min((j + 1) * self.batch_size, self.length), dtype=np.int64)
        if len(q) == 0:  # a short block's padding: its first sample again, never counted
            return PlannedBatch(np.array([self.start % max(1, int(self.ends[-1]))]), np.zeros(1, dtype=bool))
        positions = self.start + self.lane_starts[q % self.lanes] + q // self.lanes
        return PlannedBatch(positions, np.ones(len(q), dtype=bool))

    def shards(self, positions: np.ndarray) -> np.ndarray:
        """[n] int64 shard of each epoch position."""
        return self.shard_order[np.searchsorted(self.ends, positions, side="right")].astype(np.int64)

    def resolve(self, positions: np.ndarray) -> np.ndarray:
        """[n, 2] int64 (shard, member) of epoch positions."""
        k = np.searchsorted(self.ends, positions, side="right")
        shards = self.shard_order[k]
        offsets = positions - self.starts[k]
        members = np.array([self._permutation(s)[o] for s, o in zip(shards.tolist(), offsets.tolist())],
                           dtype=np.int64).reshape(len(offsets))
        return np.stack([shards.astype(np.int64), members], axis=1)

    def _permutation(self, shard: int) -> np.ndarray:
        if shard not in self._members:
            count = self.counts[shard]
            self._members[shard] = (np.random.default_rng([self.seed, self.epoch, _MEMBER_STREAM, shard])
                                    .permutation(count) if self.shuffle else np.arange(count))
        return self._members[shard]


def epoch_order(counts: tuple[int, ...], seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """[N, 2] int64 (shard, member) of every epoch position: the whole sequence that ranks cut into blocks.
    For tools and tests on small data; training never builds it."""
    plan = EpochPlan(counts, 1, seed=seed, epoch=epoch, shuffle=shuffle)
    return plan.resolve(np.arange(sum(counts), dtype=np.int64))


def rank_batches(counts: tuple[int, ...], batch_size: int, rank: int, world_size: int, drop_last: bool, *,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, shard_mix: int = 8) -> list[PlannedBatch]:
    """All batches of ``rank`` for one epoch (every rank gets the same number)."""
    plan = EpochPlan(counts, batch_size, rank, world_size, seed=seed, epoch=epoch, shuffle=shuffle,
                     drop_last=drop_last, shard_mix=shard_mix)
    return [plan.batch(j) for j in range(plan.num_batches)]
