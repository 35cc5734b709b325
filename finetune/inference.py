"""A trained model on the user's own files: loading it from whatever the user has (a fine-tuning run, one of
its checkpoints, an exported file, an official checkpoint) and cutting files into clips the way evaluation
does. Shared by `finetune.predict` and `finetune.features`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from data import SampleConfig, SampleProcessor, normalize
from data.decode import IMAGE_EXTENSIONS
from engine import checkpoint
from engine.config import ConfigError, DataConfig, EvalConfig, RunConfig, load_config
from engine.exported import encoder_file
from engine.loaders import resolve_normalization
from models import CheckpointError, Normalization, create_model

from .task import class_names, initialise, newly_initialised

KINETICS400 = Path(__file__).with_name("kinetics400_classes.txt")  # the official list, alphabetical


@dataclass
class Loaded:
    model: nn.Module  # in eval mode
    name: str  # registered architecture
    classes: tuple[str, ...]  # one name per output (empty for an encoder without a classifier)
    data: DataConfig  # how its clips are cut: frames, sampling rate, fps, crop size
    evaluation: EvalConfig  # the run's evaluation views
    normalization: Normalization  # the input statistics it was trained with
    multi_label: bool = False  # independent classes: sigmoid scores (a run with data.multi_label)

    @property
    def is_video(self) -> bool | None:
        """Whether the model takes clips; None for a model without a registry config (a stand-in such as the
        benchmark's raw pixels), which takes what it is given."""
        config = getattr(self.model, "config", None)
        return None if config is None else len(config.input_size) == 3


def at_least_one(text: str) -> int:
    """An argparse type for counts (views, batch sizes): an integer of at least 1, or a usage error (exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def run_config(source: Path) -> RunConfig | None:
    """The resolved config saved next to a run's files (`output_dir/config.yaml`, `checkpoint-*/config.yaml`)."""
    found = source / "config.yaml" if source.is_dir() else source.parent / "config.yaml"
    return load_config([str(found)], []) if found.is_file() else None


def saved_metadata(exported: Path | None, key: str, default: str) -> object:
    """A JSON value a fine-tuning run wrote into its exported classifier's metadata (FinetuneTask.encoder):
    "classes" (names), "multi_label" (bool)."""
    if exported is None:
        return json.loads(default)
    with safe_open(str(exported), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(key, default))


def load_model(source: str | Path, model_name: str | None = None, need_head: bool = True) -> Loaded:
    """Our runs and exported files name their architecture; any other checkpoint (an official Hiera K400
    file, timm weights) needs `model_name`. With `need_head` the classifier must come from the file.
    Raises CheckpointError or ConfigError naming the file."""
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or directory")
    exported = encoder_file(source)
    saved = checkpoint.read_encoder_metadata(exported) if exported else None
    if saved is None and not model_name:
        raise ConfigError(f"{source} does not name its architecture: give --model (e.g. hiera_base_16x224)")
    name, overrides = saved if saved is not None else (model_name, {})
    if need_head and saved is not None and "num_classes" not in overrides:  # fine-tuned exports always say
        raise ConfigError(f"{exported} is an encoder without a classifier (a pretraining run's): fine-tune it "
                          f"first (finetune/main.py), or export its features (python -m finetune.features)")
    model = create_model(name.removeprefix("mae_"), **overrides)
    report = initialise(model, str(exported or source), need_head=need_head)
    if "norm.weight" in newly_initialised(report):
        # An MAE encoder has no classifier norm: its features are the pooled last stage, as the k-NN
        # monitor sees them, not a freshly initialised norm of them.
        model.norm = nn.Identity()
    cfg = run_config(source)
    classes = _classes(exported, cfg, model.config.num_classes)
    data, evaluation = (cfg.data, cfg.eval) if cfg else (DataConfig(), EvalConfig())
    multi_label = saved_metadata(exported, "multi_label", "false") or data.multi_label
    return Loaded(model.eval(), name, classes, data, evaluation, resolve_normalization(data, name, exported),
                  multi_label)


def _classes(exported: Path | None, cfg: RunConfig | None, num_classes: int) -> tuple[str, ...]:
    """Names from the exported file, else from the run's shards, else Kinetics-400's for 400 outputs, else
    the class indices."""
    names = tuple(saved_metadata(exported, "classes", "[]"))
    if not names and cfg is not None:
        try:
            names = class_names(cfg)
        except (OSError, ValueError):  # the run's shards were moved or deleted
            names = ()
    if not names and num_classes == 400:
        names = tuple(KINETICS400.read_text().splitlines())
    return names if len(names) == num_classes else tuple(str(i) for i in range(num_classes))


def sample_config(loaded: Loaded, views: tuple[int | None, int | None], is_image: bool) -> SampleConfig:
    """Evaluation's views for this model: its frames, crop size and input statistics, the run's frame spacing,
    and views as the run evaluated (engine.loaders.eval_sample: a video's clips of the whole short side, an
    image's centre crops of `eval.image_crop_pct`); `views` (spatial, temporal) counts that are not None replace
    the run's."""
    size, d, e = loaded.model.config.input_size, loaded.data, loaded.evaluation
    if is_image:
        spatial, temporal, crop_pct = views[0] or e.image_views, 1, e.image_crop_pct
    else:
        spatial, temporal, crop_pct = views[0] or e.spatial_views, views[1] or e.temporal_views, 1.0
    return SampleConfig(train=False, num_frames=size[0] if loaded.is_video else 1, sampling_rate=d.sampling_rate,
                        target_fps=d.target_fps, sampling=d.sampling, crop_size=size[-1], spatial_views=spatial,
                        temporal_views=temporal, crop_pct=crop_pct, mean=loaded.normalization.mean,
                        std=loaded.normalization.std, max_pixels=d.max_pixels)


def file_clips(path: Path, loaded: Loaded, views: tuple[int | None, int | None]) -> torch.Tensor:
    """A video or image file -> normalised views [V, 3, (T,) S, S] for `loaded.model` (`sample_config`). An
    image given to a video model is repeated over the frames (one temporal view); a video given to an image
    model gives single frames. Raises OSError or data.DecodeError for a file that cannot be read."""
    ext = path.suffix.lstrip(".").lower()
    is_image = ext in IMAGE_EXTENSIONS
    sample = sample_config(loaded, views, is_image)
    views = SampleProcessor(sample)(path.read_bytes(), ext, 0, 0, 0)
    pixels = torch.stack([v["pixels"] for v in views])  # [V, 3, S, S] image, [V, 3, T, S, S] video
    return normalize(fit_to_model(pixels, loaded, sample.num_frames), sample.mean, sample.std)


def fit_to_model(pixels: torch.Tensor, loaded: Loaded, num_frames: int) -> torch.Tensor:
    """Images [N, 3, S, S] or clips [N, 3, T, S, S] -> what `loaded.model` takes: for a video model an image
    repeated over `num_frames` frames, for an image model a clip's first frame."""
    video = loaded.is_video
    if pixels.dim() == 4 and video is True:
        return pixels[:, :, None].expand(-1, -1, num_frames, -1, -1)
    if pixels.dim() == 5 and video is False:
        return pixels[:, :, 0]
    return pixels
