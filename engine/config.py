"""The typed config schema (the one source of defaults) and its loading from YAML files and `key=value`.

    accelerate launch pretrain/main.py --config configs/pretrain/demo.yaml train.max_steps=50 seed=1

A YAML file may name `_base_: other.yaml` (relative to itself) to inherit; later files and the command line
override earlier ones. An unknown key or a value of the wrong type stops the program before any work with
exit code 2 and a message that names the key (and the near one, if any).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.decode import DEFAULT_MAX_PIXELS
from data.samples import SAMPLINGS

from .preemption import signal_numbers


@dataclass
class ModelConfig:
    name: str = "mae_hiera_base_16x224"
    input_size: list[int] | None = None  # None: the registered size
    drop_path_rate: float | None = None
    mask_ratio: float | None = None  # MAE only; None: 0.6 images, 0.9 video
    decoder_depth: int | None = None
    decoder_embed_dim: int | None = None
    decoder_num_heads: int | None = None
    target: str | None = None  # MAE: "pixel" or "hog"
    norm_pix_loss: bool | None = None
    num_classes: int | None = None  # fine-tuning: None = the training data's class count
    head_dropout: float | None = None
    pretrained: str | None = None  # fine-tuning: MAE checkpoint dir, exported encoder, official/timm/SlowFast file,
    # or "random" (the random initialisation, e.g. a linear-probe baseline)
    extra: dict[str, Any] = field(default_factory=dict)  # any other field of the registered model config
    compile: bool = False  # torch.compile the model (one graph for the MAE)

    def overrides(self) -> dict[str, Any]:
        """The set fields, as `create_model` overrides."""
        skip = {"name", "pretrained", "extra", "compile"}
        chosen = {k: v for k, v in vars(self).items() if k not in skip and v is not None}
        if chosen.get("input_size") is not None:
            chosen["input_size"] = tuple(chosen["input_size"])
        return {**chosen, **dict(self.extra)}


@dataclass
class DataConfig:
    # Shards: a directory or info.json, an http(s):// or s3:// base URL, a pipe: template with {name}, or a
    # brace-expanded shard list (data/sources.py).
    train: str = ""
    val: str = ""  # fine-tuning: evaluation shards
    num_frames: int = 16
    sampling_rate: int = 4
    target_fps: float | None = 30.0  # frame spacing = sampling_rate / target_fps seconds; None: native rate
    crop_size: int = 224
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # "clip": num_frames frames sampling_rate apart; "segment": one frame of each of num_frames equal segments of
    # the whole video (TSN, SlowFast's SSv2), random in training, spread over the views in evaluation.
    sampling: str = "clip"
    hflip: float = 0.5
    # [[a, b], ...]: class ids swapped when a training clip is flipped ("left to right" <-> "right to left";
    # SSv2's pairs: docs/other_datasets.md).
    flip_label_map: list[list[int]] = field(default_factory=list)
    # Fine-tuning: labels are lists of class ids (Charades): multi-hot targets, binary cross-entropy, mAP. The
    # shards must say the same (info.json's "multi_label").
    multi_label: bool = False
    rand_augment: str | None = None  # timm string, e.g. "rand-m7-mstd0.5-inc1"
    # Per-channel RGB statistics of the input normalisation, (x / 255 - mean) / std. Unset (both): the model's,
    # that is its exported encoder's (model.pretrained) or else its registry entry's (engine.loaders.normalization).
    mean: list[float] | None = None
    std: list[float] | None = None
    random_erase: float = 0.0  # fine-tuning: probability of timm's RandomErasing (pixel mode; video: every frame)
    repeat: int = 1  # repeated sampling: clips drawn per decoded video
    num_workers: int = 4
    max_fail_fraction: float = 0.05  # stop when more samples than this fail to decode (0: at the first)...
    max_fail_count: int = 5  # ... and more than this many: checked from the first batch (data.ShardLoader)
    # A video whose frames, or an image, have more pixels fails as a sample (its key and size in the reason) before
    # it is decoded: a decoder holds several frames at the source's size (~0.4 GB per worker for 8K, which passes).
    max_pixels: float = DEFAULT_MAX_PIXELS
    shard_mix: int = 8  # shards each training batch draws from (lanes interleaved per worker)
    cache_dir: str = ""  # node-local folder for remote shards; "": one in the system's temp dir
    cache_gb: float = 0.0  # its size bound (least recently used shards go first); 0: unbounded
    fetch_retries: int = 3  # retries of a failed download, with backoff 1, 2, 4, ... s


@dataclass
class TrainConfig:
    batch_size: int = 8  # clips (or images) per device per step, repeats included
    epochs: float = 800  # effective epochs: passes over the data x data.repeat
    max_steps: int | None = None  # optional cap on optimizer steps
    base_lr: float = 8e-4  # lr = base_lr x total batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 120  # effective epochs
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    layer_decay: float | None = None  # fine-tuning: per-block lr decay
    optimizer: str = "adamw"  # any timm optimizer name (timm.optim.create_optimizer_v2), e.g. "lars"
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # its other arguments, e.g. {always_adapt: true}
    accum_steps: int = 1
    clip_grad: float | None = None
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions where the run computes in fp32
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick its fastest kernels for the run's fixed shapes
    mixed_precision: str | None = None  # no, bf16 or fp16; unset: accelerate launch's --mixed_precision
    # FSDP: the dtype gradients are reduce-scattered in, fp32 as DDP all-reduces them (accelerate's mixed precision
    # policy would use bf16 under bf16); bf16 or fp16 halve that traffic.
    fsdp_reduce_dtype: str = "fp32"
    checkpoint_every: int = 1000  # optimizer steps
    checkpoint_minutes: float | None = None  # also save when this much wall time passed since the last save
    # Signals that stop the run with a checkpoint and exit code 75, "requeue me" (engine/preemption.py).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 20  # consecutive NaN/inf steps before the run stops
    # Fine-tuning recipe (ignored by pretraining).
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    mode: str = "finetune"  # fine-tuning app: "finetune" (all weights) or "linear_probe" (frozen encoder)


@dataclass
class LogConfig:
    every: int = 10  # steps between scalar logs
    visualize_every: int = 200  # steps between reconstruction images (0: never)
    visualize_samples: int = 4
    progress: bool = True
    # tensorboard, wandb, mlflow (engine/tracking.py; wandb and mlflow are the extras of the same names)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "multiscale-mae"  # the wandb project, the MLflow experiment


@dataclass
class KnnConfig:
    """Pretraining's online k-NN monitor (engine/knn.py): off while `train` or `val` is unset."""

    train: str = ""  # labelled shard directory: the neighbours
    val: str = ""  # labelled shard directory: the queries
    every: int = 1000  # optimizer steps between measurements (and at step 0)
    max_samples: int | None = None  # use only the first this many samples of each set
    k: int = 20
    temperature: float = 0.07
    # GiB per rank: the decoded views of the rank's share of the sets (the bank first) stay in memory between
    # measurements when they fit (no decoding, no worker processes after the first); 0: decode every time
    keep_views_gb: float = 2.0


