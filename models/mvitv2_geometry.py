"""Token-grid geometry of MViTv2: pooled grid sizes, windows and mask units, relative-position distances.

Tokens lie row-major over a grid ([T,] H, W). In a masked (sparse) forward only the kept mask units' tokens
exist, unit-major: unit after unit, row-major within a unit; `KeptUnits` says where each unit lies, so every
token keeps its true coordinates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

Grid = tuple[int, ...]


def pool_padding(kernel: Grid, stride: Grid) -> Grid:
    # The published kernels pad by k // 2; kernel = stride tiles the grid exactly and pads nothing.
    return tuple(0 if k == s else k // 2 for k, s in zip(kernel, stride))


def pooled_grid(grid: Grid, kernel: Grid | None, stride: Grid) -> Grid:
    if kernel is None:
        return grid
    return tuple((g + 2 * p - k) // s + 1 for g, k, s, p in zip(grid, kernel, stride, pool_padding(kernel, stride)))


def to_windows(x: torch.Tensor, grid: Grid, window: Grid) -> torch.Tensor:
    """[B, X, prod(grid), C] -> [B, X * #windows, prod(window), C]: each window becomes a batch entry."""
    B, X, _, C = x.shape
    split = [n for g, w in zip(grid, window) for n in (g // w, w)]
    x = x.reshape(B, X, *split, C)
    dims = len(grid)
    order = [0, 1] + [2 + 2 * d for d in range(dims)] + [3 + 2 * d for d in range(dims)] + [2 + 2 * dims]
    return x.permute(order).reshape(B, -1, math.prod(window), C)


def from_windows(x: torch.Tensor, X: int, counts: Grid, window: Grid) -> torch.Tensor:
    """[B, X * prod(counts), prod(window), C] -> [B, X, prod(counts * window), C] in spatial order."""
    B, C, dims = x.shape[0], x.shape[-1], len(window)
    x = x.reshape(B, X, *counts, *window, C)
    order = [0, 1] + [n for d in range(dims) for n in (2 + d, 2 + dims + d)] + [2 + 2 * dims]
    return x.permute(order).reshape(B, X, -1, C)


def gather_units(x: torch.Tensor, grid: Grid, unit: Grid, keep_idx: torch.Tensor) -> torch.Tensor:
    """Tokens [B, prod(grid), C] in spatial order -> the kept units' tokens [B, K, prod(unit), C]."""
    units = to_windows(x[:, None], grid, unit)
    K, U, C = keep_idx.shape[1], units.shape[2], units.shape[3]
    return units.gather(1, keep_idx[:, :, None, None].expand(-1, K, U, C))


def rel_pos_table(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """[L, C] table -> [2 * max(q_size, k_size) - 1, C], linearly interpolated if it has another length (another
    input size)."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear").squeeze(0).T
    return table


def rel_pos_distance(q_pos: torch.Tensor, k_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """Table rows of the scaled distances between query and key coordinates (broadcast) along one dimension."""
    q_ratio, k_ratio = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    return (q_pos * q_ratio - k_pos * k_ratio + (k_size - 1) * k_ratio).long()


def rel_pos_lookup(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """[L, C] table -> [q_size, k_size, C] embeddings of all query-key distances of a dense grid."""
    q_pos = torch.arange(q_size, device=table.device)[:, None]
    k_pos = torch.arange(k_size, device=table.device)[None, :]
    return rel_pos_table(table, q_size, k_size)[rel_pos_distance(q_pos, k_pos, q_size, k_size)]


class KeptUnits(NamedTuple):
    """Where the kept mask units of a sparse (MAE) forward lie: `coords` [B, K, dims] is each kept unit's place
    in the mask-unit grid `unit_grid`. Their tokens are laid out unit-major, row-major within a unit."""

    coords: torch.Tensor
    unit_grid: Grid

    @classmethod
    def from_indices(cls, keep_idx: torch.Tensor, unit_grid: Grid) -> KeptUnits:
        """keep_idx [B, K]: indices into the row-major mask-unit grid."""
        strides = [math.prod(unit_grid[d + 1:]) for d in range(len(unit_grid))]
        return cls(torch.stack([keep_idx // s % g for s, g in zip(strides, unit_grid)], dim=-1), unit_grid)

    def positions(self, unit: Grid) -> torch.Tensor:
        """[B, K * prod(unit), dims]: every kept token's coordinates in the full grid, units holding `unit`."""
        local = torch.stack(torch.meshgrid(*(torch.arange(u, device=self.coords.device) for u in unit),
                                           indexing="ij"), dim=-1).view(-1, len(unit))
        origin = torch.stack([self.coords[..., d] * u for d, u in enumerate(unit)], dim=-1)
        return (origin[:, :, None] + local).flatten(1, 2)

    def full_grid(self, unit: Grid) -> Grid:
        return tuple(g * u for g, u in zip(self.unit_grid, unit))


