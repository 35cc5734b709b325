"""Clips per second of the shard loader against raw PyAV decoding of the same clips.

    python -m tools.bench_loader [--videos 48] [--seconds 10] [--size 320x240] [--gop 250] [--rounds 3]

Writes a synthetic dataset into a temporary folder (Kinetics-like: 10 s clips, x264's default key-frame
interval of 250, which is also what ``make_shards --short-side`` produces), shards it, then times:
- raw: plain PyAV, in this process, decoding the loader's own clip times (seek, decode every frame, RGB),
  the R clips of a video in one pass;
- the loader with 1 and 2 workers, repeated sampling 1 and 4 (crop 224, flip, mask, batching; the batch is
  uint8 and normalisation happens on the consumer's device, so it is not timed here).
Ratios are printed: loader / raw (the loader's overhead; 1 worker is the like-for-like comparison; it can
exceed 1 because the loader's decoder skips the frames that are neither shown nor referenced), repeat 4 /
repeat 1, and raw repeat 4 / raw repeat 1, the ceiling that full decoding sets for that ratio. Each figure
is the best of ``--rounds`` runs: the machine is shared, so compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from data import make_shards
from data.decode import rgb24
from data.loader import ShardLoader
from data.samples import SampleConfig, position_rng
from data.shards import ShardReader, ShardSet
from data.stream import epoch_order
from data.synthetic import write_kinetics_dataset
from data.transforms import clip_span, clip_times, random_clip_start


def raw_decode(data: bytes, times: np.ndarray) -> list[np.ndarray]:
    """Plain PyAV: seek to the first time, decode, convert the frame on screen at each time to RGB (with the
    loader's own fast conversion, so that the ratio measures the loader's overhead, not that trick)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        container.seek(int(times[0] / stream.time_base), stream=stream, backward=True)
        out, previous, i = [], None, 0
        for frame in container.decode(stream):
            while i < len(times) and frame.time > times[i] + 1e-6:
                out.append(rgb24(previous or frame))
                i += 1
            if i == len(times):
                break
            previous = frame
        out += [rgb24(previous)] * (len(times) - i)
    return out


def bench_raw(shards: ShardSet, cfg: SampleConfig, repeats: int, seed: int = 0) -> float:
    """Clips/s of raw decoding of the clips the loader draws (epoch 0); the ``repeats`` clips of a video are
    decoded in one pass, as the loader does, so raw repeat R / raw repeat 1 is the most that repeated
    sampling can give on these videos with a decoder that decodes every frame."""
    order = epoch_order(shards.counts, seed, 0)
    fps = cfg.target_fps
    span = clip_span(fps, cfg.num_frames, cfg.sampling_rate)
    with ShardReader(shards) as reader:
        samples = [reader.read(int(s), int(m))[2] for s, m in order]
        start = time.perf_counter()
        for position, data in enumerate(samples):
            with av.open(io.BytesIO(data)) as c:
                s = c.streams.video[0]
                duration = float(s.duration * s.time_base)
            starts = [random_clip_start(duration, span, position_rng(seed, 0, position, r, "clip"))
                      for r in range(repeats)]
            times = np.concatenate([clip_times(t0, fps, cfg.num_frames, cfg.sampling_rate) for t0 in starts])
            raw_decode(data, np.sort(times))
    return len(samples) * repeats / (time.perf_counter() - start)


def bench_loader(shards: ShardSet, cfg: SampleConfig, workers: int, batch_size: int) -> float:
    """Steady-state clips/s: the clock starts when every worker's first batch has arrived, so starting the
    workers (once per epoch, negligible on a real epoch but not on this small dataset) is left out, and no
    worker has a batch half made before the clock starts."""
    loader = ShardLoader(shards, cfg, batch_size=batch_size, num_workers=workers, drop_last=False)
    batches = iter(loader)
    for _ in range(max(1, workers)):
        next(batches)
    start, clips = time.perf_counter(), 0
    for batch in batches:
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=48, help="videos in the dataset (4 classes)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gop", type=int, default=250, help="key-frame interval of the written videos")
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of the videos")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--rate", type=int, default=4, help="sampling rate (frames at 30 fps)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fps = 25
        csv_path = write_kinetics_dataset(tmp / "raw", per_class=max(1, args.videos // 4), splits=("train",),
                                          size=(width, height), num_frames=int(args.seconds * fps), fps=fps,
                                          gop=args.gop)
        make_shards.main(["kinetics", "--csv", str(csv_path["train"]), "--videos", str(tmp / "raw" / "videos"),
                          "--out", str(tmp / "shards"), "--per-shard", "8", "--workers", "2"])
        shards = ShardSet.load(tmp / "shards")
        print(f"{shards.num_samples} videos {width}x{height}, {args.seconds:g} s at {fps} fps, gop {args.gop}; "
              f"clips {args.frames}x{args.rate}, crop 224")
        rows = []
        for repeats in (1, 4):
            cfg = SampleConfig(num_frames=args.frames, sampling_rate=args.rate, repeats=repeats,
                               mask_grid=(args.frames // 2, 7, 7), mask_ratio=0.9)
            raw = max(bench_raw(shards, cfg, repeats) for _ in range(args.rounds))
            for workers in (1, 2):
                speed = max(bench_loader(shards, cfg, workers, args.batch_size) for _ in range(args.rounds))
                rows.append((repeats, workers, speed, raw))
        by_key = {(r, w): speed for r, w, speed, _ in rows}
        raw_by_repeat = {r: raw for r, _, _, raw in rows}
        print(f"{'repeat':>6} {'workers':>7} {'loader clip/s':>13} {'raw clip/s':>10} {'loader/raw':>10} "
              f"{'vs repeat 1':>11} {'raw vs repeat 1':>15}")
        for repeats, workers, speed, raw in rows:
            print(f"{repeats:>6} {workers:>7} {speed:>13.1f} {raw:>10.1f} {speed / raw:>10.2f} "
                  f"{speed / by_key[(1, workers)]:>11.2f} {raw / raw_by_repeat[1]:>15.2f}")


if __name__ == "__main__":
    main()