@dataclass
class EvalConfig:
    spatial_views: int = 3  # video: crops along the long side, each of the whole short side (SlowFast)
    temporal_views: int = 5  # video: clips spaced over its length
    image_views: int = 1  # images: crops along the long side, each of image_crop_pct of the short side
    image_crop_pct: float = 0.875  # images: timm's and Hiera's evaluation (resize to crop / 0.875, centre crop)
    batch_size: int = 8
    every_epochs: int = 1  # fine-tuning: evaluate after every this many passes
    shuffled: bool = True  # video: the final evaluation also with each clip's frames permuted (temporal reliance)
    shuffled_every: bool = False  # ... and every periodic evaluation too (which doubles their cost)
    metric: str = "top1"  # what best/ keeps the highest of: a key of the evaluation's metrics (metrics.json)
    export: str = "last"  # the model in output_dir/encoder.safetensors at the end: "last" or "best"
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/pretrain"
    seed: int = 0
    resume: str = ""  # "auto": the latest checkpoint in output_dir; or a checkpoint directory
    eval_only: bool = False  # fine-tuning: evaluate `model.pretrained` and stop


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file with its `_base_` chain merged under it."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:  # OmegaConf hands PyYAML's error on; its first line says what, the rest where
        where = getattr(err, "problem_mark", None)
        line = f", line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {str(err).splitlines()[0]}") from err
    base = node.pop("_base_", None)
    if base is None:
        return node
    bases = [base] if isinstance(base, str) else list(base)
    merged = OmegaConf.merge(*(_read_yaml(path.parent / b, (*seen, path)) for b in bases))
    return OmegaConf.merge(merged, node)


def load_config(config_files: list[str], overrides: list[str], schema: type = RunConfig) -> RunConfig:
    """Schema defaults <- YAML files (in order) <- `key=value` overrides; validated against the schema."""
    try:
        layers = [OmegaConf.structured(schema)]
        layers += [_read_yaml(Path(f)) for f in config_files]
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
        layers.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from err
    if isinstance(config, RunConfig):
        check_values(config)
    return config


_AT_LEAST_ONE = ("train.batch_size", "train.accum_steps", "train.checkpoint_every", "log.every",
                 "eval.batch_size", "eval.every_epochs", "eval.spatial_views", "eval.temporal_views",
                 "eval.image_views", "data.repeat", "data.num_frames", "data.sampling_rate", "data.crop_size",
                 "data.shard_mix", "eval.knn.every", "eval.knn.k", "eval.knn.max_samples")


