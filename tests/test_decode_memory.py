"""Decoding memory follows the output, not the source (issue 22): frames are cut and resized as they come, a
frame far larger than its crops is converted to RGB shrunk, and a source above data.max_pixels fails its sample
by name and size."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.decode
from data.decode import Crops, DecodeError, decode_image, decode_video
from data.loader import DataFailureError, ShardLoader
from data.make_shards.encode import encode_input
from data.make_shards.inputs import Input
from data.samples import SampleConfig
from data.synthetic import write_shard_dir, write_video
from data.transforms import crop_resize
from tools.bench_decode_memory import decode_in_child, moving_pattern

FPS = 25
TIMES = np.array([0.0, 0.04, 0.04, 0.32, 0.2, 5.0])  # repeats, any order, and one past the end
MiB = 2**20


def textured(num_frames: int, height: int, width: int) -> np.ndarray:
    """[T, H, W, 3] uint8: smooth colour that moves, with some fine texture (what the shrinking has to keep)."""
    rng = np.random.default_rng(0)
    grain = rng.integers(0, 24, (height, width, 3), dtype=np.uint8)
    return np.stack([frame // 2 + grain for frame in moving_pattern(width, height, num_frames)])


def reference_cuts(frames: np.ndarray, boxes: list, size: int) -> np.ndarray:
    """What decoding used to do: full-size RGB frames [N, H, W, 3], each cut to its box by crop_resize."""
    return np.stack([crop_resize(torch.from_numpy(frame)[None], box, size)[0].permute(1, 2, 0).numpy()
                     for frame, box in zip(frames, boxes)])


def boxes_for(count: int, seed: int):
    """Boxes that differ per requested frame (as the views of a sample do), inside any source of its size."""
    rng = np.random.default_rng(seed)

    def boxes(height: int, width: int) -> list:
        out = []
        for _ in range(count):
            h, w = int(rng.integers(height // 2, height + 1)), int(rng.integers(width // 2, width + 1))
            out.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
        return out

    return boxes


def test_small_sources_are_cut_exactly_as_from_full_frames(tmp_path):
    """Boxes under 4 x the output size: the frame is converted at full size and the output is bit-identical to
    cutting the full-size frames afterwards (the old path), for videos and images."""
    video = write_video(tmp_path / "v.mp4", textured(10, 96, 128), FPS, gop=4).read_bytes()
    boxes = boxes_for(len(TIMES), seed=0)(96, 128)
    frames, _ = decode_video(video, lambda _: TIMES)
    cut, _ = decode_video(video, lambda _: TIMES, Crops(lambda h, w: boxes, 48))
    assert cut.shape == (len(TIMES), 48, 48, 3)
    np.testing.assert_array_equal(cut, reference_cuts(frames, boxes, 48))

    image = io.BytesIO()
    Image.fromarray(textured(1, 75, 100)[0]).convert("P").save(image, format="png")  # a palette: RGB at decode
    image_boxes = boxes_for(3, seed=1)(75, 100)
    cut = decode_image(image.getvalue(), Crops(lambda h, w: image_boxes, 32))
    full = decode_image(image.getvalue())
    np.testing.assert_array_equal(cut, reference_cuts(np.stack([full] * 3), image_boxes, 32))


def test_large_frames_are_converted_to_rgb_shrunk_and_stay_close(tmp_path, monkeypatch):
    """Boxes of 4 x the output size or more: no frame is converted to RGB at full size, and the output stays
    within a grey level or two of cutting the full-size frames (measured: mean 0.4-1.8 on textured 1080p and 4K
    frames; the boxes keep their exact place, in fractional pixels of the shrunk frame)."""
    video = write_video(tmp_path / "v.mp4", textured(10, 480, 640), FPS, gop=4).read_bytes()
    boxes = boxes_for(len(TIMES), seed=2)(480, 640)
    reference = reference_cuts(decode_video(video, lambda _: TIMES)[0], boxes, 24)
    converted = []

    def spy(frame, width=None, height=None):
        converted.append((width or frame.width, height or frame.height))
        return rgb24(frame, width, height)

    rgb24 = data.decode.rgb24
    monkeypatch.setattr(data.decode, "rgb24", spy)
    cut, _ = decode_video(video, lambda _: TIMES, Crops(lambda h, w: boxes, 24))
    assert converted and all(w * h <= 640 * 480 / 4 for w, h in converted), converted
    difference = np.abs(cut.astype(int) - reference)
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12, (difference.mean(), difference.max())

    for fmt in ("jpeg", "png"):
        image = io.BytesIO()
        Image.fromarray(textured(1, 480, 640)[0]).save(image, format=fmt, quality=95)
        image_boxes = boxes_for(2, seed=3)(480, 640)
        cut = decode_image(image.getvalue(), Crops(lambda h, w: image_boxes, 24))  # noqa: B023
        full = decode_image(image.getvalue())
        difference = np.abs(cut.astype(int) - reference_cuts(np.stack([full] * 2), image_boxes, 24))
        assert difference.mean() < 2.0, (fmt, difference.mean())


@pytest.mark.parametrize("kind", ["video", "jpeg"])
def test_peak_memory_of_a_worker_follows_the_output_clip(tmp_path, kind):
    """One 16-frame 224-pixel training clip from a 1920x1080 video, or one view of a 6000x4000 JPEG, in a fresh
    process: what decoding adds to its peak RSS stays small. The old code held every frame in full-size RGB twice:
    +252 MiB for this video, and +444 MiB for a 33 MP JPEG (tools/bench_decode_memory.py)."""
    if kind == "video":
        path = write_video(tmp_path / "hd.mp4", moving_pattern(1920, 1080, 16), FPS, gop=16)
        frames, bound = 16, 100 * MiB
    else:
        path = tmp_path / "photo.jpg"
        Image.fromarray(next(moving_pattern(6000, 4000, 1))).save(path, quality=90)
        frames, bound = 1, 40 * MiB
    rss = decode_in_child(path, frames, 224, Path(data.decode.__file__).parents[1])
    added = (rss["peak_kib"] - rss["before_kib"]) * 1024
    assert added < bound, f"decoding added {added / MiB:.0f} MiB"
    assert rss["shape"] == ([3, frames, 224, 224] if kind == "video" else [3, 224, 224])


def test_sources_above_max_pixels_fail_by_size_before_decoding(tmp_path):
    video = write_video(tmp_path / "v.mp4", textured(4, 48, 64), FPS).read_bytes()
    with pytest.raises(DecodeError, match=r"^video larger than data.max_pixels: 64x48 = 0.00307 MP > 0.003 MP"):
        decode_video(video, lambda _: np.zeros(1), max_pixels=3000)
    assert decode_video(video, lambda _: np.zeros(1), max_pixels=64 * 48)[0].shape == (1, 48, 64, 3)
    image = io.BytesIO()
    Image.fromarray(textured(1, 48, 64)[0]).save(image, format="png")
    with pytest.raises(DecodeError, match=r"^image larger than data.max_pixels: 64x48"):
        decode_image(image.getvalue(), max_pixels=3000)


def test_a_sample_above_max_pixels_is_a_failure_naming_its_key_and_size(tmp_path):
    """Counted like any failed sample: the loader's message names the sample, its shard and its size."""
    small, large = (io.BytesIO() for _ in range(2))
    Image.fromarray(textured(1, 40, 40)[0]).save(small, format="png")
    Image.fromarray(textured(1, 120, 160)[0]).save(large, format="png")
    samples = [(f"ok{i}", "png", small.getvalue(), 0) for i in range(3)] + [("huge", "png", large.getvalue(), 0)]
    shards = write_shard_dir(tmp_path / "shards", [samples], media="image")
    sample = SampleConfig(num_frames=1, crop_size=32, max_pixels=10_000)
    loader = ShardLoader(shards, sample, batch_size=4, shuffle=False, drop_last=False, max_fail_count=0)
    with pytest.raises(DataFailureError) as caught:
        list(loader)
    assert ("1 x 'image larger than data.max_pixels' (e.g. huge in shard-000000.tar: image larger than "
            "data.max_pixels: 160x120 = 0.0192 MP > 0.01 MP") in str(caught.value)


