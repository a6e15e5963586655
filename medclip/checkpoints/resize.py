"""Position-embedding interpolation matching PyTorch's bicubic `interpolate(align_corners=False)`.

transformers resizes CLIP position grids with torch's bicubic kernel (a = -0.75, border clamped);
`jax.image.resize` uses a = -0.5, so a model fine-tuned at another resolution would start from
slightly different embeddings than the PyTorch one. Done once at load time in NumPy.
"""

from __future__ import annotations

import numpy as np

_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t, shape (n, 4)."""
    x = np.stack([t + 1, t, 1 - t, 2 - t], axis=-1)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return np.where(x <= 1, near, far)


def _resize_axis(values: np.ndarray, new_size: int, axis: int) -> np.ndarray:
    old_size = values.shape[axis]
    src = (np.arange(new_size) + 0.5) * (old_size / new_size) - 0.5
    floor = np.floor(src)
    weights = _cubic_weights(src - floor)  # (new, 4)
    taps = np.clip(floor[:, None].astype(int) + np.arange(-1, 3)[None], 0, old_size - 1)  # (new, 4)
    moved = np.moveaxis(values, axis, 0)  # (old, ...)
    gathered = moved[taps]  # (new, 4, ...)
    out = np.einsum("nk,nk...->n...", weights, gathered)
    return np.moveaxis(out, 0, axis)


def resize_position_embeddings(table: np.ndarray, new_num_positions: int) -> np.ndarray:
    """Resizes a CLIP table (1 + grid^2, dim) to (new_num_positions, dim), keeping the CLS row."""
    old_grid = int(round((table.shape[0] - 1) ** 0.5))
    new_grid = int(round((new_num_positions - 1) ** 0.5))
    if old_grid ** 2 + 1 != table.shape[0] or new_grid ** 2 + 1 != new_num_positions:
        raise ValueError(f"position table of {table.shape[0]} rows cannot be resized to {new_num_positions}: "
                         "both must be 1 + a square grid")
    grid = table[1:].astype(np.float64).reshape(old_grid, old_grid, -1)
    grid = _resize_axis(_resize_axis(grid, new_grid, 0), new_grid, 1)
    return np.concatenate([table[:1], grid.reshape(new_grid ** 2, -1).astype(table.dtype)], axis=0)
