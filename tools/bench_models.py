"""Time our models against the reference implementations in one process, on the same inputs, and print ratios.

    python tools/bench_models.py [--case hiera_base_224 ...] [--batch 8] [--iters 5] [--precision bf16]
                                 [--no-compile] [--profile] [--json results.json]

Absolute times drift on shared machines; the ratios (reference time / our time, > 1 = we are faster) are the
figures to quote. Every implementation runs under the same `torch.autocast` (bf16 by default on a GPU, fp32 on
the CPU; `--precision` chooses). Under bf16, ours also runs in fp32, for our bf16/fp32 speed-up; ours compiled
(`torch.compile(fullgraph=True)`) runs too unless `--no-compile`.

``--profile`` (CPU only) also measures, with torch's profiler, the share of each implementation's time spent in
matrix products: the Linear layers (``aten::mm`` / ``aten::addmm``, forward and backward, the same products in
every implementation) and the attention kernels. From our eager run it prints the ceiling: the reference's time
over the time of our matrix products alone, the most that any rewrite keeping the arithmetic and these kernels
could reach if everything else (norms, activations, copies, indexing) took no time at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models import create_model, get_config, load_pretrained
from models.hiera import use_qkv_layout
from models.mvitv2 import simplification_overrides

Runner = Callable[[], object]


def median_seconds(run: Runner, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def matmul_share(run: Runner) -> float:
    """Fraction of one run's CPU operator time spent in matrix products (Linear layers and attention)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return sum(times.get(op, 0) for op in MATMUL_OPS) / sum(times.values())


@dataclasses.dataclass(frozen=True)
class Settings:
    device: torch.device
    bf16: bool  # every implementation under bf16 autocast (else fp32)
    compile: bool  # also time ours under torch.compile(fullgraph=True)

    def autocast(self, bf16: bool | None = None) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 if bf16 is None else bf16)


def ours_variants(settings: Settings, make: Callable[[torch.nn.Module, bool], Runner],
                  model: torch.nn.Module) -> dict[str, Runner]:
    """Ours eager, compiled (one graph), and in fp32 when the run is bf16; `make(module, bf16)` builds a runner."""
    runners = {"ours": make(model, settings.bf16)}
    if settings.compile:
        runners["ours compiled"] = make(torch.compile(model, fullgraph=True), settings.bf16)
    if settings.bf16:
        runners["ours fp32"] = make(model, False)
    return runners


def forward_runner(model: torch.nn.Module, x: torch.Tensor, settings: Settings, bf16: bool) -> Runner:
    def run():
        with torch.inference_mode(), settings.autocast(bf16):
            return model(x)

    return run


def hiera_forward_case(name: str, batch: int, settings: Settings) -> dict[str, Runner]:
    """Ours, the official hiera-transformer model and timm's, sharing one set of weights."""
    import hiera as official
    import timm

    device = settings.device
    ours = create_model(name).eval().to(device)
    reference = official.Hiera(**dataclasses.asdict(ours.config)).eval().to(device)
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(batch, 3, *ours.config.input_size, device=device)
    runners = ours_variants(settings, lambda m, bf16: forward_runner(m, x, settings, bf16), ours)
    runners["official"] = forward_runner(reference, x, settings, settings.bf16)
    if name.endswith("_224") and name in timm.list_models("hiera_*"):
        timm_model = timm.create_model(name, pretrained=False).eval().to(device)
        runners["timm"] = forward_runner(timm_model, x, settings, settings.bf16)
    return runners


def mvitv2_forward_case(name: str, batch: int, settings: Settings) -> dict[str, Runner]:
    """Ours and timm's image MViTv2, sharing one set of weights."""
    import timm

    reference = timm.create_model(name, pretrained=False).eval().to(settings.device)
    ours = create_model(name).eval().to(settings.device)
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(batch, 3, *ours.config.input_size, device=settings.device)
    runners = ours_variants(settings, lambda m, bf16: forward_runner(m, x, settings, bf16), ours)
    runners["timm"] = forward_runner(reference, x, settings, settings.bf16)
    return runners


def train_step_runner(model: torch.nn.Module, step: Callable[[], torch.Tensor], settings: Settings,
                      bf16: bool) -> Runner:
    """Forward + backward of one MAE step (no optimizer: it is the same for every implementation)."""
    def run():
        model.zero_grad(set_to_none=True)
        with settings.autocast(bf16):
            loss = step()
        loss.backward()

    return run


def mae_train_case(name: str, batch: int, settings: Settings) -> dict[str, Runner]:
    """Our MAE against the official MaskedAutoencoderHiera, same weights and masks. The official model cannot
    compile without graph breaks (boolean-mask indexing)."""
    from hiera.hiera_mae import MaskedAutoencoderHiera

    ours = create_model(name).train().to(settings.device)
    reference = MaskedAutoencoderHiera(**dataclasses.asdict(ours.encoder.config)).train().to(settings.device)
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(batch, 3, *ours.encoder.config.input_size, device=settings.device)
    mask = reference.get_random_mask(x, ours.mask_ratio)
    keep_idx = ours.keep_indices(x, mask)
    runners = ours_variants(settings, lambda m, bf16: train_step_runner(
        ours, lambda: m(x, keep_idx=keep_idx)["loss"], settings, bf16), ours)
    runners["official"] = train_step_runner(reference, lambda: reference(x, mask=mask)[0], settings, settings.bf16)
    return runners


