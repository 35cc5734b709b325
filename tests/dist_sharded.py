"""Run by test_sharded under torchrun with two gloo processes: an FSDP2-sharded MAE, wrapped by the policy that
accelerate's plugin builds from the shipped config (one shard group per block), trains, saves its sharded
checkpoint and trains on; a fresh sharded model resumes from the checkpoint and must end bit-identical; a single
unsharded process trained on the same global batches must agree within fp32 round-off. Rank 0 writes what the
test compares."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from engine.sharded import all_finite, full_model_state, load_sharded, norm_value, save_sharded
from models import create_model

STEPS, SAVE_AT, GLOBAL_BATCH = 4, 2, 4


def build(shard: bool):
    torch.manual_seed(0)
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), decoder_depth=1, decoder_embed_dim=64,
                         decoder_num_heads=2, drop_path_rate=0.0)
    if shard:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        plugin.set_auto_wrap_policy(model)
        for module in list(model.modules())[1:]:
            if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0):
                fully_shard(module)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)


def global_batch(model, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator)
    noise = torch.rand(GLOBAL_BATCH, model.num_mask_units, generator=generator)
    return x, model.keep_mask(noise.argsort(1)[:, :model.num_keep].sort(1).values)


def train(model, optimizer, steps: range, rows: slice) -> list[float]:
    norms = []
    for step in steps:
        x, mask = global_batch(model, step)
        model(x[rows], mask=mask[rows])["loss"].backward()
        norms.append(norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

    model, optimizer = build(shard=True)
    norms = train(model, optimizer, range(SAVE_AT), rows)
    groups = save_sharded(out / "checkpoint" / "sharded", model, optimizer)
    norms += train(model, optimizer, range(SAVE_AT, STEPS), rows)
    straight = full_model_state(model)
    assert not all_finite(model)

    resumed, resumed_optimizer = build(shard=True)
    load_sharded(out / "checkpoint" / "sharded", resumed, resumed_optimizer, json.loads(json.dumps(groups)))
    train(resumed, resumed_optimizer, range(SAVE_AT, STEPS), rows)
    again = full_model_state(resumed)
    if rank == 0:
        plain, plain_optimizer = build(shard=False)
        plain_norms = train(plain, plain_optimizer, range(STEPS), slice(None))
        save_file(straight, str(out / "sharded.safetensors"))
        save_file(again, str(out / "resumed.safetensors"))
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(out / "plain.safetensors"))
        (out / "norms.json").write_text(json.dumps({"sharded": norms, "plain": plain_norms,
                                                    "shard_files": sorted(p.name for p in (out / "checkpoint" /
                                                                                           "sharded").iterdir())}))
    dist.destroy_process_group()
