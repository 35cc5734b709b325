"""The shard stream: exact-once over ranks x workers, equal batch counts, exact resume, bad data."""

import json

import numpy as np
import pytest
import torch

from data.loader import DataFailureError, ShardLoader
from data.plan import EpochPlan
from data.samples import SampleConfig
from data.stream import PrefetchWindow, epoch_order, rank_batches
from data.synthetic import CLASSES, motion_clip, write_corrupt, write_shard_dir, write_video, write_zero_byte

UNEVEN = (5, 1, 3, 2)  # samples per shard
SAMPLE = SampleConfig(num_frames=4, sampling_rate=2, crop_size=16, repeats=2, mask_grid=(2, 2, 2),
                      mask_ratio=0.5)


def tiny_videos(tmp_path, count, seed=0):
    rng = np.random.default_rng(seed)
    return [write_video(tmp_path / f"v{i}.mp4", motion_clip(i % 4, rng, 16, 48, 64)).read_bytes()
            for i in range(count)]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uneven")
    videos = iter(tiny_videos(tmp, sum(UNEVEN)))
    shards = [[(f"s{s}_{m}", "mp4", next(videos), (s + m) % 4) for m in range(n)] for s, n in enumerate(UNEVEN)]
    return write_shard_dir(tmp / "shards", shards)


def run_epoch(loader):
    return list(loader)


