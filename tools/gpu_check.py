"""The whole GPU check in one command, for the few minutes a GPU is lent (under 7 minutes on one GPU).

    bash tools/gpu_check.sh [--out runs/gpu_check] [--device cuda] [--quick] [--shards DIR]

Sections, each in its own process under its own time limit, so that a failure or a hang costs only itself:
  tests     `pytest -m cuda`: ours against the official Hiera and timm on CUDA, fp32 and bf16 (tests/test_precision.py);
            FSDP through accelerate (tests/test_sharded.py): pretraining killed and resumed bit-identically,
            fine-tuning resumed with its sharded EMA
  bench     tools/bench_models.py, every case, bf16 autocast, ours eager and compiled against official and timm
  pretrain  200 steps of the K400 Hiera-B MAE recipe (mae_hiera_base_16x224, batch 16, bf16) on synthetic
            320x240 shards: perf/samples_per_s and perf/data_wait_fraction from its TensorBoard log
  memory    peak memory of one training step (torch.cuda.max_memory_allocated), B and L MAE at the recipe's
            batch of 16 clips in bf16, with and without activation checkpointing
  layout    our Hiera MAE steps and forwards with q/k/v handed to SDPA as strided views and as contiguous copies
            (models.hiera.QKV_LAYOUTS), bf16: which one the "auto" layout should pick on CUDA
It writes OUT/gpu_check.json and OUT/gpu_check.md. `--device cpu --quick` runs every section at toy sizes (a
minute or so): the proof, in CI, that the command works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Seconds per section on a GPU (estimates: no GPU has run them yet); together under 7 minutes. The tests launch
# accelerate five times. Quick CPU runs get QUICK_LIMIT each.
LIMITS = {"tests": 140, "bench": 110, "pretrain": 80, "memory": 30, "layout": 45}
# (model, batch) timed in both q/k/v layouts: Hiera's MAE steps and classifier forwards, video and image. (MViTv2
# pools its q/k/v into new, contiguous tensors; only its unpooled simplification rows would see the layout.)
LAYOUT_CASES = (("mae_hiera_base_16x224", 8), ("hiera_base_16x224", 8), ("mae_hiera_base_224", 64),
                ("hiera_base_224", 64))
QUICK_LIMIT = 120
QUICK_MODEL_CONFIG = REPO / "configs" / "pretrain" / "demo.yaml"  # what --quick measures the memory of


def run_limited(command: list[str], limit: float, log: Path) -> int | None:
    """Run `command` from the repository root with its output in `log`; None if it ran past `limit` seconds
    (then its whole process group, DataLoader workers included, is killed)."""
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# -- sections: each returns its part of the JSON --------------------------------------------------------------
def section_tests(args: argparse.Namespace, out: Path) -> dict:
    report = out / "tests.xml"
    code = run_limited([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}", "tests"], LIMITS["tests"] - 5, out / "tests.log")
    suite = ET.parse(report).getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"exit_code": code, **counts, "ok": code == 0 and not counts["failures"] and not counts["errors"]}


def section_bench(args: argparse.Namespace, out: Path) -> dict:
    results = out / "bench.json"
    command = [sys.executable, "tools/bench_models.py", "--device", args.device, "--precision", "bf16",
               "--json", str(results)]
    if args.quick:
        command += ["--case", "hiera_base_224", "--batch", "1", "--iters", "1", "--warmup", "0", "--no-compile"]
    code = run_limited(command, LIMITS["bench"] - 5, out / "bench.log")
    found = json.loads(results.read_text()) if results.exists() else {"results": []}
    # Compiling every case may not fit its minutes on a fresh machine: the cases done before the limit stay.
    return {"exit_code": code, **found, "ok": code == 0, "timed_out": code is None}


def synthetic_shards(args: argparse.Namespace, out: Path) -> Path:
    """Synthetic Kinetics-layout videos packed into shards (320x240 like Kinetics after --short-side; toy
    64x64 clips with --quick)."""
    raw, shards = out / "data" / "raw", out / "data" / "shards"
    size, per_class, frames = ("64x64", 2, 16) if args.quick else ("320x240", 8, 64)  # 32 training videos
    for command in ([sys.executable, "-m", "data.synthetic", "--out", str(raw), "--per-class", str(per_class),
                     "--size", size, "--frames", str(frames)],
                    [sys.executable, "-m", "data.make_shards", "kinetics", "--csv", str(raw / "train.csv"),
                     "--videos", str(raw / "videos"), "--out", str(shards), "--per-shard", "16"]):
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return shards


def section_pretrain(args: argparse.Namespace, out: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = Path(args.shards) if args.shards else synthetic_shards(args, out)
    steps, every = (4, 2) if args.quick else (200, 50)
    config = "configs/pretrain/demo.yaml" if args.quick else "configs/pretrain/k400_hiera_base_16x224.yaml"
    workers = 1 if args.quick else max(1, min(10, (os.cpu_count() or 2) - 2))
    precision = "no" if args.device == "cpu" else "bf16"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", precision, "--dynamo_backend", "no", "pretrain/main.py", "--config", config,
               f"data.train={shards}", f"output_dir={out / 'pretrain'}", f"train.max_steps={steps}",
               f"log.every={every}", "log.visualize_every=0",
               "log.progress=false", f"train.checkpoint_every={steps}", f"data.num_workers={workers}"]
    # A fresh run each time: the check times a start from scratch, and the app refuses a folder holding a run.
    shutil.rmtree(out / "pretrain", ignore_errors=True)
    started = time.perf_counter()
    code = run_limited(command, LIMITS["pretrain"] - 5, out / "pretrain.log")
    tags = set()
    if (out / "pretrain" / "tb").is_dir():  # absent when the run failed before its first log
        events = EventAccumulator(str(out / "pretrain" / "tb"), size_guidance={"scalars": 0})
        tags = set(events.Reload().Tags()["scalars"])
    series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] if tag in tags else []
              for tag in ("perf/samples_per_s", "perf/data_wait_fraction", "train/loss")}
    # The first logging window holds the warm-up (allocator, first batches): the steady figures leave it out.
    steady = {tag: values[1:] or values for tag, values in series.items()}
    mean = {tag: sum(v for _, v in values) / len(values) if values else None for tag, values in steady.items()}
    return {"exit_code": code, "timed_out": code is None, "model": "mae_hiera_base_16x224", "config": config,
            "steps": steps, "seconds": time.perf_counter() - started, "series": series, "steady_mean": mean,
            "ok": code == 0 and bool(series["perf/samples_per_s"])}


def section_memory(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from engine.config import load_config
    from tools.peak_memory import checkpointing_rows

    device = torch.device(args.device)
    if args.quick:  # the demo's toy video MAE in fp32: on the CPU, MemTracker makes a step of L take minutes
        quick = load_config([str(QUICK_MODEL_CONFIG)], []).model
        names, batch, bf16, overrides = [quick.name], 8, False, quick.overrides()
    else:
        names, batch, bf16, overrides = ["mae_hiera_base_16x224", "mae_hiera_large_16x224"], 16, True, {}
    rows = [checkpointing_rows(name, batch, device, bf16, **overrides) for name in names]
    return {"rows": rows, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
            "ok": all(r["plain"] is None or (r["checkpointing"] or 0) < r["plain"] for r in rows)}


def section_layout(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from engine.config import load_config
    from tools.bench_models import Settings, qkv_layout_case, time_case

    device = torch.device(args.device)
    settings = Settings(device, bf16=device.type == "cuda", compile=False)
    if args.quick:  # the demo's toy video MAE: one step per layout
        quick = load_config([str(QUICK_MODEL_CONFIG)], []).model
        cases, overrides, warmup, iters = [(quick.name, 2)], quick.overrides(), 0, 1
    else:
        cases, overrides, warmup, iters = LAYOUT_CASES, {}, 2, 5
    rows = []
    for name, batch in cases:
        seconds = time_case(qkv_layout_case(name, batch, settings, **overrides), warmup, iters, device)
        rows.append({"case": name, "batch": batch, "seconds": seconds,
                     "contiguous_over_strided": seconds["contiguous"] / seconds["strided"]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"precision": "bf16" if settings.bf16 else "fp32", "rows": rows, "ok": len(rows) == len(cases)}


SECTIONS = {"tests": section_tests, "bench": section_bench, "pretrain": section_pretrain, "memory": section_memory,
            "layout": section_layout}


# -- the report -----------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    from tools.peak_memory import markdown as memory_table

    lines = [f"# GPU check ({report['device']}{', quick' if report['quick'] else ''})", "",
             f"{report['environment']}; {report['seconds']:.0f} s in all.", "", "| section | status | seconds |",
             "|---|---|---:|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']:.0f} |" for name, s in report["sections"].items()]
    tests = report["sections"]["tests"]
    if "tests" in tests:
        lines += ["", f"Tests (`pytest -m cuda`): {tests['tests']} run, {tests['failures']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped."]
    bench = report["sections"]["bench"]
    if bench.get("results"):
        lines += ["", f"Benchmarks ({bench['precision']}, batch {bench['batch']}; ratio = their time / ours):", "",
                  "| case | it/s | ratios |", "|---|---|---|"]
        for r in bench["results"]:
            speeds = ", ".join(f"{n} {1 / t:.2f}" for n, t in r["seconds"].items())
            lines.append(f"| `{r['case']}` | {speeds} | {', '.join(f'{n} {v:.2f}x' for n, v in r['ratios'].items())} |")
    pretrain = report["sections"]["pretrain"]
    if pretrain.get("ok"):
        m = pretrain["steady_mean"]
        lines += ["", f"Pretraining `{pretrain['model']}` ({pretrain['config']}, {pretrain['steps']} steps, "
                      f"{pretrain['seconds']:.0f} s): perf/samples_per_s {m['perf/samples_per_s']:.1f}, "
                      f"perf/data_wait_fraction {m['perf/data_wait_fraction']:.3f} (means after the first "
                      f"window)."]
    memory = report["sections"]["memory"]
    if memory.get("rows"):
        lines += ["", "Peak memory of one training step:", "", memory_table(memory["rows"])]
    layout = report["sections"]["layout"]
    if layout.get("rows"):
        lines += ["", f"q/k/v layout for SDPA ({layout['precision']}; median seconds per step; above 1 in the last "
                      f"column, the strided views are faster; `auto` copies contiguous on CUDA):", "",
                  "| case | batch | strided | contiguous | contiguous / strided |", "|---|---:|---:|---:|---:|"]
        lines += [f"| `{r['case']}` | {r['batch']} | {r['seconds']['strided']:.4f} | {r['seconds']['contiguous']:.4f} "
                  f"| {r['contiguous_over_strided']:.2f} |" for r in layout["rows"]]
    return "\n".join(lines) + "\n"


def environment(device: str) -> str:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "CPU"
    return f"{name}, torch {torch.__version__}, {os.cpu_count()} CPU cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="toy sizes (for CI on a CPU)")
    parser.add_argument("--shards", help="pretrain on these shards instead of making synthetic ones")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # one section, in-process
    args = parser.parse_args()
    out = args.out.resolve()
    if args.quick:
        LIMITS.update(dict.fromkeys(LIMITS, QUICK_LIMIT))
    if args.section:
        part = out / "sections"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"{args.section}.json").write_text(json.dumps(SECTIONS[args.section](args, part), indent=1))
        return

    started = time.perf_counter()
    sections = {}
    for name in SECTIONS:
        begun = time.perf_counter()
        out.joinpath("sections").mkdir(parents=True, exist_ok=True)
        log = out / "sections" / f"{name}.section.log"
        code = run_limited([sys.executable, "-m", "tools.gpu_check", *sys.argv[1:], "--out", str(out),
                            "--section", name], LIMITS[name], log)
        result_file = out / "sections" / f"{name}.json"
        result = json.loads(result_file.read_text()) if code == 0 and result_file.exists() else {"ok": False}
        status = "ok" if result["ok"] else ("timed out" if code is None or result.get("timed_out") else "failed")
        sections[name] = {**result, "status": status, "seconds": time.perf_counter() - begun}
        if status != "ok":
            sections[name]["log_tail"] = tail(log) + tail(out / "sections" / f"{name}.log")
        print(f"{name}: {status} ({sections[name]['seconds']:.0f} s)", flush=True)
    report = {"device": args.device, "quick": args.quick, "environment": environment(args.device),
              "seconds": time.perf_counter() - started, "sections": sections}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    raise SystemExit(0 if all(s["status"] == "ok" for s in sections.values()) else 1)


if __name__ == "__main__":
    main()
