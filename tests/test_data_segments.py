"""Segment sampling (TSN, SlowFast's SSv2 loader) and the flip label map on real VP9 WebM files, and the config keys
(`data.sampling`, `data.flip_label_map`) that choose them."""

import random

import numpy as np
import pytest
import torch

from data import ShardLoader
from data.samples import SampleConfig, SampleProcessor, position_rng
from data.synthetic import write_shard_dir, write_video
from data.transforms import random_segment_frames, segment_bounds, spaced_segment_frames
from engine.config import ConfigError, load_config
from engine.loaders import eval_sample, train_loader

FRAMES, FPS, LEVEL = 40, 12, 6  # frame k of the ramp video is uniformly grey level LEVEL * k


def slowfast_get_seq_frames(video_length, num_frames, train, randint=random.randint):
    """SlowFast `slowfast/datasets/ssv2.py get_seq_frames`, with `randint` for its `random.randint`."""
    seg_size = float(video_length - 1) / num_frames
    seq = []
    for i in range(num_frames):
        start = int(np.round(seg_size * i))
        end = int(np.round(seg_size * (i + 1)))
        if train:
            seq.append(randint(start, end))
        else:
            seq.append((start + end) // 2)
    return seq


@pytest.fixture(scope="module")
def ramp_webm(tmp_path_factory):
    """VP9 WebM written as a live stream (no stated duration, as PyAV#1131 describes), 40 frames at 12 fps."""
    levels = np.arange(FRAMES, dtype=np.uint8) * LEVEL
    clip = np.repeat(levels[:, None, None, None], 24, 1).repeat(32, 2).repeat(3, 3)
    return write_video(tmp_path_factory.mktemp("v") / "ramp.webm", clip, FPS, codec="libvpx-vp9",
                       options={"deadline": "realtime"}, muxer_options={"live": "1"}).read_bytes()


def frame_ids(view):
    """pixels [3, T, S, S] of the ramp video -> the frame index shown in each of its T frames."""
    return np.rint(view["pixels"].float().mean(dim=(0, 2, 3)).numpy() / LEVEL).astype(int).tolist()


@pytest.mark.parametrize("num_frames", [1, 8, 16, 32])
def test_segments_are_slowfast_s(num_frames):
    for length in range(1, 200):
        first, last = segment_bounds(length, num_frames)
        bounds = slowfast_get_seq_frames(length, num_frames, train=True, randint=lambda a, b: (a, b))
        assert list(zip(first.tolist(), last.tolist())) == bounds, length
        middle = spaced_segment_frames(length, num_frames, 0, 1).tolist()
        assert middle == slowfast_get_seq_frames(length, num_frames, train=False), length


def test_training_draws_every_frame_of_its_segment_and_nothing_else():
    first, last = segment_bounds(100, 16)
    rng = np.random.default_rng(0)
    drawn = np.stack([random_segment_frames(100, 16, rng) for _ in range(500)])  # [draws, segments]
    assert ((drawn >= first) & (drawn <= last)).all()
    assert (drawn.min(0) == first).all() and (drawn.max(0) == last).all()  # both ends, as randint(start, end)


def test_evaluation_views_take_distinct_frames():
    """SlowFast repeats one clip for every temporal view (SlowFast#306): here view v of V takes the frame at
    (v + 0.5) / V of each segment."""
    first, last = segment_bounds(300, 16)  # segments of ~19 frames
    views = np.stack([spaced_segment_frames(300, 16, v, 3) for v in range(3)])
    assert (views[0] < views[1]).all() and (views[1] < views[2]).all()
    assert ((views >= first) & (views <= last)).all()
    assert np.array_equal(views[1], spaced_segment_frames(300, 16, 0, 1))  # the middle view is SlowFast's


def test_processor_decodes_the_segment_frames(ramp_webm):
    evaluate = SampleConfig(train=False, sampling="segment", num_frames=8, crop_size=16, temporal_views=2,
                            spatial_views=3)
    views = SampleProcessor(evaluate)(ramp_webm, "webm", seed=0, epoch=0, index=0)
    assert len(views) == 6
    for t in range(2):  # view index t * spatial_views + s
        expected = spaced_segment_frames(FRAMES, 8, t, 2).tolist()
        assert all(frame_ids(views[t * 3 + s]) == expected for s in range(3))
    one_view = SampleProcessor(SampleConfig(train=False, sampling="segment", num_frames=8, crop_size=16))
    assert frame_ids(one_view(ramp_webm, "webm", 0, 0, 0)[0]) == slowfast_get_seq_frames(FRAMES, 8, train=False)

    train = SampleConfig(sampling="segment", num_frames=8, crop_size=16, repeats=3, hflip=0.0)
    drawn = [[frame_ids(v) for v in SampleProcessor(train)(ramp_webm, "webm", 0, 1, index)] for index in (5, 5, 6)]
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]  # a function of the sample's position
    for index, views_of_sample in zip((5, 5, 6), drawn):
        for r, ids in enumerate(views_of_sample):  # each repeat from its own position stream
            assert ids == random_segment_frames(FRAMES, 8, position_rng(0, 1, index, r, "clip")).tolist()


