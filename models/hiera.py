"""Hiera: a hierarchical vision transformer with mask-unit attention (Ryali et al., 2023), image and video.

Tokens are "unrolled" once after the position embedding, so that the offsets of every pooling stride become
leading dimensions of the token axis. Then a kernel = stride max-pool is `x.view(B, stride, -1, C).amax(1)`,
mask-unit windows are the trailing part of the token axis, and dropping masked units keeps the layout.
State-dict keys are those of the official implementation (facebookresearch/hiera), so its checkpoints load
as they are.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, resample_abs_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from .registry import KINETICS, ModelConfigError, register_model

MAE_ONLY_KEY_PREFIXES = ("mask_token", "decoder_", "encoder_norm.", "multi_scale_fusion_heads.")


@dataclass(frozen=True)
class HieraConfig:
    input_size: tuple[int, ...] = (224, 224)  # (H, W) or (T, H, W)
    in_chans: int = 3
    embed_dim: int = 96
    num_heads: int = 1
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    stages: tuple[int, ...] = (2, 3, 16, 3)
    q_pool: int = 3  # number of stage transitions that pool
    q_stride: tuple[int, ...] = (2, 2)
    mask_unit_size: tuple[int, ...] = (8, 8)  # in tokens; equals q_stride ** (len(stages) - 1)
    mask_unit_attn: tuple[bool, ...] = (True, True, False, False)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    patch_kernel: tuple[int, ...] = (7, 7)
    patch_stride: tuple[int, ...] = (4, 4)
    patch_padding: tuple[int, ...] = (3, 3)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0
    head_init_scale: float = 0.001
    sep_pos_embed: bool = False  # video: separate spatial and temporal position embeddings

    def __post_init__(self):
        dims = len(self.input_size)
        for field in ("q_stride", "mask_unit_size", "patch_kernel", "patch_stride", "patch_padding"):
            if len(getattr(self, field)) != dims:
                raise ModelConfigError(f"Hiera: {field}={getattr(self, field)} needs {dims} entries like input_size")
        if not 0 <= self.q_pool < len(self.stages):
            raise ModelConfigError(f"Hiera: q_pool={self.q_pool} must be in [0, {len(self.stages) - 1}]")
        if len(self.mask_unit_attn) != len(self.stages):
            raise ModelConfigError("Hiera: mask_unit_attn needs one flag per stage")
        unroll = tuple(s ** (len(self.stages) - 1) for s in self.q_stride)
        if self.mask_unit_size != unroll:
            raise ModelConfigError(f"Hiera: mask_unit_size {self.mask_unit_size} must equal q_stride ** (stages - 1) "
                                   f"= {unroll}")
        if self.sep_pos_embed and dims != 3:
            raise ModelConfigError("Hiera: sep_pos_embed needs a video input_size (T, H, W)")
        for size, patch, unit in zip(self.input_size, self.patch_stride, self.mask_unit_size):
            if size % patch or (size // patch) % unit:
                raise ModelConfigError(
                    f"Hiera: input_size {self.input_size} / patch_stride {self.patch_stride} must give a token "
                    f"grid divisible by the mask unit {self.mask_unit_size}"
                )

    @property
    def token_grid(self) -> tuple[int, ...]:
        return tuple(i // s for i, s in zip(self.input_size, self.patch_stride))

    @property
    def mask_unit_grid(self) -> tuple[int, ...]:
        return tuple(t // u for t, u in zip(self.token_grid, self.mask_unit_size))

    @property
    def num_mask_units(self) -> int:
        return math.prod(self.mask_unit_grid)

    @property
    def stage_ends(self) -> list[int]:
        return [sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages))]


def run_block(block: nn.Module, *args, checkpointed: bool = False):
    """`block(*args)`. With `checkpointed` (and gradients on), the block's activations are not kept for the
    backward pass but recomputed there: activation checkpointing, non-reentrant so that torch.compile traces it
    inside the one graph and the RNG (drop path) replays the same draws."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


MATMUL_ATTENTION_MAX_KEYS = 640  # measured: matmuls faster at 624 keys (2.2x), flash at 784 (1.2x)

