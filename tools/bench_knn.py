"""The k-NN monitor's cost against the plain forward of the same images, at 32 px and 224 px, on 1 and 2 ranks.

    python -m tools.bench_knn [--images 2400] [--images-224 120] [--ranks 1 2] [--measurements 5] [--json FILE]

Writes Fashion-MNIST-like data into a temporary folder (28x28 grey PNGs of 10 classes of shapes, sharded as
`make_shards folder` does; a sixth of the images are the queries, the rest the bank), then, for each size and
rank count, starts that many processes (`accelerate launch`, gloo between CPU ranks) that each time, in turn and
`--measurements` times:
- the plain forward: the encoder's `forward_features` over this rank's share of the bank and the queries,
  decoded beforehand and held in memory, under the run's autocast (bf16 as the configs train);
- one measurement of the monitor (engine.knn.KnnMonitor) on the same images: loading, forward, k-NN, results.
Each is timed from a barrier to a barrier, so a figure is the slowest rank's. Printed: seconds per 10k images
(bank + queries) of each (the forward's median over all turns, the monitor's first measurement and the median of
its later ones: what every `eval.knn.every` steps costs), and their ratio: the monitor's time over the forward's
of the same turn (the first turn; the median of the later ones). The two alternate, which goes first swapping
every turn, so that drift in a shared machine's load hits both. Then, per rank: the peak bytes of the tensors one
more measurement and one more plain forward allocate (`peak_bytes`), and the decoded views the monitor keeps
between measurements; the figures of the rank with the most.
32 px is configs/pretrain/fmnist_hiera.yaml (eval.batch_size 256, data.num_workers 2); 224 px is
in1k_hiera_tiny_224.yaml with eval.batch_size 32 and data.num_workers 2. Absolute times drift on shared
machines: quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.distributed._tools.mem_tracker import MemTracker

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {32: ("configs/pretrain/fmnist_hiera.yaml", ()),
           224: ("configs/pretrain/in1k_hiera_tiny_224.yaml", ("eval.batch_size=32", "data.num_workers=2"))}
QUERY_SHARE = 6  # one image in six is a query


def write_images(root: Path, count: int, seed: int) -> None:
    """`count` 28x28 grey PNGs in 10 class folders: a bright bar at a class-dependent angle over noise."""
    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:28, 0:28] - 13.5
    for i in range(count):
        label = i % 10
        angle = np.pi * label / 10 + rng.normal(0, 0.1)
        distance = np.abs(grid[0] * np.cos(angle) - grid[1] * np.sin(angle))
        pixels = np.clip(220 * (distance < 3) + rng.integers(0, 60, (28, 28)), 0, 255).astype(np.uint8)
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def write_shards(root: Path, images: int) -> dict[str, Path]:
    """{"train": bank shards, "val": query shards} of `images` images in all."""
    from data.make_shards.folder import folder_inputs
    from data.make_shards.writer import shard_inputs

    queries = images // QUERY_SHARE
    shards = {}
    for role, count, seed in (("train", images - queries, 0), ("val", queries, 1)):
        write_images(root / "images" / role, count, seed)
        inputs, classes = folder_inputs(root / "images" / role)
        shards[role] = root / "shards" / role
        shard_inputs(inputs, classes, shards[role], per_shard=256)
    return shards


class TotalMemTracker(MemTracker):
    """torch's MemTracker without its per-module statistics, which refuse a module called more than once (the
    encoder runs once per batch): the device totals, peak included, are all that is read."""

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: object) -> None:
        pass

    def _post_fw_hook(self, module: torch.nn.Module, inputs: object, outputs: object) -> None:
        pass


def peak_bytes(work: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated while `work()` runs, above those alive before: on CUDA
    `max_memory_allocated`; on the CPU, whose allocator keeps no such statistic, torch's MemTracker counts them
    (as tools/peak_memory.py does; `TotalMemTracker`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = TotalMemTracker()
    with tracker:
        work()
    return sum(totals["Total"] for where, totals in tracker.get_tracker_snapshot("peak").items() if where.type == "cpu")


def kept_bytes(monitor) -> int:
    """Bytes of decoded views the monitor keeps between measurements (engine.loaders.RepeatedEvalPass; 0 for a
    monitor without kept views)."""
    return sum(t.nbytes for p in getattr(monitor, "passes", {}).values() for b in (p.kept or []) for t in b.values())


def rank_main(config: str, overrides: list[str], measurements: int, out: Path) -> None:
    """In each launched process: the plain forward and the monitor, `measurements` times each, in turn."""
    from accelerate import Accelerator

    from engine.config import load_config
    from engine.knn import KnnMonitor
    from engine.loaders import eval_loader, media_of
    from engine.tblog import TrainLogger
    from models import create_model

    cfg = load_config([config], overrides)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    rank, ranks, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, **cfg.model.overrides()).to(device).eval()
    input_size = model.encoder.config.input_size
    monitor = KnnMonitor(cfg, input_size)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    inputs = []  # this rank's share of both sets, decoded and normalised once, as the plain forward's input
    for shards in monitor.sets.values():
        loader = eval_loader(cfg, rank, ranks, input_size, shards=shards, views=(1, 1))
        inputs += [media_of(batch, loader.sample, device) for batch in loader]
    images = sum(shards.num_samples for shards in monitor.sets.values())

    @torch.no_grad()
    def plain_forward() -> None:
        with accelerator.autocast():
            for x in inputs:
                model.forward_features(x)

    def timed(work: Callable[[], object]) -> float:
        accelerator.wait_for_everyone()
        began = time.perf_counter()
        work()
        accelerator.wait_for_everyone()
        return time.perf_counter() - began

    logger = TrainLogger(cfg.output_dir, enabled=False)
    measure = partial(monitor, model, accelerator, logger, 0)
    seconds = {"forward": [], "monitor": []}
    for turn in range(measurements):  # the monitor first in every other turn: drift in the machine's load cancels
        for name in ("forward", "monitor") if turn % 2 == 0 else ("monitor", "forward"):
            seconds[name].append(timed(plain_forward if name == "forward" else measure))
    peak = {"forward": peak_bytes(plain_forward, device), "monitor": peak_bytes(measure, device)}
    (out / f"rank{rank}.json").write_text(json.dumps({"images": images, "seconds": seconds, "peak_bytes": peak,
                                                      "kept_bytes": kept_bytes(monitor)}))
    accelerator.end_training()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(size: int, ranks: int, shards: dict[str, Path], images: int, measurements: int, work: Path) -> dict:
    """One size on `ranks` processes -> a result row (the figures of the rank that used the most memory)."""
    config, extra = CONFIGS[size]
    out = work / f"{size}px_{ranks}ranks"
    out.mkdir(parents=True)
    overrides = [f"eval.knn.train={shards['train']}", f"eval.knn.val={shards['val']}", f"output_dir={out}",
                 *extra]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    many = ["--multi_gpu", "--main_process_port", str(free_port())] if ranks > 1 else []
    command = [accelerate, "launch", "--num_processes", str(ranks), "--num_machines", "1", "--dynamo_backend",
               "no", *many, __file__, "--rank-of", config, "--out", str(out), "--measurements", str(measurements),
               *(f"--override={o}" for o in overrides)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{size} px on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    per_10k = 10_000 / images

    def seconds(name: str, which: slice) -> float:  # the same on every rank: timed between barriers
        return statistics.median(per_rank[0]["seconds"][name][which]) * per_10k

    later = slice(1, None) if measurements > 1 else slice(0, 1)
    row = {"size": size, "ranks": ranks, "images": images,
           "forward_s_per_10k": seconds("forward", slice(None)),
           "monitor_first_s_per_10k": seconds("monitor", slice(0, 1)),
           "monitor_s_per_10k": seconds("monitor", later),
           **{f"{name}_peak_mib": max(r["peak_bytes"][name] for r in per_rank) / 2**20
              for name in ("forward", "monitor")},
           "kept_mib": max(r["kept_bytes"] for r in per_rank) / 2**20, "seconds_per_turn": per_rank[0]["seconds"]}
    # Each turn's monitor over the same turn's forward: neighbours in time share the machine's load.
    ratios = [m / f for m, f in zip(per_rank[0]["seconds"]["monitor"], per_rank[0]["seconds"]["forward"])]
    row["ratio_first"], row["ratio"] = ratios[0], statistics.median(ratios[later])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2400, help="images at 32 px (bank + queries)")
    parser.add_argument("--images-224", type=int, default=120, help="images at 224 px (bank + queries)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(CONFIGS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--measurements", type=int, default=5, help="monitor calls (and plain forwards) per case")
    parser.add_argument("--json", type=Path, help="also write the rows to this file (after every case)")
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)  # internal: run one rank with this config
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.override, args.measurements, args.out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in args.sizes:
            images = args.images if size == 32 else args.images_224
            shards = write_shards(work / f"data{size}", images)
            for ranks in args.ranks:
                row = launch(size, ranks, shards, images, args.measurements, work)
                rows.append(row)
                print(f"{size} px, {ranks} rank(s), {images} images: forward {row['forward_s_per_10k']:.1f} s/10k, "
                      f"monitor {row['monitor_s_per_10k']:.1f} s/10k ({row['ratio']:.2f}x; first measurement "
                      f"{row['monitor_first_s_per_10k']:.1f} s/10k, {row['ratio_first']:.2f}x); per rank: peak "
                      f"memory of a measurement {row['monitor_peak_mib']:.1f} MiB (forward "
                      f"{row['forward_peak_mib']:.1f} MiB), views kept between measurements {row['kept_mib']:.1f} MiB",
                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
