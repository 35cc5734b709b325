"""Loaders built from the run config: the one place where config keys become data-pipeline settings."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from data import DataFailureError, SampleConfig, ShardCache, ShardLoader, ShardSet, normalize
from data.loader import shared_memory_for
from models import Normalization
from models import normalization as registered_normalization

from .config import ConfigError, DataConfig, RunConfig, check_flip_label_map
from .exported import encoder_file, saved_normalization

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


def resolve_normalization(data: DataConfig, model_name: str, exported: Path | None) -> Normalization:
    """The statistics the data are normalised with: `data.mean` / `data.std` when the user set them, else those
    the model was trained with: the `exported` encoder's (our export it starts from), else the registry's for
    `model_name` (what its published checkpoints take: Kinetics' for video, ImageNet's for images)."""
    if data.mean is not None and data.std is not None:
        return Normalization(tuple(data.mean), tuple(data.std))
    saved = saved_normalization(exported) if exported is not None else None
    return saved or registered_normalization(model_name)


def normalization(cfg: RunConfig) -> Normalization:
    """`resolve_normalization` for a run: its data keys, the export `model.pretrained` names, `model.name`."""
    exported = encoder_file(cfg.model.pretrained) if cfg.model.pretrained else None
    return resolve_normalization(cfg.data, cfg.model.name, exported)


def check_geometry(cfg: RunConfig, input_size: tuple[int, ...]) -> None:
    """The clips the data makes must be the model's input size."""
    if cfg.data.crop_size != input_size[-1] or input_size[-2] != input_size[-1]:
        raise ConfigError(f"data.crop_size={cfg.data.crop_size} does not match the model input {input_size}: "
                          f"set model.input_size or data.crop_size")
    if len(input_size) == 3 and cfg.data.num_frames != input_size[0]:
        raise ConfigError(f"data.num_frames={cfg.data.num_frames} does not match the model input {input_size}")


def check_label_kind(cfg: RunConfig, shards: ShardSet) -> None:
    """`data.multi_label` must say what the shards hold: the step's loss and the evaluation's metric follow it,
    while the batches' labels follow the shards (class ids [N], or multi-hot rows [N, K])."""
    if shards.multi_label != cfg.data.multi_label:
        kind = "lists of class ids (multi-label)" if shards.multi_label else "one class id each"
        said, wanted = str(cfg.data.multi_label).lower(), str(shards.multi_label).lower()
        raise ConfigError(f"{shards.spec}: its samples' labels are {kind}, but data.multi_label={said}: set "
                          f"data.multi_label={wanted}")


def check_failures(loader: ShardLoader, accelerator: Accelerator, where: str) -> int:
    """Failed samples summed over the ranks (returned for logging); past the limits of `data.max_fail_count`
    and `data.max_fail_fraction` (data.ShardLoader) every rank raises the same DataFailureError. Callers use it
    where the ranks synchronise anyway (log steps, saves, the end of an evaluation, the first optimizer steps),
    so all stop together; a rank deciding alone on its own counts left the others waiting in a collective
    until it timed out. Loaders built here leave the decision to this function."""
    stats = loader.stats
    tried, failed = accelerator.reduce(
        torch.tensor([stats["samples_tried"], stats["samples_failed"]], device=accelerator.device),
        reduction="sum").tolist()
    if failed:
        by_shard: Counter[str] = Counter()
        reasons: dict[str, list] = {}
        for counts, kinds in gather_object([(stats["failed_by_shard"], stats["reasons"])]):
            by_shard.update(counts)
            for kind, (count, example) in kinds.items():
                reasons.setdefault(kind, [0, example])[0] += count
        message = loader.failure_message(tried, by_shard, reasons)
        if message:
            raise DataFailureError(f"{where}, all {accelerator.num_processes} ranks: {message}")
    return failed


def eval_sample(cfg: RunConfig, is_image: bool, views: tuple[int, int] | None = None) -> SampleConfig:
    """How evaluation cuts a sample: a video as `eval.spatial_views` x `eval.temporal_views` clips of its whole
    short side (SlowFast, mae_st, Hiera), an image as `eval.image_views` centre crops of `eval.image_crop_pct` of
    its short side (timm and Hiera: one view at 0.875). `views` (spatial, temporal) replaces the counts."""
    d, e = cfg.data, cfg.eval
    if is_image:
        (spatial, temporal), crop_pct = ((views[0] if views else e.image_views), 1), e.image_crop_pct
    else:
        (spatial, temporal), crop_pct = views or (e.spatial_views, e.temporal_views), 1.0
    channel_stats = normalization(cfg)
    return SampleConfig(train=False, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                        target_fps=d.target_fps, sampling=d.sampling, crop_size=d.crop_size, spatial_views=spatial,
                        temporal_views=temporal, crop_pct=crop_pct, mean=channel_stats.mean, std=channel_stats.std,
                        max_pixels=d.max_pixels)


def evaluation_shared_memory(cfg: RunConfig, is_image: bool) -> int:
    """Shared memory of the evaluation loader that runs while the training workers live (fine-tuning's
    multi-view evaluation, or the k-NN monitor's, one loader at a time): 0 when the run has none."""
    e = cfg.eval
    if not cfg.data.val and not (e.knn.train and e.knn.val):
        return 0
    sample = eval_sample(cfg, is_image, None if cfg.data.val else (1, 1))
    return shared_memory_for(sample, e.batch_size, cfg.data.num_workers, is_image)


