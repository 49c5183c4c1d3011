"""Small building blocks shared by the trunks and heads.

Every resize in this package goes through :func:`resize_to` or :func:`rescale`, so
the interpolation convention (bilinear, ``align_corners=False``) lives in one place.
"""
import math
from typing import Sequence, Tuple

import torch
from torch import nn

from utils.determinism import interpolate_bilinear

BN_MOMENTUM = 0.1


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the momentum the released models were trained with."""
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


def bn_relu(channels: int) -> nn.Sequential:
    """BatchNorm followed by ReLU, nested in a Sequential.

    The nesting is deliberate: the released checkpoints name these parameters
    ``<parent>.<i>.0.weight``, so the BatchNorm must sit at index 0 of a child
    Sequential.
    """
    return nn.Sequential(batch_norm(channels), nn.ReLU())


def conv1x1(in_ch: int, out_ch: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, padding=0, bias=bias)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of an N x C x H x W tensor to ``size`` = (H', W') (with a deterministic
    backward under ``--deterministic``, utils/determinism.py)."""
    return interpolate_bilinear(x, size=tuple(size), align_corners=False)


def resize_as(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Resize ``x`` to the spatial size of ``like``."""
    return resize_to(x, like.shape[-2:])


def scaled_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """Spatial size of an image rescaled by ``scale``, rounded DOWN.

    This is what ``F.interpolate(scale_factor=s, recompute_scale_factor=True)``
    produces (and what PyTorch < 1.5 produced without the flag), which is how the
    reference resizes its inputs for multi-scale inference; rounding to nearest
    instead would change the 0.25x and 0.5x predictions of odd-sized inputs.
    """
    new_h = int(math.floor(float(height) * scale))
    new_w = int(math.floor(float(width) * scale))
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"scale {scale} turns a {height}x{width} input into {new_h}x{new_w}; "
            "use a larger input or drop that scale"
        )
    return new_h, new_w


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize an image batch by ``scale`` with the reference's floor rounding.

    The interpolation itself is done by size (the effective factor is
    out/in, not ``scale``), matching the reference.
    """
    if scale == 1.0:
        return x
    return resize_to(x, scaled_size(x.shape[-2], x.shape[-1], scale))