def keys_of(batches):
    return [k for b in batches for k, v, ok in zip(b["key"], b["view"].tolist(), b["valid"].tolist())
            if v == 0 and ok]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        for name in ("video", "mask", "label", "index", "view", "valid"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("counts", [(1,), (2, 1), (3, 5), (4, 5), (4, 4, 3), (6, 1, 6), (5, 0, 6, 6)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_plan_is_even_and_exact(counts, drop_last):
    world, batch, num_samples = 3, 2, sum(counts)
    plans = [rank_batches(counts, batch, r, world, drop_last, seed=1, shard_mix=2) for r in range(world)]
    assert len({len(p) for p in plans}) == 1, "ranks must agree on the number of batches"
    seen = np.concatenate([b.positions[b.valid] for p in plans for b in p]) if plans[0] else np.array([])
    assert len(seen) == len(set(seen.tolist()))
    if drop_last:  # each rank's block loses what does not fill a batch
        assert len(seen) == world * batch * ((num_samples // world) // batch)
    else:
        assert sorted(seen.tolist()) == list(range(num_samples))


def test_epoch_order_is_a_permutation_that_depends_on_seed_and_epoch():
    a = epoch_order(UNEVEN, seed=1, epoch=0)
    assert sorted(map(tuple, a.tolist())) == [(s, m) for s, n in enumerate(UNEVEN) for m in range(n)]
    assert np.array_equal(a, epoch_order(UNEVEN, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(UNEVEN, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(UNEVEN, seed=2, epoch=0))


def test_two_ranks_two_workers_see_every_sample_once(uneven):
    per_rank = []
    for rank in range(2):
        loader = ShardLoader(uneven, SAMPLE, batch_size=2, rank=rank, world_size=2, num_workers=2,
                             drop_last=False)
        batches = run_epoch(loader)
        assert len(batches) == len(loader) == 3
        assert all(b["video"].shape[1:] == (3, 4, 16, 16) for b in batches)
        assert all(b["mask"].sum(1).eq(4).all() for b in batches)
        per_rank.append(keys_of(batches))
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == sorted(f"s{s}_{m}" for s, n in enumerate(UNEVEN) for m in range(n))


def test_resume_and_worker_count_change_nothing_but_speed(uneven):
    def make(num_workers):
        return ShardLoader(uneven, SAMPLE, batch_size=2, num_workers=num_workers, seed=7, drop_last=False)

    reference = run_epoch(make(num_workers=2))
    assert_same_batches(reference, run_epoch(make(num_workers=0)))

    first = make(num_workers=2)
    stream = iter(first)
    consumed = [next(stream), next(stream)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    assert state["consumed"] == 2
    del stream

    resumed = make(num_workers=1)
    resumed.load_state_dict(state)
    rest = run_epoch(resumed)
    assert_same_batches(consumed + rest, reference)
    assert resumed.state_dict()["epoch"] == 1
    next_epoch = run_epoch(resumed)
    assert keys_of(next_epoch) != keys_of(reference) and sorted(keys_of(next_epoch)) == sorted(keys_of(reference))


def test_persistent_workers_carry_over_epochs_and_change_no_batch(uneven):
    """Training loaders keep their workers across epochs: the batches are those of fresh per-epoch workers,
    also after a consumer stops mid-epoch (as the trainer does at its last step) and comes back."""
    def make(persistent):
        return ShardLoader(uneven, SAMPLE, batch_size=2, num_workers=2, seed=3, drop_last=False,
                           persistent=persistent)

    fresh = make(persistent=False)
    expected = [run_epoch(fresh) for _ in range(3)]
    loader = make(persistent=True)
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 2:
            break
    state = loader.state_dict()
    epochs = [head + run_epoch(loader), run_epoch(loader), run_epoch(loader)]
    for want, got in zip(expected, epochs):
        assert_same_batches(want, got)
    assert loader.state_dict()["epoch"] == 3

    resumed = make(persistent=True)
    resumed.load_state_dict(state)
    assert_same_batches(expected[0][2:] + expected[1], run_epoch(resumed) + run_epoch(resumed))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """Shards holding corrupt, zero-byte and non-video samples, and a shard cut in the middle."""
    tmp = tmp_path_factory.mktemp("dirty")
    good = tiny_videos(tmp, 8, seed=1)
    truncated_video = write_corrupt(tmp / "cut.mp4", tmp / "v0.mp4").read_bytes()
    bad = [("zero", "mp4", write_zero_byte(tmp / "z.mp4").read_bytes()),
           ("noise", "mp4", write_corrupt(tmp / "n.mp4").read_bytes()),
           ("cut", "mp4", truncated_video),
           ("text", "mp4", b"not a video at all\n")]
    shards = [
        [("a0", "mp4", good[0], 0), *[(k, e, d, 1) for k, e, d in bad[:2]], ("a1", "mp4", good[1], 1)],
        [("b0", "mp4", good[2], 2), *[(k, e, d, 1) for k, e, d in bad[2:]]],
        [(f"c{i}", "mp4", good[3 + i], 3) for i in range(5)],
    ]
    root = write_shard_dir(tmp / "shards", shards)
    path = root / "shard-000002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # c0.. survive, the tail is lost
    return root


def test_bad_samples_and_a_truncated_tar_are_skipped_and_counted(dirty):
    loader = ShardLoader(dirty, SAMPLE, batch_size=3, num_workers=2, drop_last=False, max_fail_fraction=1.0)
    batches = run_epoch(loader)
    seen = keys_of(batches)
    assert {"a0", "a1", "b0", "c0"} <= set(seen)
    assert not {"zero", "noise", "cut", "text"} & set(seen)
    failures = [f for b in batches for f in b["failures"]]
    stats = loader.stats
    assert stats["samples_tried"] == 12
    assert stats["samples_failed"] == len(failures) == 12 - len(seen)
    assert stats["failed_by_shard"]["shard-000000.tar"] == 2
    assert stats["failed_by_shard"]["shard-000001.tar"] == 2
    truncated = [f for f in failures if f[0] == "shard-000002.tar"]
    assert truncated and all("truncated" in reason for _, _, reason in truncated)


def test_failed_samples_keep_their_rows_as_invalid_stand_ins(dirty):
    """Batches keep one shape whatever fails (no zero-row batch for a step, no new shape for a compiled
    model): a failed sample's rows copy the batch's first good sample, or are zeros when none decoded."""
    loader = ShardLoader(dirty, SAMPLE, batch_size=3, num_workers=0, max_fail_fraction=1.0, shuffle=False)
    batches = run_epoch(loader)
    assert all(len(b["video"]) == len(b["mask"]) == len(b["valid"]) == 3 * SAMPLE.repeats for b in batches)
    assert all(b["mask"].sum(1).tolist() == [4] * 6 for b in batches)  # every row a usable mask
    stand_ins = [(b, row) for b in batches for row in range(6) if not b["valid"][row]]
    assert len(stand_ins) == 2 * sum(len(b["failures"]) for b in batches)
    for batch, row in stand_ins:
        good = torch.nonzero(batch["valid"]).flatten()
        donor = batch["video"][good[0] + row % 2] if len(good) else torch.zeros_like(batch["video"][row])
        assert torch.equal(batch["video"][row], donor)
    # shard 1 (b0 first) is followed by three failures in a row: a batch without any good sample
    assert any(not b["valid"].any() and not b["video"].any() for b in batches)


def test_too_many_failures_stop_the_run_naming_the_shards(dirty):
    loader = ShardLoader(dirty, SAMPLE, batch_size=3, num_workers=0, max_fail_fraction=0.2, max_fail_count=1,
                         shuffle=False)
    with pytest.raises(DataFailureError, match="shard-000000.tar"):
        run_epoch(loader)


def test_synthetic_classes_need_temporal_order():
    rng = np.random.default_rng(0)
    left = motion_clip(CLASSES.index("moving_left"), rng, 8, 48, 64)
    grow = motion_clip(CLASSES.index("growing"), rng, 8, 48, 64)

    def bright_columns(clip):  # x centroid of the square (brighter than any background pixel)
        return [np.nonzero((f == clip.max()).all(-1).any(0))[0].mean() for f in clip]

    def bright_area(clip):
        return [(f == clip.max()).all(-1).sum() for f in clip]

    assert np.all(np.diff(bright_columns(left)) < 0) and np.all(np.diff(bright_columns(left[::-1])) > 0)
    assert np.all(np.diff(bright_area(grow)) >= 0) and bright_area(grow)[-1] > bright_area(grow)[0]


def test_the_prefetch_window_plans_each_batch_once_and_keeps_ahead():
    """Worker 1 of 2 over 40 shards of 7: each of its later batches is planned once, as it enters the window,
    and after batch j the shards of its batches up to j + ahead * 2 have been asked for, in order of need."""
    counts, workers, worker = (7,) * 40, 2, 1
    plan = EpochPlan(counts, 4, seed=0, epoch=0, shard_mix=4)
    unspied, planned = plan.batch, []
    plan.batch = lambda k: planned.append(k) or unspied(k)
    window = PrefetchWindow(plan, len(counts), workers)
    assert window.ahead == 4  # 7 samples a shard x 4 lanes / (4 a batch x 2 workers), rounded up

    def shards_of(batches) -> list[int]:
        return list(dict.fromkeys(plan.shards(np.concatenate([unspied(k).positions for k in batches])).tolist()))

    mine = range(worker, plan.num_batches, workers)
    asked = []
    for j in mine:
        asked += [s for s in window.entering(j) if s not in asked]
        reach = [k for k in mine if j < k <= j + window.ahead * workers]
        if reach:
            assert asked == shards_of(range(worker + workers, reach[-1] + 1, workers))
    assert planned == list(mine[1:])  # each later batch once, in order: not the whole window at every step
