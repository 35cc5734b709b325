"""The fine-tuning app end to end, as users run it: real shards, real processes, files read back."""

import csv
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import hiera as official
import pytest
import torch
from conftest import TINY
from launch import image_tree
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data import SampleConfig, SampleProcessor, ShardLoader, normalize
from data.make_shards.folder import folder_inputs
from data.make_shards.writer import shard_inputs
from data.synthetic import CLASSES, kinetics_name, write_corrupt
from engine import checkpoint
from engine.config import ConfigError, load_config
from engine.loaders import media_of
from engine.trainer import Trainer
from finetune.probe import LinearProbe
from finetune.task import FinetuneTask
from models import KINETICS, create_model, load_pretrained

REPO = Path(__file__).resolve().parents[1]
DEMO = "configs/finetune/demo.yaml"
SIZE = ["model.input_size=[8,32,32]", "data.crop_size=32", "data.num_workers=1", "log.progress=false"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def finetune(shards: dict[str, Path], out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "finetune/main.py", "--config", DEMO, f"data.train={shards['train']}",
                f"data.val={shards['val']}", f"output_dir={out}", *SIZE, *overrides])


@pytest.fixture(scope="module")
def finetuned(demo_shards, mae_encoder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A run fine-tuned from the untrained MAE encoder on the 4 motion classes: (output_dir, the process)."""
    out = tmp_path_factory.mktemp("finetuned") / "ft"
    result = finetune(demo_shards, out, f"model.pretrained={mae_encoder}", "train.max_steps=96",
                      "train.base_lr=2e-2", "train.layer_decay=null", "eval.every_epochs=100")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_finetune_from_mae_beats_chance_and_needs_temporal_order(demo_shards, finetuned, tmp_path):
    out, result = finetuned
    # The report names what was loaded and what starts fresh (the MAE has no classifier norm or head).
    assert "loaded 70 tensors" in result.stdout
    fresh = "norm.weight, norm.bias, head.projection.weight, head.projection.bias"
    assert f"newly initialised (4): {fresh}" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_videos"] == 16 and metrics["views_per_video"] == 2 and metrics["chance"] == 25.0
    assert metrics["top1"] >= 75, metrics  # chance: 25%
    # Shuffled frames destroy the motion that defines the classes.
    assert metrics["top1_shuffled"] <= metrics["top1"] - 20, metrics
    assert f"top1 {metrics['top1']:.2f}%" in result.stdout

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert events.Scalars("eval/top1")[-1].value == pytest.approx(metrics["top1"])
    assert "eval/confusion_matrix" in events.Tags()["images"]
    assert Image.open(out / "confusion_matrix.png").size[0] > 4 * 30  # the picture with names, next to metrics
    assert {"setup/initialisation/text_summary", "eval/per_class_top1/text_summary"} <= set(events.Tags()["tensors"])

    # The exported classifier evaluates on its own (eval_only), with the same views: the same numbers.
    name, overrides = checkpoint.read_encoder_metadata(out / "encoder.safetensors")
    assert name == "hiera_base_16x224" and overrides["num_classes"] == 4 and overrides["embed_dim"] == 16
    again = finetune(demo_shards, tmp_path / "eval", f"model.pretrained={out}", "eval_only=true")
    assert again.returncode == 0, again.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["top1"] == metrics["top1"] and evaluated["top1_shuffled"] == metrics["top1_shuffled"]


def val_videos(demo_shards: dict[str, Path]) -> list[tuple[Path, str]]:
    """The validation split's mp4 files and their class names, from the raw Kinetics-style CSV."""
    raw = demo_shards["val"].parents[1] / "raw"
    with open(raw / "val.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(raw / "videos" / r["label"] / kinetics_name(r["youtube_id"], int(r["time_start"]), int(r["time_end"])),
             r["label"]) for r in rows]


