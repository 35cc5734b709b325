"""Pictures of reconstructions: the shared renderer of the TensorBoard viewer and `pretrain.visualize`.

Each sample becomes rows of original | masked | reconstruction | reconstruction with the visible units
pasted back (the last two only for pixel targets). Video is shown as frame strips (one frame per temporal
token) and as an animation of the same panels side by side.
"""

from __future__ import annotations

import torch
from torchvision.utils import make_grid

PANELS = ("original", "masked", "reconstruction", "pasted")


def unnormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[B, 3, ...] normalised -> [0, 1]."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    std_, mean_ = (torch.tensor(v, device=x.device).view(shape) for v in (std, mean))
    return (x * std_ + mean_).clamp(0, 1)


def panels(views: dict[str, torch.Tensor], mean, std) -> list[torch.Tensor]:
    """The available views in panel order, in [0, 1]: each [B, 3, H, W] or [B, 3, T, H, W]."""
    return [unnormalize(views[name].float(), mean, std) for name in PANELS if name in views]


def image_grid(views: dict[str, torch.Tensor], mean, std) -> torch.Tensor:
    """Images: one row per sample, one column per panel -> [3, H', W']."""
    columns = panels(views, mean, std)
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # [B * panels, 3, H, W], row-major by sample
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


def frame_strips(views: dict[str, torch.Tensor], mean, std, sample: int) -> torch.Tensor:
    """Video: for one sample, one row per panel, one column per frame -> [3, H', W']."""
    columns = panels(views, mean, std)
    frames = torch.stack([c[sample].transpose(0, 1) for c in columns])  # [panels, T, 3, H, W]
    return make_grid(frames.flatten(0, 1), nrow=frames.shape[1], padding=2, pad_value=1.0)


def animation(views: dict[str, torch.Tensor], mean, std, sample: int) -> torch.Tensor:
    """Video: the panels of one sample side by side, per frame -> [T, 3, H, W']."""
    columns = panels(views, mean, std)
    clip = torch.cat([c[sample] for c in columns], dim=-1)  # [3, T, H, panels * W]
    return clip.transpose(0, 1)
