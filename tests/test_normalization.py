"""The input normalisation follows the model: the registry holds each name's statistics (Kinetics' 0.45 / 0.225
for video, ImageNet's for images), exported encoders carry theirs, and fine-tuning, finetune.predict and
finetune.features feed a model what it was trained with; data.mean / data.std win when set."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors import safe_open

from data import SampleProcessor, normalize
from data.synthetic import write_video
from engine import checkpoint
from engine.config import ConfigError, load_config
from engine.exported import normalization_metadata
from engine.loaders import eval_loader, normalization, train_loader
from finetune.inference import file_clips, load_model, sample_config
from finetune.task import FinetuneTask
from models import IMAGENET, KINETICS, Normalization, create_model
from models import normalization as registered
from pretrain.task import encoder_metadata

# Statistics no model is registered with, so that a test sees which source they came from.
CUSTOM = Normalization((0.3, 0.4, 0.5), (0.2, 0.3, 0.4))
TINY_RUN = [f"model.input_size={TINY['input_size']}", "data.num_frames=8", "data.crop_size=32", "data.num_workers=0"]


def export_classifier(path, stats: Normalization) -> None:
    """A tiny video classifier (3 classes) exported as our runs do, recording `stats`."""
    overrides = {**TINY, "num_classes": 3}
    model = create_model("hiera_base_16x224", **overrides)
    metadata = {**checkpoint.encoder_metadata("hiera_base_16x224", overrides), **normalization_metadata(stats)}
    checkpoint.export_encoder(path, model.state_dict(), metadata)


@pytest.mark.parametrize("name, expected", [
    ("hiera_base_16x224", KINETICS), ("mae_hiera_large_16x224", KINETICS), ("mvitv2_small_16x4", KINETICS),
    ("mvit_base_32x3", KINETICS), ("hiera_base_224", IMAGENET), ("mae_hiera_tiny_224", IMAGENET),
    ("mvitv2_base", IMAGENET)])
def test_each_registered_name_has_the_statistics_of_its_published_checkpoints(name, expected):
    assert registered(name) == expected


def test_the_video_statistics_are_slowfasts_and_unknown_names_are_named():
    assert (KINETICS.mean, KINETICS.std) == ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225))  # also mae_st's
    with pytest.raises(KeyError, match="did you mean"):
        registered("hiera_base_16x22")


def test_finetuning_data_follow_a_video_model_unless_data_mean_is_set(demo_shards):
    keys = ["model.name=hiera_base_16x224", "model.pretrained=null", f"data.train={demo_shards['train']}",
            f"data.val={demo_shards['val']}", *TINY_RUN]
    cfg = load_config(["configs/finetune/k400_hiera_base_16x224.yaml"], keys)
    assert cfg.data.mean is None and cfg.data.std is None
    input_size = tuple(TINY["input_size"])
    for loader in (train_loader(cfg, 0, 1, input_size), eval_loader(cfg, 0, 1, input_size)):
        assert (loader.sample.mean, loader.sample.std) == (KINETICS.mean, KINETICS.std)

    explicit = load_config(["configs/finetune/k400_hiera_base_16x224.yaml"],
                           [*keys, "data.mean=[0.3,0.4,0.5]", "data.std=[0.2,0.3,0.4]"])
    for loader in (train_loader(explicit, 0, 1, input_size), eval_loader(explicit, 0, 1, input_size)):
        assert (loader.sample.mean, loader.sample.std) == (CUSTOM.mean, CUSTOM.std)
    with pytest.raises(ConfigError, match="set both"):
        load_config([], ["data.mean=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match="three values"):
        load_config([], ["data.mean=[0.5,0.5]", "data.std=[0.2,0.2]"])


def test_finetuning_takes_the_statistics_of_the_export_it_starts_from(tmp_path, mae_encoder):
    export_classifier(tmp_path / "encoder.safetensors", CUSTOM)
    started = load_config([], ["model.name=hiera_base_16x224", f"model.pretrained={tmp_path}"])
    assert normalization(started) == CUSTOM  # the export's, not the registry's Kinetics statistics
    explicit = load_config([], ["model.name=hiera_base_16x224", f"model.pretrained={tmp_path}",
                                "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"])
    assert normalization(explicit) == Normalization((0.5,) * 3, (0.25,) * 3)
    # Exports of earlier versions name their model but carry no statistics: those runs all used ImageNet's.
    legacy = load_config([], ["model.name=hiera_base_16x224", f"model.pretrained={mae_encoder}"])
    assert normalization(legacy) == IMAGENET
    # An official checkpoint says nothing: the registry's statistics for the name.
    official = load_config([], ["model.name=hiera_base_16x224", "model.pretrained=hiera_base_16x224.pth"])
    assert normalization(official) == KINETICS


def test_a_video_models_export_carries_its_statistics_and_predict_and_features_use_them(demo_shards, tmp_path):
    cfg = load_config([], ["model.name=hiera_base_16x224", f"data.train={demo_shards['train']}", *TINY_RUN])
    cfg.model.extra = {k: v for k, v in TINY.items() if k != "input_size"}
    task = FinetuneTask()
    state, metadata = task.encoder(task.build_model(cfg))
    assert (json.loads(metadata["mean"]), json.loads(metadata["std"])) == ([0.45] * 3, [0.225] * 3)
    path = tmp_path / "run" / "encoder.safetensors"
    path.parent.mkdir()
    checkpoint.export_encoder(path, state, metadata)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["mean"]) == [0.45] * 3

    loaded = load_model(path)
    assert loaded.normalization == KINETICS
    video = write_video(tmp_path / "clip.mp4", np.random.default_rng(0).integers(0, 256, (48, 40, 48, 3), np.uint8))
    sample = sample_config(loaded, (1, 1), is_image=False)  # what finetune.features cuts a shard's videos with
    assert (sample.mean, sample.std) == (KINETICS.mean, KINETICS.std)
    pixels = SampleProcessor(sample)(video.read_bytes(), "mp4", 0, 0, 0)[0]["pixels"]
    clips = file_clips(video, loaded, (1, 1))  # what finetune.predict feeds the model
    assert torch.equal(clips, normalize(pixels[None], KINETICS.mean, KINETICS.std))

    # The pretraining app's export records the statistics too (here: the demo config's explicit ImageNet ones).
    demo = load_config(["configs/pretrain/demo.yaml"], [])
    assert json.loads(encoder_metadata(demo)["std"]) == list(IMAGENET.std)
    assert json.loads(encoder_metadata(load_config([], []))["mean"]) == [0.45] * 3  # mae_hiera_base_16x224