def check_values(config: RunConfig) -> None:
    """Values the types allow but the run cannot use, named before any work starts."""
    for key in _AT_LEAST_ONE:
        value = config
        for name in key.split("."):
            value = getattr(value, name)
        if value is not None and value < 1:  # None: an optional key left unset
            raise ConfigError(f"{key}={value}: must be at least 1")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise ConfigError(f"train.max_steps={config.train.max_steps}: must be at least 1 (or unset)")
    if config.data.num_workers < 0 or config.log.visualize_every < 0:
        raise ConfigError("data.num_workers and log.visualize_every cannot be negative")
    if config.data.fetch_retries < 0 or config.data.cache_gb < 0 or config.data.max_fail_count < 0:
        raise ConfigError("data.fetch_retries, data.cache_gb and data.max_fail_count cannot be negative")
    if not 0 < config.eval.image_crop_pct <= 1:
        raise ConfigError(f"eval.image_crop_pct={config.eval.image_crop_pct}: must be in (0, 1]")
    if config.data.max_pixels <= 0:
        raise ConfigError(f"data.max_pixels={config.data.max_pixels:g}: must be positive")
    if not 0 <= config.data.max_fail_fraction <= 1:
        raise ConfigError(f"data.max_fail_fraction={config.data.max_fail_fraction}: must be in [0, 1]")
    if config.train.mode not in ("finetune", "linear_probe"):
        raise ConfigError(f"train.mode={config.train.mode!r}: use finetune or linear_probe")
    if config.eval.export not in ("last", "best"):
        raise ConfigError(f"eval.export={config.eval.export!r}: use last or best")
    if config.eval.knn.temperature <= 0:
        raise ConfigError(f"eval.knn.temperature={config.eval.knn.temperature}: must be positive")
    if config.eval.knn.keep_views_gb < 0:
        raise ConfigError(f"eval.knn.keep_views_gb={config.eval.knn.keep_views_gb}: cannot be negative")
    if config.train.checkpoint_minutes is not None and config.train.checkpoint_minutes <= 0:
        raise ConfigError(f"train.checkpoint_minutes={config.train.checkpoint_minutes}: must be positive (or unset)")
    try:
        signal_numbers(config.train.stop_signals)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    check_normalization(config.data.mean, config.data.std)
    if config.data.sampling not in SAMPLINGS:
        raise ConfigError(f"data.sampling={config.data.sampling!r}: use {' or '.join(SAMPLINGS)}")
    check_flip_label_map(config.data.flip_label_map)
    if config.train.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision={config.train.mixed_precision!r}: use no, bf16 or fp16")
    if config.train.fsdp_reduce_dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.fsdp_reduce_dtype={config.train.fsdp_reduce_dtype!r}: use fp32, bf16 or fp16")


def check_normalization(mean: list[float] | None, std: list[float] | None) -> None:
    """`data.mean` and `data.std` are set together (half of one normalisation and half of another would fit
    no model), three values each, with positive stds."""
    if (mean is None) != (std is None):
        raise ConfigError(f"data.mean={mean} and data.std={std}: set both (or neither: the model's)")
    if mean is None:
        return
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"data.mean={mean} and data.std={std}: three values each (R, G, B)")
    if min(std) <= 0:
        raise ConfigError(f"data.std={std}: must be positive")


def check_flip_label_map(pairs: list[list[int]], num_classes: int | None = None) -> None:
    """`data.flip_label_map` holds pairs of distinct class ids (below `num_classes` when given), each id in one
    pair at most: otherwise which label a flipped clip gets would be ambiguous."""
    seen: set[int] = set()
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1] or min(pair) < 0:
            raise ConfigError(f"data.flip_label_map: {pair} is not a pair of two different class ids")
        if num_classes is not None and max(pair) >= num_classes:
            raise ConfigError(f"data.flip_label_map: {pair} names a class id outside the data's {num_classes} "
                              f"classes")
        if seen & set(pair):
            raise ConfigError(f"data.flip_label_map: class {sorted(seen & set(pair))[0]} is in two pairs")
        seen |= set(pair)


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    return f"config key {key!r}: {message}" if key else message


def parse_args(description: str, argv: list[str] | None = None, schema: type = RunConfig) -> RunConfig:
    """Command line -> config; on a bad config print the problem and exit with code 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", action="append", default=[], help="YAML file (repeatable; later wins)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides, schema)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def flatten(config: RunConfig) -> dict[str, Any]:
    """{"train.base_lr": 0.0008, ...} with lists and None as strings: what TensorBoard hparams accept."""
    flat = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk(OmegaConf.to_container(OmegaConf.structured(config)), "")
    return flat
