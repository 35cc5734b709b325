"""From one sample's bytes to its training or evaluation views.

A video is decoded once for all of its views: the R clips of repeated sampling (mae_st's trick) or the
S x T evaluation views. Every random choice comes from ``position_rng(seed, epoch, index, view, purpose)``,
where ``index`` is the sample's position in the epoch order, so results do not depend on the worker layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, Crops, VideoInfo, decode_image, decode_video
from .masking import random_mask
from .transforms import (
    Box,
    ClipRandAugment,
    clip_span,
    clip_times,
    random_clip_start,
    random_resized_crop_box,
    random_segment_frames,
    spaced_segment_frames,
    spatial_view_boxes,
    uniform_clip_starts,
)

SAMPLINGS = ("clip", "segment")  # how a video's frames are chosen (SampleConfig.sampling)
_PURPOSES = {"clip": 0, "crop": 1, "flip": 2, "augment": 3, "mask": 4}


def position_rng(seed: int, epoch: int, index: int, view: int, purpose: str) -> np.random.Generator:
    """The generator for one random choice of one view of one sample; one stream per purpose, so turning
    an augmentation off does not change the clips or masks of the others."""
    return np.random.default_rng([seed, epoch, index, view, _PURPOSES[purpose]])


@dataclass(frozen=True)
class SampleConfig:
    """How a sample becomes views. Defaults follow the Hiera K400 MAE recipe (REFERENCE.md §4).

    Train: ``repeats`` views per sample, each a random clip + random resized crop (+ flip, RandAugment).
    Eval (``train=False``): ``temporal_views`` uniformly spaced clips x ``spatial_views`` short-side crops,
    view index ``t * spatial_views + s``. Images use the same path with one frame and come out [3, S, S].

    ``sampling``: "clip" takes ``num_frames`` frames ``sampling_rate`` apart at ``target_fps``; "segment" (TSN,
    SlowFast's SSv2) cuts the whole video into ``num_frames`` equal segments and takes one frame of each, random
    in training and at (t + 0.5) / temporal_views of the segment in evaluation view t (``sampling_rate`` and
    ``target_fps`` then play no part). ``flip_label_map``: pairs of class ids swapped when a training view is
    flipped (a flipped "left to right" clip shows "right to left").
    """

    train: bool = True
    num_frames: int = 16
    sampling_rate: int = 4
    target_fps: float | None = 30.0  # frame spacing is sampling_rate / target_fps; None: the video's rate
    crop_size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    sampling: str = "clip"  # one of SAMPLINGS
    hflip: float = 0.5
    flip_label_map: tuple[tuple[int, int], ...] = ()
    rand_augment: str | None = None  # timm config string, e.g. "rand-m7-n4-mstd0.5-inc1"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    repeats: int = 1
    spatial_views: int = 1
    temporal_views: int = 1
    crop_pct: float = 1.0  # eval: the views cover this fraction of the short side (timm's crop_pct)
    mask_grid: tuple[int, ...] | None = None  # mask-unit grid, e.g. (8, 7, 7); None: no mask
    mask_ratio: float = 0.9
    max_pixels: float | None = DEFAULT_MAX_PIXELS  # larger frames or images fail the sample; None: no bound

    @property
    def num_views(self) -> int:
        return self.repeats if self.train else self.spatial_views * self.temporal_views

    def view_shape(self, is_image: bool) -> tuple[int, ...]:
        s = self.crop_size
        return (3, s, s) if is_image else (3, self.num_frames, s, s)


class SampleProcessor:
    """Callable: (bytes, extension, seed, epoch, index[, out, label]) -> list of ``num_views`` dicts with
    ``pixels`` uint8 [3, T, S, S] (video) or [3, S, S] (image), not normalised (``transforms.normalize``),
    ``label`` (the sample's ``label``, a class id or a multi-label sample's tuple of ids, each swapped by
    ``flip_label_map`` in a flipped view) and ``mask``
    bool [#MU] when configured. With ``out`` [num_views, *pixels shape], the pixels are written there. Raises
    ``decode.DecodeError`` for undecodable input."""

    def __init__(self, config: SampleConfig):
        if config.sampling not in SAMPLINGS:
            raise ValueError(f"sampling={config.sampling!r}: use one of {', '.join(SAMPLINGS)}")
        self.config = config
        self.mirrored_label = {a: b for pair in config.flip_label_map for a, b in (pair, pair[::-1])}
        self.rand_augment = (
            ClipRandAugment(config.rand_augment, config.mean) if config.train and config.rand_augment else None
        )

    def __call__(
        self, data: bytes, ext: str, seed: int, epoch: int, index: int, out: torch.Tensor | None = None,
        label: int | tuple[int, ...] = -1,
    ) -> list[dict]:
        cfg = self.config
        is_image = ext.lower() in IMAGE_EXTENSIONS
        if is_image:  # one frame, cut once per view (use temporal_views=1 for images)
            clips = decode_image(data, self._crops(seed, epoch, index, 1), cfg.max_pixels)[:, None]
        else:
            clips = self._decode_clips(data, seed, epoch, index)
        views = []
        for v, clip in enumerate(clips):
            target = None if out is None else (out[v].unsqueeze(1) if is_image else out[v])
            pixels, flipped = self._augment(torch.from_numpy(clip), seed, epoch, index, v, target)
            view = {"pixels": pixels[:, 0] if is_image else pixels,
                    "label": self.mirrored(label) if flipped else label}
            if cfg.mask_grid is not None:
                view["mask"] = self.mask(seed, epoch, index, v)
            views.append(view)
        return views

    def mirrored(self, label: int | tuple[int, ...]) -> int | tuple[int, ...]:
        """The label of a flipped view: `flip_label_map` applied to the class id, or to each of a tuple's."""
        if isinstance(label, tuple):
            return tuple(sorted(self.mirrored_label.get(c, c) for c in label))
        return self.mirrored_label.get(label, label)

    def mask(self, seed: int, epoch: int, index: int, view: int) -> torch.Tensor:
        """bool [#MU], True = keep: the mask of one view, drawn whether or not its sample decodes."""
        rng = position_rng(seed, epoch, index, view, "mask")
        return torch.from_numpy(random_mask(self.config.mask_grid, self.config.mask_ratio, rng))

    def _decode_clips(self, data: bytes, seed: int, epoch: int, index: int) -> np.ndarray:
        """One decode for all views: [num_views, T, S, S, 3] uint8, each view cut to its box."""
        cfg = self.config

        def choose_times(info: VideoInfo) -> np.ndarray:
            sampled = self._segment_times if cfg.sampling == "segment" else self._clip_times
            if cfg.train:
                times = [sampled(info, r, position_rng(seed, epoch, index, r, "clip")) for r in range(cfg.repeats)]
            else:
                times = np.repeat([sampled(info, t) for t in range(cfg.temporal_views)], cfg.spatial_views, axis=0)
            return np.concatenate(times)

        frames, _ = decode_video(data, choose_times, self._crops(seed, epoch, index, cfg.num_frames), cfg.max_pixels)
        return frames.reshape(cfg.num_views, cfg.num_frames, *frames.shape[1:])

    def _crops(self, seed: int, epoch: int, index: int, frames_per_view: int) -> Crops:
        """Every view's box, once for each of its frames (in view order), from the source's size: a random
        resized crop in training, evaluation's spatial view ``view % spatial_views`` otherwise."""
        cfg = self.config

        def view_box(height: int, width: int, view: int) -> Box:
            if cfg.train:
                return random_resized_crop_box(height, width, cfg.scale, cfg.ratio,
                                               position_rng(seed, epoch, index, view, "crop"))
            return spatial_view_boxes(height, width, cfg.spatial_views, cfg.crop_pct)[view % cfg.spatial_views]

        def boxes(height: int, width: int) -> list[Box]:
            return [box for v in range(cfg.num_views) for box in [view_box(height, width, v)] * frames_per_view]

        return Crops(boxes, cfg.crop_size)

    def _clip_times(self, info: VideoInfo, view: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Times [num_frames] of one clip: random start with ``rng`` (training), else temporal view ``view``
        of the uniformly spaced evaluation clips."""
        cfg = self.config
        fps = cfg.target_fps or info.fps
        span = clip_span(fps, cfg.num_frames, cfg.sampling_rate)
        if rng is not None:
            start = random_clip_start(info.duration, span, rng)
        else:
            start = uniform_clip_starts(info.duration, span, cfg.temporal_views)[view]
        return clip_times(start, fps, cfg.num_frames, cfg.sampling_rate)

    def _segment_times(self, info: VideoInfo, view: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Times [num_frames] of one frame per segment: random frames with ``rng`` (training), else those of
        temporal view ``view``. Frame k is asked for at the middle of its display time, (k + 0.5) / fps, so
        that timestamps rounded to the container's time base still pick frame k."""
        cfg = self.config
        video_frames = max(1, round(info.duration * info.fps))
        if rng is not None:
            frames = random_segment_frames(video_frames, cfg.num_frames, rng)
        else:
            frames = spaced_segment_frames(video_frames, cfg.num_frames, view, cfg.temporal_views)
        return (frames + 0.5) / info.fps

    def _augment(
        self, clip: torch.Tensor, seed: int, epoch: int, index: int, view: int, out: torch.Tensor | None
    ) -> tuple[torch.Tensor, bool]:
        """clip [T, S, S, 3] uint8 (cut and resized) -> ([3, T, S, S] uint8 (written into ``out`` if given),
        whether it was flipped)."""
        cfg = self.config
        clip = clip.permute(0, 3, 1, 2)  # [T, 3, S, S], channels-last in memory as crop_resize leaves it
        flipped = cfg.train and position_rng(seed, epoch, index, view, "flip").random() < cfg.hflip
        if flipped:
            clip = clip.flip(-1)
        if self.rand_augment is not None:
            clip = self.rand_augment(clip, position_rng(seed, epoch, index, view, "augment"))
        if out is None:
            out = torch.empty(clip.shape[1], clip.shape[0], *clip.shape[2:], dtype=torch.uint8)
        return out.copy_(clip.permute(1, 0, 2, 3)), flipped
