"""Turn a video or image collection into tar shards plus ``info.json`` (format: ``data/shards.py``).

    python -m data.make_shards kinetics --csv train.csv --videos DIR --out OUT [options]
    python -m data.make_shards list --list train.txt [--root DIR] --out OUT [options]
    python -m data.make_shards folder --root DIR --out OUT [options]
    python -m data.make_shards index SHARDS... --out OUT/info.json [--classes FILE]

``kinetics`` reads the official lists (header ``label,youtube_id,time_start,time_end,split``) and finds each
clip by its ``<youtube_id>_<start:06d>_<end:06d>`` name anywhere under ``--videos`` (class folders or flat).
``list`` reads ``path label`` lines (SlowFast / mae_st / VideoMAE). ``folder`` takes one sub-folder per class.
``index`` writes the info.json of shards made by another tool (``data/index.py``).

Options: ``--short-side 320`` re-encodes videos (H.264, audio dropped) or re-saves images (JPEG) whose short
side is larger; the default keeps the original bytes. ``--per-shard``, ``--workers``, ``--seed`` (inputs are
shuffled once before sharding so that every shard mixes classes).

Inputs that are missing, unreadable or have no video stream are skipped and listed with the reason in
``info.json``. Shard i always holds inputs [i * per_shard, (i + 1) * per_shard) of the shuffled list, and is
written under a temporary name then renamed, so re-running the same command after an interruption only
writes the shards that are not finished. Each shard's sidecar ``shard-NNNNNN.json`` records its size, and its
members' offsets and labels, so that training reads no tar header.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from .decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DecodeError, decode_image, probe_video
from .errors import InputError, one_line_errors
from .index import index_shards
from .shards import INFO_NAME, ShardSetError, index_tar
from .sources import FetchError


@dataclass(frozen=True)
class Input:
    path: str
    label: int  # -1: unlabelled (Kinetics test lists)
    name: str  # human-readable origin, used in keys and skip reports
    problem: str = ""  # why it cannot go into a shard, known before it is read (it is listed as skipped)


class Skip(Exception):
    """An input that cannot go into a shard; the message is the reason."""


# ---------------------------------------------------------------- collecting inputs


def kinetics_inputs(csv_path: Path, videos: Path, classes: list[str] | None) -> tuple[list[Input], list[str]]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if classes is None:
        classes = sorted({r["label"] for r in rows if r.get("label")})
    label_of = {c: i for i, c in enumerate(classes)}
    found = {}  # "<id>_<start>_<end>" -> path; one directory walk instead of a lookup per row
    for path in sorted(videos.rglob("*")):
        if path.suffix.lstrip(".").lower() in VIDEO_EXTENSIONS:
            found.setdefault(path.stem, path)
    inputs = []
    for r in rows:
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        name = r.get("label") or ""
        problem = f"class {name!r} is not in --classes" if name and name not in label_of else ""
        inputs.append(Input(str(found.get(stem, videos / f"{stem}.mp4")), label_of.get(name, -1), stem, problem))
    return inputs, classes


def list_inputs(list_path: Path, root: Path | None, classes: list[str] | None = None) -> tuple[list[Input], list[str]]:
    """`path id` lines (a bare path: unlabelled). Ids index `classes`; without it they must be 0 .. N-1 with
    none missing, which become the names "0" .. "N-1". Anything else is an InputError naming the line."""
    inputs = []
    base = root or list_path.parent
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        path, _, label = line.strip().rpartition(" ")
        if not path:  # a bare path: unlabelled
            path, label = label, "-1"
        if not label.lstrip("-").isdigit() or int(label) < -1:
            raise InputError(f"{list_path}, line {number}: label {label!r} is not a class id (a non-negative "
                             f"integer; -1: unlabelled): `make_shards list` takes 'path id' lines (class names: "
                             f"use `make_shards folder`)")
        if classes is not None and int(label) >= len(classes):
            raise InputError(f"{list_path}, line {number}: class id {label} is outside --classes, which lists "
                             f"{len(classes)} classes")
        inputs.append(Input(str(base / path), int(label), path))
    if classes is None:
        used = sorted({i.label for i in inputs if i.label >= 0})
        missing = sorted(set(range(used[-1] + 1)) - set(used)) if used else []
        if missing:
            raise InputError(f"{list_path}: class ids {used[0]}..{used[-1]} are used but {len(missing)} ids in between "
                             f"are not (e.g. {missing[:5]}): pass --classes FILE (one class name a line) to say "
                             f"which classes there are")
        classes = [str(c) for c in range(len(used))]
    return inputs, classes


def folder_inputs(root: Path) -> tuple[list[Input], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    inputs = [
        Input(str(path), label, f"{name}/{path.stem}")
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lstrip(".").lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    ]
    return inputs, classes


# ---------------------------------------------------------------- encoding one input


def encode_input(item: Input, short_side: int | None) -> tuple[str, bytes]:
    """(extension, bytes) to store for one input; raises ``Skip`` with the reason."""
    path = Path(item.path)
    if item.problem:
        raise Skip(item.problem)
    if not path.is_file():
        raise Skip("missing")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Skip(f"unreadable: {e}") from e
    ext = path.suffix.lstrip(".").lower()
    try:
        if ext in IMAGE_EXTENSIONS:
            image = decode_image(data)
            if short_side and min(image.shape[:2]) > short_side:
                return "jpg", _resize_image(image, short_side)
            return ext, data
        info = probe_video(data)
        if short_side and min(info.width, info.height) > short_side:
            return "mp4", _reencode(data, short_side)
        return ext, data
    except DecodeError as e:
        raise Skip(str(e)) from e
    except av.FFmpegError as e:
        raise Skip(f"unreadable: {e}") from e


def _scaled(width: int, height: int, short_side: int) -> tuple[int, int]:
    """New (width, height) with the short side at ``short_side``, both even (4:2:0 chroma)."""
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _resize_image(image: np.ndarray, short_side: int) -> bytes:
    width, height = _scaled(image.shape[1], image.shape[0], short_side)
    out = io.BytesIO()
    Image.fromarray(image).resize((width, height), Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _reencode(data: bytes, short_side: int) -> bytes:
    """H.264 at the new size; keeps every frame's timestamp (variable frame rates survive), drops audio."""
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(out, "w", format="mp4") as target:
        src = source.streams.video[0]
        width, height = _scaled(src.codec_context.width, src.codec_context.height, short_side)
        dst = target.add_stream("libx264", rate=src.average_rate or 30)
        dst.width, dst.height, dst.pix_fmt = width, height, "yuv420p"
        dst.time_base = src.time_base
        dst.options = {"crf": "23", "preset": "veryfast"}
        last_pts = None
        for frame in source.decode(src):
            if frame.pts is None or (last_pts is not None and frame.pts <= last_pts):
                continue  # the muxer rejects non-increasing timestamps
            last_pts = frame.pts
            scaled = frame.reformat(width=width, height=height, format="yuv420p")
            scaled.pts, scaled.time_base = frame.pts, src.time_base
            target.mux(dst.encode(scaled))
        target.mux(dst.encode())
    return out.getvalue()


