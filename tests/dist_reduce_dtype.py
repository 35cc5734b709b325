"""Run by test_sharded under `accelerate launch` of the shipped FSDP config with bf16 mixed precision, two gloo
processes (through tests/fsdp_cpu.py): one fixed batch through a small model, its reduced gradients under DDP
and under FSDP2: with accelerate's own mixed precision policy, then with the schema's default
`train.fsdp_reduce_dtype` and with bf16, each set on accelerate's plugin by the trainer's `set_fsdp_reduce_dtype`
before `prepare`. Rank 0 writes, for each, the largest difference from DDP's gradients relative to their largest
magnitude.

The model holds only what bf16 computes alike in both settings (linear layers, GELU, residual sums): under
autocast (DDP) and with bf16 parameters (FSDP) every rank then computes the same local gradients, so what is
left to differ is how the ranks' gradients are summed."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.config import TrainConfig
from engine.trainer import set_fsdp_reduce_dtype

WIDTH, GLOBAL_BATCH = 64, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class Small(nn.Module):
    _no_split_modules = ["Block"]  # accelerate's TRANSFORMER_BASED_WRAP: one shard group per block

    def __init__(self):
        super().__init__()
        self.embed, self.blocks, self.head = nn.Linear(16, WIDTH), nn.Sequential(Block(), Block()), nn.Linear(WIDTH, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def gradients(accelerator: Accelerator, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    """{name: the whole reduced gradient} after one forward and backward of this rank's rows."""
    with accelerator.autocast():
        out = model(x)
    (out.float() - target).pow(2).mean().backward()
    return {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
            for name, p in model.named_parameters()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    accelerator = Accelerator()
    assert accelerator.is_fsdp2 and accelerator.mixed_precision == "bf16"
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    reference = Small()
    x, target = torch.randn(GLOBAL_BATCH, 16), torch.randn(GLOBAL_BATCH, 8)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

    ddp = gradients(accelerator, DistributedDataParallel(copy.deepcopy(reference)), x[rows], target[rows])
    ddp = {name.removeprefix("module."): grad for name, grad in ddp.items()}
    scale = max(grad.abs().max() for grad in ddp.values())
    differences = {}
    for case in ("accelerate", "default", "bf16"):  # accelerate's policy first, before the others change it
        if case != "accelerate":
            set_fsdp_reduce_dtype(accelerator.state.fsdp_plugin, TrainConfig.fsdp_reduce_dtype if case == "default"
                                  else case)
        model = copy.deepcopy(reference)  # accelerate prepares FSDP2 models only with their optimizer
        model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
        fsdp = gradients(accelerator, model, x[rows], target[rows])
        assert fsdp.keys() == ddp.keys()
        differences[case] = float(max((fsdp[name].float() - ddp[name]).abs().max() for name in ddp) / scale)
    if rank == 0:
        (out / "differences.json").write_text(json.dumps(differences))
    accelerator.wait_for_everyone()
    dist.destroy_process_group()