def shared_memory_shortfall(cfg: RunConfig, loader: ShardLoader, batch_key: str, shm: str = "/dev/shm") -> str | None:
    """Why this node's /dev/shm is too small for the data workers of its ranks, if it is: the training loader's
    and the evaluation loader's of each rank, times the node's ranks (LOCAL_WORLD_SIZE). Workers hand batches
    over in shared memory; a container's default /dev/shm (64 MB under Docker) is soon too small for video
    batches, and running out kills a worker with a bus error hours in. The trainer asks at start, on every
    rank."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    training = loader.shared_memory_needed()
    evaluating = evaluation_shared_memory(cfg, loader.shards.media == "image")
    needed = ranks * (training + evaluating)
    if not needed or not os.path.isdir(shm):
        return None
    stat = os.statvfs(shm)
    free = stat.f_bavail * stat.f_frsize
    if needed <= free:
        return None
    keys = f"{batch_key}={loader.batch_size * loader.sample.num_views}" + (
        f", eval.batch_size={cfg.eval.batch_size}" if evaluating else "")
    return (f"the data workers of this node's {ranks} rank(s) may need {needed / 2**30:.2f} GiB of shared memory "
            f"({training / 2**30:.2f} GiB for training and {evaluating / 2**30:.2f} GiB for evaluation per rank), "
            f"but {shm} has {free / 2**30:.2f} GiB free: lower data.num_workers={loader.num_workers} or {keys} "
            f"(or data.num_frames / data.crop_size), or give the container more (docker run --shm-size=16g)")


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
    channel_stats = normalization(cfg)
    sample = SampleConfig(train=True, num_frames=d.num_frames, sampling_rate=d.sampling_rate,
                          target_fps=d.target_fps, sampling=d.sampling, crop_size=d.crop_size, scale=tuple(d.scale),
                          hflip=d.hflip, flip_label_map=tuple(tuple(pair) for pair in d.flip_label_map),
                          rand_augment=d.rand_augment, mean=channel_stats.mean, std=channel_stats.std,
                          repeats=d.repeat, mask_grid=mask_grid, mask_ratio=mask_ratio, max_pixels=d.max_pixels)
    loader = ShardLoader(d.train, sample, cfg.train.batch_size // d.repeat, seed=cfg.seed, rank=rank,
                         world_size=world_size, num_workers=d.num_workers, shuffle=True, drop_last=True,
                         max_fail_fraction=d.max_fail_fraction, max_fail_count=d.max_fail_count,
                         pin_memory=PIN_MEMORY, persistent=True,
                         check_failures=False,  # the trainer decides, on the counts of all ranks
                         shard_mix=d.shard_mix, cache=shard_cache(cfg))
    check_flip_label_map(d.flip_label_map, loader.num_classes)
    check_label_kind(cfg, loader.shards)
    return loader


def eval_loader(cfg: RunConfig, rank: int, world_size: int, input_size: tuple[int, ...],
                shards: str | ShardSet | None = None, views: tuple[int, int] | None = None,
                labels_follow_config: bool = True) -> ShardLoader:
    """Every sample of `shards` (default `data.val`) exactly once across ranks, in shard order, as the views of
    `eval_sample` (`views`: other spatial x temporal counts). The shards' labels must be of the kind that
    `data.multi_label` says, unless `labels_follow_config` is False (the k-NN monitor's sets, which it judges
    by their own kind)."""
    check_geometry(cfg, input_size)
    d = cfg.data
    shards = shards if isinstance(shards, ShardSet) else ShardSet.load(shards or d.val, d.fetch_retries)
    sample = eval_sample(cfg, shards.media == "image", views)
    loader = ShardLoader(shards, sample, cfg.eval.batch_size, seed=cfg.seed, rank=rank,
                         world_size=world_size, num_workers=d.num_workers, shuffle=False, drop_last=False,
                         max_fail_fraction=d.max_fail_fraction, max_fail_count=d.max_fail_count,
                         pin_memory=PIN_MEMORY, check_failures=False,
                         cache=shard_cache(cfg), shard_mix=1)  # evaluation gains nothing from mixing shards
    if labels_follow_config:
        check_label_kind(cfg, shards)
    return loader


class RepeatedEvalPass:
    """Every sample of a shard set once across ranks, one centre view each (`eval_loader`), pass after pass: the
    k-NN monitor's bank and queries. The first pass decodes. When this rank's share of the decoded views (uint8)
    fits in `keep_bytes`, it stays in this process's memory and every later pass replays it: no worker
    processes, no decoding (a sample's eval view never changes). Otherwise each pass decodes again, with workers
    started for the pass: their start (about a second) is small against decoding more than `keep_bytes`, and
    workers kept alive between passes would hold processes and shared memory through training."""

    KEPT = ("video", "image", "label", "index", "valid")  # what a replayed pass needs of a batch

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, input_size: tuple[int, ...], shards: ShardSet,
                 keep_bytes: float, where: str):
        self.loader = eval_loader(cfg, rank, world_size, input_size, shards=shards, views=(1, 1),
                                  labels_follow_config=False)
        self.sample, self.where = self.loader.sample, where
        frames = 1 if shards.media == "image" else self.sample.num_frames
        share = len(self.loader) * self.loader.batch_size * 3 * frames * self.sample.crop_size**2
        self.keep = share <= keep_bytes  # the same on every rank: their shares are padded to equal batches
        self.kept_bytes = share if self.keep else 0
        self.kept: list[dict] | None = None

    def batches(self, accelerator: Accelerator):
        """The batches of one pass; all ranks at once (a decoding pass ends with `check_failures`)."""
        if self.kept is not None:
            yield from self.kept
            return
        kept = []
        self.loader.set_epoch(0)  # every pass as the first: the same views
        for batch in self.loader:
            if self.keep:  # out of shared memory, where batches from workers live, into this process's
                kept.append({k: v.clone() if v.is_shared() else v for k, v in batch.items() if k in self.KEPT})
            yield batch
        check_failures(self.loader, accelerator, self.where)
        if self.keep:
            self.kept, self.loader = kept, None