def mvitv2_mae_train_case(name: str, row: str, batch: int, settings: Settings) -> dict[str, Runner]:
    """The MAE of one simplification row of MViTv2 (REFERENCE.md §3); no reference implementation exists, so
    there is no ratio, only throughput."""
    video = len(get_config(name).input_size) == 3
    ours = create_model(f"mae_{name}", **simplification_overrides(row, video)).train().to(settings.device)
    x = torch.randn(batch, 3, *ours.encoder.config.input_size, device=settings.device)
    keep_idx = ours.keep_indices(x)
    return ours_variants(settings, lambda m, bf16: train_step_runner(
        ours, lambda: m(x, keep_idx=keep_idx)["loss"], settings, bf16), ours)


def qkv_layout_case(name: str, batch: int, settings: Settings, **overrides) -> dict[str, Runner]:
    """Ours alone, with q/k/v handed to SDPA as strided views and as contiguous copies (models.hiera.QKV_LAYOUTS):
    one MAE training step for an `mae_` name, an inference forward otherwise. The same model and inputs for both."""
    with settings.device:  # weights made where they live
        model = create_model(name, **overrides)
    encoder = model.encoder if name.startswith("mae_") else model
    x = torch.randn(batch, 3, *encoder.config.input_size, device=settings.device)
    if name.startswith("mae_"):
        keep_idx = model.train().keep_indices(x)
        run = train_step_runner(model, lambda: model(x, keep_idx=keep_idx)["loss"], settings, settings.bf16)
    else:
        run = forward_runner(model.eval(), x, settings, settings.bf16)

    def in_layout(layout: str) -> Runner:
        def run_in_layout():
            with use_qkv_layout(layout):
                return run()

        return run_in_layout

    return {layout: in_layout(layout) for layout in ("strided", "contiguous")}


CASES: dict[str, Callable[[int, Settings], dict[str, Runner]]] = {
    "hiera_base_224": lambda batch, settings: hiera_forward_case("hiera_base_224", batch, settings),
    "mvitv2_base": lambda batch, settings: mvitv2_forward_case("mvitv2_base", batch, settings),
    "mae_hiera_base_224": lambda batch, settings: mae_train_case("mae_hiera_base_224", batch, settings),
    # One 16x224 clip per step on the CPU: a batch of 8 clips would take minutes per iteration here.
    "mae_hiera_base_16x224": lambda batch, settings: mae_train_case(
        "mae_hiera_base_16x224", batch if settings.device.type == "cuda" else 1, settings),
    # Row c: the last row of the paper's table that needs separate-and-pad.
    "mae_mvitv2_base_row_c": lambda batch, settings: mvitv2_mae_train_case("mvitv2_base", "c", batch, settings),
}


def time_case(runners: dict[str, Runner], warmup: int, iters: int, device: torch.device) -> dict[str, float]:
    """Median seconds per run of each implementation, interleaved so that drift of the shared machine hits all
    of them alike."""
    times = {name: [] for name in runners}
    for _ in range(iters):
        for name, run in runners.items():
            times[name].append(median_seconds(run, warmup=warmup if not times[name] else 0, iters=1, device=device))
    return {name: statistics.median(series) for name, series in times.items()}


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """{"ours vs official": their time / ours, ..., "ours bf16/fp32": fp32 time / bf16 time}."""
    references = [n for n in medians if not n.startswith("ours")]
    out = {f"{ours} vs {r}": medians[r] / medians[ours]
           for ours in medians if ours.startswith("ours") and ours != "ours fp32" for r in references}
    if "ours fp32" in medians:
        out["ours bf16/fp32"] = medians["ours fp32"] / medians["ours"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 avoids the stalls of "
                        "OpenMP barriers when other jobs share the cores")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="time ours eager only")
    parser.add_argument("--profile", action="store_true", help="print the matmul share and the ceiling")
    parser.add_argument("--json", help="also write the times and ratios to this file (after every case)")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.profile and device.type == "cuda":
        parser.error("--profile attributes CPU operator time; run it with --device cpu")
    settings = Settings(device, precision == "bf16", args.compile)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} precision={precision} "
          f"torch={torch.__version__}")
    results = []
    for case in args.case:
        runners = CASES[case](args.batch, settings)
        medians = time_case(runners, args.warmup, args.iters, device)
        found = ratios(medians)
        results.append({"case": case, "seconds": medians, "ratios": found})
        if args.json:  # after every case: a run cut short by a time limit keeps what it measured
            Path(args.json).write_text(json.dumps({"device": str(device), "precision": precision,
                                                   "batch": args.batch, "threads": torch.get_num_threads(),
                                                   "torch": torch.__version__, "results": results}, indent=1))
        print(f"{case}: " + ", ".join(f"{n} {1 / t:.3f} it/s" for n, t in medians.items()) + " | " +
              ", ".join(f"{n} {r:.2f}x" for n, r in found.items()))
        if args.profile:
            references = [n for n in medians if not n.startswith("ours")]
            shares = {name: matmul_share(run) for name, run in runners.items()}
            print("  matrix products: " + ", ".join(f"{n} {s:.0%} of its time" for n, s in shares.items()) +
                  "".join(f"; ceiling vs {r}: {medians[r] / (medians['ours'] * shares['ours']):.2f}x"
                          for r in references))


if __name__ == "__main__":
    main()
