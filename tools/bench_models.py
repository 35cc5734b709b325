"""Time our models against the reference implementations in one process, on the same inputs, and print ratios.

    python tools/bench_models.py [--case hiera_base_224 ...] [--batch 8] [--iters 5]

Absolute times drift on shared machines; the ratios (reference time / our time, > 1 = we are faster) are the
figures to quote. On a GPU the forward runs under bf16 autocast; on the CPU in fp32.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from models import create_model, load_pretrained

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


CASES: dict[str, Callable[[int, torch.device], dict[str, Runner]]] = {
    "hiera_base_224": lambda batch, device: hiera_forward_case("hiera_base_224", batch, device),
    "mvitv2_base": lambda batch, device: mvitv2_forward_case("mvitv2_base", batch, device),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        ours = statistics.median(times["ours"])
        line = [f"{case}: ours {args.batch / ours:.2f}/s"]
        for name, series in times.items():
            if name != "ours":
                ref = statistics.median(series)
                line.append(f"{name} {args.batch / ref:.2f}/s (ours {ref / ours:.2f}x)")
        print(" | ".join(line))


if __name__ == "__main__":
    main()
