"""Masked-unit autoencoder over any hierarchical encoder (Hiera; MViTv2 via separate-and-pad).

The encoder sees only the kept mask units. Keep indices drive gather/scatter, never boolean indexing, so
every shape is static and `torch.compile(fullgraph=True)` traces forward and backward in one graph.
Stage outputs at distinct resolutions are fused per mask unit (multi-scale fusion), a light decoder fills in
mask tokens and predicts pixels (norm-pix or plain) or HOG features of every token; the loss is the mean
squared error over masked tokens. Parameter names follow the official Hiera MAE, with the encoder's under
`encoder.`, so official MAE checkpoints load after a prefix rename.

An encoder plugs in by providing `config.{input_size, mask_unit_grid, num_mask_units}`, `stage_dims`,
`stage_unit_shapes` (tokens per mask unit and stage) and `forward_mask_units(x, keep_idx)` returning
[B, K, *unit_shape_s, C_s] per stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hiera import MAE_ONLY_KEY_PREFIXES, HieraBlock, mask_to_keep_indices, run_block
from .registry import ModelConfigError, create_model, model_class, register_prefix, replace_config
from .targets import denorm_pix, hog_targets, norm_pix, patchify, unpatchify


@dataclass(frozen=True)
class MAEConfig:
    mask_ratio: float | None = None  # None: 0.6 for images, 0.9 for video
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    target: str = "pixel"  # "pixel" or "hog"
    norm_pix_loss: bool = True
    hog_bins: int = 9
    hog_cell: int = 8
    hog_window: int = 16  # MaskFeat's Gaussian weighting of the magnitudes (0: none)

    def __post_init__(self):
        if self.target not in ("pixel", "hog"):
            raise ModelConfigError(f"MAE target must be 'pixel' or 'hog', not {self.target!r}")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ModelConfigError(f"mask_ratio must be in [0, 1), not {self.mask_ratio}")


def random_keep_indices(batch: int, num_units: int, num_keep: int, device: torch.device,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random kept units per sample: ascending indices [B, num_keep]."""
    noise = torch.rand(batch, num_units, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values


class MaskedAutoencoder(nn.Module):
    @property
    def _no_split_modules(self) -> tuple[str, ...]:
        """FSDP's units of sharding: the encoder's blocks and the decoder's."""
        return (*self.encoder._no_split_modules, "HieraBlock")

    def __init__(self, encoder: nn.Module, config: MAEConfig):
        super().__init__()
        # The fused features get their own `encoder_norm`; the classifier norm would be an unused parameter.
        encoder.norm = nn.Identity()
        self.encoder, self.config = encoder, config
        enc = encoder.config
        self.is_video = len(enc.input_size) == 3
        self.mask_ratio = config.mask_ratio if config.mask_ratio is not None else (0.9 if self.is_video else 0.6)
        self.num_mask_units = enc.num_mask_units
        self.num_keep = int(self.num_mask_units * (1 - self.mask_ratio))
        if self.num_keep < 1:
            raise ModelConfigError(f"mask_ratio {self.mask_ratio} keeps no unit of {self.num_mask_units}: lower it "
                                   f"or use a larger input_size")
        self.mask_unit_grid = tuple(enc.mask_unit_grid)

        # Fuse each stage whose resolution differs from the next one, and the last stage.
        units, dims = encoder.stage_unit_shapes, encoder.stage_dims
        self.fused_stages = [s for s in range(len(units)) if s == len(units) - 1 or units[s] != units[s + 1]]
        self.unit_shape = tuple(units[-1])  # tokens per mask unit at the decoder
        conv = (nn.Conv2d, nn.Conv3d)[len(self.unit_shape) - 2]
        self.multi_scale_fusion_heads = nn.ModuleList()
        for s in self.fused_stages[:-1]:
            kernel = tuple(u // f for u, f in zip(units[s], self.unit_shape))
            self.multi_scale_fusion_heads.append(conv(dims[s], dims[-1], kernel_size=kernel, stride=kernel))
        self.encoder_norm = nn.LayerNorm(dims[-1], eps=1e-6)

        self.token_grid = tuple(g * u for g, u in zip(self.mask_unit_grid, self.unit_shape))
        D = config.decoder_embed_dim
        self.decoder_embed = nn.Linear(dims[-1], D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.token_grid), D))
        self.decoder_blocks = nn.ModuleList(
            HieraBlock(D, D, config.decoder_num_heads, config.decoder_mlp_ratio, 0.0, 1, 0, False)
            for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(D, eps=1e-6)

        # One target row per decoder token: a pred_stride² patch of one frame (time-strided for video).
        self.pred_stride = enc.input_size[-1] // self.token_grid[-1]
        self.time_stride = enc.input_size[0] // self.token_grid[0] if self.is_video else 1
        channels = enc.in_chans
        if config.target == "hog":
            out = channels * config.hog_bins * (self.pred_stride // config.hog_cell) ** 2
        else:
            out = channels * self.pred_stride ** 2
        self.decoder_pred = nn.Linear(D, out)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.zeros_(m.bias)
                nn.init.ones_(m.weight)
        patch_weight = self.encoder.patch_embed.proj.weight.data  # like a Linear, as the official MAE does
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token", "decoder_pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every encoder and decoder block (see models.hiera.run_block)."""
        self.encoder.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    # -- masks ---------------------------------------------------------------------------------------------
    def keep_indices(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Ascending kept-unit indices [B, num_keep], random or from `mask` [B, #MU] bool (True = keep)."""
        if mask is None:
            return random_keep_indices(x.shape[0], self.num_mask_units, self.num_keep, x.device)
        if not torch.compiler.is_compiling() and mask.device.type == "cpu" and (mask.sum(1) != self.num_keep).any():
            raise ValueError(f"every mask must keep exactly {self.num_keep} of {self.num_mask_units} units "
                             f"(mask_ratio {self.mask_ratio}); got {mask.sum(1).tolist()}")
        return mask_to_keep_indices(mask, self.num_keep)

    def keep_mask(self, keep_idx: torch.Tensor) -> torch.Tensor:
        """[B, K] indices -> [B, #MU] bool, True = visible."""
        mask = torch.zeros(keep_idx.shape[0], self.num_mask_units, dtype=torch.bool, device=keep_idx.device)
        return mask.scatter(1, keep_idx, True)

    def token_mask(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """[B, #MU] -> [B, N_tokens] in the decoder's spatial order."""
        B = unit_mask.shape[0]
        grid = unit_mask.view(B, 1, *self.mask_unit_grid).float()
        return F.interpolate(grid, size=self.token_grid).view(B, -1) > 0.5

    # -- model -----------------------------------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Pixels and kept units [B, K] -> fused latents [B, K, *unit_shape, C_enc]."""
        stages = self.encoder.forward_mask_units(x, keep_idx)
        terms = [self._per_unit(head, stages[s]) for head, s in zip(self.multi_scale_fusion_heads, self.fused_stages)]
        terms.append(stages[self.fused_stages[-1]])
        return self.encoder_norm(sum(terms[1:], terms[0]))  # summed in stage order, like the official

    @staticmethod
    def _per_unit(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Apply a conv to each mask unit: [B, K, *unit, C] -> [B, K, *unit', C']."""
        B, K = x.shape[:2]
        spatial = list(range(1, x.dim() - 2))
        y = conv(x.reshape(B * K, *x.shape[2:]).permute(0, x.dim() - 2, *spatial))
        return y.permute(0, *[d + 1 for d in spatial], 1).reshape(B, K, *y.shape[2:], y.shape[1])

    def forward_decoder(self, latent: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """[B, K, *unit_shape, C_enc] -> predictions [B, N_tokens, D_pred] in spatial order."""
        B, K = keep_idx.shape
        x = self.decoder_embed(latent).flatten(2, -2)  # [B, K, U, D]
        U, D = x.shape[2], x.shape[3]
        full = self.mask_token.to(x.dtype).expand(B, self.num_mask_units, U, D)  # autocast: x is bf16/fp16
        x = full.scatter(1, keep_idx[:, :, None, None].expand(B, K, U, D), x)
        # [B, #MU, *unit, D] -> [B, *token_grid, D]: interleave unit-grid and in-unit coordinates per dim.
        dims = len(self.unit_shape)
        x = x.view(B, *self.mask_unit_grid, *self.unit_shape, D)
        order = [0] + [a for d in range(dims) for a in (1 + d, 1 + dims + d)] + [1 + 2 * dims]
        x = x.permute(order).reshape(B, -1, D) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = run_block(block, x, checkpointed=self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled last stage on unmasked input [B, C, (T,) H, W] -> [B, C_enc]: what fine-tuning
        starts from (the MAE replaces the classifier norm by an identity), and what the k-NN monitor measures."""
        return self.encoder.forward_features(x)

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction targets [B, N_tokens, D_pred] (computed without gradient, in fp32 also under
        autocast: HOG's orientation bins and norm-pix's statistics need the precision)."""
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.config.target == "hog":
                return hog_targets(x, self.pred_stride, self.time_stride, self.config.hog_bins, self.config.hog_cell,
                                   self.config.hog_window)
            rows = patchify(x, self.pred_stride, self.time_stride)
            return norm_pix(rows) if self.config.norm_pix_loss else rows

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, keep_idx: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x: [B, C, (T,) H, W]; mask: [B, #MU] bool, True = keep (official convention), or keep_idx [B, K];
        valid: [B] bool, False for rows left out of the loss (stand-ins for samples that failed to load); the
        loss of a batch without valid rows is 0, with gradients, so that data-parallel steps stay in step.

        Returns loss (scalar), pred and target [B, N_tokens, D_pred], mask [B, #MU] (True = visible) and
        token_mask [B, N_tokens] (True = visible).
        """
        if keep_idx is None:
            keep_idx = self.keep_indices(x, mask)
        pred = self.forward_decoder(self.forward_encoder(x, keep_idx), keep_idx)
        target = self.targets(x)
        unit_mask = self.keep_mask(keep_idx)
        token_mask = self.token_mask(unit_mask)
        weight = (~token_mask).float()  # its sum overflows fp16 past 65504 masked tokens
        if valid is not None:
            weight = weight * valid[:, None]
        per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
        loss = (per_token * weight).sum() / weight.sum().clamp(min=1)
        return {"loss": loss, "pred": pred, "target": target, "mask": unit_mask, "token_mask": token_mask}

    # -- checkpoints and reconstructions ---------------------------------------------------------------------
    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official MAE keys (encoder at the top level) -> ours (encoder under `encoder.`)."""
        if any(k.startswith("encoder.") for k in state_dict):
            return state_dict
        own = {k: v for k, v in state_dict.items() if k.startswith(MAE_ONLY_KEY_PREFIXES)}
        encoder = self.encoder.adapt_state_dict({k: v for k, v in state_dict.items() if k not in own})
        return own | {f"encoder.{k}": v for k, v in encoder.items()}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under its own names, for export and fine-tuning."""
        return self.encoder.state_dict()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pixel-space views of one forward's output, for the viewer. All [B, C, (T',) H, W], where video is
        time-strided like the targets: `original`, `masked` (masked units zeroed: the dataset mean once
        unnormalised), `reconstruction` (the prediction everywhere; norm-pix undone with the true patch
        statistics) and `pasted` (visible units from the original, masked ones from the prediction).
        HOG targets give no reconstruction."""
        rows = patchify(x, self.pred_stride, self.time_stride)
        grid = self.token_grid
        visible = out["token_mask"][..., None].to(rows.dtype)
        views = {"original": unpatchify(rows, self.pred_stride, grid, x.shape[1]),
                 "masked": unpatchify(rows * visible, self.pred_stride, grid, x.shape[1])}
        if self.config.target == "pixel":
            pred = out["pred"].to(rows.dtype)
            pred = denorm_pix(pred, rows) if self.config.norm_pix_loss else pred
            views["reconstruction"] = unpatchify(pred, self.pred_stride, grid, x.shape[1])
            views["pasted"] = unpatchify(rows * visible + pred * (1 - visible), self.pred_stride, grid, x.shape[1])
        return views


def build_mae(encoder_name: str, **overrides) -> MaskedAutoencoder:
    """`create_model("mae_" + encoder_name, ...)`: MAEConfig fields go to the MAE, the rest to the encoder."""
    mae_fields = set(MAEConfig.__dataclass_fields__)
    mae_config = replace_config(MAEConfig(), f"mae_{encoder_name}",
                                **{k: v for k, v in overrides.items() if k in mae_fields})
    encoder_cls = model_class(encoder_name)
    encoder_overrides = {**getattr(encoder_cls, "mae_defaults", {}),
                         **{k: v for k, v in overrides.items() if k not in mae_fields}}
    return MaskedAutoencoder(create_model(encoder_name, **encoder_overrides), mae_config)


register_prefix("mae_", build_mae)
