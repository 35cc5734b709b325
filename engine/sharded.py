"""Checkpoints of a sharded (FSDP2) model: every rank writes and reads only its own shards.

Model and optimizer state go through `torch.distributed.checkpoint` with its safetensors storage
(`HuggingFaceStorageWriter/Reader`): one `shard-0000r-*.safetensors` file per rank in `<checkpoint>/sharded/`,
whose layout is described in the safetensors headers (JSON). The default `FileSystemReader` keeps that
description in a pickle, and checkpoints here are never unpickled. What is not a tensor (the optimizer's
param groups: lr, betas, parameter names) is returned as plain data for `state.json`.

Loading reshards: the same files load into any number of ranks, sharded or not (`dcp.load` maps the saved
shards onto whatever the receiving state dict holds). The encoder export needs the whole model on one rank:
`full_model_state` gathers it to rank 0's CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

_MODEL, _OPTIM, _TASK = "model.", "optim.", "task."


def _flat(model_state: dict, optim_state: dict, extra: dict | None) -> dict[str, torch.Tensor]:
    """{model.<fqn>: tensor, optim.<fqn>.<name>: tensor, task.<name>: tensor}: what the safetensors storage can
    hold. `extra` is a task's own state (an EMA's sharded weights), saved and restored in place."""
    flat = {_MODEL + k: v for k, v in model_state.items()} | {_TASK + k: v for k, v in (extra or {}).items()}
    for fqn, values in optim_state["state"].items():
        flat |= {f"{_OPTIM}{fqn}.{name}": v for name, v in values.items()}
    return flat


def _nested(flat: dict[str, torch.Tensor], optim_state: dict) -> tuple[dict, dict]:
    model_state = {k.removeprefix(_MODEL): v for k, v in flat.items() if k.startswith(_MODEL)}
    state = {fqn: {name: flat[f"{_OPTIM}{fqn}.{name}"] for name in values}
             for fqn, values in optim_state["state"].items()}
    return model_state, {"state": state, "param_groups": optim_state["param_groups"]}


def save_sharded(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Collective: every rank writes its shards of model, optimizer and `extra` into `directory`. Returns the
    optimizer's param groups (plain data, the same on every rank) for the caller to keep as JSON."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save(_flat(model_state, optim_state, extra), storage_writer=HuggingFaceStorageWriter(
        str(directory), save_distributed=dist.is_initialized()))
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
            for group in optim_state["param_groups"]]


def load_sharded(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 param_groups: list[dict], extra: dict[str, torch.Tensor] | None = None) -> None:
    """Collective: fill `model`, `optimizer` (sharded or not) and, in place, `extra` from `save_sharded`'s
    files."""
    model_state, optim_state = get_state_dict(model, optimizer)  # allocates the optimizer's state
    flat = _flat(model_state, optim_state, extra)
    missing = sorted(set(flat) - saved_keys(directory))
    if missing:
        raise RuntimeError(f"{directory}: the sharded checkpoint lacks {len(missing)} tensors of this model and "
                           f"optimizer, e.g. {', '.join(missing[:5])}")
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(directory)))
    model_state, optim_state = _nested(flat, optim_state)
    optim_state["param_groups"] = param_groups
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def saved_keys(directory: str | Path) -> set[str]:
    """The tensors a sharded checkpoint holds, from its safetensors headers (every shard file is opened)."""
    return set(HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole model's state on rank 0's CPU ({} on the other ranks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def nonfinite(model: torch.nn.Module) -> list[str]:
    """Collective: names of the parameters and buffers with a non-finite value on any rank's shard."""
    names, flags = [], []
    for name, value in model.state_dict().items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.is_floating_point():
            names.append(name)
            flags.append(torch.isfinite(local).all())
    if not names:
        return []
    bad = (~torch.stack(flags)).to(torch.int32)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return [n for n, b in zip(names, bad.tolist()) if b]


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor, left on its device; a sharded model's norm is a DTensor whose full value
    is gathered (a collective, without a host sync)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
