"""MViTv2 (Li et al., 2022) and MViT (Fan et al., 2021) for images and video, with the switches of the Hiera
paper's Table 1 that walk MViTv2 into Hiera one step at a time.

Tokens stay in spatial order ([B, (1 +) T*H*W, C], an optional cls token first) and every block is told the grid
it works on. Pooling (q, k, v and the skip path) reshapes to [B', C, (T,) H, W] and back. Mask-unit attention
moves each unit into the batch dimension before pooling and attention, so an overlapping kernel never mixes
units. Decomposed relative positions are an additive bias computed from q and handed to
F.scaled_dot_product_attention, whose result equals the explicit softmax(q k^T * scale + bias) v.

As an MAE encoder (`forward_mask_units`, used by models/mae.py) only the kept mask units' tokens exist, unit
after unit; every pooling moves the units into the batch dimension and pads each for kernels larger than
their stride ("separate-and-pad", the Hiera paper's trick), so no kernel carries anything across a unit border,
while attention stays global over the kept tokens at their true positions (models/mvitv2_geometry.py).

State-dict keys are those of facebookresearch/mvit and SlowFast (`blocks.{i}.attn.qkv`, `attn.pool_q`,
`attn.norm_q`, `attn.rel_pos_h`, `blocks.{i}.proj`, `head.projection`), so their checkpoints load as they are;
`adapt_state_dict` converts timm's and the older separate-q/k/v layouts (models/mvitv2_convert.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from .hiera import MAE_ONLY_KEY_PREFIXES, Head, PatchEmbed, attention, init_transformer_weights, run_block
from .mvitv2_convert import adapt_mvitv2_state_dict
from .mvitv2_geometry import (
    Grid,
    KeptUnits,
    from_windows,
    gather_units,
    pool_padding,
    pooled_grid,
    rel_pos_distance,
    rel_pos_lookup,
    rel_pos_table,
    to_windows,
)
from .registry import KINETICS, ModelConfigError, register_model

_POOL_OPS = {"conv": None, "max": (F.max_pool2d, F.max_pool3d), "avg": (F.avg_pool2d, F.avg_pool3d)}
_HEAD_POOLS = ("cls", "mean", "mean_then_norm")


@dataclass(frozen=True)
class MViTv2Config:
    input_size: tuple[int, ...] = (224, 224)  # (H, W) or (T, H, W)
    in_chans: int = 3
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (2, 3, 16, 3)  # channels and heads double at the first block of stages 2..
    q_pool: int = 3  # number of stage transitions that also stride q (Hiera's MAE models use 2)
    q_stride: tuple[int, ...] = (2, 2)
    kv_stride: tuple[int, ...] = (4, 4)  # adaptive: the first stage's KV stride, divided by every q stride
    pool_kernel: tuple[int, ...] = (3, 3)
    patch_kernel: tuple[int, ...] = (7, 7)
    patch_stride: tuple[int, ...] = (4, 4)
    patch_padding: tuple[int, ...] = (3, 3)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dim_mul_in_att: bool = True  # channels grow in the attention (v2) or in the MLP of the block before (v1, L)
    cls_token: bool = False
    head_pool: str = "mean"  # "cls": normed cls token; "mean": norm, then mean; "mean_then_norm" (Hiera)
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0
    head_init_scale: float = 1.0
    # The simplification switches (REFERENCE.md §3), MViTv2 values by default.
    rel_pos: bool = True  # a: False = learned absolute positions
    sep_pos_embed: bool = False  # absolute positions of video: separate spatial + temporal tables
    pool_mode: str = "conv"  # b: "conv" (depthwise conv + LayerNorm), "max" or "avg"
    q_pool_stride1: bool = True  # c: pool q with stride 1 in blocks that do not downsample
    kv_pool_stride1: bool = True  # c: pool k, v where the adaptive KV stride has reached 1
    kernel_equals_stride: bool = False  # d: pooling kernels (q, kv and skip) equal their stride, no padding
    residual_pooling: bool = True  # e: add the pooled q to the attention output
    kv_pool: bool = True  # f: False = k, v unpooled (mask-unit attention takes its place)
    mask_unit_attn: tuple[bool, ...] = (False, False, False, False)  # f: per stage, as Hiera's flags
    mask_unit_size: tuple[int, ...] = (8, 8)  # in tokens

    def __post_init__(self):
        dims = len(self.input_size)
        for field in ("q_stride", "kv_stride", "pool_kernel", "patch_kernel", "patch_stride", "patch_padding",
                      "mask_unit_size"):
            if len(getattr(self, field)) != dims:
                raise ModelConfigError(f"MViTv2: {field}={getattr(self, field)} needs {dims} entries like input_size")
        if self.pool_mode not in _POOL_OPS:
            raise ModelConfigError(f"MViTv2: pool_mode={self.pool_mode!r} must be one of {sorted(_POOL_OPS)}")
        if self.head_pool not in _HEAD_POOLS or (self.head_pool == "cls") != self.cls_token:
            raise ModelConfigError(f"MViTv2: head_pool={self.head_pool!r} must be one of {_HEAD_POOLS}, 'cls' exactly "
                                   f"when cls_token (={self.cls_token})")
        if not 0 <= self.q_pool < len(self.stages) or len(self.mask_unit_attn) != len(self.stages):
            raise ModelConfigError("MViTv2: q_pool must be below the number of stages; mask_unit_attn needs one flag "
                                   "per stage")
        if any(self.mask_unit_attn) and (self.kv_pool or self.cls_token):
            raise ModelConfigError("MViTv2: mask-unit attention replaces kv pooling and has no place for a cls token: "
                                   "set kv_pool=False, cls_token=False")
        if self.sep_pos_embed and (self.rel_pos or dims != 3):
            raise ModelConfigError("MViTv2: sep_pos_embed is for absolute positions (rel_pos=False) of video")

    @property
    def token_grid(self) -> Grid:
        return tuple(i // s for i, s in zip(self.input_size, self.patch_stride))

    @property
    def mask_unit_grid(self) -> Grid:
        return tuple(t // u for t, u in zip(self.token_grid, self.mask_unit_size))

    @property
    def num_mask_units(self) -> int:
        return math.prod(self.mask_unit_grid)


@dataclass(frozen=True)
class BlockSpec:
    """Everything one block needs; kernels are None where that pooling is off."""

    dim: int
    dim_out: int
    heads: int
    grid: Grid  # input token grid
    q_stride: Grid
    q_kernel: Grid | None
    kv_stride: Grid
    kv_kernel: Grid | None
    skip_kernel: Grid | None
    window: Grid | None  # mask unit at this block's input resolution; None = global attention
    drop_path: float


def block_plan(cfg: MViTv2Config) -> list[BlockSpec]:
    """The per-block geometry of the whole network at the configured input size."""
    dims = len(cfg.input_size)
    ones = (1,) * dims
    starts = [sum(cfg.stages[:s]) for s in range(1, len(cfg.stages))]
    stage_of = [s for s, n in enumerate(cfg.stages) for _ in range(n)]
    depth = sum(cfg.stages)

    def kernel(stride: Grid, pool_stride1: bool) -> Grid | None:
        if math.prod(stride) == 1 and not pool_stride1:
            return None
        k = stride if cfg.kernel_equals_stride else cfg.pool_kernel
        return None if math.prod(k) == 1 and math.prod(stride) == 1 else k

    plan, dim, heads, kv, grid, cum = [], cfg.embed_dim, cfg.num_heads, cfg.kv_stride, cfg.token_grid, ones
    for i in range(depth):
        # The first block of a stage keeps the previous stage's attention kind (Hiera's "lag by 1 block").
        mask_unit = cfg.mask_unit_attn[stage_of[max(i - 1, 0)]]
        heads = heads * 2 if i in starts else heads
        grows = i in starts if cfg.dim_mul_in_att else i + 1 in starts
        dim_out = dim * 2 if grows else dim
        q_stride = cfg.q_stride if i in starts[: cfg.q_pool] else ones
        kv = tuple(max(k // s, 1) for k, s in zip(kv, q_stride))
        window = tuple(m // c for m, c in zip(cfg.mask_unit_size, cum)) if mask_unit else None
        downsample = math.prod(q_stride) > 1
        skip_kernel = (q_stride if cfg.kernel_equals_stride else tuple(s + 1 if s > 1 else s for s in q_stride))
        plan.append(BlockSpec(
            dim=dim, dim_out=dim_out, heads=heads, grid=grid, q_stride=q_stride,
            q_kernel=kernel(q_stride, cfg.q_pool_stride1), kv_stride=kv,
            kv_kernel=kernel(kv, cfg.kv_pool_stride1) if cfg.kv_pool else None,
            skip_kernel=skip_kernel if downsample else None, window=window,
            drop_path=cfg.drop_path_rate * i / max(depth - 1, 1),
        ))
        grid = pooled_grid(grid, plan[-1].q_kernel, q_stride)
        cum = tuple(c * s for c, s in zip(cum, q_stride))
        dim = dim_out
    return plan


def pool_tokens(x: torch.Tensor, pool, grid: Grid, prefix: int) -> tuple[torch.Tensor, Grid]:
    """Apply `pool` ([B', C, *grid] -> [B', C, *grid']) to tokens [..., prefix + prod(grid), C]; prefix tokens
    (cls) bypass it. Returns [..., prefix + prod(grid'), C] and grid'."""
    lead, C = x.shape[:-2], x.shape[-1]
    spatial = x[..., prefix:, :].reshape(-1, *grid, C).movedim(-1, 1)
    pooled = pool(spatial)
    grid = tuple(pooled.shape[2:])
    pooled = pooled.flatten(2).transpose(1, 2).reshape(*lead, -1, C)
    return (torch.cat([x[..., :prefix, :], pooled], dim=-2) if prefix else pooled), grid


class PoolingAttention(nn.Module):
    """Multi-head pooling attention: q, k, v are projected, pooled (q to the block's stride, k and v to the
    adaptive KV stride), optionally within mask units, then attend with decomposed relative positions."""

    def __init__(self, spec: BlockSpec, dim_out: int, cfg: MViTv2Config):
        super().__init__()
        self.dim_out, self.heads = dim_out, spec.heads
        self.head_dim = dim_out // spec.heads
        self.prefix = int(cfg.cls_token)
        self.window, self.residual_pooling = spec.window, cfg.residual_pooling
        self.qkv = nn.Linear(spec.dim, 3 * dim_out, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        self.pool_q, self.norm_q = self._pool(cfg, spec.q_kernel, spec.q_stride)
        self.pool_k, self.norm_k = self._pool(cfg, spec.kv_kernel, spec.kv_stride)
        self.pool_v, self.norm_v = self._pool(cfg, spec.kv_kernel, spec.kv_stride)
        self.rel_pos_names = ()
        if cfg.rel_pos:
            grid = spec.window or spec.grid
            q_grid = pooled_grid(grid, spec.q_kernel, spec.q_stride)
            k_grid = pooled_grid(grid, spec.kv_kernel, spec.kv_stride)
            self.rel_pos_names = ("rel_pos_t", "rel_pos_h", "rel_pos_w")[-len(grid):]
            for name, q, k in zip(self.rel_pos_names, q_grid, k_grid):
                table = nn.Parameter(torch.zeros(2 * max(q, k) - 1, self.head_dim))
                trunc_normal_(table, std=0.02)
                setattr(self, name, table)

    def _pool(self, cfg: MViTv2Config, kernel: Grid | None, stride: Grid) -> tuple[nn.Module | None, nn.Module]:
        if kernel is None:
            return None, nn.Identity()
        padding = pool_padding(kernel, stride)
        if cfg.pool_mode == "conv":
            conv = (nn.Conv2d, nn.Conv3d)[len(kernel) - 2]
            return (conv(self.head_dim, self.head_dim, kernel, stride, padding, groups=self.head_dim, bias=False),
                    nn.LayerNorm(self.head_dim, eps=1e-6))
        return _FunctionalPool(cfg.pool_mode, kernel, stride, padding), nn.Identity()

    def rel_pos_bias(self, q: torch.Tensor, q_grid: Grid, k_grid: Grid) -> torch.Tensor:
        """q [B, X, prefix + Nq, hd] -> additive bias [B, X, prefix + Nq, prefix + Nk]: q_i . R_d[dist_d(i, j)]
        summed over the dims d of the grid; zero in the cls row and column."""
        B, X, _, hd = q.shape
        letters = "thw"[-len(q_grid):]
        r_q = q[:, :, self.prefix:].reshape(B, X, *q_grid, hd)
        bias = None
        for d, name in enumerate(self.rel_pos_names):
            R = rel_pos_lookup(getattr(self, name), q_grid[d], k_grid[d])
            rel = torch.einsum(f"bx{letters}c,{letters[d]}kc->bx{letters}k", r_q, R)
            rel = rel.reshape(B, X, *q_grid, *(k if j == d else 1 for j, k in enumerate(k_grid)))
            bias = rel if bias is None else bias + rel
        bias = bias.reshape(B, X, math.prod(q_grid), math.prod(k_grid))
        return F.pad(bias, (self.prefix, 0, self.prefix, 0)) if self.prefix else bias

    def rel_pos_bias_at(self, q: torch.Tensor, kept: KeptUnits, q_grid: Grid, k_grid: Grid) -> torch.Tensor:
        """The bias at true positions, for the kept units only: q [B, X, prefix + K * prod(q_grid), hd] with
        `q_grid`, `k_grid` the grids of one unit -> [B, X, prefix + K * prod(q_grid), prefix + K * prod(k_grid)]."""
        r_q = q[:, :, self.prefix:]
        B, X, Nq, _ = r_q.shape
        q_pos, k_pos = kept.positions(q_grid), kept.positions(k_grid)
        bias = None
        for d, (name, q_size, k_size) in enumerate(zip(self.rel_pos_names, kept.full_grid(q_grid),
                                                       kept.full_grid(k_grid))):
            # q against every table row ([B, X, Nq, L], cheap), then each (query, key) pair picks its row.
            per_row = r_q @ rel_pos_table(getattr(self, name), q_size, k_size).T
            dist = rel_pos_distance(q_pos[:, :, None, d], k_pos[:, None, :, d], q_size, k_size)
            rel = per_row.gather(3, dist[:, None].expand(B, X, Nq, dist.shape[-1]))
            bias = rel if bias is None else bias + rel
        return F.pad(bias, (self.prefix, 0, self.prefix, 0)) if self.prefix else bias

    def forward(self, x: torch.Tensor, grid: Grid, kept: KeptUnits | None = None,
                visible: torch.Tensor | None = None) -> tuple[torch.Tensor, Grid]:
        """[B, prefix + U * prod(grid), dim] -> [B, prefix + U * prod(grid'), dim_out] and grid'.

        Dense: U = 1 and `grid` is the token grid. Sparse (`kept`): the tokens of the U = K kept mask units,
        unit-major, and `grid` is the grid of one unit; pooling then runs per unit, padded at its borders as the
        dense model pads the image's (separate-and-pad), and global attention sees every kept token at its true
        position.
        `visible` [B, *unit_grid] bool (dense only) hides the keys of masked units from global attention.
        """
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        units = (L - self.prefix) // math.prod(grid)
        pool_grid = grid
        if self.window is not None:
            # Units go into the batch beside the heads; a sparse unit is one window (mask units are windows).
            q, k, v = (to_windows(t.reshape(B, self.heads * units, -1, self.head_dim), grid, self.window)
                       for t in (q, k, v))
            pool_grid = self.window
        q, q_grid = self._apply_pool(q, self.pool_q, self.norm_q, pool_grid)
        k, k_grid = self._apply_pool(k, self.pool_k, self.norm_k, pool_grid)
        v, _ = self._apply_pool(v, self.pool_v, self.norm_v, pool_grid)
        bias = None
        if self.rel_pos_names:
            # Within a window the local positions are the true ones.
            bias = self.rel_pos_bias_at(q, kept, q_grid, k_grid) if kept is not None and self.window is None \
                else self.rel_pos_bias(q, q_grid, k_grid)
        if visible is not None and self.window is None:
            hidden = self.hidden_key_bias(visible, k_grid, q.dtype)
            bias = hidden if bias is None else bias + hidden
        out = attention(q, k, v, bias)
        if self.residual_pooling:
            # The cls token is not a pooled token: SlowFast leaves its row without the residual.
            out = torch.cat([out[:, :, :self.prefix], out[:, :, self.prefix:] + q[:, :, self.prefix:]], dim=2) \
                if self.prefix else out + q
        if self.window is not None:
            counts = tuple(g // w for g, w in zip(grid, self.window))
            out = from_windows(out, self.heads * units, counts, q_grid).reshape(B, self.heads, -1, self.head_dim)
            q_grid = tuple(c * w for c, w in zip(counts, q_grid))
        out = out.transpose(1, 2).reshape(B, -1, self.dim_out)
        return self.proj(out), q_grid

    def hidden_key_bias(self, visible: torch.Tensor, k_grid: Grid, dtype: torch.dtype) -> torch.Tensor:
        """visible [B, *unit_grid] bool -> [B, 1, 1, prefix + prod(k_grid)]: -inf on keys of masked units."""
        keys = F.interpolate(visible[:, None].to(dtype), size=k_grid, mode="nearest").flatten(1) > 0.5
        keys = F.pad(keys, (self.prefix, 0), value=True)
        return torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(~keys, -math.inf)[:, None, None]

    def _apply_pool(self, t: torch.Tensor, pool: nn.Module | None, norm: nn.Module, grid: Grid):
        if pool is None:
            return t, grid
        t, grid = pool_tokens(t, pool, grid, self.prefix)
        return norm(t), grid


class _FunctionalPool(nn.Module):
    """A parameter-free max or avg pool of a 2-D or 3-D grid."""

    def __init__(self, mode: str, kernel: Grid, stride: Grid, padding: Grid):
        super().__init__()
        self.op = _POOL_OPS[mode][len(kernel) - 2]
        self.kernel, self.stride, self.padding = kernel, stride, padding
        # Avg pooling counts padded zeros (count_include_pad); padding explicitly gives the same result and
        # also works where a mask unit is thinner than the kernel (one frame), which avg_pool3d refuses.
        self.explicit_pad = [p for pad in reversed(padding) for p in (pad, pad)] if mode == "avg" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad is not None:
            return self.op(F.pad(x, self.explicit_pad), self.kernel, self.stride)
        return self.op(x, self.kernel, self.stride, self.padding)


class MultiScaleBlock(nn.Module):
    def __init__(self, spec: BlockSpec, cfg: MViTv2Config):
        super().__init__()
        self.dim, self.dim_out, self.dim_mul_in_att = spec.dim, spec.dim_out, cfg.dim_mul_in_att
        self.prefix = int(cfg.cls_token)
        att_dim = spec.dim_out if cfg.dim_mul_in_att else spec.dim
        self.norm1 = nn.LayerNorm(spec.dim, eps=1e-6)
        self.attn = PoolingAttention(spec, att_dim, cfg)
        self.norm2 = nn.LayerNorm(att_dim, eps=1e-6)
        self.mlp = Mlp(att_dim, int(att_dim * cfg.mlp_ratio), spec.dim_out, act_layer=nn.GELU)
        self.drop_path = DropPath(spec.drop_path) if spec.drop_path > 0 else nn.Identity()
        if spec.dim != spec.dim_out:
            self.proj = nn.Linear(spec.dim, spec.dim_out)
        self.pool_skip = None
        if spec.skip_kernel is not None:
            self.pool_skip = _FunctionalPool("max", spec.skip_kernel, spec.q_stride,
                                             pool_padding(spec.skip_kernel, spec.q_stride))

    def forward(self, x: torch.Tensor, grid: Grid, kept: KeptUnits | None = None,
                visible: torch.Tensor | None = None) -> tuple[torch.Tensor, Grid]:
        """[B, prefix + U * prod(grid), dim] -> [B, prefix + U * prod(grid'), dim_out] and grid'; U = 1 and the
        token grid, or the U kept units and the grid of one unit (see PoolingAttention.forward)."""
        x_norm = self.norm1(x)
        x_attn, grid_out = self.attn(x_norm, grid, kept, visible)
        if self.dim_mul_in_att and self.dim != self.dim_out:
            # Channels grow here: the shortcut is the projection of the *normed* input.
            x = self.proj(x_norm)
        if self.pool_skip is not None:
            x, _ = pool_tokens(x, self.pool_skip, grid, self.prefix)
        x = x + self.drop_path(x_attn)
        x_norm = self.norm2(x)
        x_mlp = self.mlp(x_norm)
        if not self.dim_mul_in_att and self.dim != self.dim_out:
            x = self.proj(x_norm)
        return x + self.drop_path(x_mlp), grid_out


class MViTv2(nn.Module):
    foreign_key_prefixes = MAE_ONLY_KEY_PREFIXES
    _no_split_modules = ("MultiScaleBlock",)  # FSDP's unit of sharding (accelerate's TRANSFORMER_BASED_WRAP)
    mae_defaults = {"q_pool": 2, "num_classes": 0}  # as Hiera's MAE: stages 3 and 4 at one resolution

    def __init__(self, config: MViTv2Config):
        super().__init__()
        self.config = cfg = config
        self.plan = block_plan(cfg)
        self.token_grid = cfg.token_grid
        self.prefix = int(cfg.cls_token)
        conv = (nn.Conv2d, nn.Conv3d)[len(cfg.input_size) - 2]
        self.patch_embed = PatchEmbed(conv(cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride,
                                           cfg.patch_padding))
        C, N = cfg.embed_dim, math.prod(self.token_grid)
        if cfg.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        if not cfg.rel_pos:
            if cfg.sep_pos_embed:
                self.pos_embed_spatial = nn.Parameter(torch.zeros(1, N // self.token_grid[0], C))
                self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.token_grid[0], C))
                if cfg.cls_token:
                    self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, C))
            else:
                self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix + N, C))
        self.blocks = nn.ModuleList(MultiScaleBlock(spec, cfg) for spec in self.plan)
        self.stage_ends = [sum(cfg.stages[: s + 1]) - 1 for s in range(len(cfg.stages))]
        self.num_features = self.plan[-1].dim_out
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head = Head(self.num_features, cfg.num_classes, cfg.head_dropout) if cfg.num_classes > 0 \
            else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # As SlowFast / facebookresearch/mvit; rel-pos tables were initialised where they were made.
        for name, p in self.named_parameters():
            if "." not in name:  # cls token and absolute position tables
                trunc_normal_(p, std=0.02)
        init_transformer_weights(self, self.config.head_init_scale)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter layers, for layer-wise lr decay: the stem (patch_embed, cls_token, pos_embed) is
        layer 0, block i is layer i + 1, the final norm and the head come last (REFERENCE.md §4)."""
        return {"stem": r"^patch_embed|^cls_token|^pos_embed", "blocks": [(r"^blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        """Position tables (absolute and relative) and the cls token."""
        return {n for n, _ in self.named_parameters()
                if "." not in n or n.rsplit(".", 1)[-1].startswith("rel_pos_")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (timm's method name; see models.hiera.run_block)."""
        self.grad_checkpointing = enable

    def get_pos_embed(self) -> torch.Tensor:
        """[1, prefix + N, C] in spatial order."""
        if not self.config.sep_pos_embed:
            return self.pos_embed
        pos = (self.pos_embed_temporal[:, :, None] + self.pos_embed_spatial[:, None]).flatten(1, 2)
        return torch.cat([self.pos_embed_class, pos], dim=1) if self.prefix else pos

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Pixels [B, C, (T,) H, W] -> tokens [B, prefix + N, C0] and their grid."""
        x = self.patch_embed.proj(x)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        if self.prefix:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if not self.config.rel_pos:
            x = x + self.get_pos_embed()
        return x, grid

    def forward_stages(self, x: torch.Tensor) -> list[tuple[torch.Tensor, Grid]]:
        """The output of every stage: tokens [B, prefix + N_s, C_s] and grid."""
        return self.run_blocks(*self.embed(x))

    def run_blocks(self, x: torch.Tensor, grid: Grid, kept: KeptUnits | None = None,
                   visible: torch.Tensor | None = None) -> list[tuple[torch.Tensor, Grid]]:
        """Embedded tokens through the blocks; every stage's output and grid (see MultiScaleBlock.forward)."""
        outputs = []
        for i, block in enumerate(self.blocks):
            x, grid = run_block(block, x, grid, kept, visible, checkpointed=self.grad_checkpointing)
            if i in self.stage_ends:
                outputs.append((x, grid))
        return outputs

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs in spatial order, cls token dropped: [B, (T,) H_s, W_s, C_s]."""
        return [t[:, self.prefix:].reshape(t.shape[0], *grid, t.shape[-1]) for t, grid in self.forward_stages(x)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, (T,) H, W] -> pooled, normed features [B, num_features]."""
        return self._head_features(self.forward_stages(x)[-1][0])

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass: (forward_features [B, num_features], every stage's tokens averaged [B, C_s], cls
        token left out)."""
        stages = self.forward_stages(x)
        return self._head_features(stages[-1][0]), [t[:, self.prefix:].mean(dim=1) for t, _ in stages]

    def _head_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens [B, N, C] (cls first where there is one) -> what the head sees [B, C]."""
        if self.config.head_pool == "mean_then_norm":
            return self.norm(x.mean(dim=1))
        x = self.norm(x)
        return x[:, 0] if self.config.head_pool == "cls" else x[:, self.prefix:].mean(dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, (T,) H, W] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm, facebookresearch/mvit or SlowFast keys -> ours; position tables resampled to this model."""
        return adapt_mvitv2_state_dict(state_dict, self.config.stages, self.state_dict())

    # -- masked-unit forward (MAE) ---------------------------------------------------------------------------
    @property
    def stage_dims(self) -> list[int]:
        return [self.plan[end].dim_out for end in self.stage_ends]

    @property
    def stage_unit_shapes(self) -> list[Grid]:
        """Tokens per mask unit at the end of each stage. Every pooling stride must divide the unit it pools, so
        that a unit's pooled tokens are exactly its share of the dense pooled grid (true positions stay exact)."""
        unit, shapes = self.config.mask_unit_size, []
        if any(t % u for t, u in zip(self.token_grid, unit)):
            raise ModelConfigError(f"MViTv2: the token grid {self.token_grid} is not a whole number of mask units "
                                   f"{unit}")
        for i, spec in enumerate(self.plan):
            for kernel, stride in ((spec.q_kernel, spec.q_stride), (spec.kv_kernel, spec.kv_stride),
                                   (spec.skip_kernel, spec.q_stride)):
                share = tuple(u // s for u, s in zip(unit, stride))
                if kernel is not None and (any(u % s for u, s in zip(unit, stride))
                                           or pooled_grid(unit, kernel, stride) != share):
                    raise ModelConfigError(f"MViTv2 block {i}: pooling stride {stride} (kernel {kernel}) does not tile "
                                           f"the mask unit of {unit} tokens; masked pretraining needs it to")
            unit = pooled_grid(unit, spec.q_kernel, spec.q_stride)
            if i in self.stage_ends:
                shapes.append(unit)
        return shapes

    def unit_visibility(self, keep_idx: torch.Tensor) -> torch.Tensor:
        """keep_idx [B, K] -> [B, *mask_unit_grid] bool, True = kept."""
        visible = torch.zeros(keep_idx.shape[0], self.config.num_mask_units, dtype=torch.bool, device=keep_idx.device)
        return visible.scatter(1, keep_idx, True).view(-1, *self.config.mask_unit_grid)

    def embed_mask_units(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, (T,) H, W] -> tokens of the kept units [B, prefix + K * prod(mask_unit_size), C0],
        unit-major. Masked pixels are zeroed before the overlapping patch convolution (as Hiera's MAE does) so
        they cannot reach kept tokens; absolute positions are added before gathering, so tokens keep their own."""
        visible = self.unit_visibility(keep_idx)[:, None].to(x.dtype)
        tokens, grid = self.embed(x * F.interpolate(visible, size=x.shape[2:]))
        units = gather_units(tokens[:, self.prefix:], grid, self.config.mask_unit_size, keep_idx)
        return torch.cat([tokens[:, :self.prefix], units.flatten(1, 2)], dim=1)

    def forward_mask_units(self, x: torch.Tensor, keep_idx: torch.Tensor,
                           separate_and_pad: bool = True) -> list[torch.Tensor]:
        """Stage outputs of the kept units, keep_idx [B, K] (ascending indices into the row-major mask-unit
        grid): [B, K, *unit_shape_s, C_s] per stage.

        Separate-and-pad (the MAE path): only the kept units' tokens exist. Each unit is its own small image in
        the batch dimension for every pooling (q, k, v and the skip path), padded for kernels larger than the
        stride as an image border is; attention stays global over all kept tokens of the sample, and relative
        positions use every token's true place in the grid. Where kernel = stride (rows d, e) the same per-unit
        pooling pads nothing and equals dense pooling; mask-unit attention (row f) attends within each unit.

        The cls token (the video configs) is kept rather than dropped: it attends to kept tokens only, so it
        carries nothing masked, and it is trained the way fine-tuning uses it (same attention in both, no fresh
        parameter at fine-tuning). It is left out of the outputs: the decoder predicts tokens of the grid.

        `separate_and_pad=False` is the leaky control: the whole input runs dense and masked units are only
        hidden from the attention keys, so every kernel that overlaps a unit border (patch embedding, pooling
        with kernel > stride) carries masked content into kept tokens.
        """
        B, K = keep_idx.shape
        if separate_and_pad:
            kept = KeptUnits.from_indices(keep_idx, self.config.mask_unit_grid)
            stages = self.run_blocks(self.embed_mask_units(x, keep_idx), self.config.mask_unit_size, kept)
            return [t[:, self.prefix:].reshape(B, K, *unit, t.shape[-1]) for t, unit in stages]
        stages = self.run_blocks(*self.embed(x), visible=self.unit_visibility(keep_idx))
        outputs = []
        for t, grid in stages:
            unit = tuple(g // m for g, m in zip(grid, self.config.mask_unit_grid))
            outputs.append(gather_units(t[:, self.prefix:], grid, unit, keep_idx).view(B, K, *unit, t.shape[-1]))
        return outputs


_IMAGE = dict(input_size=(224, 224))
_VIDEO = dict(input_size=(16, 224, 224), num_classes=400, q_stride=(1, 2, 2), kv_stride=(1, 8, 8),
              pool_kernel=(3, 3, 3), patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4), patch_padding=(1, 3, 3),
              mask_unit_size=(1, 8, 8), cls_token=True, head_pool="cls", head_dropout=0.5)
_SIZES = {
    "tiny": dict(stages=(1, 2, 5, 2)),
    "small": dict(stages=(1, 2, 11, 2)),
    "base": dict(stages=(2, 3, 16, 3)),
    "large": dict(stages=(2, 6, 36, 4), embed_dim=144, num_heads=2, dim_mul_in_att=False),
}
for _size, _arch in _SIZES.items():
    register_model(f"mvitv2_{_size}", MViTv2, MViTv2Config(**_IMAGE, **_arch))
register_model("mvitv2_small_16x4", MViTv2, MViTv2Config(**_VIDEO, **_SIZES["small"], drop_path_rate=0.2),
               KINETICS)
register_model("mvitv2_base_32x3", MViTv2, MViTv2Config(
    **{**_VIDEO, "input_size": (32, 224, 224)}, **_SIZES["base"], drop_path_rate=0.3), KINETICS)
# The published 217.6 M parameters of L 40x3 are those of channel growth in the MLP (REFERENCE.md §2).
register_model("mvitv2_large_40x3", MViTv2, MViTv2Config(
    **{**_VIDEO, "input_size": (40, 312, 312)}, **_SIZES["large"], drop_path_rate=0.75), KINETICS)
# MViT v1: the same skeleton with absolute (separate) positions, no relative positions, no residual pooling,
# channel growth in the MLP and q pooled only where it downsamples.
_V1 = dict(_VIDEO, **_SIZES["small"], rel_pos=False, sep_pos_embed=True, residual_pooling=False,
           dim_mul_in_att=False, q_pool_stride1=False, drop_path_rate=0.2)
register_model("mvit_base_16x4", MViTv2, MViTv2Config(**_V1), KINETICS)
register_model("mvit_base_32x3", MViTv2, MViTv2Config(**{**_V1, "input_size": (32, 224, 224)}), KINETICS)


def simplification_overrides(row: str, video: bool, stages: int = 4) -> dict:
    """Config overrides for a row of the Hiera paper's Table 1 ("" = MViTv2 itself, "a" .. "f"), cumulative:
    row f is Hiera (no cls token, mean-then-norm head, mask-unit attention in the first two of `stages`)."""
    steps = {
        "a": dict(rel_pos=False, sep_pos_embed=video),
        "b": dict(pool_mode="max"),
        "c": dict(q_pool_stride1=False, kv_pool_stride1=False),
        "d": dict(kernel_equals_stride=True),
        "e": dict(residual_pooling=False),
        "f": dict(kv_pool=False, mask_unit_attn=(True, True) + (False,) * (stages - 2), cls_token=False,
                  head_pool="mean_then_norm"),
    }
    if row and row not in steps:
        raise ValueError(f"unknown row {row!r}; rows are {sorted(steps)}")
    overrides = {}
    for name in sorted(steps)[: "abcdef".index(row) + 1 if row else 0]:
        overrides.update(steps[name])
    return overrides
