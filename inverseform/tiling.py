"""Cutting boundary maps into the regressor's tiles, without concatenation loops.

The reference resizes each map to (3T) x (6T) and concatenates the 18 tiles one by one
(a growing tensor copied 17 times). Here one bilinear resize and one reshape/permute
produce all tiles of the batch in a single tensor, ordered (image, tile row, tile column),
so per-tile results reshape straight back to N x rows x cols.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["resize_for_tiling", "image_to_tiles", "tiles_to_image"]


def resize_for_tiling(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of N x C x H x W maps to ``size`` = (H', W').

    Inputs of any size are accepted; a map already at ``size`` is returned as is.
    """
    if x.dim() != 4:
        raise ValueError(f"expected N x C x H x W maps, got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.is_cuda and torch.is_grad_enabled() and x.requires_grad and torch.are_deterministic_algorithms_enabled():
        return _DeterministicResize.apply(x, tuple(size))  # CUDA's own backward is refused there
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _DeterministicResize(torch.autograd.Function):
    """:func:`resize_for_tiling` with a deterministic backward (two matrix products with the
    interpolation weights instead of the CUDA kernel's atomic adds); the same forward."""

    @staticmethod
    def forward(ctx, x, size):
        ctx.in_size = tuple(x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad):
        rows, cols = (_linear_weights(n, m, grad.device) for n, m in zip(ctx.in_size, grad.shape[-2:]))
        along_width = torch.matmul(grad.float(), cols.t())  # 2-D right operands: the batch folds into one product
        return torch.matmul(along_width.transpose(-1, -2), rows.t()).transpose(-1, -2).to(grad.dtype), None


def _linear_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """n_in x n_out weights of 1-D linear interpolation (align_corners=False), PyTorch's own."""
    eye = torch.eye(n_in, device=device).unsqueeze(0)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]


def image_to_tiles(x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """N x C x (R*T) x (K*T) -> (N*R*K) x C x T x T, tile (n, r, k) at index (n*R + r)*K + k.

    Tile (n, r, k) is ``x[n, :, r*T:(r+1)*T, k*T:(k+1)*T]``.
    """
    if x.dim() != 4:
        raise ValueError(f"expected N x C x H x W maps, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h % tile_size or w % tile_size:
        raise ValueError(f"map of size {h} x {w} is not a whole number of {tile_size} x {tile_size} tiles")
    rows, cols = h // tile_size, w // tile_size
    tiles = x.reshape(n, c, rows, tile_size, cols, tile_size).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(n * rows * cols, c, tile_size, tile_size)


def tiles_to_image(tiles: torch.Tensor, n: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`image_to_tiles`: (N*R*K) x C x T x T -> N x C x (R*T) x (K*T)."""
    if tiles.dim() != 4 or tiles.shape[0] != n * rows * cols or tiles.shape[2] != tiles.shape[3]:
        raise ValueError(
            f"expected {n * rows * cols} x C x T x T tiles for a {n} x {rows} x {cols} grid, "
            f"got shape {tuple(tiles.shape)}")
    _, c, t, _ = tiles.shape
    grid = tiles.reshape(n, rows, cols, c, t, t).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, c, rows * t, cols * t)
