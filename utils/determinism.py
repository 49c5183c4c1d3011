"""Replacements for the ops of this project that have no deterministic CUDA kernel.

Under ``torch.use_deterministic_algorithms(True)`` (``--deterministic``) PyTorch refuses, on
CUDA, the backward of bilinear ``F.interpolate`` (atomic adds), ``cross_entropy`` / ``nll_loss``
of N x C x H x W logits with a ``sum`` or ``mean`` reduction and ``torch.histc``.  The functions
here take the fast kernel everywhere else and, in that case only (:func:`replacing`), a
deterministic equivalent: the interpolation's backward as two matrix products with its weight
matrices (the forward unchanged), the loss summed from its per-pixel values (utils/metrics.py
counts classes by scatter-add instead of ``histc``); equal to the fast ops up to the order of
the sums.  CPU kernels are deterministic already; on a CPU the interpolation's matrix-product
backward is taken anyway where it is the faster one (:func:`matmul_backward_pays_on_cpu`).
The plug-ins, which import nothing of this repository, carry their own copy of the resize
(inverseform/tiling.py, rloss/loss.py).
"""
from __future__ import annotations

import math
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


# ATen's CPU backward of bilinear upsampling scatters every output's gradient into its four
# inputs; the two dense products of transposed_resize cost 2 * W_in * (1 + H_in / W_out)
# multiply-adds per output instead, which a CPU's matrix kernel does faster while that stays
# small.  Measured on a 2-core Intel Xeon with AVX-512 (benchmarks/bench_resize.py,
# docs/benchmarks.md): 1.5-9x faster at the costs of the main job's resizes (9-34; 8.6x for its
# logits, stride 8 to the 128 x 256 crop), 4.4x at 66, 1.4x at 288, slower at 384 (no upsampling
# at all) and 576 (an axis of 512 inputs).
CPU_MATMUL_BACKWARD_MAX_COST = 320


def output_size(x: torch.Tensor, size: Size, scale_factor: Scale) -> Tuple[int, int]:
    """(H_out, W_out) of ``F.interpolate(x, size, scale_factor)``: ``size`` as given, else
    each input side times its scale, rounded down."""
    if size is not None:
        return tuple(int(s) for s in _pair(size))
    return tuple(int(math.floor(n * float(s))) for n, s in zip(x.shape[-2:], _pair(scale_factor)))


def matmul_backward_pays_on_cpu(in_size: Tuple[int, int], out_size: Tuple[int, int]) -> bool:
    """Whether the matrix-product backward beats ATen's on a CPU for this resize (its cost per
    output, 2 * W_in * (1 + H_in / W_out) multiply-adds, at most CPU_MATMUL_BACKWARD_MAX_COST)."""
    (h_in, w_in), (_, w_out) = in_size, out_size
    return w_in * (1 + h_in / w_out) <= CPU_MATMUL_BACKWARD_MAX_COST


def takes_matmul_backward(x: torch.Tensor, size: Size = None, scale_factor: Scale = None) -> bool:
    """Whether :func:`interpolate_bilinear` takes the matrix-product backward for ``x``: on CUDA
    in deterministic mode, and on a CPU where it is the faster one."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return False
    if replacing(x.device):
        return True
    return x.device.type == "cpu" and matmul_backward_pays_on_cpu(tuple(x.shape[-2:]),
                                                                  output_size(x, size, scale_factor))


def interpolate_bilinear(x: torch.Tensor, size: Size = None, scale_factor: Scale = None,
                         align_corners: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size, scale_factor, mode='bilinear', align_corners)``, with the
    matrix-product backward where :func:`takes_matmul_backward` (same forward, bit for bit)."""
    if takes_matmul_backward(x, size, scale_factor):
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
