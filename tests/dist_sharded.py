"""Run by test_sharded under torchrun with two gloo processes: an FSDP2-sharded MAE, wrapped by the policy that
accelerate's plugin builds from the shipped config (one shard group per block), trains, saves its sharded
checkpoint and trains on; a fresh sharded model resumes from the checkpoint and must end bit-identical; a single
unsharded process trained on the same global batches must agree within fp32 round-off. Rank 0 writes what the
test compares. An EMA of the weights, sharded like the model, is saved and resumed with it."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from timm.utils import ModelEmaV3
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from engine.sharded import full_model_state, full_norm, load_sharded, nonfinite, save_sharded
from models import create_model

STEPS, SAVE_AT, GLOBAL_BATCH = 4, 2, 4


def shard_like_accelerate(model: torch.nn.Module) -> torch.nn.Module:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    for module in list(model.modules())[1:]:
        if plugin.auto_wrap_policy(module=module, recurse=False, nonwrapped_numel=0):
            fully_shard(module)
    return fully_shard(model)


def build(shard: bool):
    """Model, optimizer and an EMA copy (made before sharding, then sharded the same way, as the trainer's
    FinetuneTask.shard_copies does)."""
    torch.manual_seed(0)
    model = create_model("mae_hiera_tiny_224", input_size=(64, 64), decoder_depth=1, decoder_embed_dim=64,
                         decoder_num_heads=2, drop_path_rate=0.0)
    ema = ModelEmaV3(model, decay=0.5)
    if shard:
        model, ema.module = shard_like_accelerate(model), shard_like_accelerate(ema.module)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05), ema


def ema_state(ema: ModelEmaV3) -> dict[str, torch.Tensor]:
    return {f"ema.{k}": v for k, v in ema.module.state_dict().items()}


def global_batch(model, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator)
    noise = torch.rand(GLOBAL_BATCH, model.num_mask_units, generator=generator)
    return x, model.keep_mask(noise.argsort(1)[:, :model.num_keep].sort(1).values)


def train(model, optimizer, ema, steps: range, rows: slice) -> list[float]:
    norms = []
    for step in steps:
        x, mask = global_batch(model, step)
        model(x[rows], mask=mask[rows])["loss"].backward()
        norms.append(float(full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step=step + 1)
    return norms


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

    model, optimizer, ema = build(shard=True)
    norms = train(model, optimizer, ema, range(SAVE_AT), rows)
    groups = save_sharded(out / "checkpoint" / "sharded", model, optimizer, ema_state(ema))
    norms += train(model, optimizer, ema, range(SAVE_AT, STEPS), rows)
    straight = full_model_state(model) | {f"ema.{k}": v for k, v in full_model_state(ema.module).items()}
    assert not nonfinite(model)

    resumed, resumed_optimizer, resumed_ema = build(shard=True)
    load_sharded(out / "checkpoint" / "sharded", resumed, resumed_optimizer, json.loads(json.dumps(groups)),
                 ema_state(resumed_ema))
    train(resumed, resumed_optimizer, resumed_ema, range(SAVE_AT, STEPS), rows)
    again = full_model_state(resumed) | {f"ema.{k}": v for k, v in full_model_state(resumed_ema.module).items()}
    probe = global_batch(model, 99)[0]
    register_fsdp_forward_method(model, "forward_features")  # as the trainer does for the k-NN monitor
    with torch.no_grad():
        features = model.forward_features(probe)
    if rank == 0:
        plain, plain_optimizer, plain_ema = build(shard=False)
        plain_norms = train(plain, plain_optimizer, plain_ema, range(STEPS), slice(None))
        whole, _, _ = build(shard=False)
        whole.load_state_dict({k: v for k, v in straight.items() if not k.startswith("ema.")})
        with torch.no_grad():
            torch.testing.assert_close(features, whole.encoder.forward_features(probe), rtol=1e-5, atol=1e-5)
        save_file(straight, str(out / "sharded.safetensors"))
        save_file(again, str(out / "resumed.safetensors"))
        save_file({k: v.contiguous() for k, v in (plain.state_dict() | ema_state(plain_ema)).items()},
                  str(out / "plain.safetensors"))
        (out / "norms.json").write_text(json.dumps({"sharded": norms, "plain": plain_norms,
                                                    "shard_files": sorted(p.name for p in (out / "checkpoint" /
                                                                                           "sharded").iterdir())}))
    dist.destroy_process_group()