def test_a_flipped_view_takes_the_mirrored_label(ramp_webm):
    cfg = SampleConfig(num_frames=4, crop_size=16, repeats=8, hflip=0.5, flip_label_map=((1, 2),))
    processor = SampleProcessor(cfg)
    flipped = [position_rng(0, 0, 3, v, "flip").random() < 0.5 for v in range(8)]
    assert any(flipped) and not all(flipped)
    assert [v["label"] for v in processor(ramp_webm, "webm", 0, 0, 3, label=1)] == [2 if f else 1 for f in flipped]
    assert [v["label"] for v in processor(ramp_webm, "webm", 0, 0, 3, label=2)] == [1 if f else 2 for f in flipped]
    assert [v["label"] for v in processor(ramp_webm, "webm", 0, 0, 3, label=0)] == [0] * 8  # in no pair
    evaluate = SampleProcessor(SampleConfig(train=False, num_frames=4, crop_size=16, flip_label_map=((1, 2),)))
    assert evaluate(ramp_webm, "webm", 0, 0, 3, label=1)[0]["label"] == 1  # evaluation never flips


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_batch_labels_follow_the_flips(ramp_webm, tmp_path, hflip):
    shards = write_shard_dir(tmp_path, [[("left", "webm", ramp_webm, 0), ("right", "webm", ramp_webm, 1),
                                         ("other", "webm", ramp_webm, 3)]])
    sample = SampleConfig(sampling="segment", num_frames=4, crop_size=16, repeats=2, hflip=hflip,
                          flip_label_map=((0, 1),))
    batch = next(iter(ShardLoader(shards, sample, batch_size=3, shuffle=False)))
    by_key = dict(zip(batch["key"], batch["label"].tolist()))
    assert by_key == ({"left": 1, "right": 0, "other": 3} if hflip else {"left": 0, "right": 1, "other": 3})
    assert batch["valid"].all() and batch["label"].dtype == torch.int64


def test_the_config_reaches_the_samples(ramp_webm, tmp_path):
    shards = write_shard_dir(tmp_path, [[(f"s{i}", "webm", ramp_webm, i) for i in range(4)]])
    keys = [f"data.train={shards}", "data.sampling=segment", "data.num_frames=4", "data.crop_size=16",
            "data.num_workers=0", "train.batch_size=2"]
    cfg = load_config([], [*keys, "data.flip_label_map=[[0,1]]"])
    loader = train_loader(cfg, 0, 1, (4, 16, 16))
    assert (loader.sample.sampling, loader.sample.flip_label_map) == ("segment", ((0, 1),))
    assert eval_sample(cfg, is_image=False).sampling == "segment"
    with pytest.raises(ConfigError, match=r"\[0, 9\] names a class id outside the data's 4 classes"):
        train_loader(load_config([], [*keys, "data.flip_label_map=[[0,9]]"]), 0, 1, (4, 16, 16))
