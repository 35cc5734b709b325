"""Clip-level sampling and augmentation: temporal windows, crops, flips, RandAugment, and
the normalisation that consumers apply on their device.

Every function takes its randomness as an explicit ``numpy.random.Generator`` so the caller can seed it from
the sample's position (DESIGN.md, "randomness is a function of position"). Frames are handled as a clip
[T, H, W, 3] uint8 and the same crop / flip / augmentation is applied to every frame of the clip.
"""

from __future__ import annotations

import functools
import math
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

Box = tuple[int, int, int, int]  # top, left, height, width in source pixels


def clip_times(start: float, fps: float, num_frames: int, sampling_rate: int) -> np.ndarray:
    """Times [num_frames] (seconds) of a clip taking every ``sampling_rate``-th frame at ``fps``."""
    return start + np.arange(num_frames) * (sampling_rate / fps)


def clip_span(fps: float, num_frames: int, sampling_rate: int) -> float:
    return num_frames * sampling_rate / fps


def random_clip_start(duration: float, span: float, rng: np.random.Generator) -> float:
    """Uniform over the starts that keep the clip inside the video; 0 for videos shorter than a clip."""
    return float(rng.uniform(0.0, max(0.0, duration - span)))


def uniform_clip_starts(duration: float, span: float, num_views: int) -> np.ndarray:
    """Starts [num_views] of uniformly spaced evaluation clips (first at 0, last ending at the end)."""
    last = max(0.0, duration - span)
    if num_views == 1:
        return np.array([last / 2])
    return np.linspace(0.0, last, num_views)


def segment_bounds(video_frames: int, num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) [num_segments] frame indices, both inclusive, of ``num_segments`` equal segments of a video
    of ``video_frames`` frames, as SlowFast's ``ssv2.py get_seq_frames`` cuts them: ``seg = (L - 1) / N``,
    segment i spans ``round(seg * i) .. round(seg * (i + 1))`` (neighbours share their boundary frame)."""
    seg = (video_frames - 1) / num_segments
    edges = np.round(seg * np.arange(num_segments + 1)).astype(np.int64)
    return edges[:-1], edges[1:]


def random_segment_frames(video_frames: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Frame indices [num_segments] for training (TSN): a uniform frame of each segment, ends included."""
    first, last = segment_bounds(video_frames, num_segments)
    return rng.integers(first, last + 1)


def spaced_segment_frames(video_frames: int, num_segments: int, view: int, num_views: int) -> np.ndarray:
    """Frame indices [num_segments] of evaluation view ``view`` of ``num_views``: the frame at fraction
    (view + 0.5) / num_views of each segment, so the views differ (SlowFast repeats one clip, SlowFast#306).
    One view takes each segment's middle frame, exactly as SlowFast does."""
    first, last = segment_bounds(video_frames, num_segments)
    return first + (2 * view + 1) * (last - first) // (2 * num_views)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> Box:
    """torchvision's RandomResizedCrop box selection, drawn from ``rng``: area fraction in ``scale``,
    log-uniform aspect in ``ratio``; after 10 misses, the largest centred box within ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def spatial_view_boxes(height: int, width: int, num_views: int, crop_pct: float = 1.0) -> list[Box]:
    """Square boxes of `crop_pct` of the short side, centred across it and uniformly spaced along the long side
    (SlowFast's 3-crop test at 1.0; one view at 0.875 is timm's image evaluation).

    Cropping these and resizing to the crop size equals resizing the short side to crop size / crop_pct
    first, then cropping.
    """
    short, long = min(height, width), max(height, width)
    side = max(1, round(short * crop_pct))
    across = (short - side) // 2
    offsets = [(long - side) // 2] if num_views == 1 else \
        np.linspace(0, long - side, num_views).round().astype(int).tolist()
    if height >= width:
        return [(int(o), across, side, side) for o in offsets]
    return [(across, int(o), side, side) for o in offsets]


def crop_resize(frames: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """Crop ``box`` from frames [T, H, W, 3] uint8 and resize to [T, 3, size, size] uint8 (bilinear,
    antialiased), any input size including ones smaller than ``size``.

    The result stays in channels-last memory, the layout decoded frames already have: torch's uint8
    resize kernel is ~4x faster on it than on a channels-first copy.
    """
    top, left, h, w = box
    crop = frames[:, top : top + h, left : left + w].permute(0, 3, 1, 2)
    if (h, w) == (size, size):
        return crop
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@contextmanager
def _seeded_global_rngs(seed: int):
    """timm's RandAugment draws from the global ``random`` and ``numpy.random``; pin both, restore after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield lambda: (random.seed(seed), np.random.seed(seed))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class ClipRandAugment:
    """timm RandAugment (config string such as ``rand-m7-n4-mstd0.5-inc1``) applied identically to every
    frame of a clip: the global RNGs are reset to the same seed before each frame, so each frame draws the
    same ops and magnitudes."""

    def __init__(self, config: str, mean: tuple[float, float, float]):
        fill = tuple(round(255 * m) for m in mean)
        self.transform = rand_augment_transform(config, {"translate_const": 100, "img_mean": fill})

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """clip [T, 3, S, S] uint8 -> [T, 3, S, S] uint8."""
        seed = int(rng.integers(2**31))
        frames = clip.permute(0, 2, 3, 1).numpy()
        out = []
        with _seeded_global_rngs(seed) as reseed:
            for frame in frames:
                reseed()
                out.append(np.asarray(self.transform(Image.fromarray(frame))))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """pixels [N, 3, ...] uint8 -> float32 of the same shape on the same device, (x / 255 - mean) / std per
    channel. Loaders hand over uint8 and the consumer normalises on its device: a quarter of the bytes to pass
    between processes and to the GPU, and no float pass in the workers."""
    scale, shift = _normalize_affine(tuple(mean), tuple(std), pixels.device, pixels.dim())
    return torch.addcmul(shift, pixels, scale)  # promotes the uint8 to float32 without a temporary copy


@functools.lru_cache(maxsize=16)
def _normalize_affine(mean: tuple, std: tuple, device: torch.device, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1, 3, 1, ...] on ``device``, made once: a host-to-device copy every step would stall it."""
    shape = (1, 3) + (1,) * (dims - 2)
    std_ = torch.tensor(std, dtype=torch.float64).view(shape)
    scale, shift = 1.0 / (255.0 * std_), -torch.tensor(mean, dtype=torch.float64).view(shape) / std_
    return scale.float().to(device), shift.float().to(device)
