"""Measure every row of a simplification ladder (the Hiera paper's Table 1, REFERENCE.md §3) and write
`results.json`, `table.md` and `chart.png` into the output folder.

    python tools/sweep.py --ladder configs/ablation/image_cpu.ladder.yaml --out runs/sweep/image_cpu
    python tools/sweep.py --ladder configs/ablation/video_l.ladder.yaml --out DIR --device cuda --batch 8
    python tools/sweep.py --ladder configs/ablation/image_l.ladder.yaml --out DIR --iters 0   # params, FLOPs only

What is measured, per row, is the row config's encoder (`model.name` without `mae_`, with `model.input_size`
and `model.extra`) doing classification inference, as the paper's speed column:
- `params`: parameters of the classifier, in millions;
- `gflops`: forward FLOPs of one sample counted by torch.utils.flop_counter on the meta device (a multiply-add
  is two FLOPs); `gmacs` = gflops / 2 is what the MViTv2 and Hiera papers call "FLOPs";
- `throughput`: samples (images or clips) per second in eval on a fixed batch of random inputs: warm-up runs
  discarded, then the median of the timed runs; bf16 autocast on CUDA, fp32 on the CPU. The rows are timed in
  interleaved rounds (one run of each row per round), so that drift of a shared machine hits every row alike.

`--train` also runs a short MAE pretraining (rows with `mae: true`) and a fine-tuning of every row through the
apps, `--seeds N` times (seeds 0..N-1), and records the fine-tuned top-1 (`accuracy`, mean, std and runs) and,
when the pretraining runs the k-NN monitor, its last k-NN top-1 (`knn`). Each (row, seed) writes
`OUT/<row>/seed<s>/result.json` when done, so a rerun skips finished runs, and the apps resume interrupted ones
(`resume=auto`); a rerun with other training arguments is refused (OUT/train_args.json). `--rows a,b` trains
only those rows: sweeps that share OUT split a ladder, and each one's report holds every finished run. The
sweep then also draws `accuracy.png`, top-1 against relative speed. The runs' length and data are yours to set,
e.g. (Fashion-MNIST: docs/ablation.md)
    --train --pretrain-args "data.train=SHARDS train.max_steps=200" \\
            --finetune-args "--config configs/finetune/X.yaml data.train=SHARDS data.val=VAL train.max_steps=200"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import ConfigError, RunConfig, load_config
from engine.errors import one_line_errors
from engine.preemption import REQUEUE_EXIT_CODE
from models import create_model
from models.mae import MAEConfig
from tools.bench_models import Settings, forward_runner, median_seconds
from tools.sweep_report import write_accuracy_chart, write_chart, write_table

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LadderRow:
    label: str = ""  # the setting, as the paper names it
    mae: bool = True  # MAE-pretrained (False: the supervised baseline, fine-tuned from scratch by --train)
    paper_acc: float | None = None  # top-1 %, REFERENCE.md §3
    paper_speed: float | None = None  # im/s or clip/s on an A100 in fp16
    paper_note: str = ""  # a mark the paper puts next to its speed (†)


@dataclass
class Ladder:
    """A ladder file: the rows in the paper's order, the first one the baseline of the relative speeds."""

    title: str = ""
    unit: str = "im/s"  # throughput unit: im/s or clip/s
    configs: str = ""  # folder (relative to the ladder file) holding one RunConfig per row: <row>.yaml
    batch: int = 8  # default timing batch
    rows: dict[str, LadderRow] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # footnotes of the table


class RunFailedError(RuntimeError):
    """A pretraining or fine-tuning run of `--train` that did not finish; its log holds why."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


def load_ladder(path: str | Path) -> Ladder:
    """The ladder file (with `_base_` inheritance), validated against `Ladder`."""
    ladder = load_config([str(path)], [], schema=Ladder)
    if not ladder.rows:
        raise ConfigError(f"{path}: the ladder lists no rows")
    return ladder


def row_config_path(ladder_path: str | Path, ladder: Ladder, row: str) -> Path:
    return Path(ladder_path).parent / ladder.configs / f"{row}.yaml"


def encoder_spec(cfg: RunConfig) -> tuple[str, dict]:
    """(registered encoder name, its overrides) of a row config: the MAE's fields dropped."""
    overrides = {k: v for k, v in cfg.model.overrides().items() if k not in MAEConfig.__dataclass_fields__}
    return cfg.model.name.removeprefix("mae_"), overrides


