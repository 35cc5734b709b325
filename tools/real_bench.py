"""Proof on real images: what MAE pretraining buys over random initialisation and over raw pixels.

    python -m tools.real_bench --data fashion-mnist --out runs/bench/fmnist [--seeds 2]
    python -m tools.real_bench --data my_images/ --out runs/bench/mine [--quick]
    python -m tools.real_bench --data moving-fashion-mnist --out runs/bench/mfmnist
    python -m tools.real_bench ... --seeds 2 --only-seed 1   # one seed per process, all sharing --out

`--data` is `fashion-mnist` (the offline system package, data/fashion_mnist.py) or a folder with `train/` and
`test/`, each holding one sub-folder of images per class, of any size (the loader resizes them to the
configs' 32 px). 10% of train, drawn per class with a fixed seed, is the validation split.
`moving-fashion-mnist` is the video variant (data/moving_fashion_mnist.py, configs mfmnist_<model>.yaml): the
frozen protocols use the garment classes; fine-tuning learns the direction of motion from all train labels,
and its test clips are scored again with their frames shuffled (chance is 25%).

For each seed, the encoder is pretrained (configs/pretrain/fmnist_<model>.yaml, with the online k-NN monitor)
and then, for the pretrained encoder and for the same architecture at its random initialisation:
- `knn`: weighted k-NN of frozen features (the monitor's T 0.07 and cosine; k 10, 20 or 50);
- `linear`: a linear probe (BatchNorm + linear layer, finetune.probe.fit_probe) on frozen features computed
  once (no augmentation: the fast path of `train.mode=linear_probe`);
- `finetune_1`, `finetune_10`, `finetune_100`: fine-tuning (configs/finetune/fmnist_<model>.yaml) on 1%, 10%
  and 100% of the train labels (class-balanced subsets drawn from the seed).
Raw pixels (the eval view, flattened) get the same `knn` and `linear`. Settings of the frozen protocols
(features: pooled last stage or all stages; centring; k; probe lr and weight decay) are chosen on validation.
Test is scored once per measurement, with the chosen settings. Every part writes its result when done,
so a rerun after an interruption skips the finished parts (pretraining and fine-tuning resume from their
checkpoints). Writes OUT/results.json, OUT/table.md and OUT/plot.png; logs of each run go to OUT/logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import safe_open

from data import DataFailureError, ShardLoader, ShardSet
from data.fashion_mnist import CLASSES as GARMENTS
from data.fashion_mnist import FashionMnistError, write_class_folders
from data.make_shards.folder import folder_inputs
from data.make_shards.inputs import Input
from data.make_shards.writer import shard_inputs
from data.moving_fashion_mnist import DIRECTIONS, clip_inputs, order_blind_top1
from engine import checkpoint
from engine.config import ConfigError, load_config
from engine.knn import knn_scores, topk_percent
from engine.loaders import eval_sample, normalization
from finetune.evaluate import evaluate
from finetune.features import chunk_name, export
from finetune.inference import Loaded, load_model
from finetune.probe import fit_probe
from models import CheckpointError, create_model
from tools.real_bench_report import FRACTIONS, INITS, write_report

REPO = Path(__file__).resolve().parents[1]
VAL_FRACTION, SPLIT_SEED = 0.1, 0
MOVING = "moving-fashion-mnist"


class BenchError(RuntimeError):
    """A problem with the input or a run, said in one line."""


@dataclass(frozen=True)
class Budget:
    """How much each phase runs. Fine-tuning epochs are passes over the labelled subset."""

    images_per_class: int | None = None  # cap on train and test images per class (None: all)
    pretrain: tuple[str, ...] = ()  # overrides of the pretraining config
    finetune: tuple[str, ...] = ()  # overrides of the fine-tuning config
    finetune_epochs: dict[int, float] = field(default_factory=lambda: {1: 40, 10: 8, 100: 4})
    knn_ks: tuple[int, ...] = (10, 20, 50)  # neighbours (the monitor's: 20)
    probe_epochs: int = 15
    probe_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    probe_weight_decays: tuple[float, ...] = (0.0, 1e-3)
    feature_batch: int = 256
    clips: tuple[int, int] = (8000, 2000)  # moving-fashion-mnist: train and test clips
    direction_epochs: float = 2  # moving-fashion-mnist: fine-tuning passes on the direction labels


VIDEO_ONLY, IMAGE_ONLY = {"clips", "direction_epochs"}, {"images_per_class", "finetune_epochs"}


FULL = Budget()
QUICK = Budget(images_per_class=24,
               pretrain=("train.max_steps=8", "train.batch_size=16", "eval.knn.every=5", "log.every=4",
                         "log.visualize_every=6", "train.checkpoint_every=6", "data.num_workers=1"),
               finetune=("train.max_steps=6", "train.batch_size=16", "log.every=2", "data.num_workers=1"),
               finetune_epochs={1: 4, 10: 2, 100: 1}, knn_ks=(20,), probe_epochs=3, probe_lrs=(1e-2,),
               probe_weight_decays=(0.0,), feature_batch=32, clips=(60, 20), direction_epochs=1)


class Pixels(torch.nn.Module):
    """The raw-pixel baseline as an 'encoder': the normalised eval view (of a clip, its middle frame), flattened."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] or [B, 3, T, S, S] -> [B, 3 S^2]."""
        return (x[:, :, x.shape[2] // 2] if x.ndim == 5 else x).flatten(1)


class Bench:
    def __init__(self, data: str, out: Path, model: str, budget: Budget, seeds: int):
        self.data, self.out, self.budget, self.seeds = data, out, budget, seeds
        self.video = data == MOVING
        prefix = "mfmnist" if self.video else "fmnist"
        self.pretrain_config = REPO / f"configs/pretrain/{prefix}_{model}.yaml"
        self.finetune_config = REPO / f"configs/finetune/{prefix}_{model}.yaml"
        for config in (self.pretrain_config, self.finetune_config):
            if not config.is_file():
                raise BenchError(f"--data {data} --model {model}: there is no {config.relative_to(REPO)}")
        self.model = model
        self.eval_config = load_config([str(self.finetune_config)], [])  # how what is measured is cut
        self.fractions = () if self.video else FRACTIONS  # of the class labels, for fine-tuning

    @functools.cached_property
    def accelerator(self) -> Accelerator:
        """Made when a part first measures (a rerun that only reports, or stops on its input, needs none)."""
        return Accelerator(mixed_precision="bf16")  # as the configs train: AMX on CPUs

    # ---------------------------------------------------------------- bookkeeping

    def phase(self, name: str, result_path: Path, work) -> dict:
        """Run `work()` -> result dict unless `result_path` holds its result (None when it does not and this
        process does not measure the seed); print one line with the time."""
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            print(f"{name}: done before ({result['seconds']:.0f} s)", flush=True)
            return result
        if not self.measuring:  # another process measures this seed (--only-seed)
            return None
        began = time.perf_counter()
        self.log = self.out / "logs" / f"{result_path.parent.name}_{result_path.stem}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            result = work()
        result["seconds"] = time.perf_counter() - began
        result_path.parent.mkdir(parents=True, exist_ok=True)
        temp = result_path.with_name(result_path.name + ".tmp")
        temp.write_text(json.dumps(result, indent=1))
        temp.replace(result_path)
        print(f"{name}: {result['seconds']:.0f} s - {result['summary']}", flush=True)
        return result

    def check_settings(self) -> None:
        """OUT/settings.json: what every part in OUT was measured with. A rerun with another model, budget or
        input list would mix its parts with the old ones, so it stops instead."""
        inputs = [(i.path, i.label) for split in self.splits["class"].values() for i in split]
        unused = IMAGE_ONLY if self.video else VIDEO_ONLY
        settings = {"data": self.data, "model": self.model,
                    "budget": {k: str(v) for k, v in asdict(self.budget).items() if k not in unused},
                    "inputs": hashlib.sha256(json.dumps(inputs).encode()).hexdigest()}
        path = self.out / "settings.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            # Budget fields that this kind of data does not use, or that were added since (absent from the
            # saved settings), had no say in the parts measured.
            saved["budget"] = {k: saved.get("budget", {}).get(k, v) for k, v in settings["budget"].items()}
            changed = [k for k in settings if saved.get(k) != settings[k]]
            if changed:
                raise BenchError(f"{self.out} holds a benchmark with other {', '.join(changed)} ({path}): use "
                                 f"another --out, or delete it to start over")
        self.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))

    def launch(self, app: str, config: Path, overrides: list[str]) -> None:
        """`python -m <app> --config ... overrides`, its output into the current phase's log."""
        sys.stdout.flush()
        code = subprocess.call([sys.executable, "-m", app, "--config", str(config), "log.progress=false",
                                "resume=auto", *overrides], cwd=REPO, stdout=sys.stdout, stderr=subprocess.STDOUT)
        if code:
            tail = self.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise BenchError(f"{app} failed (exit {code}); see {self.log}: {tail[0]}")

    # ---------------------------------------------------------------- data

    def split_inputs(self) -> tuple[dict[str, dict[str, list[Input]]], list[str]]:
        """({labels: {"train", "val", "test": inputs}}, class names), labels "class" (and for clips
        "direction"): val is 10% of each class of train, drawn with a fixed seed, so every call (and every
        rerun) makes the same split."""
        if self.video:
            train, test = self.budget.clips
            found = clip_inputs(self.out / "clips", {"train": train, "test": test},
                                workers=max(1, os.cpu_count() or 1))
            val_rows = class_balanced(found["class"]["train"], VAL_FRACTION, np.random.default_rng(SPLIT_SEED))
            return {labels: split_off(inputs["train"], val_rows, inputs["test"])
                    for labels, inputs in found.items()}, list(GARMENTS)
        root = Path(self.data)
        if self.data == "fashion-mnist":
            root = write_class_folders(self.out / "images")
        for split in ("train", "test"):
            if not (root / split).is_dir():
                raise BenchError(f"--data {self.data}: no {root / split}/ (give a folder with train/ and test/, "
                                 f"each holding one sub-folder of images per class)")
        train, classes = folder_inputs(root / "train")
        test, test_classes = folder_inputs(root / "test")
        if classes != test_classes:
            raise BenchError(f"--data {self.data}: train/ and test/ have different class folders "
                             f"({len(classes)} vs {len(test_classes)})")
        if not train or not test:
            raise BenchError(f"--data {self.data}: no images under {root}/train or {root}/test")
        cap = self.budget.images_per_class
        if cap:
            train, test = per_class(train, cap), per_class(test, cap)
        val_rows = class_balanced(train, VAL_FRACTION, np.random.default_rng(SPLIT_SEED))
        return {"class": split_off(train, val_rows, test)}, classes

    def shard_root(self, labels: str) -> Path:
        return self.out / ("shards" if labels == "class" else f"shards_{labels}")

    def prepare_data(self) -> dict:
        """Shards of the three splits (per label set); an unreadable input stops the benchmark."""
        counts = {}
        for labels, splits in self.splits.items():
            classes = self.classes if labels == "class" else list(DIRECTIONS)
            for name, inputs in splits.items():
                out = self.shard_root(labels) / name
                info = shard_inputs(inputs, classes, out, per_shard=256, workers=max(1, (os.cpu_count() or 1) - 1))
                if info["skipped"]:
                    s = info["skipped"][0]
                    shutil.rmtree(out)  # a rerun shards the repaired folder afresh
                    raise BenchError(f"{s['input']}: {s['reason']} ({len(info['skipped'])} unreadable inputs in "
                                     f"{name}): remove or replace them, then run again")
                counts[name] = info["num_samples"]
        return {"counts": counts,
                "summary": ", ".join(f"{n} {c}" for n, c in counts.items())
                + f" {'clips' if self.video else 'images'}, {len(self.classes)} classes"}

    def labelled_subset(self, seed: int, fraction: int) -> Path:
        """Shards of a class-balanced `fraction`% of train (all of it at 100), drawn from `seed`."""
        if fraction == 100:
            return self.out / "shards" / "train"
        out = self.out / "shards" / f"train_{fraction}pct_seed{seed}"
        train = self.splits["class"]["train"]
        rows = class_balanced(train, fraction / 100, np.random.default_rng([seed, fraction]))
        shard_inputs([train[i] for i in sorted(rows)], self.classes, out, per_shard=256)
        return out

    # ---------------------------------------------------------------- features and frozen protocols

    def eval_loader(self, split: str, labels: str = "class") -> ShardLoader:
        """Every sample of a split once, in shard order, as its one centre view (as fine-tuning evaluates)."""
        shards = ShardSet.load(str(self.shard_root(labels) / split))
        sample = eval_sample(self.eval_config, shards.media == "image", views=(1, 1))
        return ShardLoader(shards, sample, self.budget.feature_batch, num_workers=1, shuffle=False, drop_last=False,
                           shard_mix=1)

    def features(self, model: torch.nn.Module, name: str, directory: Path, stages: bool) -> dict[str, dict]:
        """{split: {"labels": [N], "last": [N, D] (, "stages": [N, sum C_s], "widths")}} of the frozen
        `model`, computed once into `directory` (chunks of finetune.features)."""
        model.to(self.accelerator.device).eval()
        found = {}
        with locked(directory / "lock"):  # processes that share OUT (--only-seed) share the pixels' features
            for split in ("train", "val", "test"):
                out = directory / split
                if not (out / "info.json").is_file():
                    loader = self.eval_loader(split)
                    loaded = Loaded(model, name, (), self.eval_config.data, self.eval_config.eval,
                                    normalization(self.eval_config))
                    job = {"model": name, "split": split, "stages": stages, "batch_size": self.budget.feature_batch,
                           "batches_per_chunk": 64, "views": [1, 1], "shards": loader.shards.fingerprint}
                    out.mkdir(parents=True, exist_ok=True)
                    with self.accelerator.autocast():
                        export(loaded, loader, out, job, self.accelerator.device)
                found[split] = read_features(out)
        return found

    def frozen(self, found: dict[str, dict], seed: int) -> dict:
        """k-NN and linear-probe top-1 on test with the settings that do best on val."""
        num_classes = len(self.classes)
        labels = {split: f["labels"] for split, f in found.items()}
        kinds = [k for k in ("last", "stages") if k in found["train"]]

        def knn(kind: str, centre: bool, k: int) -> Callable:
            bank = found["train"][kind]
            shift = bank.mean(0) if centre else torch.zeros(bank.shape[1])

            def prepare(x: torch.Tensor) -> torch.Tensor:  # each stage counts alike, whatever its width
                x = x - shift
                return normalize_stages(x, found["train"]["widths"]) if kind == "stages" else x

            return lambda query: knn_scores(prepare(bank), labels["train"], prepare(found[query][kind]), num_classes,
                                            k=k)

        def probe(kind: str, lr: float, weight_decay: float) -> Callable:
            head, _ = fit_probe(found["train"][kind], labels["train"], num_classes, lr, weight_decay,
                                self.budget.probe_epochs, seed=seed)
            return lambda query: head(found[query][kind].float()).detach()

        b = self.budget
        knn_grid = {f"{kind}, {'centred' if centre else 'raw'}, k {k}": (kind, centre, k) for kind in kinds
                    for centre in (False, True) for k in b.knn_ks}
        probe_grid = {f"{kind}, lr {lr:g}, wd {wd:g}": (kind, lr, wd) for kind in kinds for lr in b.probe_lrs
                      for wd in b.probe_weight_decays}
        return {"knn": chosen_on_val(knn_grid, knn, labels), "linear": chosen_on_val(probe_grid, probe, labels)}

    # ---------------------------------------------------------------- the phases of one seed

    def pretrain(self, seed: int) -> dict:
        run = self.out / f"seed{seed}" / "pretrain"
        train, val = self.out / "shards" / "train", self.out / "shards" / "val"
        self.launch("pretrain.main", self.pretrain_config,
                    [f"data.train={train}", f"eval.knn.train={train}", f"eval.knn.val={val}", f"output_dir={run}",
                     f"seed={seed}", *self.budget.pretrain])
        history = json.loads((run / "metrics.json").read_text())["knn_history"]
        return {"knn_history": history, "summary": f"k-NN on val {history[0]['top1']:.1f}% at step 0, "
                f"{history[-1]['top1']:.1f}% at step {history[-1]['step']}"}

    def encoder(self, init: str, seed: int) -> torch.nn.Module:
        """The pretraining run's encoder, or the same architecture at its random initialisation for `seed`; both
        give the pooled last stage as features."""
        run = self.out / f"seed{seed}" / "pretrain"
        if init == "pretrained":
            return load_model(run, need_head=False).model
        name, overrides = checkpoint.read_encoder_metadata(run / "encoder.safetensors")
        torch.manual_seed(seed)
        random = create_model(name.removeprefix("mae_"), **overrides)
        random.norm = torch.nn.Identity()  # as the MAE encoder's features: the pooled last stage
        return random

    def frozen_phase(self, init: str, seed: int) -> dict:
        if init == "pixels":
            found = self.features(Pixels(), init, self.out / "features" / "pixels", stages=False)
        else:
            found = self.features(self.encoder(init, seed), init, self.out / f"seed{seed}" / "features" / init,
                                  stages=True)
        result = self.frozen(found, seed)
        return {**result, "summary": f"{init}: k-NN {result['knn']['top1']:.1f}%, linear "
                f"{result['linear']['top1']:.1f}% on test"}

    def finetune(self, init: str, fraction: int, seed: int, labels: str = "class") -> dict:
        """Fine-tune on `fraction`% of the train labels (class), or on all direction labels; score test once
        (clips: also with their frames shuffled)."""
        direction = labels == "direction"
        run = self.out / f"seed{seed}" / "finetune" / (f"{init}_{labels}" if direction else f"{init}_{fraction}")
        train = self.shard_root(labels) / "train" if direction else self.labelled_subset(seed, fraction)
        size = ShardSet.load(str(train)).num_samples
        epochs = self.budget.direction_epochs if direction else self.budget.finetune_epochs[fraction]
        batch = load_config([str(self.finetune_config)], list(self.budget.finetune)).train.batch_size
        start = ([f"model.pretrained={self.out / f'seed{seed}' / 'pretrain' / 'encoder.safetensors'}"]
                 if init == "pretrained" else ["model.pretrained=null", "train.layer_decay=null"])
        self.launch("finetune.main", self.finetune_config,
                    [f"data.train={train}", f"data.val={self.shard_root(labels) / 'val'}", f"output_dir={run}",
                     f"seed={seed}", f"train.epochs={epochs}", f"train.warmup_epochs={epochs / 10}", *start,
                     *self.budget.finetune, f"train.batch_size={min(size, batch)}"])  # a subset may be smaller
        val = json.loads((run / "metrics.json").read_text())
        model = load_model(run).model.to(self.accelerator.device)
        classes = len(DIRECTIONS) if direction else len(self.classes)
        test = evaluate(model, self.eval_loader("test", labels), self.accelerator, classes,
                        shuffle_seed=seed if self.video else None)
        result = {"top1": test["plain"]["top1"], "val_top1": val["top1"], "labelled": size, "epochs": epochs,
                  "summary": f"{init} {labels if direction else f'{fraction}%'} labels ({size} samples): "
                             f"{test['plain']['top1']:.1f}% on test"}
        if "shuffled" in test:
            result |= {"top1_shuffled": test["shuffled"]["top1"], "val_top1_shuffled": val["top1_shuffled"]}
            result["summary"] += f", {test['shuffled']['top1']:.1f}% with frames shuffled"
        return result

    def run(self, only_seed: int | None = None) -> dict | None:
        """Measure every seed, or only `only_seed` (processes that share OUT, one seed each); then the report,
        once every seed's parts are in OUT (None until then)."""
        began = time.perf_counter()
        self.measuring = True
        self.splits, self.classes = self.split_inputs()
        with locked(self.out / "parts" / "data.lock"):  # processes that share OUT (--only-seed) write it once
            self.check_settings()
            data = self.phase("data", self.out / "parts" / "data.json", self.prepare_data)
        parts = {}
        for seed in sorted(range(self.seeds), key=lambda s: s != only_seed):  # the others' parts read after
            self.measuring = only_seed in (None, seed)
            where = self.out / "parts" / f"seed{seed}"
            parts[(seed, "pixels")] = self.phase(f"[seed {seed}] pixels", where / "pixels.json",
                                                 partial(self.frozen_phase, "pixels", seed))
            parts[(seed, "pretrain")] = self.phase(f"[seed {seed}] pretrain", where / "pretrain.json",
                                                   partial(self.pretrain, seed))
            for init in INITS:
                parts[(seed, init)] = self.phase(f"[seed {seed}] frozen {init}", where / f"frozen_{init}.json",
                                                 partial(self.frozen_phase, init, seed))
                for fraction in self.fractions:
                    parts[(seed, init, fraction)] = self.phase(
                        f"[seed {seed}] finetune {init} {fraction}%", where / f"finetune_{init}_{fraction}.json",
                        partial(self.finetune, init, fraction, seed))
                if self.video:
                    parts[(seed, init, "direction")] = self.phase(
                        f"[seed {seed}] finetune {init} direction", where / f"finetune_{init}_direction.json",
                        partial(self.finetune, init, 100, seed, "direction"))
        waiting = sorted({key[0] for key, part in parts.items() if part is None})
        if waiting:
            print(f"seed {only_seed} done; the report waits for seed {', '.join(map(str, waiting))} (rerun once "
                  f"it has finished)", flush=True)
            return None
        results = collect(parts, self.seeds, dataset=self.data, data=data, classes=self.classes)
        if self.video:  # the ceiling of the shuffled-frames test
            results["order_blind_top1"] = order_blind_top1("test", self.budget.clips[1])
        results["wall_seconds_this_call"] = time.perf_counter() - began
        write_report(results, self.out)
        return results


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (made if missing) among processes, held for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def per_class(inputs: list[Input], cap: int) -> list[Input]:
    """The first `cap` inputs of each class (folder order)."""
    taken: dict[int, int] = {}
    kept = []
    for item in inputs:
        if taken.get(item.label, 0) < cap:
            taken[item.label] = taken.get(item.label, 0) + 1
            kept.append(item)
    return kept