def test_predict_names_the_classes_and_agrees_with_evaluation(demo_shards, finetuned, tmp_path):
    out, _ = finetuned
    videos = val_videos(demo_shards)
    broken = write_corrupt(tmp_path / "broken.mp4", videos[0][0])
    files = [videos[0][0], broken, *(v for v, _ in videos[1:])]
    result = run([sys.executable, "-m", "finetune.predict", "--checkpoint", str(out), "--json", *map(str, files)])
    assert result.returncode == 1, result.stderr[-3000:]  # one file failed, the others were predicted
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {broken}: ")
    entries = json.loads(result.stdout)
    assert [e["file"] for e in entries] == list(map(str, files)) and set(entries[1]) == {"file", "error"}
    predicted = [e["predictions"] for e in entries if "predictions" in e]
    assert len(predicted) == 16
    for top in predicted:  # all 4 classes, by name, most probable first, probabilities summing to 1
        assert sorted(p["class"] for p in top) == sorted(CLASSES)
        assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)
        assert sum(p["probability"] for p in top) == pytest.approx(1, abs=1e-5)
    # The run's 1 x 2 views, averaged like evaluation: the same top-1 as metrics.json.
    hits = sum(top[0]["class"] == label for top, (_, label) in zip(predicted, videos))
    assert 100 * hits / 16 == pytest.approx(json.loads((out / "metrics.json").read_text())["top1"])

    text = run([sys.executable, "-m", "finetune.predict", "--checkpoint", str(out / "encoder.safetensors"),
                "--spatial-views", "2", str(videos[0][0])])
    assert text.returncode == 0, text.stderr[-3000:]
    lines = text.stdout.splitlines()
    assert lines[0] == str(videos[0][0]) and len(lines) == 5 and lines[1].split()[0] in CLASSES
    assert lines[1].endswith("%")


def test_predict_with_an_official_kinetics_checkpoint(demo_shards, tmp_path):
    torch.manual_seed(0)
    config = create_model("hiera_base_16x224").config
    reference = official.Hiera(**dataclasses.asdict(config)).eval()  # 400 Kinetics classes, random weights
    torch.save({"model_state": reference.state_dict()}, tmp_path / "hiera_base_16x224.pth")
    video = val_videos(demo_shards)[0][0]
    result = run([sys.executable, "-m", "finetune.predict", "--checkpoint", str(tmp_path / "hiera_base_16x224.pth"),
                  "--model", "hiera_base_16x224", "--spatial-views", "1", "--temporal-views", "1", "--json",
                  str(video)])
    assert result.returncode == 0, result.stderr[-3000:]
    top = json.loads(result.stdout)[0]["predictions"]
    # The official model on the same clip (16 frames, 4 apart at 30 fps, centre crop, normalised with the
    # Kinetics statistics the official video checkpoints were trained with; its head softmaxes in eval).
    clip = SampleProcessor(SampleConfig(train=False))(video.read_bytes(), "mp4", 0, 0, 0)[0]["pixels"]
    with torch.no_grad():
        expected = reference(normalize(clip[None], KINETICS.mean, KINETICS.std))[0].topk(5)
    names = (REPO / "finetune" / "kinetics400_classes.txt").read_text().splitlines()
    assert [p["class"] for p in top] == [names[i] for i in expected.indices.tolist()]
    assert [p["probability"] for p in top] == pytest.approx(expected.values.tolist(), abs=1e-4)
    assert len(names) == 400 and names[:2] == ["abseiling", "air drumming"] and names[-1] == "zumba"


