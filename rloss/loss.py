"""DenseCRF regularized loss (Tang et al., ECCV 2018) as the reference computes it.

    loss = weight * ( -(1 / N) * sum_{n,k} <S~_nk, A_n S~_nk> ),   S~ = seg * roi

at ``scale_factor`` times the input resolution (image and roi nearest, seg bilinear; the
spatial bandwidth becomes sigma_xy * scale_factor).  The backward is the reference's, not
autograd of the forward: dloss/dS~ = -2 * weight * A S~ / N, masked by the roi (it treats A as
symmetric, which the lattice only nearly is).  No gradient reaches the image or the roi.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .filter import KERNELS, bilateral_filter

__all__ = ["DenseCRFLoss", "densecrf_loss"]


def _fp32_region(device: torch.device):
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _resize(seg: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear resize by ``scale``; on CUDA under ``torch.use_deterministic_algorithms`` with a
    deterministic backward (CUDA's own, with atomic adds, is refused there)."""
    if seg.is_cuda and torch.is_grad_enabled() and seg.requires_grad and torch.are_deterministic_algorithms_enabled():
        return _DeterministicResize.apply(seg, scale)
    return F.interpolate(seg, scale_factor=scale, mode="bilinear", align_corners=False)


class _DeterministicResize(torch.autograd.Function):
    """:func:`_resize`'s forward; backward two matrix products with the interpolation weights."""

    @staticmethod
    def forward(ctx, seg, scale):
        ctx.in_size, ctx.scale = tuple(seg.shape[-2:]), scale
        return F.interpolate(seg, scale_factor=scale, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad):
        rows, cols = (F.interpolate(torch.eye(n, device=grad.device)[None], scale_factor=ctx.scale, mode="linear",
                                    align_corners=False)[0] for n in ctx.in_size)  # n_in x n_out, PyTorch's weights
        along_width = torch.matmul(grad.float(), cols.t())  # 2-D right operands: the batch folds into one product
        return torch.matmul(along_width.transpose(-1, -2), rows.t()).transpose(-1, -2).to(grad.dtype), None


class _DenseCRFFunction(torch.autograd.Function):
    """Forward: -(1/N) sum <S~, A S~>; backward: -2 A S~ / N * roi (the reference's)."""

    @staticmethod
    def forward(ctx, image, seg, roi, sigma_rgb, sigma_xy, kernel):
        masked = seg * roi[:, None]
        filtered = bilateral_filter(image, masked, sigma_rgb, sigma_xy, kernel=kernel)
        n = seg.shape[0]
        ctx.save_for_backward(filtered, roi)
        ctx.batch = n
        return -(masked * filtered).sum() / n   # torch's cascade sum: float64-like accuracy here

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        filtered, roi = ctx.saved_tensors
        grad_seg = filtered * (roi * (grad_output * (-2.0 / ctx.batch)))[:, None]
        return None, grad_seg, None, None, None, None


def densecrf_loss(image: torch.Tensor, segmentation: torch.Tensor, roi: torch.Tensor, weight: float,
                  sigma_rgb: float, sigma_xy: float, scale_factor: float = 1.0,
                  kernel: str = "permutohedral") -> torch.Tensor:
    """Functional form of :class:`DenseCRFLoss` (same arguments); returns a 0-dim tensor."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"DenseCRFLoss: image must be N x 3 x H x W RGB in [0, 255], got {tuple(image.shape)}")
    if segmentation.dim() != 4 or segmentation.shape[0] != image.shape[0] \
            or segmentation.shape[2:] != image.shape[2:]:
        raise ValueError(f"DenseCRFLoss: segmentation must be N x K x H x W with the image's N, H, W "
                         f"{image.shape[0]}, {tuple(image.shape[2:])}, got {tuple(segmentation.shape)}")
    if roi.dim() != 3 or roi.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"DenseCRFLoss: roi must be N x H x W = {(image.shape[0], *image.shape[2:])} in {{0, 1}}, "
                         f"got {tuple(roi.shape)}")
    if not torch.is_floating_point(segmentation):
        raise ValueError(f"DenseCRFLoss: segmentation must be float (softmax probabilities), got {segmentation.dtype}")
    if kernel not in KERNELS:
        raise ValueError(f"DenseCRFLoss: kernel must be one of {KERNELS}, got {kernel!r}")
    if not scale_factor > 0:
        raise ValueError(f"DenseCRFLoss: scale_factor must be > 0, got {scale_factor}")
    with _fp32_region(segmentation.device):
        image = image.detach().float()
        seg = segmentation.float()
        roi = roi.detach().float()
        if scale_factor != 1:
            image = F.interpolate(image, scale_factor=scale_factor)
            seg = _resize(seg, scale_factor)
            roi = F.interpolate(roi[:, None], scale_factor=scale_factor)[:, 0]
        value = _DenseCRFFunction.apply(image, seg, roi, float(sigma_rgb), float(sigma_xy) * scale_factor, kernel)
        return weight * value


class DenseCRFLoss(nn.Module):
    """The DenseCRF regularized loss, called as ``loss(image, segmentation, roi)``.

    Args:
        weight: multiplier of the loss (published: 2e-9 at 513 x 513 crops and scale 0.5; the
            loss grows with the number of pixels squared times the kernel's reach, so a weight
            is tied to the crop size and the scale).
        sigma_rgb: colour bandwidth in levels of [0, 255] (published: 15).
        sigma_xy: spatial bandwidth in pixels of the full-resolution input (published: 100).
        scale_factor: the loss is computed at this fraction of the input size (published: 0.5).
        kernel: "permutohedral" (the reference's lattice, exact reproduction) or "exact" (the
            dense Gaussian; about 1 / 0.57 times larger, see :mod:`rloss.filter`).

    Inputs: ``image`` N x 3 x H x W float RGB in [0, 255] (the de-normalised network input),
    ``segmentation`` N x K x H x W softmax probabilities, ``roi`` N x H x W in {0, 1} (0 on
    padding).  Returns a 0-dim float32 tensor; gradients reach ``segmentation`` only.
    """

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale_factor: float,
                 kernel: str = "permutohedral"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"DenseCRFLoss: kernel must be one of {KERNELS}, got {kernel!r}")
        if not (sigma_rgb > 0 and sigma_xy > 0 and scale_factor > 0):
            raise ValueError(f"DenseCRFLoss: sigma_rgb, sigma_xy and scale_factor must be > 0, got "
                             f"{sigma_rgb}, {sigma_xy}, {scale_factor}")
        self.weight = weight
        self.sigma_rgb = sigma_rgb
        self.sigma_xy = sigma_xy
        self.scale_factor = scale_factor
        self.kernel = kernel

    def forward(self, image: torch.Tensor, segmentation: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        return densecrf_loss(image, segmentation, roi, self.weight, self.sigma_rgb, self.sigma_xy,
                             self.scale_factor, self.kernel)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, sigma_rgb={self.sigma_rgb}, sigma_xy={self.sigma_xy}, "
                f"scale_factor={self.scale_factor}, kernel={self.kernel!r}")
