"""Reconstruction targets for masked autoencoders: pixels (optionally norm-pix) and HOG (MaskFeat), one row per
decoder token, with the official Hiera flatten orders so that released MAE checkpoints give the same loss.

Images [B, C, H, W] -> [B, (H/p)(W/p), C*p*p] flattened (C, py, px).
Video [B, C, T, H, W] -> one frame per temporal token (x[:, :, ::time_stride]) -> [B, T'(H/p)(W/p), p*p*C]
flattened (py, px, C): an upstream quirk that the released video checkpoints were trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORM_PIX_EPS = 1e-6


def patchify(x: torch.Tensor, patch: int, time_stride: int = 1) -> torch.Tensor:
    """Pixels -> [B, N, D] patch rows in the official flatten order (see module docstring)."""
    if x.dim() == 4:
        B, C, H, W = x.shape
        x = x.view(B, C, H // patch, patch, W // patch, patch)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)
    x = x[:, :, ::time_stride]
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(B, T * (H // patch) * (W // patch), patch * patch * C)


def unpatchify(rows: torch.Tensor, patch: int, grid: tuple[int, ...], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: [B, N, D] -> [B, C, H, W] for a 2-D token grid, [B, C, T', H, W] for 3-D."""
    B = rows.shape[0]
    if len(grid) == 2:
        gh, gw = grid
        x = rows.view(B, gh, gw, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, channels, gh * patch, gw * patch)
    gt, gh, gw = grid
    x = rows.view(B, gt, gh, gw, patch, patch, channels).permute(0, 6, 1, 2, 4, 3, 5)
    return x.reshape(B, channels, gt, gh * patch, gw * patch)


def patch_statistics(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased variance: [B, N, D] -> ([B, N, 1], [B, N, 1])."""
    return rows.mean(dim=-1, keepdim=True), rows.var(dim=-1, keepdim=True)


def norm_pix(rows: torch.Tensor) -> torch.Tensor:
    mean, var = patch_statistics(rows)
    return (rows - mean) / (var + NORM_PIX_EPS) ** 0.5


def denorm_pix(pred: torch.Tensor, original_rows: torch.Tensor) -> torch.Tensor:
    """Undo norm-pix on predictions with the true statistics of the original patches."""
    mean, var = patch_statistics(original_rows)
    return pred * (var + NORM_PIX_EPS) ** 0.5 + mean


def gaussian_window(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[size, size] Gaussian of std size // 2, summing to 1 (MaskFeat's `get_gkern(size, size // 2)`)."""
    n = torch.arange(size, device=device, dtype=dtype)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    window = torch.outer(g, g)
    return window / window.sum()


def hog_features(images: torch.Tensor, bins: int = 9, cell: int = 8, window: int = 16) -> torch.Tensor:
    """MaskFeat HOG: [B, C, H, W] -> [B, C, bins, H/cell, W/cell].

    Sobel gradients per channel; each pixel votes its gradient magnitude into one of `bins` unsigned
    orientation bins; votes are summed over cell x cell pixels and L2-normalised per cell over the bins.
    With `window` (MaskFeat / SlowFast `HOGLayerC(gaussian_window=16)`; 0: none), the magnitudes are first
    weighted by a window x window Gaussian tiled over the image, so that each window's centre counts most
    (a size that is not a multiple of the window gets the tiling cut at the border, where SlowFast asserts).
    """
    B, C, H, W = images.shape
    # Built on the device: a tensor copied from the host would stall the GPU stream every step.
    offsets = torch.arange(-1.0, 2.0, device=images.device, dtype=images.dtype)  # [-1, 0, 1]
    sobel_x = torch.outer(2 - offsets.abs(), -offsets)  # [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None].repeat(C, 1, 1, 1)  # [2C, 1, 3, 3]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    grads = F.conv2d(padded, kernels, groups=C).view(B, C, 2, H, W)
    gx, gy = grads[:, :, 0], grads[:, :, 1]
    magnitude = torch.sqrt(gx * gx + gy * gy)
    if window:
        tiles = gaussian_window(window, images.device, images.dtype).repeat(-(-H // window), -(-W // window))
        magnitude = magnitude * tiles[:H, :W]
    phase = torch.atan2(gx, gy) / math.pi * bins  # in [-bins, bins]: unsigned orientations fold modulo bins
    bin_index = torch.floor(phase).long().remainder(bins)
    votes = torch.zeros(B, C, bins, H, W, device=images.device, dtype=images.dtype)
    votes.scatter_add_(2, bin_index[:, :, None], magnitude[:, :, None])
    cells = votes.view(B, C, bins, H // cell, cell, W // cell, cell).sum(dim=(4, 6))
    return F.normalize(cells, p=2, dim=2)


def hog_targets(x: torch.Tensor, patch: int, time_stride: int = 1, bins: int = 9, cell: int = 8,
                window: int = 16) -> torch.Tensor:
    """HOG per decoder token: images [B, C, H, W] or video [B, C, T, H, W] (time-strided like the pixels)
    -> [B, N, C * bins * (patch / cell)^2]."""
    if x.dim() == 5:
        x = x[:, :, ::time_stride]
        B, C, T = x.shape[:3]
        frames = x.transpose(1, 2).reshape(B * T, C, *x.shape[3:])
        return hog_targets(frames, patch, bins=bins, cell=cell, window=window).view(
            B, -1, C * bins * (patch // cell) ** 2)
    B, C, H, W = x.shape
    per = patch // cell
    cells = hog_features(x, bins, cell, window).view(B, C, bins, H // patch, per, W // patch, per)
    return cells.permute(0, 3, 5, 1, 2, 4, 6).reshape(B, (H // patch) * (W // patch), C * bins * per * per)
