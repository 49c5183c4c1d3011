"""Replacements for the ops of this project that have no deterministic CUDA kernel.

Under ``torch.use_deterministic_algorithms(True)`` (``--deterministic``) PyTorch refuses, on
CUDA, the backward of bilinear ``F.interpolate`` (atomic adds), ``cross_entropy`` / ``nll_loss``
of N x C x H x W logits with a ``sum`` or ``mean`` reduction and ``torch.histc``.  The functions
here take the fast kernel everywhere else and, in that case only (:func:`replacing`), a
deterministic equivalent: the interpolation's backward as two matrix products with its weight
matrices (the forward unchanged), the loss summed from its per-pixel values (utils/metrics.py
counts classes by scatter-add instead of ``histc``); equal to the fast ops up to the order of
the sums.  CPU kernels are deterministic already and never change.  The plug-ins, which import
nothing of this repository, carry their own copy of the resize (inverseform/tiling.py,
rloss/loss.py).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Size = Union[int, Sequence[int], None]
Scale = Union[float, Sequence[float], None]


def replacing(device: Union[str, torch.device]) -> bool:
    """Whether ops on ``device`` take the deterministic replacements: CUDA under
    ``torch.use_deterministic_algorithms(True)``."""
    return torch.device(device).type == "cuda" and torch.are_deterministic_algorithms_enabled()


def _pair(value) -> Tuple:
    if value is None:
        return (None, None)
    if isinstance(value, (int, float)):
        return (value, value)
    return tuple(value)


def linear_weights(n_in: int, n_out: Optional[int], scale: Optional[float], align_corners: bool,
                   device: torch.device) -> torch.Tensor:
    """n_in x n_out float32 matrix W with ``interpolate(x)[o] = sum_i x[i] W[i, o]`` along one
    axis, taken from PyTorch's own 1-D linear interpolation of the identity (same weights)."""
    eye = torch.eye(n_in, dtype=torch.float32, device=device).unsqueeze(0)
    return F.interpolate(eye, size=n_out, scale_factor=scale, mode="linear", align_corners=align_corners)[0]


class _BilinearMatmulBackward(torch.autograd.Function):
    """``F.interpolate(mode='bilinear')`` forward; backward ``R^T G C`` with the row and column
    weight matrices (matrix products: no atomic adds)."""

    @staticmethod
    def forward(ctx, x, size, scale_factor, align_corners):
        out = F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners)
        ctx.shape = (x.shape[-2:], _pair(size), _pair(scale_factor), align_corners)
        return out

    @staticmethod
    def backward(ctx, grad):
        (height, width), sizes, scales, align_corners = ctx.shape
        rows = linear_weights(height, sizes[0], scales[0], align_corners, grad.device)   # H_in x H_out
        cols = linear_weights(width, sizes[1], scales[1], align_corners, grad.device)    # W_in x W_out
        return transposed_resize(grad, rows, cols), None, None, None


def transposed_resize(grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ grad @ cols^T`` per image and channel, in float32, as two matrix products whose
    batch folds into one (no per-channel copies of the weights)."""
    along_width = torch.matmul(grad.float(), cols.t())                           # N x C x H_out x W_in
    return torch.matmul(along_width.transpose(-1, -2), rows.t()).transpose(-1, -2).to(grad.dtype)


def bilinear_matmul_backward(x: torch.Tensor, size: Size = None, scale_factor: Scale = None,
                             align_corners: bool = False) -> torch.Tensor:
    """Bilinear interpolation whose backward is deterministic on every device (the replacement
    :func:`interpolate_bilinear` takes on CUDA in deterministic mode)."""
    return _BilinearMatmulBackward.apply(x, size, scale_factor, align_corners)


def interpolate_bilinear(x: torch.Tensor, size: Size = None, scale_factor: Scale = None,
                         align_corners: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size, scale_factor, mode='bilinear', align_corners)``, with a
    deterministic backward on CUDA in deterministic mode (same forward, bit for bit)."""
    if torch.is_grad_enabled() and x.requires_grad and replacing(x.device):
        return bilinear_matmul_backward(x, size, scale_factor, align_corners)
    return F.interpolate(x, size=size, scale_factor=scale_factor, mode="bilinear", align_corners=align_corners)


def summed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` reduced from its per-pixel values (deterministic on every device):
    ``sum``, or ``mean`` over the pixels whose target is not ``ignore_index``."""
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"summed_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    return total / (target != ignore_index).sum()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` (no class weights); deterministic on CUDA in deterministic mode,
    where the ``sum``/``mean`` of N x C x H x W logits has no deterministic kernel."""
    if reduction != "none" and logits.dim() > 2 and replacing(logits.device):
        return summed_cross_entropy(logits, target, ignore_index, reduction)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