def split_off(train: list[Input], val_rows: set[int], test: list[Input]) -> dict[str, list[Input]]:
    """{"train": train without `val_rows`, "val": those rows, "test": test}."""
    return {"train": [x for i, x in enumerate(train) if i not in val_rows],
            "val": [train[i] for i in sorted(val_rows)], "test": test}


def class_balanced(inputs: list[Input], fraction: float, rng: np.random.Generator) -> set[int]:
    """Positions of `fraction` of each class's inputs (at least one each), drawn with `rng`."""
    chosen = set()
    by_class: dict[int, list[int]] = {}
    for i, item in enumerate(inputs):
        by_class.setdefault(item.label, []).append(i)
    for label in sorted(by_class):
        rows = by_class[label]
        count = max(1, round(len(rows) * fraction))
        chosen.update(rows[j] for j in rng.permutation(len(rows))[:count])
    return chosen


def read_features(directory: Path) -> dict[str, torch.Tensor]:
    """The chunks of finetune.features in `directory` -> {"labels", "last", and with stages "stages" (the
    pooled stages side by side) and "widths" (their widths)}."""
    info = json.loads((directory / "info.json").read_text())
    parts: dict[str, list[torch.Tensor]] = {}
    for c in range(info["chunks"]):
        with safe_open(str(directory / chunk_name(c)), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                parts.setdefault(key, []).append(f.get_tensor(key))
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    found = {"labels": tensors["labels"], "last": tensors["features"]}
    stages = sorted(k for k in tensors if k.startswith("stage"))
    if stages:
        found["stages"] = torch.cat([tensors[s] for s in stages], dim=1)
        found["widths"] = [tensors[s].shape[1] for s in stages]
    return found


def chosen_on_val(grid: dict[str, tuple], build, labels: dict[str, torch.Tensor]) -> dict:
    """Each setting of `grid` ({name: args}) becomes a scorer `build(*args)` (split -> scores [N, K]); the one
    with the best val top-1 scores test, once."""
    scorers = {name: build(*args) for name, args in grid.items()}
    val = {name: topk_percent(score("val"), labels["val"], 1) for name, score in scorers.items()}
    best = max(val, key=val.get)
    return {"top1": topk_percent(scorers[best]("test"), labels["test"], 1), "val_top1": val[best], "choice": best,
            "val_grid": val}


def normalize_stages(x: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """[N, sum C_s] pooled stages side by side -> each stage's part L2-normalised."""
    return torch.cat([F.normalize(part, dim=1) for part in x.split(widths, dim=1)], dim=1)


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (the sample std over seeds; 0 for one run), "runs"}."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "runs": values}


def collect(parts: dict, seeds: int, dataset: str, data: dict, classes: list[str]) -> dict:
    """The results.json content: top-1 (test) and val_top1 as {INIT: {EVAL: {mean, std, runs}}}."""
    found: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(init: str, evaluation: str, part: dict, suffix: str = "") -> None:
        for key in ("top1", "val_top1"):
            found.setdefault(key, {}).setdefault(init, {}).setdefault(evaluation, []).append(part[key + suffix])

    for key, part in parts.items():
        if len(key) == 2 and key[1] != "pretrain":  # (seed, init): the frozen protocols
            for evaluation in ("knn", "linear"):
                add(key[1], evaluation, part[evaluation])
        elif len(key) == 3:  # (seed, init, fraction or "direction")
            add(key[1], f"finetune_{key[2]}", part)
            if key[2] == "direction":
                add(key[1], "finetune_direction_shuffled", part, "_shuffled")
    summary = {key: {init: {e: mean_std(v) for e, v in evals.items()} for init, evals in table.items()}
               for key, table in found.items()}
    return {**summary, "dataset": dataset, "seeds": seeds, "counts": data["counts"], "classes": classes,
            "seconds": sum(p["seconds"] for p in parts.values()) + data["seconds"],
            "phase_seconds": {" ".join(map(str, k)): p["seconds"] for k, p in parts.items()},
            "choices": {" ".join(map(str, k)): {e: p[e]["choice"] for e in ("knn", "linear")}
                        for k, p in parts.items() if len(k) == 2 and "knn" in p},
            "knn_history": {f"seed{s}": parts[(s, "pretrain")]["knn_history"] for s in range(seeds)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help=f"fashion-mnist, {MOVING}, or a folder with train/ and test/ class folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", choices=("hiera", "mvitv2"), default="hiera",
                        help="configs/{pretrain,finetune}/fmnist_<model>.yaml")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every measurement with seeds 0..N-1")
    parser.add_argument("--only-seed", type=int, metavar="S",
                        help="measure only seed S (processes sharing --out, one seed each; the last one reports)")
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run (minutes)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.only_seed is not None and not 0 <= args.only_seed < args.seeds:
        parser.error(f"--only-seed must be one of 0..{args.seeds - 1} (--seeds {args.seeds})")
    try:
        bench = Bench(args.data, args.out, args.model, QUICK if args.quick else FULL, args.seeds)
        results = bench.run(args.only_seed)
    except (BenchError, FashionMnistError, ConfigError, CheckpointError, DataFailureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results is None:
        return 0
    print(f"done in {results['seconds']:.0f} s of measured work: {args.out}/results.json, table.md"
          + (", plot.png" if (args.out / "plot.png").is_file() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