# How `attention` hands q, k and v to SDPA. Hiera passes strided views (slices of one qkv projection, windows
# folded into the batch); so does MViTv2 for whatever it does not pool (pooling makes new, contiguous tensors).
# "strided": as they come; "contiguous": each copied into its own memory first; "auto": contiguous on CUDA, strided
# elsewhere. On the CPU the fused kernel takes the strided views as they are, which saves three copies. On CUDA no
# measurement has decided yet: `bash tools/gpu_check.sh` times both (its "layout" section), so that a GPU run
# settles what "auto" picks there.
QKV_LAYOUTS = ("auto", "strided", "contiguous")
_qkv_layout = "auto"


def set_qkv_layout(layout: str) -> str:
    """Make every model of this process hand q/k/v to SDPA in `layout` (one of QKV_LAYOUTS); returns the
    previous one. Outputs are the same either way (to rounding); only the speed differs."""
    global _qkv_layout
    if layout not in QKV_LAYOUTS:
        raise ValueError(f"q/k/v layout {layout!r}: use one of {', '.join(QKV_LAYOUTS)}")
    previous, _qkv_layout = _qkv_layout, layout
    return previous


@contextmanager
def use_qkv_layout(layout: str):
    """`set_qkv_layout(layout)` inside the block, the previous layout after it."""
    previous = set_qkv_layout(layout)
    try:
        yield
    finally:
        set_qkv_layout(previous)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v: q [B, H, Nq, d], k and v [B, H, Nk, d], bias broadcastable to
    [B, H, Nq, Nk] -> [B, H, Nq, d].

    SDPA's fused kernels, except when training in bf16 on the CPU over at most `MATMUL_ATTENTION_MAX_KEYS` keys:
    there the flash kernel's backward is 1.5-7x slower than two batched matmuls (AMX) and a softmax (one core,
    Hiera-B MAE shapes, forward + backward: image decoder 84 vs 33 ms, stage-3 global 38 vs 25 ms, mask-unit
    windows 47 vs 14 and 36 vs 7 ms). With longer sequences (the video decoder's 1568 tokens: 150 vs 236 ms)
    the softmax over the materialised scores costs more than flash's overhead saves. q, k and v reach either in
    the layout of `set_qkv_layout`.
    """
    bias = None if bias is None else bias.to(q.dtype)  # SDPA outside autocast wants the dtype of q
    if _qkv_layout == "contiguous" or (_qkv_layout == "auto" and q.is_cuda):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if (q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled()
            and k.shape[-2] <= MATMUL_ATTENTION_MAX_KEYS):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return (scores if bias is None else scores + bias).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def max_pool_unrolled(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, stride * N, C] unrolled tokens -> [B, N, C]: a kernel = stride max-pool over the leading offsets."""
    return x.view(x.shape[0], stride, -1, x.shape[-1]).amax(dim=1)


class Unroll:
    """Token reordering between spatial order and the unrolled layout, as precomputed view/permute plans.

    With strides s_0..s_{L-1} per dimension, unrolled tokens are ordered [s_0, s_1, ..., s_{L-1}, grid / prod(s)]
    (each s_l expanded over the spatial dims), s_0 being the finest offset. After pooling p times, the first p
    offset groups are gone and the layout is [s_p, ..., s_{L-1}, grid / prod(s)].
    """

    def __init__(self, token_grid: tuple[int, ...], strides: list[tuple[int, ...]]):
        dims, levels = len(token_grid), len(strides)
        self.base = tuple(g // math.prod(s[d] for s in strides) for d, g in enumerate(token_grid))
        # Spatial view per dim d: [base_d, s_{L-1,d}, ..., s_{0,d}].
        self.spatial_view = [n for d in range(dims) for n in (self.base[d], *(s[d] for s in reversed(strides)))]
        offset_axes = [1 + d * (levels + 1) + levels - lv for lv in range(levels) for d in range(dims)]
        self.unroll_order = [0, *offset_axes, *(1 + d * (levels + 1) for d in range(dims)), 1 + len(self.spatial_view)]
        self.plans = {}
        for done in range(levels + 1):
            remaining = strides[done:]
            offsets = [s[d] for s in remaining for d in range(dims)]  # level-major, as laid out
            unit = [math.prod(s[d] for s in remaining) for d in range(dims)]
            # Axis of offset (level lv, dim d) in the view [B, *offsets, units..., C], finest last per dim.
            per_dim = [[1 + (lv - done) * dims + d for lv in reversed(range(done, levels))] for d in range(dims)]
            units_axis = 1 + len(offsets)
            sparse_order = [0, units_axis, *sum(per_dim, []), units_axis + 1]
            dense_order = [0, *sum(([units_axis + d, *per_dim[d]] for d in range(dims)), []), units_axis + dims]
            grid_now = [b * u for b, u in zip(self.base, unit)]
            self.plans[done] = (offsets, unit, sparse_order, dense_order, grid_now)

    def unroll(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] tokens in spatial order -> [B, N, C] unrolled."""
        B, N, C = x.shape
        return x.view(B, *self.spatial_view, C).permute(self.unroll_order).reshape(B, N, C)

    def reroll(self, x: torch.Tensor, done: int, sparse: bool = False) -> torch.Tensor:
        """Unrolled tokens after `done` poolings -> spatial order.

        Dense: [B, N, C] -> [B, *grid_now, C]. Sparse (masked units dropped): [B, N, C] ->
        [B, #kept units, *unit_shape_now, C], units in ascending index order.
        """
        B, C = x.shape[0], x.shape[-1]
        offsets, unit, sparse_order, dense_order, grid_now = self.plans[done]
        if sparse:
            return x.view(B, *offsets, -1, C).permute(sparse_order).reshape(B, -1, *unit, C)
        return x.view(B, *offsets, *self.base, C).permute(dense_order).reshape(B, *grid_now, C)


class MaskUnitAttention(nn.Module):
    """Attention within mask units (or global), with optional max-pooling of q over the leading offsets."""

    def __init__(self, dim: int, dim_out: int, heads: int, q_stride: int = 1, window_size: int = 0,
                 use_mask_unit_attn: bool = False):
        super().__init__()
        self.dim_out, self.heads, self.q_stride = dim_out, heads, q_stride
        self.head_dim = dim_out // heads
        self.window_size, self.use_mask_unit_attn = window_size, use_mask_unit_attn
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] unrolled -> [B, N / q_stride, dim_out]."""
        B, N, _ = x.shape
        windows = N // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1
        tokens = N // windows
        # Windows move into the batch before the projection, where the tensor is a third of qkv's size; q, k
        # and v are then strided 4-D views [B * windows, heads, tokens, head_dim] that SDPA's fused CPU kernel
        # takes as they are (a 5-D layout would fall back to the slow math kernel); `attention` copies them
        # contiguous where the q/k/v layout says so (`set_qkv_layout`).
        x = x.view(B, tokens, windows, -1).transpose(1, 2).reshape(B * windows, tokens, -1)
        qkv = self.qkv(x).view(B * windows, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_stride > 1:
            q = q.unflatten(2, (self.q_stride, -1)).amax(dim=2)
        x = attention(q, k, v)
        x = x.view(B, windows, self.heads, -1, self.head_dim).permute(0, 3, 1, 2, 4).reshape(B, -1, self.dim_out)
        return self.proj(x)


class HieraBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, heads: int, mlp_ratio: float, drop_path: float,
                 q_stride: int, window_size: int, use_mask_unit_attn: bool):
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MaskUnitAttention(dim, dim_out, heads, q_stride, window_size, use_mask_unit_attn)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N / q_stride, dim_out]."""
        x_norm = self.norm1(x)
        if self.dim != self.dim_out:
            # The residual at a dim change is the projection of the *normed* input, pooled like q.
            x = max_pool_unrolled(self.proj(x_norm), self.attn.q_stride)
        x = x + self.drop_path(self.attn(x_norm))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, (T,) H, W] -> [B, N, C0] in spatial order."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Head(nn.Module):
    """Dropout + linear classifier on pooled features; returns logits (the official one softmaxes in eval)."""

    def __init__(self, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.dropout(x))


def init_transformer_weights(model: nn.Module, head_init_scale: float) -> None:
    """The official Hiera / MViT init: trunc-normal 0.02 weights, biases and LayerNorm shifts 0.02, and a
    classifier head scaled down by `head_init_scale`."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0.02)
            nn.init.constant_(m.weight, 1.0)
    if isinstance(model.head, Head):
        model.head.projection.weight.data.mul_(head_init_scale)
        model.head.projection.bias.data.mul_(head_init_scale)


class Hiera(nn.Module):
    foreign_key_prefixes = MAE_ONLY_KEY_PREFIXES
    _no_split_modules = ("HieraBlock",)  # FSDP's unit of sharding (accelerate's TRANSFORMER_BASED_WRAP)
    mae_defaults = {"q_pool": 2, "num_classes": 0}  # MAE keeps stages 3 and 4 at one resolution

    def __init__(self, config: HieraConfig):
        super().__init__()
        self.config = cfg = config
        self.token_grid = cfg.token_grid
        self.mask_unit_grid = cfg.mask_unit_grid
        self.stage_ends = cfg.stage_ends
        self.mu_size = math.prod(cfg.mask_unit_size)
        self.q_pool_blocks = [end + 1 for end in self.stage_ends[: cfg.q_pool]]
        flat_q_stride = math.prod(cfg.q_stride)

        conv = (nn.Conv2d, nn.Conv3d)[len(cfg.input_size) - 2]
        self.patch_embed = PatchEmbed(conv(cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride,
                                           cfg.patch_padding))
        if cfg.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, math.prod(self.token_grid[1:]), cfg.embed_dim))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.token_grid[0], cfg.embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.token_grid), cfg.embed_dim))
        self.unroller = Unroll(self.token_grid, [cfg.q_stride] * (len(cfg.stages) - 1))

        depth = sum(cfg.stages)
        drop_path = [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        dim, heads, stage, window = cfg.embed_dim, cfg.num_heads, 0, self.mu_size
        self.blocks = nn.ModuleList()
        for i in range(depth):
            dim_out = dim
            # The flag is read before the stage counter moves: the first block of a stage keeps the
            # previous stage's attention kind (the official "lag by 1 block").
            use_mask_unit_attn = cfg.mask_unit_attn[stage]
            if i - 1 in self.stage_ends:
                dim_out, heads, stage = int(dim * cfg.dim_mul), int(heads * cfg.head_mul), stage + 1
                if i in self.q_pool_blocks:
                    window //= flat_q_stride
            q_stride = flat_q_stride if i in self.q_pool_blocks else 1
            self.blocks.append(HieraBlock(dim, dim_out, heads, cfg.mlp_ratio, drop_path[i], q_stride, window,
                                          use_mask_unit_attn))
            dim = dim_out
        self.num_features = dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = Head(dim, cfg.num_classes, cfg.head_dropout) if cfg.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed_spatial, self.pos_embed_temporal) if self.config.sep_pos_embed else (self.pos_embed,):
            nn.init.trunc_normal_(p, std=0.02)
        init_transformer_weights(self, self.config.head_init_scale)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter layers, for layer-wise lr decay: the stem (patch_embed, pos_embed) is
        layer 0, block i is layer i + 1, the final norm and the head come last (REFERENCE.md §4)."""
        return {"stem": r"^patch_embed|^pos_embed", "blocks": [(r"^blocks\.(\d+)", None)]}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed_spatial", "pos_embed_temporal"} if self.config.sep_pos_embed else {"pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (timm's method name; see `run_block`)."""
        self.grad_checkpointing = enable

    def get_pos_embed(self) -> torch.Tensor:
        """[1, N, C] in spatial order."""
        if self.config.sep_pos_embed:
            return (self.pos_embed_temporal[:, :, None] + self.pos_embed_spatial[:, None]).flatten(1, 2)
        return self.pos_embed

    def stage_pool_counts(self) -> list[int]:
        """How many poolings have happened by the end of each stage."""
        return [min(i, self.config.q_pool) for i in range(len(self.config.stages))]

    def embed(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels [B, C, (T,) H, W] -> unrolled tokens [B, N, C0]; with `keep_idx` [B, K] (ascending mask-unit
        indices) only the kept units: [B, mu_size * K, C0]. Masked pixels are zeroed before the overlapping
        patch conv so they cannot leak into kept tokens."""
        B = x.shape[0]
        if keep_idx is not None:
            keep = torch.zeros(B, self.config.num_mask_units, device=x.device, dtype=x.dtype)
            keep = keep.scatter(1, keep_idx, 1.0).view(B, 1, *self.mask_unit_grid)
            x = x * F.interpolate(keep, size=x.shape[2:])
        x = self.patch_embed(x)
        x = self.unroller.unroll(x + self.get_pos_embed())
        if keep_idx is None:
            return x
        C, K = x.shape[-1], keep_idx.shape[1]
        x = x.view(B, self.mu_size, -1, C)
        return x.gather(2, keep_idx[:, None, :, None].expand(B, self.mu_size, K, C)).reshape(B, -1, C)

    def forward_stages(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The output of every stage, unrolled: [B, N_s, C_s]."""
        x = self.embed(x, keep_idx)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, checkpointed=self.grad_checkpointing)
            if i in self.stage_ends:
                outputs.append(x)
        return outputs

    @property
    def stage_dims(self) -> list[int]:
        return [self.blocks[end].dim_out for end in self.stage_ends]

    @property
    def stage_unit_shapes(self) -> list[tuple[int, ...]]:
        """Tokens per mask unit at the end of each stage."""
        unit, stride = self.config.mask_unit_size, self.config.q_stride
        return [tuple(u // s**done for u, s in zip(unit, stride)) for done in self.stage_pool_counts()]

    def forward_mask_units(self, x: torch.Tensor, keep_idx: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs of the kept units [B, K] (ascending): [B, K, *unit_shape_s, C_s] per stage."""
        stages = self.forward_stages(x, keep_idx)
        return [self.unroller.reroll(s, done, sparse=True) for s, done in zip(stages, self.stage_pool_counts())]

    def forward_intermediates(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stage outputs in spatial order: [B, (T,) H_s, W_s, C_s]; with `mask` [B, #MU] bool (True = keep),
        [B, #kept, *unit_shape_s, C_s]."""
        if mask is not None:
            return self.forward_mask_units(x, mask_to_keep_indices(mask))
        return [self.unroller.reroll(s, done) for s, done in zip(self.forward_stages(x), self.stage_pool_counts())]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, (T,) H, W] -> pooled, normed features [B, num_features]."""
        return self.norm(self.forward_stages(x)[-1].mean(dim=1))

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward pass: (forward_features [B, num_features], every stage's tokens averaged [B, C_s])."""
        pooled = [s.mean(dim=1) for s in self.forward_stages(x)]
        return self.norm(pooled[-1]), pooled

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, (T,) H, W] -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official or timm keys -> ours; position embeddings resampled to this model's token grid."""
        renamed = {}
        for key, value in state_dict.items():
            key = key.replace("head.fc.", "head.projection.")
            if key.startswith("head.norm."):
                key = key[len("head."):]
            renamed[key] = value
        for key, target in self.state_dict().items():
            if key.startswith("pos_embed") and key in renamed and renamed[key].shape != target.shape:
                renamed[key] = self._resample_pos_embed(key, renamed[key])
        return renamed

    def _resample_pos_embed(self, key: str, pos: torch.Tensor) -> torch.Tensor:
        """Interpolate a [1, N, C] embedding: bicubic over a square spatial grid, linear over time."""
        if key == "pos_embed_temporal":
            resized = F.interpolate(pos.transpose(1, 2), size=self.token_grid[0], mode="linear", align_corners=False)
            return resized.transpose(1, 2)
        grid = self.token_grid[-2:]
        if key == "pos_embed" and len(self.token_grid) == 3:
            raise ValueError("a single pos_embed cannot be resampled to a video grid; use sep_pos_embed")
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise ValueError(f"{key}: cannot resample {pos.shape[1]} positions (not a square grid) to {grid}")
        return resample_abs_pos_embed(pos, list(grid), [side, side], num_prefix_tokens=0)


def mask_to_keep_indices(mask: torch.Tensor, num_keep: int | None = None) -> torch.Tensor:
    """[B, #MU] bool (True = keep, the same count per sample) -> ascending kept indices [B, num_keep].

    Without `num_keep` the count is read on the host; the MAE passes its static count instead.
    """
    num_keep = int(mask[0].sum()) if num_keep is None else num_keep
    order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :num_keep]
    return order.sort(dim=1).values


_IMAGE = dict(input_size=(224, 224))
_VIDEO = dict(input_size=(16, 224, 224), num_classes=400, q_stride=(1, 2, 2), mask_unit_size=(1, 8, 8),
              patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), sep_pos_embed=True)
_SIZES = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4)),
    "huge": dict(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4)),
}
for _size, _arch in _SIZES.items():
    register_model(f"hiera_{_size}_224", Hiera, HieraConfig(**_IMAGE, **_arch))
    if _size not in ("tiny", "small"):
        register_model(f"hiera_{_size}_16x224", Hiera, HieraConfig(**_VIDEO, **_arch), KINETICS)
