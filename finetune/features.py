"""Export a trained encoder's features of a shard set, for your own classifiers, retrieval or clustering.

    python -m finetune.features --checkpoint runs/demo/pretrain --data runs/demo/shards/val --out feats/
    python -m finetune.features --checkpoint hiera_base_16x224.pth --model hiera_base_16x224 \
        --data shards/k400/val --out feats/ --stages --spatial-views 3 --temporal-views 5

Writes `OUT/features-00000.safetensors`, ... in chunks of `--chunk-size` samples, in shard order. Each holds
`features` float32 [n, D] (the pooled, normed features of `forward_features`), `labels` int64 [n] (-1 when
unlabelled; for a multi-label shard set, multi-hot float32 [n, K]), `index` int64 [n] (the sample's position in
the shard set) and, with --stages, `stage{s}` float32 [n, C_s] (each stage's output averaged over its positions);
the sample keys are the JSON list `keys` in the file's metadata. Several views of a sample are averaged. A chunk
appears under its name only once complete (written to a temporary name, then renamed), so a run killed at any
point and started again with the same command continues after the last complete chunk and ends with the same
files. `OUT/info.json` is written at the end: counts, dimensions, class names, whether the labels are multi-hot
(`multi_label`) and the samples that could not be decoded.
--checkpoint takes what finetune.predict takes, and also pretraining runs (their encoder). Images given to a
video encoder are repeated over its frames, as finetune.predict does. Bad inputs, and data that fails past
data.max_fail_count / max_fail_fraction, stop it with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from data import SampleConfig, ShardLoader, ShardSet
from engine.checkpoint import save_atomically
from engine.config import ConfigError
from engine.errors import one_line_errors
from engine.loaders import media_of

from .evaluate import average_views
from .inference import Loaded, at_least_one, fit_to_model, load_model, sample_config

JOB = "job.json"  # what the files in OUT are the features of; a resumed run must match it


def chunk_name(chunk: int) -> str:
    return f"features-{chunk:05d}.safetensors"


@torch.no_grad()
def batch_rows(loaded: Loaded, batch: dict, sample: SampleConfig, stages: bool,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One loader batch -> (index [M], labels [M], {"features": [M, D], "stage0": ...}) of its M samples,
    views averaged, rows of failed samples and padding left out (`valid`)."""
    x = fit_to_model(media_of(batch, sample, device), loaded, sample.num_frames)  # e.g. images, a video model
    if stages:  # one forward pass for both
        features, pooled = loaded.model.forward_pooled(x)
        outputs = {"features": features, **{f"stage{s}": f for s, f in enumerate(pooled)}}
    else:
        outputs = {"features": loaded.model.forward_features(x)}
    index, valid, label = batch["index"].to(device), batch["valid"].to(device), batch["label"].to(device)
    rows = {}
    for name, values in outputs.items():
        index_m, rows[name], labels_m = average_views(values.float(), index, valid, label)
    return index_m.cpu(), labels_m.cpu(), {k: v.cpu() for k, v in rows.items()}


def write_chunk(out: Path, chunk: int, parts: list[tuple], keys: list[str]) -> None:
    """Concatenate the batches of one chunk and write it atomically."""
    tensors = {"index": torch.cat([p[0] for p in parts]), "labels": torch.cat([p[1] for p in parts])}
    for name in parts[0][2]:
        tensors[name] = torch.cat([p[2][name] for p in parts])
    save_atomically(out / chunk_name(chunk), tensors, metadata={"keys": json.dumps(keys)})


def complete_chunks(out: Path) -> int:
    """How many chunks, from the first on, are already written."""
    count = 0
    while (out / chunk_name(count)).is_file():
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run, checkpoint dir or checkpoint file")
    parser.add_argument("--model", help="architecture of a checkpoint that does not name it")
    parser.add_argument("--data", required=True, help="shard set (directory, URL, ...)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--stages", action="store_true", help="also every stage's pooled output")
    parser.add_argument("--spatial-views", type=at_least_one, default=1)
    parser.add_argument("--temporal-views", type=at_least_one, default=1)
    parser.add_argument("--batch-size", type=at_least_one, default=16, help="samples per forward pass")
    parser.add_argument("--chunk-size", type=at_least_one, default=4096, help="samples per file (whole batches)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with one_line_errors(KeyError, TypeError):  # and weights that do not fit the architecture named
        loaded = load_model(args.checkpoint, args.model, need_head=False)
        shards = ShardSet.load(args.data)
        sample = sample_config(loaded, (args.spatial_views, args.temporal_views), shards.media == "image")
        loader = ShardLoader(shards, sample, args.batch_size, num_workers=args.num_workers, shuffle=False,
                             drop_last=False, shard_mix=1)
        batches_per_chunk = max(1, args.chunk_size // args.batch_size)
        job = {"checkpoint": str(args.checkpoint), "model": loaded.name, "data": str(args.data),
               "shards": loader.shards.fingerprint, "stages": args.stages, "batch_size": args.batch_size,
               "batches_per_chunk": batches_per_chunk, "views": [args.spatial_views, args.temporal_views]}
        args.out.mkdir(parents=True, exist_ok=True)
        saved_job = json.loads((args.out / JOB).read_text()) if (args.out / JOB).is_file() else None
        if saved_job is not None and saved_job != job:
            raise ConfigError(f"{args.out} holds features of another job ({args.out / JOB}); use a new --out")
    device = torch.device(args.device)
    loaded.model.to(device)
    (args.out / JOB).write_text(json.dumps(job, indent=2))
    with one_line_errors():  # samples that fail to load past data.max_fail_count / max_fail_fraction
        export(loaded, loader, args.out, job, device)
    return 0


def export(loaded: Loaded, loader: ShardLoader, out: Path, job: dict, device: torch.device) -> None:
    """Write the chunks not yet in `out`, then info.json."""
    per_chunk, start = job["batches_per_chunk"], complete_chunks(out)
    if start:
        print(f"resuming after {start} complete chunk(s) in {out}", flush=True)
        loader.load_state_dict({**loader.state_dict(), "consumed": min(start * per_chunk, len(loader))})
    failures: list[list[str]] = []
    parts, keys, chunk = [], [], start
    # As a context, the bar ends its line also when the data fails: the error is then a line of its own.
    with tqdm(total=len(loader), initial=loader.consumed, desc="features", unit="batch", dynamic_ncols=True) as bar:
        for batch in loader:
            failures += [list(f) for f in batch["failures"]]
            index, labels, rows = batch_rows(loaded, batch, loader.sample, job["stages"], device)
            key_of = dict(zip(batch["index"].tolist(), batch["key"]))
            parts.append((index, labels, rows))
            keys += [key_of[i] for i in index.tolist()]
            bar.update(1)
            if len(parts) == per_chunk or loader.consumed == len(loader):
                write_chunk(out, chunk, parts, keys)
                parts, keys, chunk = [], [], chunk + 1
    counts = []
    for c in range(chunk):
        with safe_open(str(out / chunk_name(c)), framework="pt") as f:
            counts.append(f.get_slice("index").get_shape()[0])
    info = {**job, "chunks": chunk, "num_samples": sum(counts), "classes": list(loader.shards.classes),
            "multi_label": loader.shards.multi_label,
            "failed_since_start": failures}  # a resumed run lists the failures of its own part only
    (out / "info.json").write_text(json.dumps(info, indent=2))
    print(f"done: {info['num_samples']} samples in {chunk} chunk(s) in {out}")


if __name__ == "__main__":
    sys.exit(main())
