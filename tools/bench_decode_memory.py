"""Peak memory of a data worker decoding one sample, against the source's resolution.

    python -m tools.bench_decode_memory [--sizes 1920x1080 3840x2160 7680x4320] [--frames 16] [--crop 224]
    python -m tools.bench_decode_memory --code /path/to/another/checkout   # the same sources, other code

Writes, in a temporary folder, one H.264 mp4 of ``--frames`` frames per size (x264 veryfast, a smooth moving
pattern) and a JPEG and a PNG of the largest size. Each is then decoded by a fresh process, as a training data
worker does (``SampleProcessor``, the training defaults: random resized crop to ``--crop``, one thread), into
one clip of ``--frames`` consecutive frames, every one a different frame of the source. The process reports
its resident memory before and its peak while decoding (Linux's VmRSS and VmHWM): "peak" is the whole process
(Python, torch, PyAV and the sample), "decoding adds" what the one sample added on top.

``--code`` runs the decoding processes on another checkout's ``data`` package (the sources are still written
with this one), e.g. to measure the code before a change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

import data
from data.synthetic import write_video

MiB = 2**20

# Runs in the decoding process: one sample through the training worker's path. The kernel's peak RSS (VmHWM) is
# reset just before (clear_refs 5), so the peak is that of the decoding: ru_maxrss cannot be reset, and a process
# started by exec keeps its parent's high-water mark in it.
_DECODE_ONE = """
import json, sys
import torch
from data.samples import SampleConfig, SampleProcessor
def status_kib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])
torch.set_num_threads(1)  # as in a DataLoader worker
path, frames, crop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ext = path.rsplit(".", 1)[1]
raw = open(path, "rb").read()
processor = SampleProcessor(SampleConfig(num_frames=frames, sampling_rate=1, target_fps=None, crop_size=crop))
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
views = processor(raw, ext, 0, 0, 0)
print(json.dumps({"before_kib": before, "peak_kib": status_kib("VmHWM"), "shape": list(views[0]["pixels"].shape)}))
"""


def moving_pattern(width: int, height: int, frames: int) -> Iterator[np.ndarray]:
    """Frames [H, W, 3] uint8, made one at a time: smooth ramps that move a few pixels per frame (each frame
    differs, and x264 still compresses them well)."""
    x = np.arange(width, dtype=np.int64)[None, :]
    y = np.arange(height, dtype=np.int64)[:, None]
    for t in range(frames):
        frame = np.empty((height, width, 3), np.uint8)
        frame[..., 0] = (x // 8 + 4 * t) & 255
        frame[..., 1] = (y // 8 + 2 * t) & 255
        frame[..., 2] = ((x + y) // 16) & 255
        yield frame


def write_sources(folder: Path, sizes: list[tuple[int, int]], frames: int) -> list[tuple[str, Path]]:
    """(label, path) of the videos of every size, then a JPEG and a PNG of the largest."""
    sources = []
    for width, height in sizes:
        path = write_video(folder / f"{width}x{height}.mp4", moving_pattern(width, height, frames), fps=25, gop=frames)
        sources.append((f"mp4 {width}x{height}, {frames} frames", path))
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    image = Image.fromarray(next(moving_pattern(width, height, 1)))
    for ext, options in (("jpg", {"quality": 90}), ("png", {"compress_level": 1})):
        path = folder / f"{width}x{height}.{ext}"
        image.save(path, **options)
        sources.append((f"{ext} {width}x{height}", path))
    return sources


def decode_in_child(path: Path, frames: int, crop: int, code: Path) -> dict:
    """{"before_kib": RSS before, "peak_kib": peak RSS while decoding, "shape": the first view's} of one sample,
    decoded by a fresh process that imports `code`'s data package (Linux: it reads /proc/self/status)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", _DECODE_ONE, str(path), str(frames), str(crop)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1920x1080", "3840x2160", "7680x4320"], help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=16, help="frames of the clip (and of each video)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--code", type=Path, default=Path(data.__file__).resolve().parents[1],
                        help="checkout whose data package decodes (default: this one)")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    print(f"decoding code: {args.code}; clip {args.frames} frames, crop {args.crop}")
    print(f"{'source':<32} {'file MiB':>8} {'peak RSS MiB':>12} {'decoding adds MiB':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in write_sources(Path(tmp), sizes, args.frames):
            rss = decode_in_child(path, args.frames, args.crop, args.code)
            print(f"{label:<32} {path.stat().st_size / MiB:>8.1f} {rss['peak_kib'] / 1024:>12.0f} "
                  f"{(rss['peak_kib'] - rss['before_kib']) / 1024:>17.0f}", flush=True)


if __name__ == "__main__":
    main()
