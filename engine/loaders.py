"""Loaders built from the run config: the one place where config keys become data-pipeline settings."""

from __future__ import annotations

import torch

from data import SampleConfig, ShardCache, ShardLoader, normalize

from .config import ConfigError, RunConfig

# Batches in page-locked memory let `.to(device, non_blocking=True)` overlap the copy with compute; from
# pageable memory the copy blocks the host.
PIN_MEMORY = torch.cuda.is_available()


def media_of(batch: dict, sample: SampleConfig, device: torch.device | None = None) -> torch.Tensor:
    """The pixels of a batch, normalised with `sample`'s statistics on `device` (default: where the batch is):
    `video` float32 [N, 3, T, S, S] or `image` [N, 3, S, S]. The loader hands over uint8."""
    pixels = batch["video"] if "video" in batch else batch["image"]
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)
    return normalize(pixels, sample.mean, sample.std)


def check_geometry(cfg: RunConfig, input_size: tuple[int, ...]) -> None:
    """The clips the data makes must be the model's input size."""
    if cfg.data.crop_size != input_size[-1] or input_size[-2] != input_size[-1]:
        raise ConfigError(f"data.crop_size={cfg.data.crop_size} does not match the model input {input_size}: "
                          f"set model.input_size or data.crop_size")
    if len(input_size) == 3 and cfg.data.num_frames != input_size[0]:
        raise ConfigError(f"data.num_frames={cfg.data.num_frames} does not match the model input {input_size}")


def shard_cache(cfg: RunConfig) -> ShardCache:
    """Where remote shards are kept on this node (`data.cache_dir`, `data.cache_gb`, `data.fetch_retries`)."""
    d = cfg.data
    return ShardCache(root=d.cache_dir, max_bytes=int(d.cache_gb * 2**30), retries=d.fetch_retries)


def train_loader(cfg: RunConfig, rank: int, world_size: int, input_size: tuple[int, ...],
                 mask_grid: tuple[int, ...] | None = None, mask_ratio: float = 0.0) -> ShardLoader:
    """Shuffled, augmented training batches of `train.batch_size` clips (`data.repeat` per video)."""
    check_geometry(cfg, input_size)
    d = cfg.data
    if cfg.train.batch_size % d.repeat:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of data.repeat={d.repeat}")
    if not d.train:
        raise ConfigError("data.train is not set: give a shard directory (python -m data.make_shards ...)")
    sample = SampleConfig(train=True, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                          target_fps=d.target_fps, crop_size=d.crop_size, scale=tuple(d.scale), hflip=d.hflip,
                          rand_augment=d.rand_augment, repeats=d.repeat, mask_grid=mask_grid,
                          mask_ratio=mask_ratio)
    return ShardLoader(d.train, sample, cfg.train.batch_size // d.repeat, seed=cfg.seed, rank=rank,
                       world_size=world_size, num_workers=d.num_workers, shuffle=True, drop_last=True,
                       max_fail_fraction=d.max_fail_fraction, pin_memory=PIN_MEMORY, persistent=True,
                       shard_mix=d.shard_mix, cache=shard_cache(cfg))


def eval_loader(cfg: RunConfig, rank: int, world_size: int, input_size: tuple[int, ...]) -> ShardLoader:
    """Every validation sample exactly once across ranks, as spatial x temporal views."""
    check_geometry(cfg, input_size)
    d = cfg.data
    sample = SampleConfig(train=False, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                          target_fps=d.target_fps, crop_size=d.crop_size,
                          spatial_views=cfg.eval.spatial_views, temporal_views=cfg.eval.temporal_views)
    return ShardLoader(d.val, sample, cfg.eval.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                       num_workers=d.num_workers, shuffle=False, drop_last=False,
                       max_fail_fraction=d.max_fail_fraction, pin_memory=PIN_MEMORY, cache=shard_cache(cfg),
                       shard_mix=1)  # evaluation gains nothing from mixing shards
