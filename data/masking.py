"""Random mask-unit masks, generated in the data workers from config values (no model import).

Convention (official Hiera): True = keep (visible). Exactly ``int(num_units * (1 - ratio))`` units are kept,
chosen as the lowest values of uniform noise, like the official ``get_random_mask``.
"""

from __future__ import annotations

import math

import numpy as np


def num_kept(grid: tuple[int, ...], ratio: float) -> int:
    return int(math.prod(grid) * (1 - ratio))


def random_mask(grid: tuple[int, ...], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """A mask [prod(grid)] bool over the mask-unit grid flattened in row-major (t, h, w) order.

    ``grid`` is the mask-unit grid, e.g. (8, 7, 7) for Hiera video at 16x224 or (7, 7) for images at 224.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    noise = rng.random(math.prod(grid))
    mask = np.zeros(noise.shape, dtype=bool)
    mask[np.argsort(noise, kind="stable")[: num_kept(grid, ratio)]] = True
    return mask