def _encode_job(args: tuple[Input, int | None]) -> tuple[str, bytes] | str:
    """Worker entry: (ext, bytes) or the skip reason."""
    try:
        return encode_input(*args)
    except Skip as e:
        return str(e)


# ---------------------------------------------------------------- writing shards


def sample_key(index: int, name: str) -> str:
    """Unique, dot-free (webdataset splits at the first dot) and readable: ``00000042_<name>``."""
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """A read-only member with a fixed mtime, so re-running a job writes identical shards."""
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = len(payload), 0o444, 0
    tar.addfile(member, io.BytesIO(payload))


def _job_signature(args: argparse.Namespace, inputs: list[Input]) -> str:
    described = [args.short_side, args.per_shard, args.seed, [(i.path, i.label) for i in inputs]]
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
        results = pool.imap(_encode_job, jobs, chunksize=1)
        for i in todo:
            _write_shard(out, i, [(k, inputs[k], next(results)) for k in chunks[i]])
            bar.update(len(chunks[i]))
    bar.close()
    return _write_info(out, len(chunks), classes, args)


def shard_inputs(inputs: list[Input], classes: list[str], out: Path, *, per_shard: int = 256, seed: int = 0,
                 workers: int = 1, short_side: int | None = None) -> dict:
    """`write_shards` for callers that already hold their inputs (e.g. a split of a `folder_inputs` list)."""
    args = argparse.Namespace(per_shard=per_shard, seed=seed, workers=workers, short_side=short_side,
                              media=_media_of(inputs))
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
            add_member(tar, f"{key}.json", json.dumps({"label": item.label, "source": item.path}).encode())
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
        "shards": shards,
        "skipped": skipped,
        "short_side": args.short_side,
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=1))
    return info


