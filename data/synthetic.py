"""Synthetic demo data: small real mp4 videos in the official Kinetics layout, plus odd files for tests.

Every class is defined by motion, so no single frame identifies it: a square moving left is the time
reversal of one moving right, and a growing square is the time reversal of a shrinking one. A model that
ignores temporal order cannot beat 50% on this data.

    python -m data.synthetic --out DIR [--per-class 8] [--size 64x48] [--frames 32] [--fps 25]

writes ``DIR/{train,val}.csv`` (header ``label,youtube_id,time_start,time_end,split``) and
``DIR/videos/<class>/<youtube_id>_<start:06d>_<end:06d>.mp4``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np

from .make_shards.writer import add_member
from .shards import INFO_NAME

CLASSES = ("moving_left", "moving_right", "growing", "shrinking")
CSV_HEADER = ("label", "youtube_id", "time_start", "time_end", "split")


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: int = 25,
    audio: bool = False,
    gop: int = 8,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
    muxer_options: dict[str, str] | None = None,
) -> Path:
    """Encode ``frames`` [T, H, W, 3] uint8 RGB, or any iterable of [H, W, 3] frames (a generator keeps only one
    8K frame in memory at a time), H.264 by default, container from the suffix; any H, W (odd sizes use 4:4:4
    chroma).

    ``audio`` adds an AAC sine-tone stream, like most real Kinetics clips carry. A short GOP makes seeking
    land close to its target, as it would on pre-resized datasets. ``options`` replace the x264 settings;
    ``muxer_options`` go to the container (e.g. ``{"live": "1"}``: a WebM without a stated duration).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames)
    h, w, _ = first.shape
    with av.open(str(path), "w", options=muxer_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        # 4:2:0 needs even sizes; 4:4:4 keeps odd sizes decodable by any FFmpeg.
        stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        stream.options = {"g": str(gop), "preset": "veryfast"} if options is None else options
        tone = container.add_stream("aac", rate=16000) if audio else None
        if tone is not None:
            tone.layout = "mono"
        count = 0
        for frame in itertools.chain([first], frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            count += 1
        container.mux(stream.encode())
        if tone is not None:
            _encode_tone(container, tone, seconds=count / fps)
    return path


def _encode_tone(container, stream, seconds: float, rate: int = 16000, chunk: int = 1024) -> None:
    samples = np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * 440 / rate).astype(np.float32)
    for start in range(0, len(samples), chunk):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + chunk], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def motion_clip(label: int, rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """A clip [T, H, W, 3] uint8 of class ``CLASSES[label]``: a grey square, brighter than any other pixel, on a
    still, noisy grey background.

    Brightness, contrast and noise level change from clip to clip, as they do between real videos. They dominate
    a randomly initialised encoder's features (the demo's k-NN top-1: 48.4%, chance 25%); the demo's MAE
    pretraining learns past them (84.4%).
    """
    level = rng.uniform(0, 140)
    square = round(level + rng.uniform(50, 110))
    noise = rng.normal(0, rng.uniform(2, 25), size=(height, width))
    background = np.round(np.clip(level + noise, 0, square - 20)).astype(np.uint8)
    frames = np.repeat(background[None], num_frames, axis=0)
    progress = np.linspace(0.0, 1.0, num_frames)
    if CLASSES[label] in ("moving_left", "moving_right"):
        side = max(2, min(height, width) // 3)
        top = int(rng.integers(0, height - side + 1))
        lefts = progress * (width - side)
        if CLASSES[label] == "moving_left":
            lefts = lefts[::-1]
        boxes = [(top, int(round(x)), side) for x in lefts]
    else:
        small, large = 2, max(3, min(height, width) - 2)
        sides = small + progress * (large - small)
        if CLASSES[label] == "shrinking":
            sides = sides[::-1]
        boxes = [((height - int(s)) // 2, (width - int(s)) // 2, int(s)) for s in sides]
    for frame, (top, left, side) in zip(frames, boxes):
        frame[top : top + side, left : left + side] = square
    return np.repeat(frames[..., None], 3, axis=-1)


def kinetics_name(youtube_id: str, start: int, end: int) -> str:
    return f"{youtube_id}_{start:06d}_{end:06d}.mp4"


def write_kinetics_dataset(
    out: str | Path,
    per_class: int = 8,
    splits: tuple[str, ...] = ("train", "val"),
    size: tuple[int, int] = (64, 48),
    num_frames: int = 32,
    fps: int = 25,
    seed: int = 0,
    gop: int = 8,
) -> dict[str, Path]:
    """Write ``per_class`` videos per class and split; returns ``{split: csv_path}``.

    ``size`` is (width, height). The clip length in the names and CSV is the real one in seconds.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    width, height = size
    seconds = max(1, round(num_frames / fps))
    csv_paths = {}
    for split in splits:
        rows = []
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                youtube_id = f"{split[:2]}{label}x{i:04d}-syn"
                start = int(rng.integers(0, 300))
                frames = motion_clip(label, rng, num_frames, height, width)
                write_video(out / "videos" / name / kinetics_name(youtube_id, start, start + seconds), frames, fps,
                            gop=gop)
                rows.append((name, youtube_id, start, start + seconds, split))
        csv_paths[split] = out / f"{split}.csv"
        with open(csv_paths[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            writer.writerows(rows)
    return csv_paths


def write_corrupt(path: str | Path, valid_video: str | Path | None = None) -> Path:
    """A file that is not a decodable video: the head of a real mp4 if given (truncated), else noise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if valid_video is not None:
        data = Path(valid_video).read_bytes()
        payload = data[: max(1, len(data) // 5)]
    else:
        payload = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(payload)
    return path


def write_zero_byte(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_shard_dir(out: str | Path, shards: list[list[tuple[str, str, bytes, int]]], media: str = "video") -> Path:
    """Shards exactly as given, bypassing ``make_shards``' input checks: each shard is a list of
    (key, extension, payload, label). Lets tests put corrupt or zero-byte samples inside shards."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, samples in enumerate(shards):
        name = f"shard-{i:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, payload, label in samples:
                add_member(tar, f"{key}.{ext}", payload)
                add_member(tar, f"{key}.json", json.dumps({"label": label}).encode())
        entries.append({"name": name, "num_samples": len(samples)})
    info = {"version": 1, "media": media, "num_samples": sum(e["num_samples"] for e in entries),
            "classes": list(CLASSES), "shards": entries, "skipped": []}
    (out / INFO_NAME).write_text(json.dumps(info))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--size", default="64x48", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    paths = write_kinetics_dataset(args.out, args.per_class, size=(width, height), num_frames=args.frames,
                                   fps=args.fps, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
