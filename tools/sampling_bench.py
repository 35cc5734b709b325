"""Segment against clip sampling on real motion: Moving Fashion-MNIST's direction labels, fine-tuned both ways.

    python -m tools.sampling_bench --out runs/bench/sampling --frames 32 --seeds 2 \
        --encoder runs/bench/mfmnist/seed0/pretrain/encoder.safetensors

The clips (data/moving_fashion_mnist.py) are `--frames` long and the model sees 16 of them
(configs/finetune/mfmnist_hiera.yaml, no flips). `clip` sampling takes 16 consecutive frames (a random window in
training, the middle one in evaluation); `segment` sampling (`data.sampling: segment`, TSN / SlowFast's
`get_seq_frames`) takes one frame from each of 16 equal segments of the whole clip. Everything else is the
same: the encoder (`--encoder`, or none for a random start), the data, the recipe and the seed of each pair.
10% of train (per direction, fixed seed) is the validation split that each fine-tuning reports; test is scored
once per run, plain and with its frames shuffled, beside the best a model blind to frame order can reach on
those clips (`order_blind_top1`). `--paths straight` makes clips that never bounce, where that ceiling is 50%;
`--samplings clip` runs one sampling only (with `--frames 16` both see every frame). Each finished run is kept,
so a rerun resumes. Writes OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from data import ShardLoader, ShardSet
from data.fashion_mnist import FashionMnistError
from data.make_shards.writer import shard_inputs
from data.moving_fashion_mnist import DIRECTIONS, PATHS, clip_inputs, order_blind_top1
from engine.config import load_config
from engine.errors import one_line_errors
from engine.loaders import eval_sample
from finetune.evaluate import evaluate
from finetune.inference import load_model
from tools.real_bench import SPLIT_SEED, VAL_FRACTION, BenchError, class_balanced, mean_std, split_off

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/finetune/mfmnist_hiera.yaml"
SAMPLINGS = ("clip", "segment")
QUICK = ("train.max_steps=4", "train.batch_size=8", "log.every=2", "data.num_workers=1", "eval.batch_size=8")


def make_shards(out: Path, clips: tuple[int, int], frames: int, paths: str) -> dict[str, Path]:
    """Direction-labelled shards of train, val and test (written once) -> {split: folder}."""
    inputs = clip_inputs(out / "clips", {"train": clips[0], "test": clips[1]}, max(1, os.cpu_count() or 1),
                         frames, paths)["direction"]
    val_rows = class_balanced(inputs["train"], VAL_FRACTION, np.random.default_rng(SPLIT_SEED))
    folders = {}
    for split, items in split_off(inputs["train"], val_rows, inputs["test"]).items():
        folders[split] = out / "shards" / split
        if not (folders[split] / "info.json").is_file():
            info = shard_inputs(items, list(DIRECTIONS), folders[split], per_shard=256)
            if info["skipped"]:
                raise BenchError(f"{info['skipped'][0]['input']}: {info['skipped'][0]['reason']}")
    return folders


def finetune(out: Path, shards: dict[str, Path], sampling: str, seed: int, encoder: Path | None, epochs: float,
             extra: tuple[str, ...]) -> dict:
    """Fine-tune with `sampling`, then score test once -> {"val_top1", "top1", "top1_shuffled", ...}."""
    run = out / f"seed{seed}" / sampling
    result_path = run / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    start = [f"model.pretrained={encoder}"] if encoder else ["model.pretrained=null", "train.layer_decay=null"]
    overrides = [f"data.train={shards['train']}", f"data.val={shards['val']}", f"data.sampling={sampling}",
                 f"output_dir={run}", f"seed={seed}", f"train.epochs={epochs}", f"train.warmup_epochs={epochs / 10}",
                 "log.progress=false", "resume=auto", *start, *extra]
    log = out / "logs" / f"seed{seed}_{sampling}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if not (run / "metrics.json").is_file():  # written by the final evaluation: the fine-tuning is done
        with open(log, "a") as f:
            code = subprocess.call([sys.executable, "-m", "finetune.main", "--config", str(CONFIG), *overrides],
                                   cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if code:
            raise BenchError(f"fine-tuning with {sampling} sampling failed (exit {code}); see {log}")
    val = json.loads((run / "metrics.json").read_text())
    cfg = load_config([str(CONFIG)], overrides)
    test_shards = ShardSet.load(str(shards["test"]))
    loader = ShardLoader(test_shards, eval_sample(cfg, False, views=(1, 1)), cfg.eval.batch_size, num_workers=1,
                         shuffle=False, drop_last=False, shard_mix=1)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    model = load_model(run).model.to(accelerator.device)
    with torch.no_grad():
        test = evaluate(model, loader, accelerator, len(DIRECTIONS), shuffle_seed=seed)
    result = {"val_top1": val["top1"], "val_top1_shuffled": val["top1_shuffled"], "top1": test["plain"]["top1"],
              "top1_shuffled": test["shuffled"]["top1"], "steps": val["step"]}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def report(runs: dict[str, list[dict]], out: Path, settings: dict) -> dict:
    """OUT/results.json ({sampling: {metric: mean, std, runs}}) and OUT/table.md."""
    metrics = ("top1", "top1_shuffled", "val_top1")
    results = {**settings, **{s: {m: mean_std([r[m] for r in rs]) for m in metrics} for s, rs in runs.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = [f"| {s} | " + " | ".join(f"{results[s][m]['mean']:.1f} ± {results[s][m]['std']:.1f}" for m in metrics)
            + " |" for s in runs]
    (out / "table.md").write_text(
        f"Direction top-1 (%) on Moving Fashion-MNIST, {settings['frames']}-frame clips ({settings['paths']} "
        f"paths), 16 frames seen, {settings['seeds']} seed(s), encoder: {settings['encoder'] or 'random'}\n\n"
        "| sampling | test | test, frames shuffled | val |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"A model blind to frame order can reach at most {settings['order_blind_top1']:.1f}% on these test clips "
        "(data.moving_fashion_mnist.order_blind_top1); chance is 25%.\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, help="a pretrained encoder.safetensors (default: random start)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip; the model sees 16")
    parser.add_argument("--clips", type=int, nargs=2, default=(8000, 2000), metavar=("TRAIN", "TEST"))
    parser.add_argument("--epochs", type=float, default=2, help="fine-tuning passes over train")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--paths", choices=PATHS, default="bounce", help="straight: clips that never bounce")
    parser.add_argument("--samplings", nargs="+", choices=SAMPLINGS, default=list(SAMPLINGS))
    parser.add_argument("--quick", action="store_true", help="a few steps per run: a smoke test")
    args = parser.parse_args(argv)
    settings = {"frames": args.frames, "paths": args.paths, "clips": list(args.clips), "epochs": args.epochs,
                "seeds": args.seeds, "encoder": str(args.encoder) if args.encoder else None}
    with one_line_errors(BenchError, FashionMnistError):
        if args.encoder and not args.encoder.is_file():
            raise BenchError(f"--encoder {args.encoder}: no such file")
        shards = make_shards(args.out, tuple(args.clips), args.frames, args.paths)
        settings["order_blind_top1"] = order_blind_top1("test", args.clips[1], frames=args.frames, paths=args.paths)
        runs = {s: [] for s in args.samplings}
        for seed in range(args.seeds):
            for sampling in args.samplings:
                runs[sampling].append(finetune(args.out, shards, sampling, seed, args.encoder, args.epochs,
                                               QUICK if args.quick else ()))
                print(f"seed {seed}, {sampling}: {runs[sampling][-1]['top1']:.1f}% on test", flush=True)
        report(runs, args.out, settings)
    print(f"{args.out}/results.json, table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