def build_encoder(cfg: RunConfig, device: torch.device | str) -> torch.nn.Module:
    name, overrides = encoder_spec(cfg)
    with torch.device(device):
        return create_model(name, **overrides).eval()


def count(cfg: RunConfig, config_path: Path) -> dict[str, float]:
    """Params (M) and forward FLOPs of one sample, counted on the meta device. A row whose encoder cannot be
    built is a ConfigError naming its file."""
    try:
        model = build_encoder(cfg, "meta")
    except (TypeError, KeyError, ValueError) as err:
        raise ConfigError(f"{config_path}: {err}") from err
    x = torch.empty(1, 3, *model.config.input_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    flops = counter.get_total_flops()
    return {"params": sum(p.numel() for p in model.parameters()) / 1e6, "gflops": flops / 1e9,
            "gmacs": flops / 2e9}


def timings(cfgs: list[RunConfig], batch: int, warmup: int, iters: int, device: torch.device) -> list[list[float]]:
    """Seconds per batch of each config's encoder, `iters` of them: after `warmup` runs each, one run per row
    and round."""
    torch.manual_seed(0)
    runners = []
    for cfg in cfgs:
        model = build_encoder(cfg, device)
        x = torch.randn(batch, 3, *model.config.input_size, device=device)
        runners.append(forward_runner(model, x, Settings(device, bf16=False, compile=False), bf16=False))
    for run in runners:
        for _ in range(warmup):
            run()
    times = [[] for _ in runners]
    for _ in range(iters):
        for series, run in zip(times, runners):
            series.append(median_seconds(run, warmup=0, iters=1, device=device))
    return times


def relative_iqr(times: list[float]) -> float | None:
    """Interquartile range of the timed runs over their median: how far apart a shared machine's runs fall."""
    if len(times) < 2:
        return None
    low, _, high = statistics.quantiles(times, n=4)
    return (high - low) / statistics.median(times)


def settings(device: torch.device, batch: int, warmup: int, iters: int) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")]
            name = models[0] if models else name
    return {
        "device": device.type, "device_name": name, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32", "batch": batch, "warmup": warmup,
        "iters": iters, "mode": "encoder forward, eval, torch.inference_mode (classification inference)",
        "flops": "torch.utils.flop_counter, one sample; gflops = 2 x gmacs",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def architecture_args(cfg: RunConfig) -> list[str]:
    """`key=value` arguments that give another config the row's classifier: encoder name, input size and
    switches, and the data geometry that goes with the input size."""
    name, _ = encoder_spec(cfg)
    size = list(cfg.model.input_size or [])
    args = [f"model.name={name}", *(f"model.extra.{k}={json.dumps(v)}" for k, v in cfg.model.extra.items())]
    if size:
        args += [f"model.input_size={json.dumps(size)}", f"data.crop_size={size[-1]}"]
        args += [f"data.num_frames={size[0]}"] if len(size) == 3 else []
    return args


def train_commands(config: Path, row: LadderRow, out: Path, pretrain_args: list[str],
                   finetune_args: list[str]) -> list[list[str]]:
    """The app runs of one row: MAE pretraining with the row config (if `row.mae`), then fine-tuning.

    The fine-tuning takes its recipe and data from `finetune_args` (e.g. `--config configs/finetune/X.yaml
    data.train=...`), not from the row config, whose training keys are the pretraining recipe; the row only
    brings its architecture (architecture_args), its pretrained encoder (or none) and the output folder,
    which win.
    """
    finetune = [sys.executable, "finetune/main.py", *finetune_args,
                *architecture_args(load_config([str(config)], [])), f"output_dir={out / 'finetune'}"]
    if not row.mae:  # supervised from scratch, whatever encoder the recipe names; nothing to keep by layer decay
        return [[*finetune, "model.pretrained=null", "train.layer_decay=null"]]
    pretrain = [sys.executable, "pretrain/main.py", "--config", str(config), *pretrain_args,
                f"output_dir={out / 'pretrain'}"]
    return [pretrain, [*finetune, f"model.pretrained={out / 'pretrain' / 'encoder.safetensors'}"]]


def train_row(config: Path, row: LadderRow, out: Path, pretrain_args: list[str], finetune_args: list[str],
              seed: int = 0) -> dict:
    """{"top1": fine-tuned top-1 (%), "knn": the pretrained encoder's last k-NN top-1 (%) or None} of one row
    and seed after its runs (their logs: out/<app>.log), or as out/result.json recorded them before."""
    config, out = config.resolve(), out.resolve()  # the apps run in the repository root
    recorded = out / "result.json"
    if recorded.is_file():
        return json.loads(recorded.read_text())
    out.mkdir(parents=True, exist_ok=True)
    run_args = [f"seed={seed}", "resume=auto"]
    for command in train_commands(config, row, out, [*pretrain_args, *run_args], [*finetune_args, *run_args]):
        log = out / f"{Path(command[1]).parent.name}.log"
        with log.open("a") as sink:
            done = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RunFailedError(done.returncode, f"{shlex.join(command)} failed with exit code {done.returncode}; "
                                                  f"see {log}")
    pretrained = out / "pretrain" / "metrics.json"
    history = json.loads(pretrained.read_text()).get("knn_history") if pretrained.is_file() else None
    result = {"top1": float(json.loads((out / "finetune" / "metrics.json").read_text())["top1"]),
              "knn": history[-1]["top1"] if history else None}
    recorded.write_text(json.dumps(result))
    return result


def same_runs(path: Path, train_args: dict) -> None:
    """Record the training arguments of the runs in an output folder, or refuse others than those recorded: a
    rerun skips finished runs, which must not be mixed with runs of another recipe or data."""
    if path.is_file() and (recorded := json.loads(path.read_text())) != train_args:
        raise ConfigError(f"{path}: this folder's runs were trained with {recorded}, not {train_args}; pass the "
                          f"same --pretrain-args and --finetune-args, or use another --out")
    path.write_text(json.dumps(train_args, indent=2) + "\n")


def finished_runs(out: Path, seeds: int) -> list[dict]:
    """The train_row results that a row's seeds 0..seeds-1 have recorded under `out` so far."""
    found = (out / f"seed{seed}" / "result.json" for seed in range(seeds))
    return [json.loads(path.read_text()) for path in found if path.is_file()]


def spread(name: str, values: list[float]) -> dict:
    """{name: mean, name_std: sample std (None below two runs), name_runs: values}; None for no values."""
    return {name: statistics.mean(values) if values else None,
            f"{name}_std": statistics.stdev(values) if len(values) > 1 else None, f"{name}_runs": values}


def accuracy_fields(runs: list[dict]) -> dict:
    """A row's accuracy and k-NN fields (mean, std, runs) from its finished train_row results."""
    return {**spread("accuracy", [r["top1"] for r in runs]),
            **spread("knn", [r["knn"] for r in runs if r["knn"] is not None])}


def write_report(results: dict, out: Path) -> None:
    """results.json, table.md, chart.png and, once a row has an accuracy, accuracy.png."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results, out / "table.md")
    write_chart(results, out / "chart.png")
    if any(r["accuracy"] is not None for r in results["rows"]):
        write_accuracy_chart(results, out / "accuracy.png")


def sweep(ladder_path: str | Path, out: str | Path, device: torch.device, batch: int | None = None,
          warmup: int = 2, iters: int = 5, train: bool = False, pretrain_args: tuple[str, ...] = (),
          finetune_args: tuple[str, ...] = (), seeds: int = 1, rows: tuple[str, ...] = ()) -> dict:
    """Measure every row of the ladder and write results.json, table.md and chart.png into `out`.

    `rows` (default: all) are the rows that `train` runs; the others report the runs that other sweeps into
    the same `out` have finished, so that jobs can share a ladder.
    """
    ladder = load_ladder(ladder_path)
    unknown = sorted(set(rows) - set(ladder.rows))
    if unknown:
        raise ConfigError(f"--rows {','.join(unknown)}: {ladder_path} has the rows {', '.join(ladder.rows)}")
    if train and not (REPO / "finetune" / "main.py").exists():
        raise ConfigError("--train needs the fine-tuning app finetune/main.py (issue 7), which this checkout "
                         "does not have yet; run without --train for params, FLOPs and throughput")
    batch = batch or ladder.batch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {row: row_config_path(ladder_path, ladder, row) for row in ladder.rows}
    cfgs = {row: load_config([str(path)], []) for row, path in paths.items()}
    counts = {row: count(cfgs[row], paths[row]) for row in cfgs}  # also checks that every row builds
    if train:
        same_runs(out / "train_args.json", {"pretrain_args": list(pretrain_args), "finetune_args": list(finetune_args)})
    load_before = os.getloadavg()
    seconds = timings(list(cfgs.values()), batch, warmup, iters, device) if iters else [[]] * len(cfgs)
    meta = {**settings(device, batch, warmup, iters), "load_avg_before": load_before,
            "load_avg_after": os.getloadavg()}
    if train:
        meta["train"] = {"pretrain_args": shlex.join(pretrain_args), "finetune_args": shlex.join(finetune_args),
                         "seeds": seeds, "rows": list(rows or ladder.rows)}
    records = []
    for (row, spec), times in zip(ladder.rows.items(), seconds):
        name, overrides = encoder_spec(cfgs[row])
        records.append({
            "row": row, "label": spec.label, "config": str(paths[row]), "model": name, "overrides": overrides,
            **counts[row], "throughput": batch / statistics.median(times) if times else None, "unit": ladder.unit,
            "seconds_per_batch": times, "spread": relative_iqr(times), **accuracy_fields([]),
            **{k: v for k, v in asdict(spec).items() if k.startswith("paper_")},
        })
    base = records[0]
    for record in records:
        record["speedup"] = (record["throughput"] / base["throughput"]) if record["throughput"] else None
        record["paper_speedup"] = (record["paper_speed"] / base["paper_speed"]
                                   if record["paper_speed"] and base["paper_speed"] else None)
    results = {"title": ladder.title, "ladder": str(ladder_path), "unit": ladder.unit, "notes": ladder.notes,
               "settings": meta, "rows": records}

    def report() -> None:  # every row's runs finished so far, by this sweep or by others sharing `out`
        for record in records if train else ():
            record.update(accuracy_fields(finished_runs(out / record["row"], seeds)))
        write_report(results, out)

    report()
    for row, spec in ladder.rows.items() if train else ():
        if rows and row not in rows:
            continue
        for seed in range(seeds):  # the report follows every finished run: a long sweep shows its rows so far
            train_row(paths[row], spec, out / row / f"seed{seed}", list(pretrain_args), list(finetune_args), seed)
            report()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ladder", required=True, help="configs/ablation/<ladder>.ladder.yaml")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, help="samples per timed forward (default: the ladder's)")
    parser.add_argument("--warmup", type=int, default=2, help="discarded runs per row")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (0: no timing)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--train", action="store_true", help="also pretrain + fine-tune every row (needs finetune/)")
    parser.add_argument("--pretrain-args", default="", help="extra pretrain/main.py arguments, one string")
    parser.add_argument("--finetune-args", default="", help="extra finetune/main.py arguments, one string")
    parser.add_argument("--seeds", type=int, default=1, help="--train: runs per row, with seeds 0..N-1")
    parser.add_argument("--rows", default="", help="--train: only these rows, comma-separated (default: all); "
                                                   "the report also shows the other rows' finished runs")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with one_line_errors():  # e.g. a bad ladder or row config, found before any timing
            results = sweep(args.ladder, args.out, torch.device(args.device), args.batch, args.warmup, args.iters,
                            args.train, tuple(shlex.split(args.pretrain_args)),
                            tuple(shlex.split(args.finetune_args)), args.seeds,
                            tuple(r for r in args.rows.split(",") if r))
    except RunFailedError as err:  # a preempted run (75) asks for a requeue: the rerun continues where it stopped
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(REQUEUE_EXIT_CODE if err.exit_code == REQUEUE_EXIT_CODE else 1) from err
    print((Path(args.out) / "table.md").read_text())
    print(f"{len(results['rows'])} rows -> {args.out}/results.json, table.md, chart.png")


if __name__ == "__main__":
    main()
