"""Clips per second of the shard loader against raw PyAV decoding of the same clips, against local disk when
the shards come from a web server, and the cost of planning a large epoch.

    python -m tools.bench_loader [--videos 48] [--seconds 10] [--size 320x240] [--gop 250] [--rounds 3]
    python -m tools.bench_loader --source http --per-shard 2 --batch-size 8 [--shard-mix 8]
    python -m tools.bench_loader --plan

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

``--source http`` serves the shards from a web server on loopback (``data.serve.ShardServer``) and times, in one
run, repeat 1 with 1 and 2 workers: local disk, the server with a cold cache (a fresh cache each round, the
whole epoch timed, downloads included) and with a warm one (steady state, like local), and the mean number of
distinct shards per batch.

``--plan`` plans an epoch of 240,000 samples in 1,000 shards for 64 ranks x 8 workers, as each rank does: every
worker builds the epoch's plan and resolves its batches to (shard, member). It prints the time and the peak
Python memory (tracemalloc) of one rank's planning, for the first, middle and last rank. No shard is read.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import tracemalloc
from pathlib import Path

import av
import numpy as np

from data import make_shards
from data.decode import rgb24
from data.loader import ShardLoader
from data.plan import EpochPlan, epoch_order
from data.samples import SampleConfig, position_rng
from data.serve import ShardServer
from data.shards import ShardReader, ShardSet
from data.sources import ShardCache
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


def bench_loader(shards: ShardSet | str, cfg: SampleConfig, workers: int, batch_size: int, steady: bool = True,
                 **loader_args) -> float:
    """Clips/s. Steady state: the clock starts when every worker's first batch has arrived, so starting the
    workers (once per epoch, negligible on a real epoch but not on this small dataset) is left out, and no
    worker has a batch half made before the clock starts. Otherwise the whole epoch from creating the loader
    (a cold start: reading info.json, starting workers, downloads)."""
    start = time.perf_counter()
    loader = ShardLoader(shards, cfg, batch_size=batch_size, num_workers=workers, drop_last=False, **loader_args)
    batches, clips = iter(loader), 0
    if steady:
        for _ in range(max(1, workers)):
            next(batches)
        start = time.perf_counter()
    for batch in batches:
        clips += batch["video"].shape[0]
    return clips / (time.perf_counter() - start)


def distinct_shards_per_batch(shards: ShardSet, batch_size: int, shard_mix: int) -> float:
    """Mean number of shards a batch of epoch 0 draws from (from the plan: the same batches the loader makes)."""
    plan = EpochPlan(shards.counts, batch_size, seed=0, epoch=0, drop_last=False, shard_mix=shard_mix)
    return float(np.mean([len(set(plan.shards(plan.batch(j).positions).tolist()))
                          for j in range(plan.num_batches)]))


def remote_table(shards: ShardSet, root: Path, args: argparse.Namespace) -> None:
    """Local disk against the same shards from a web server on loopback, cold and warm cache."""
    cfg = SampleConfig(num_frames=args.frames, sampling_rate=args.rate, mask_grid=(args.frames // 2, 7, 7),
                       mask_ratio=0.9)
    mix = {"shard_mix": args.shard_mix}
    print(f"{len(shards.names)} shards; distinct shards per batch of {args.batch_size} at shard_mix "
          f"{args.shard_mix}: {distinct_shards_per_batch(shards, args.batch_size, args.shard_mix):.2f}")
    print(f"{'workers':>7} {'local clip/s':>12} {'http warm':>9} {'warm/local':>10} {'local epoch':>11} "
          f"{'http cold epoch':>15} {'cold/local':>10}")
    with ShardServer(root) as server:
        for workers in (1, 2):
            # Rounds alternate local and remote, so a change in the machine's load hits both alike.
            local, warm, local_cold, cold = [], [], [], []
            for r in range(args.rounds):
                cache = ShardCache(str(root.parent / f"cache-{workers}-{r}"))
                local_cold.append(bench_loader(root, cfg, workers, args.batch_size, steady=False, **mix))
                cold.append(bench_loader(server.url, cfg, workers, args.batch_size, steady=False, cache=cache, **mix))
                local.append(bench_loader(shards, cfg, workers, args.batch_size, **mix))
                warm.append(bench_loader(server.url, cfg, workers, args.batch_size, cache=cache, **mix))
            print(f"{workers:>7} {max(local):>12.1f} {max(warm):>9.1f} {max(warm) / max(local):>10.2f} "
                  f"{max(local_cold):>11.1f} {max(cold):>15.1f} {max(cold) / max(local_cold):>10.2f}")
    print("epoch columns: clips/s over a whole epoch from a new loader (start-up and, for http, downloads)")


def plan_figures(num_samples: int = 240_000, num_shards: int = 1_000, ranks: int = 64, workers: int = 8,
                 batch_size: int = 8, shard_mix: int = 8) -> None:
    """Time and peak memory of one rank's planning of an epoch (all its workers' share), reading no shard."""
    counts = tuple(np.diff(np.linspace(0, num_samples, num_shards + 1).astype(int)).tolist())

    def plan_rank(rank: int) -> int:
        resolved = 0
        for w in range(workers):  # each worker plans the epoch, then resolves the batches it builds
            plan = EpochPlan(counts, batch_size, rank, ranks, seed=0, epoch=0, shard_mix=shard_mix)
            for j in range(w, plan.num_batches, workers):
                resolved += len(plan.resolve(plan.batch(j).positions))
        return resolved

    print(f"planning an epoch of {num_samples} samples in {num_shards} shards for {ranks} ranks x {workers} "
          f"workers, batch {batch_size}, shard_mix {shard_mix}:")
    for rank in (0, ranks // 2, ranks - 1):
        start = time.perf_counter()
        resolved = plan_rank(rank)
        elapsed = time.perf_counter() - start
        tracemalloc.start()
        plan_rank(rank)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"  rank {rank:>2}: {resolved} samples planned in {elapsed * 1000:.0f} ms, peak {peak / 2**20:.2f} MB")


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
    parser.add_argument("--per-shard", type=int, default=8, help="videos per shard")
    parser.add_argument("--source", choices=("local", "http"), default="local",
                        help="local: the decoding table; http: a web server on loopback against local disk")
    parser.add_argument("--shard-mix", type=int, default=8)
    parser.add_argument("--plan", action="store_true", help="only the planning figures (no data is made)")
    args = parser.parse_args()
    if args.plan:
        plan_figures()
        return
    width, height = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fps = 25
        csv_path = write_kinetics_dataset(tmp / "raw", per_class=max(1, args.videos // 4), splits=("train",),
                                          size=(width, height), num_frames=int(args.seconds * fps), fps=fps,
                                          gop=args.gop)
        make_shards.main(["kinetics", "--csv", str(csv_path["train"]), "--videos", str(tmp / "raw" / "videos"),
                          "--out", str(tmp / "shards"), "--per-shard", str(args.per_shard), "--workers", "2"])
        shards = ShardSet.load(tmp / "shards")
        print(f"{shards.num_samples} videos {width}x{height}, {args.seconds:g} s at {fps} fps, gop {args.gop}; "
              f"clips {args.frames}x{args.rate}, crop 224")
        if args.source == "http":
            remote_table(shards, tmp / "shards", args)
            return
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