_SHARD_ONE = """
import io, json, sys
from PIL import Image
from data.make_shards.encode import encode_input
from data.make_shards.inputs import Input
def status_kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
ext, payload = encode_input(Input(sys.argv[1], 0, "photo"), 224)
print(json.dumps({"before_kib": before, "peak_kib": status_kib("VmHWM"), "ext": ext,
                  "size": Image.open(io.BytesIO(payload)).size}))
"""


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_make_shards_short_side_decodes_a_large_image_shrunk(tmp_path, fmt):
    """make_shards --short-side 224 on a 6000x4000 photo, in a fresh process. The JPEG decodes at 1/8 scale: the
    peak RSS that encoding adds stays under 25 MiB. A PNG cannot decode at reduced scale, so it holds one
    full-size decode (69 MiB here) and its file, and no RGB copies: under 1.5 copies. The old code added 322 MiB
    to both (the full image in RGB several times over). The result is as before: the short side at 224 and the
    picture of the full-size resize."""
    path = tmp_path / f"photo.{fmt}"
    photo = Image.fromarray(next(moving_pattern(6000, 4000, 1)))
    photo.save(path, **({"quality": 90} if fmt == "jpg" else {"compress_level": 1}))
    env = {**os.environ, "PYTHONPATH": str(Path(data.decode.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", _SHARD_ONE, str(path)], env=env, capture_output=True, text=True,
                          check=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    added = (rss["peak_kib"] - rss["before_kib"]) * 1024
    assert added < (25 * MiB if fmt == "jpg" else 1.5 * 6000 * 4000 * 3), f"encoding added {added / MiB:.0f} MiB"
    assert rss["ext"] == "jpg" and rss["size"] == [336, 224]
    ext, payload = encode_input(Input(str(path), 0, "photo"), 224)
    shrunk = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), dtype=int)
    full = np.asarray(photo.resize((336, 224), Image.BICUBIC), dtype=int)
    assert np.abs(shrunk - full).mean() < 3.0
