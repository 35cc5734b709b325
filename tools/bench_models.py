"""Time our models against the reference implementations in one process, on the same inputs, and print ratios.

    python tools/bench_models.py [--case hiera_base_224 ...] [--batch 8] [--iters 5] [--profile]

Absolute times drift on shared machines; the ratios (reference time / our time, > 1 = we are faster) are the
figures to quote. On a GPU the forward runs under bf16 autocast; on the CPU in fp32.

``--profile`` (CPU only) also measures, with torch's profiler, the share of each implementation's time spent in
matrix products: the Linear layers (``aten::mm`` / ``aten::addmm``, forward and backward, the same products in
every implementation) and the attention kernels. From our eager run it prints the ceiling: the reference's time
over the time of our matrix products alone, the most that any rewrite keeping the arithmetic and these kernels
could reach if everything else (norms, activations, copies, indexing) took no time at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from models import create_model, get_config, load_pretrained
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


def forward_runner(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")

    def run():
        with torch.inference_mode(), autocast:
            return model(x)

    return run


def hiera_forward_case(name: str, batch: int, device: torch.device) -> dict[str, Runner]:
    """Ours, the official hiera-transformer model and timm's, sharing one set of weights."""
    import hiera as official
    import timm

    ours = create_model(name).eval().to(device)
    reference = official.Hiera(**dataclasses.asdict(ours.config)).eval().to(device)
    load_pretrained(ours, reference.state_dict())
    runners = {"ours": forward_runner(ours, x := torch.randn(batch, 3, *ours.config.input_size, device=device)),
               "official": forward_runner(reference, x)}
    if name.endswith("_224") and name in timm.list_models("hiera_*"):
        timm_model = timm.create_model(name, pretrained=False).eval().to(device)
        runners["timm"] = forward_runner(timm_model, x)
    return runners


def mvitv2_forward_case(name: str, batch: int, device: torch.device) -> dict[str, Runner]:
    """Ours and timm's image MViTv2, sharing one set of weights."""
    import timm

    reference = timm.create_model(name, pretrained=False).eval().to(device)
    ours = create_model(name).eval().to(device)
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(batch, 3, *ours.config.input_size, device=device)
    return {"ours": forward_runner(ours, x), "timm": forward_runner(reference, x)}


def train_step_runner(model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> Runner:
    """Forward + backward of one MAE step (no optimizer: it is the same for every implementation)."""
    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16,
                            enabled=next(model.parameters()).is_cuda):
            loss = step()
        loss.backward()

    return run


def mae_train_case(name: str, batch: int, device: torch.device, compile_ours: bool = True) -> dict[str, Runner]:
    """Our MAE (eager, and compiled as one graph) against the official MaskedAutoencoderHiera, same weights and
    masks. The official model cannot compile without graph breaks (boolean-mask indexing)."""
    from hiera.hiera_mae import MaskedAutoencoderHiera

    ours = create_model(name).train().to(device)
    reference = MaskedAutoencoderHiera(**dataclasses.asdict(ours.encoder.config)).train().to(device)
    load_pretrained(ours, reference.state_dict())
    x = torch.randn(batch, 3, *ours.encoder.config.input_size, device=device)
    mask = reference.get_random_mask(x, ours.mask_ratio)
    keep_idx = ours.keep_indices(x, mask)
    runners = {"ours": train_step_runner(ours, lambda: ours(x, keep_idx=keep_idx)["loss"]),
               "official": train_step_runner(reference, lambda: reference(x, mask=mask)[0])}
    if compile_ours:
        compiled = torch.compile(ours, fullgraph=True)
        runners["ours compiled"] = train_step_runner(ours, lambda: compiled(x, keep_idx=keep_idx)["loss"])
    return runners


def mvitv2_mae_train_case(name: str, row: str, batch: int, device: torch.device) -> dict[str, Runner]:
    """The MAE of one simplification row of MViTv2 (REFERENCE.md §3), eager and compiled; no reference
    implementation exists, so there is no ratio, only throughput."""
    video = len(get_config(name).input_size) == 3
    ours = create_model(f"mae_{name}", **simplification_overrides(row, video)).train().to(device)
    x = torch.randn(batch, 3, *ours.encoder.config.input_size, device=device)
    keep_idx = ours.keep_indices(x)
    compiled = torch.compile(ours, fullgraph=True)
    return {"ours": train_step_runner(ours, lambda: ours(x, keep_idx=keep_idx)["loss"]),
            "ours compiled": train_step_runner(ours, lambda: compiled(x, keep_idx=keep_idx)["loss"])}


CASES: dict[str, Callable[[int, torch.device], dict[str, Runner]]] = {
    "hiera_base_224": lambda batch, device: hiera_forward_case("hiera_base_224", batch, device),
    "mvitv2_base": lambda batch, device: mvitv2_forward_case("mvitv2_base", batch, device),
    "mae_hiera_base_224": lambda batch, device: mae_train_case("mae_hiera_base_224", batch, device),
    # One 16x224 clip per step on the CPU: a batch of 8 clips would take minutes per iteration here.
    "mae_hiera_base_16x224": lambda batch, device: mae_train_case(
        "mae_hiera_base_16x224", batch if device.type == "cuda" else 1, device),
    # Row c: the last row of the paper's table that needs separate-and-pad.
    "mae_mvitv2_base_row_c": lambda batch, device: mvitv2_mae_train_case("mvitv2_base", "c", batch, device),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print the matmul share and the ceiling")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.profile and device.type == "cuda":
        parser.error("--profile attributes CPU operator time; run it with CUDA_VISIBLE_DEVICES= (on the CPU)")
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
          f"dtype={'bf16 autocast' if device.type == 'cuda' else 'fp32'} torch={torch.__version__}")
    for case in args.case:
        runners = CASES[case](args.batch, device)
        # Interleave the implementations so drift of the shared machine hits all of them alike.
        times = {name: [] for name in runners}
        for _ in range(args.iters):
            for name, run in runners.items():
                times[name].append(median_seconds(run, warmup=args.warmup if not times[name] else 0,
                                                  iters=1, device=device))
        medians = {name: statistics.median(series) for name, series in times.items()}
        references = [n for n in medians if not n.startswith("ours")]
        line = [f"{case}: " + ", ".join(f"{n} {1 / t:.3f} it/s" for n, t in medians.items())]
        for ours in (n for n in medians if n.startswith("ours") and references):
            line.append(f"{ours}: " + ", ".join(f"{medians[r] / medians[ours]:.2f}x {r}" for r in references))
        print(" | ".join(line))
        if args.profile:
            shares = {name: matmul_share(run) for name, run in runners.items()}
            print("  matrix products: " + ", ".join(f"{n} {s:.0%} of its time" for n, s in shares.items()) +
                  "".join(f"; ceiling vs {r}: {medians[r] / (medians['ours'] * shares['ours']):.2f}x"
                          for r in references))


if __name__ == "__main__":
    main()