def _media_of(inputs: list[Input]) -> str:
    exts = {Path(i.path).suffix.lstrip(".").lower() for i in inputs}
    return "image" if exts and exts <= set(IMAGE_EXTENSIONS) else "video"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    kinetics = commands.add_parser("kinetics", help="official Kinetics CSV + downloaded clips")
    kinetics.add_argument("--csv", type=Path, required=True)
    kinetics.add_argument("--videos", type=Path, required=True)
    kinetics.add_argument("--classes", type=Path,
                          help="class names, one a line (default: sorted labels of the CSV); "
                               "pass the training list's classes when sharding val")
    listing = commands.add_parser("list", help="'path label' lines")
    listing.add_argument("--list", type=Path, required=True)
    listing.add_argument("--root", type=Path, help="prefix for relative paths (default: the list's folder)")
    listing.add_argument("--classes", type=Path, help="class names, one a line, that the ids index")
    folder = commands.add_parser("folder", help="one sub-folder per class")
    folder.add_argument("--root", type=Path, required=True)
    index = commands.add_parser("index", help="info.json for existing webdataset shards (any tool's)")
    index.add_argument("shards", nargs="+", help="paths, URLs or pipe: commands; {000..099} braces expand")
    index.add_argument("--out", type=Path, required=True, help="the info.json to write (sidecars go beside it)")
    index.add_argument("--classes", type=Path, help="class names, one a line (labels index into it)")
    for sub in (kinetics, listing, folder):
        sub.add_argument("--out", type=Path, required=True)
        sub.add_argument("--short-side", type=int, default=None, help="resize larger inputs (default: keep bytes)")
        sub.add_argument("--per-shard", type=int, default=256)
        sub.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
        sub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with one_line_errors(InputError, ShardSetError, FetchError, FileNotFoundError):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """One `make_shards` command."""
    if args.command == "index":
        names = [c.strip() for c in args.classes.read_text().splitlines() if c.strip()] if args.classes else None
        info = index_shards(args.shards, args.out, names)
        print(f"{info['num_samples']} samples in {len(info['shards'])} shards, {len(info['classes'])} classes: "
              f"wrote {args.out}")
        for problem in info["problems"]:
            print(f"  warning: {problem}")
        return info
    if args.command == "kinetics":
        classes = [c for c in args.classes.read_text().splitlines() if c.strip()] if args.classes else None
        inputs, classes = kinetics_inputs(args.csv, args.videos, classes)
    elif args.command == "list":
        names = [c.strip() for c in args.classes.read_text().splitlines() if c.strip()] if args.classes else None
        inputs, classes = list_inputs(args.list, args.root, names)
    else:
        inputs, classes = folder_inputs(args.root)
    args.media = _media_of(inputs)
    info = write_shards(inputs, classes, args.out, args)
    print(f"{info['num_samples']} samples in {len(info['shards'])} shards, {len(info['skipped'])} skipped")
    for s in info["skipped"]:
        print(f"  skipped {s['input']}: {s['reason']}")
    return info


if __name__ == "__main__":
    main()
