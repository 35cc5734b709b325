"""Checkpoint key conversion for MViTv2 / MViT: timm's image models, facebookresearch/mvit and SlowFast.

Our keys are those of facebookresearch/mvit and SlowFast, so their checkpoints (wrapped as {"model_state": ...},
which `load_pretrained` unwraps) need no renaming. timm nests blocks in stages and renames the channel-growth
projection and the classifier; separate q/k/v projections (SlowFast `SEPARATE_QKV`) are concatenated into qkv.
Position tables are resampled to the model's sizes, so a checkpoint loads at another input size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

_TIMM_RENAMES = (("shortcut_proj_attn.", "proj."), ("shortcut_proj_mlp.", "proj."), ("head.fc.", "head.projection."))
_SEPARATE_QKV = re.compile(r"^(blocks\.\d+\.attn\.)([qkv])\.(weight|bias)$")


def timm_to_ours(state_dict: dict[str, torch.Tensor], stages: Sequence[int]) -> dict[str, torch.Tensor]:
    """`stages.{s}.blocks.{j}.` -> `blocks.{i}.` and timm's module names -> the official ones."""
    first = [sum(stages[:s]) for s in range(len(stages))]
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            key = f"blocks.{first[int(match[1])] + int(match[2])}." + key[match.end():]
        for old, new in _TIMM_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def merge_separate_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`attn.{q,k,v}.{weight,bias}` -> `attn.qkv.*` (concatenated in q, k, v order)."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        match = _SEPARATE_QKV.match(key)
        if match:
            parts.setdefault(f"{match[1]}qkv.{match[3]}", {})[match[2]] = value
        else:
            out[key] = value
    for key, qkv in parts.items():
        if sorted(qkv) != ["k", "q", "v"]:
            raise ValueError(f"{key}: found only the {sorted(qkv)} parts of a separate q/k/v projection")
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def resample_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """[L, C] -> [length, C], linear (as timm's and SlowFast's own resampling)."""
    return F.interpolate(table.T[None], size=length, mode="linear").squeeze(0).T


def resample_pos_embed(key: str, pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Resample an absolute position table to `target`'s shape: linear over time, bicubic over a square
    spatial grid; a leading cls position (pos_embed of a cls model) is kept as it is."""
    if key == "pos_embed_temporal":
        return F.interpolate(pos.transpose(1, 2), size=target.shape[1], mode="linear").transpose(1, 2)
    prefix = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2
    new_prefix = target.shape[1] - math.isqrt(target.shape[1]) ** 2
    if prefix not in (0, 1) or prefix != new_prefix:
        raise ValueError(f"{key}: cannot resample {tuple(pos.shape)} to {tuple(target.shape)} (not square grids "
                         "with the same number of cls positions)")
    side, new_side = math.isqrt(pos.shape[1] - prefix), math.isqrt(target.shape[1] - prefix)
    return resample_abs_pos_embed(pos, [new_side, new_side], [side, side], num_prefix_tokens=prefix)


def adapt_mvitv2_state_dict(state_dict: dict[str, torch.Tensor], stages: Sequence[int],
                            own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported format -> our keys, with position tables resampled to the shapes in `own`."""
    if any(k.startswith("stages.") for k in state_dict):
        state_dict = timm_to_ours(state_dict, stages)
    state_dict = merge_separate_qkv(state_dict)
    for key, value in state_dict.items():
        target = own.get(key)
        if target is None or target.shape == value.shape or value.dim() != target.dim():
            continue  # unknown or mis-shaped keys are reported by load_pretrained
        name = key.rsplit(".", 1)[-1]
        if name.startswith("rel_pos_") and value.shape[1] == target.shape[1]:
            state_dict[key] = resample_rel_pos(value, target.shape[0])
        elif name.startswith("pos_embed") and name != "pos_embed_class" and value.shape[2] == target.shape[2]:
            state_dict[key] = resample_pos_embed(name, value, target)
    return state_dict
