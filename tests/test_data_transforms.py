"""Clip sampling, augmentation, masks and the per-sample processor."""

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from data.masking import num_kept, random_mask
from data.samples import SampleConfig, SampleProcessor, position_rng
from data.synthetic import motion_clip, write_video
from data.transforms import (
    ClipRandAugment,
    crop_resize,
    normalize,
    random_resized_crop_box,
    spatial_view_boxes,
    uniform_clip_starts,
)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    clip = motion_clip(0, np.random.default_rng(0), 32, 48, 64)
    return write_video(tmp_path_factory.mktemp("v") / "a.mp4", clip, 25).read_bytes()


def test_random_resized_crop_box_respects_scale_and_bounds():
    rng = np.random.default_rng(0)
    for height, width in [(48, 64), (17, 23)]:
        boxes = {random_resized_crop_box(height, width, (0.5, 1.0), (3 / 4, 4 / 3), rng) for _ in range(50)}
        assert len(boxes) > 10
        for top, left, h, w in boxes:
            assert 0 <= top <= height - h and 0 <= left <= width - w
            assert 0.45 <= h * w / (height * width) <= 1.0  # 0.5 up to rounding to whole pixels
    # No box of that scale fits a 300x40 strip within the aspect range: the centred fallback box.
    assert random_resized_crop_box(300, 40, (0.5, 1.0), (3 / 4, 4 / 3), rng) == (123, 0, 53, 40)


def test_spatial_views_and_temporal_starts_are_uniform():
    assert spatial_view_boxes(48, 64, 3) == [(0, 0, 48, 48), (0, 8, 48, 48), (0, 16, 48, 48)]
    assert spatial_view_boxes(64, 48, 1) == [(8, 0, 48, 48)]
    # timm's image evaluation: the centre 87.5% of the short side (resize to crop / 0.875, centre crop)
    assert spatial_view_boxes(64, 48, 1, crop_pct=0.875) == [(11, 3, 42, 42)]
    assert spatial_view_boxes(48, 64, 2, crop_pct=0.5) == [(12, 0, 24, 24), (12, 40, 24, 24)]
    np.testing.assert_allclose(uniform_clip_starts(10.0, 2.0, 5), [0, 2, 4, 6, 8])
    np.testing.assert_allclose(uniform_clip_starts(1.0, 2.0, 3), [0, 0, 0])  # shorter than a clip


def test_crop_resize_upsamples_small_frames():
    frames = torch.randint(0, 255, (4, 17, 23, 3), dtype=torch.uint8)
    out = crop_resize(frames, (0, 0, 17, 23), 32)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8


def test_rand_augment_is_identical_on_every_frame_and_seeded():
    frame = torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)
    clip = frame.expand(6, -1, -1, -1).contiguous()
    augment = ClipRandAugment("rand-m9-n3-mstd0.5-inc1", (0.5, 0.5, 0.5))
    outs = [augment(clip, np.random.default_rng(seed)) for seed in (1, 1, 2, 3, 4)]
    for out in outs:
        assert (out == out[:1]).all(), "frames of one clip were augmented differently"
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in outs[2:])


def test_random_mask_keeps_the_official_count():
    assert num_kept((7, 7), 0.6) == 19 and num_kept((8, 7, 7), 0.9) == 39
    mask = random_mask((8, 7, 7), 0.9, np.random.default_rng(0))
    assert mask.shape == (392,) and mask.dtype == bool and mask.sum() == 39
    assert np.array_equal(mask, random_mask((8, 7, 7), 0.9, np.random.default_rng(0)))
    assert not np.array_equal(mask, random_mask((8, 7, 7), 0.9, np.random.default_rng(1)))


def test_repeated_sampling_draws_different_clips_from_one_decode(video):
    cfg = SampleConfig(num_frames=4, sampling_rate=2, crop_size=32, repeats=4, mask_grid=(2, 4, 4),
                       mask_ratio=0.75, rand_augment="rand-m7-n2-mstd0.5-inc1")
    views = SampleProcessor(cfg)(video, "mp4", seed=0, epoch=3, index=7)
    assert len(views) == 4
    for v in views:
        assert v["pixels"].shape == (3, 4, 32, 32) and v["pixels"].dtype == torch.uint8
        assert v["mask"].shape == (32,) and v["mask"].sum() == 8
    assert not torch.equal(views[0]["pixels"], views[1]["pixels"])
    again = SampleProcessor(cfg)(video, "mp4", seed=0, epoch=3, index=7)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(views, again))
    other_epoch = SampleProcessor(cfg)(video, "mp4", seed=0, epoch=4, index=7)
    assert not torch.equal(views[0]["pixels"], other_epoch[0]["pixels"])


def test_position_streams_are_independent_per_purpose():
    a = position_rng(0, 1, 2, 0, "crop").random(4)
    assert np.array_equal(a, position_rng(0, 1, 2, 0, "crop").random(4))
    assert not np.array_equal(a, position_rng(0, 1, 2, 0, "mask").random(4))
    assert not np.array_equal(a, position_rng(0, 1, 2, 1, "crop").random(4))


def test_eval_views_cover_space_and_time(video):
    cfg = SampleConfig(train=False, num_frames=4, sampling_rate=1, target_fps=None, crop_size=16,
                       spatial_views=3, temporal_views=2)
    views = SampleProcessor(cfg)(video, "mp4", seed=0, epoch=0, index=0)
    assert len(views) == 6
    pixels = torch.stack([v["pixels"] for v in views])
    # temporal views 0 and 1 start at 0 and at the end; spatial views differ along the width
    assert not torch.equal(pixels[0], pixels[3]) and not torch.equal(pixels[0], pixels[2])
    assert torch.equal(pixels, torch.stack([v["pixels"] for v in SampleProcessor(cfg)(video, "mp4", 5, 5, 5)]))


def test_images_use_the_same_path():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    views = SampleProcessor(SampleConfig(crop_size=24, repeats=2, mask_grid=(3, 3), mask_ratio=0.6))(
        buf.getvalue(), "png", 0, 0, 0)
    assert [v["pixels"].shape for v in views] == [(3, 24, 24)] * 2
    assert views[0]["mask"].sum() == 3


@pytest.mark.parametrize("shape", [(2, 3, 4, 8, 8), (2, 3, 8, 8)], ids=["video", "image"])
def test_normalize_matches_torchvision(shape):
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = TF.normalize((pixels.float() / 255).flatten(2, -2), mean, std).view(shape)
    out = normalize(pixels, mean, std)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-6)
