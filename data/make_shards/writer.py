"""Writing shards: each shard a tar of (key.<ext>, key.json) pairs plus a sidecar ``shard-NNNNNN.json``
with its size and its members' offsets and labels (so that training reads no tar header), then ``info.json``
(format: ``data/shards.py``).

Inputs are shuffled once before sharding so that every shard mixes classes. Shard i always holds inputs
[i * per_shard, (i + 1) * per_shard) of the shuffled list and is written under a temporary name then renamed,
so re-running the same command after an interruption only writes the shards that are not finished.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..decode import IMAGE_EXTENSIONS
from ..shards import INFO_NAME, index_tar
from .encode import encode_job
from .inputs import Input, is_multi_label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every mode that writes shards."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--short-side", type=int, default=None, help="resize larger inputs (default: keep bytes)")
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--seed", type=int, default=0)


def sample_key(index: int, name: str) -> str:
    """Unique, dot-free (webdataset splits at the first dot) and readable: ``00000042_<name>``."""
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """A read-only member with a fixed mtime, so re-running a job writes identical shards."""
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = len(payload), 0o444, 0
    tar.addfile(member, io.BytesIO(payload))


def _described(item: Input) -> list:
    """What of an input the job's signature covers (a window only where there is one, so that jobs begun
    before windows existed keep their signature)."""
    return [item.path, item.label, *([item.window] if item.window else [])]


def _job_signature(args: argparse.Namespace, inputs: list[Input]) -> str:
    described = [args.short_side, args.per_shard, args.seed, [_described(i) for i in inputs]]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def write_shards(
    inputs: list[Input],
    classes: list[str],
    out: Path,
    args: argparse.Namespace,
) -> dict:
    """Write all unfinished shards and ``info.json``; returns the info dict."""
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(args.seed).permutation(len(inputs))
    inputs = [inputs[i] for i in order]
    signature = _job_signature(args, inputs)
    job_path = out / "job.json"
    if job_path.exists() and json.loads(job_path.read_text())["signature"] != signature:
        sys.exit(f"{out} holds shards of a different job (other inputs or options): use another --out")
    job_path.write_text(json.dumps({"signature": signature}))

    chunks = [range(s, min(s + args.per_shard, len(inputs))) for s in range(0, len(inputs), args.per_shard)]
    todo = [i for i in range(len(chunks)) if not (out / f"shard-{i:06d}.tar").exists()]
    jobs = [(inputs[k], args.short_side) for i in todo for k in chunks[i]]
    bar = tqdm(total=len(inputs), initial=len(inputs) - len(jobs), unit="input", desc="sharding")
    with Pool(args.workers) as pool:
        results = pool.imap(encode_job, jobs, chunksize=1)
        for i in todo:
            _write_shard(out, i, [(k, inputs[k], next(results)) for k in chunks[i]])
            bar.update(len(chunks[i]))
    bar.close()
    return _write_info(out, len(chunks), classes, args)


def shard_inputs(inputs: list[Input], classes: list[str], out: Path, *, per_shard: int = 256, seed: int = 0,
                 workers: int = 1, short_side: int | None = None) -> dict:
    """`write_shards` for callers that already hold their inputs (e.g. a split of a `folder_inputs` list)."""
    args = argparse.Namespace(per_shard=per_shard, seed=seed, workers=workers, short_side=short_side,
                              media=media_of(inputs), multi_label=is_multi_label(inputs))
    return write_shards(inputs, classes, out, args)


def _write_shard(out: Path, shard: int, encoded: list) -> None:
    """Tar + sidecar json under temporary names; the tar is renamed last and marks the shard finished."""
    name = f"shard-{shard:06d}"
    labels, skipped = [], []
    with tarfile.open(out / f"{name}.tar.tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, item, result in encoded:
            if isinstance(result, str):
                skipped.append({"input": item.path, "reason": result})
                continue
            ext, payload = result
            key = sample_key(k, item.name)
            add_member(tar, f"{key}.{ext}", payload)
            meta = {"label": item.label, "source": item.path, **({"window": item.window} if item.window else {})}
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
            labels.append(item.label)
    samples = [[key, files, label] for (key, files, _), label in zip(index_tar(out / f"{name}.tar.tmp"), labels)]
    side = {"num_samples": len(labels), "skipped": skipped, "bytes": (out / f"{name}.tar.tmp").stat().st_size,
            "samples": samples}
    (out / f"{name}.json.tmp").write_text(json.dumps(side))
    os.replace(out / f"{name}.json.tmp", out / f"{name}.json")
    os.replace(out / f"{name}.tar.tmp", out / f"{name}.tar")


def _write_info(out: Path, num_shards: int, classes: list[str], args: argparse.Namespace) -> dict:
    shards, skipped = [], []
    for i in range(num_shards):
        side = json.loads((out / f"shard-{i:06d}.json").read_text())
        skipped += side["skipped"]
        if side["num_samples"]:
            entry = {"name": f"shard-{i:06d}.tar", "num_samples": side["num_samples"]}
            if "samples" in side:  # shards written before sidecars held offsets are indexed from their headers
                entry |= {"bytes": side["bytes"], "index": f"shard-{i:06d}.json"}
            shards.append(entry)
    info = {
        "version": 1,
        "media": args.media,
        "num_samples": sum(s["num_samples"] for s in shards),
        "classes": classes,
        "multi_label": args.multi_label,
        "shards": shards,
        "skipped": skipped,
        "short_side": args.short_side,
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=1))
    return info


def media_of(inputs: list[Input]) -> str:
    exts = {Path(i.path).suffix.lstrip(".").lower() for i in inputs}
    return "image" if exts and exts <= set(IMAGE_EXTENSIONS) else "video"