def test_official_hiera_checkpoint_finetunes_with_the_recipe_and_resumes(demo_shards, tmp_path):
    torch.manual_seed(0)
    config = create_model("hiera_base_16x224", **TINY).config
    reference = official.Hiera(**dataclasses.asdict(config))  # the `hiera` package's model, 400 classes
    torch.save({"model_state": reference.state_dict()}, tmp_path / "official.pth")
    out = tmp_path / "ft"
    # An official file names no architecture: model.name and model.* keys give it.
    architecture = ["model.extra.embed_dim=16", "model.extra.stages=[1,1,2,1]"]
    recipe = [f"model.pretrained={tmp_path / 'official.pth'}", *architecture, "train.mixup=0.8", "train.cutmix=1.0",
              "data.rand_augment=rand-m7-n4-mstd0.5-inc1", "train.ema_decay=0.9", "train.checkpoint_every=3",
              "eval.spatial_views=2", "eval.temporal_views=1"]
    result = finetune(demo_shards, out, *recipe, "train.max_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mismatched (2): head.projection.weight: checkpoint (400, 128) vs model (4, 128)" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"top1", "top5", "top1_shuffled"} <= set(metrics) and metrics["views_per_video"] == 2
    # The EMA travels in the checkpoint and is what gets exported.
    last = checkpoint.latest_checkpoint(out)
    ema = load_file(str(last / "task.safetensors"))
    exported = load_file(str(out / "encoder.safetensors"))
    torch.testing.assert_close(ema["ema.blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])
    model = load_file(str(last / "model.safetensors"))
    assert not torch.equal(model["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])

    resumed = finetune(demo_shards, out, *recipe, "train.max_steps=9", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}" in resumed.stdout + resumed.stderr
    assert checkpoint.latest_checkpoint(out).name == "checkpoint-00000009"


def test_bad_setups_stop_before_work(demo_shards, mae_encoder, tmp_path):
    wrong_name = finetune(demo_shards, tmp_path / "a", f"model.pretrained={mae_encoder}",
                          "model.name=hiera_large_16x224")
    assert wrong_name.returncode == 2 and "set model.name=hiera_base_16x224" in wrong_name.stderr
    untrained_head = finetune(demo_shards, tmp_path / "b", f"model.pretrained={mae_encoder}", "eval_only=true")
    assert untrained_head.returncode == 2 and "evaluation needs a fine-tuned classifier" in untrained_head.stderr
    no_classifier = run([sys.executable, "-m", "finetune.predict", "--checkpoint", str(mae_encoder),
                         str(val_videos(demo_shards)[0][0])])
    assert no_classifier.returncode == 2
    assert no_classifier.stderr.strip().endswith("or export its features (python -m finetune.features)")


def test_linear_probe_trains_only_the_head_and_resumes_exactly(demo_shards, mae_encoder, tmp_path):
    out = tmp_path / "probe"
    probe = [f"model.pretrained={mae_encoder}", "train.mode=linear_probe", "train.optimizer=lars",
             "train.optimizer_args.always_adapt=true", "train.base_lr=0.5", "train.weight_decay=0",
             "train.layer_decay=null", "train.label_smoothing=0", "train.max_steps=6", "train.checkpoint_every=3",
             "eval.every_epochs=100", "eval.shuffled=false"]
    result = finetune(demo_shards, out, *probe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"top1", "top5"} <= set(json.loads((out / "metrics.json").read_text()))
    final = out / "checkpoint-00000006"
    weights = load_file(final / "model.safetensors")
    # The encoder is bit-identical to the file it came from; the optimizer holds the head's 2 tensors only.
    source = load_file(mae_encoder)
    assert all(torch.equal(weights[f"encoder.{k}"], v) for k, v in source.items())
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == 2
    assert sorted(tuple(s["momentum_buffer"].shape) for s in optimizer["state"].values()) == [(4,), (4, 128)]
    assert not torch.equal(weights["head.norm.running_var"], torch.ones(128))  # the BatchNorm did learn

    # Resumed from step 3, it ends where the uninterrupted run ended, bit for bit.
    final.rename(tmp_path / "straight-6")
    resumed = finetune(demo_shards, out, *probe, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    again = load_file(final / "model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)

    # The export is the plain classifier the probe equals in eval mode (BatchNorm folded into the linear layer).
    name, overrides = checkpoint.read_encoder_metadata(out / "encoder.safetensors")
    plain = create_model(name, **overrides).eval()
    plain.load_state_dict(load_file(out / "encoder.safetensors"))
    head = weights["head.projection.weight"], weights["head.projection.bias"]
    features = torch.randn(5, 128)
    normed = (features - weights["head.norm.running_mean"]) / (weights["head.norm.running_var"] + 1e-6).sqrt()
    torch.testing.assert_close(plain.head(features), normed @ head[0].T + head[1])


def test_linear_probe_keeps_the_encoder_in_eval_mode():
    probe = LinearProbe(create_model("hiera_base_16x224", **TINY, num_classes=3, drop_path_rate=0.5)).train()
    assert probe.training and probe.head.training and not probe.encoder.training
    assert not any(m.training for m in probe.encoder.modules())
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.projection.weight",
                                                                           "head.projection.bias"]
    clips = torch.randn(2, 3, 8, 32, 32)
    torch.testing.assert_close(probe.forward_features(clips), probe.forward_features(clips))  # no drop path


def test_linear_probe_without_augmentation_fits_on_features_computed_once(tmp_path):
    """The fast path, on images: no Trainer (no checkpoints), the head fitted on the frozen features of each
    image's centre view. `model.pretrained=random` is seeded like the Trainer, so the exported encoder is the
    architecture's initialisation for `seed`; the export is the plain classifier, and its evaluation on the
    validation images equals the one the run wrote."""
    tree = image_tree(tmp_path / "images", {"train": 8, "test": 4})
    shards = {}
    for split in ("train", "test"):
        inputs, classes = folder_inputs(tree / split)
        shards[split] = tmp_path / split
        shard_inputs(inputs, classes, shards[split], per_shard=8)
    size = ["--config", "configs/finetune/fmnist_hiera.yaml", f"data.train={shards['train']}",
            f"data.val={shards['test']}", "data.num_workers=1", "log.progress=false", "seed=3"]
    out = tmp_path / "fast"
    result = run([sys.executable, "finetune/main.py", *size, "model.pretrained=random", "train.mode=linear_probe",
                  "train.layer_decay=null", "train.label_smoothing=0", "train.clip_grad=null", "train.epochs=5",
                  "train.batch_size=8", "train.base_lr=0.1", "data.scale=[1.0,1.0]", "data.hflip=0",
                  f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "features are computed once" in result.stdout and not list(out.glob("checkpoint-*"))
    name, overrides = checkpoint.read_encoder_metadata(out / "encoder.safetensors")
    torch.manual_seed(3)
    fresh = create_model(name, **overrides).state_dict()
    exported = load_file(out / "encoder.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in fresh.items() if not k.startswith("head."))
    again = run([sys.executable, "finetune/main.py", *size, f"model.pretrained={out}", "eval_only=true",
                 f"output_dir={tmp_path / 'eval'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["top1"] == \
        json.loads((out / "metrics.json").read_text())["top1"]


def test_linear_probe_of_a_random_encoder_is_asked_for_by_name(demo_shards):
    """The baseline of a probe: `model.pretrained=random` probes the architecture's random initialisation;
    leaving model.pretrained unset is still an error (a probe of nothing trained, by accident)."""
    size = [f"data.train={demo_shards['train']}", "train.mode=linear_probe", "train.layer_decay=null",
            "model.name=hiera_base_16x224", *(f"model.extra.{k}={v}" for k, v in TINY.items() if k != "input_size"),
            "model.input_size=[8,32,32]"]
    torch.manual_seed(0)
    probe = FinetuneTask().build_model(load_config([], [*size, "model.pretrained=random"]))
    torch.manual_seed(0)
    fresh = create_model("hiera_base_16x224", **TINY, num_classes=4)
    assert isinstance(probe, LinearProbe) and probe.head.projection.out_features == 4
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in probe.encoder.state_dict().items())
    with pytest.raises(ConfigError, match="or random for the architecture's random initialisation"):
        FinetuneTask().build_model(load_config([], size))
    with pytest.raises(ConfigError, match="eval_only=true needs model.pretrained"):
        FinetuneTask().build_model(load_config([], [*size, "model.pretrained=random", "eval_only=true"]))


def test_feature_export_resumes_after_a_kill_and_equals_forward_features(demo_shards, finetuned, tmp_path):
    out, _ = finetuned

    def export(dest: Path) -> list[str]:
        return [sys.executable, "-m", "finetune.features", "--checkpoint", str(out), "--data", str(demo_shards["val"]),
                "--out", str(dest), "--stages", "--batch-size", "1", "--chunk-size", "1", "--num-workers", "0"]

    straight = run(export(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "straight").glob("features-*.safetensors"))
    assert len(names) == 16  # one sample per chunk

    killed = tmp_path / "killed"
    process = subprocess.Popen(export(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / names[2]).exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert not (killed / "info.json").exists()  # it was killed before the end
    resumed = run(export(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after" in resumed.stdout
    assert sorted(p.name for p in killed.glob("features-*.safetensors")) == names
    assert all((killed / n).read_bytes() == (tmp_path / "straight" / n).read_bytes() for n in names)

    # The features are forward_features (and the pooled stages) of the exported classifier, sample by sample.
    name, overrides = checkpoint.read_encoder_metadata(out / "encoder.safetensors")
    model = create_model(name, **overrides).eval()
    load_pretrained(model, out / "encoder.safetensors")
    chunks = [load_file(tmp_path / "straight" / n) for n in names]
    exported = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    sample = SampleConfig(train=False, num_frames=8, sampling_rate=2, target_fps=25, crop_size=32)
    loader = ShardLoader(demo_shards["val"], sample, 4, shuffle=False, drop_last=False)
    with torch.no_grad():
        for batch in loader:
            x, rows = media_of(batch, sample), batch["index"]
            torch.testing.assert_close(exported["features"][rows], model.forward_features(x), rtol=1e-4, atol=1e-5)
            for s, stage in enumerate(model.forward_intermediates(x)):
                torch.testing.assert_close(exported[f"stage{s}"][rows], stage.flatten(1, -2).mean(1), rtol=1e-4,
                                           atol=1e-5)
    assert exported["index"].tolist() == list(range(16))
    info = json.loads((tmp_path / "straight" / "info.json").read_text())
    assert info["num_samples"] == 16 and info["classes"] == sorted(CLASSES)


def test_random_erasing_boxes_every_frame_of_a_clip_alike(demo_shards):
    """data.random_erase=1: the clips the model sees in a fine-tuning step have one box of noise, in the same
    place in every frame and channel (SlowFast's cube mode, timm's RandomErasing), the rest untouched."""
    cfg = load_config([DEMO], [f"data.train={demo_shards['train']}", f"data.val={demo_shards['val']}",
                               "model.pretrained=null", "data.num_workers=0",
                               "data.random_erase=1.0", "train.batch_size=4", *SIZE[:2],
                               "model.name=hiera_base_16x224",
                               *(f"model.extra.{k}={v}" for k, v in TINY.items() if k != "input_size")])
    task = FinetuneTask()
    model = task.build_model(cfg)
    batch = next(iter(task.train_loader(cfg, 0, 1)))
    seen = []

    class Recorder(torch.nn.Module):  # the real model, with its input kept
        def forward(self, x):
            seen.append(x.clone())
            return model(x)

    task.step(Recorder(), batch)
    changed = seen[0] != media_of(batch, task.loader.sample)  # [N, 3, T, S, S]
    where = changed.flatten(1, 2)  # [N, 3T, S, S]
    assert (where.any(1) == where.all(1)).all()  # a pixel is erased in every frame and channel, or in none
    for box in where.any(1):
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert len(rows) and box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle


def test_shuffled_frames_run_at_the_final_evaluation_only_unless_asked(demo_shards, mae_encoder, tmp_path):
    """Periodic evaluations after each pass; the shuffled-frames test, which doubles an evaluation's cost, only
    at the last one, or at every one with eval.shuffled_every=true (read back from TensorBoard)."""
    def shuffled_steps(out: Path, *extra: str) -> tuple[list[int], list[int]]:
        cfg = load_config([DEMO], [f"data.train={demo_shards['train']}", f"data.val={demo_shards['val']}",
                                   f"model.pretrained={mae_encoder}", f"output_dir={out}", *SIZE, "data.num_workers=0",
                                   "train.batch_size=8", "data.repeat=1", "train.max_steps=4", "eval.every_epochs=1",
                                   "log.visualize_every=0", *extra])
        Trainer(FinetuneTask(), cfg).fit()
        events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        return ([e.step for e in events.Scalars("eval/top1")],
                [e.step for e in events.Scalars("eval/top1_shuffled")] if "eval/top1_shuffled" in
                events.Tags()["scalars"] else [])

    assert shuffled_steps(tmp_path / "final") == ([2, 4], [4])  # 16 videos in batches of 8: a pass is 2 steps
    assert shuffled_steps(tmp_path / "every", "eval.shuffled_every=true", "eval.metric=top1_shuffled",
                          "eval.export=best") == ([2, 4], [2, 4])

    # best/ holds the model of the evaluation that scored highest by eval.metric (the first, on a tie).
    for out, metric, exported in ((tmp_path / "final", "top1", "last"), (tmp_path / "every", "top1_shuffled", "best")):
        events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        scores = [(e.value, -e.step) for e in events.Scalars(f"eval/{metric}")]
        best_value, best_step = max(scores)
        recorded = json.loads((out / "metrics.json").read_text())["best"]
        assert recorded == {"step": -best_step, "metric": metric, "value": pytest.approx(best_value),
                            "exported": exported}
        with safe_open(str(out / "best" / "encoder.safetensors"), framework="pt") as f:
            assert f.metadata()["step"] == str(-best_step)
        last, best = load_file(out / "encoder.safetensors"), load_file(out / "best" / "encoder.safetensors")
        assert all(torch.equal(last[k], best[k]) for k in best) == (exported == "best" or -best_step == 4)
