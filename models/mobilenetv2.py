"""MobileNetV2 (Sandler et al., 2018) with a width multiplier and DeepLab's output stride.

Written here because torchvision is not used by this project; the module names follow
torchvision's ``mobilenet_v2`` (``features.{i}...``, ``classifier.1``), so an ImageNet
checkpoint saved from torchvision loads with :func:`load_imagenet_mobilenetv2`.

``output_stride`` (8, 16 or 32) turns the later strides into dilations the way DeepLab's
MobileNetV2 does: once the running stride has reached ``output_stride`` a block keeps
stride 1, its depthwise convolution uses the current rate, and the rate grows by the
stride it skipped.  ``include_top=False`` (segmentation) stops after the last inverted
residual (320 x width channels), as DeepLab does; the 1x1 1280-channel layer and the
classifier exist only with ``include_top=True``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from utils.errors import InvalidInputError

__all__ = ["MobileNetV2", "INVERTED_RESIDUAL_SETTING", "load_imagenet_mobilenetv2", "make_divisible"]

# (expansion t, channels c, repeats n, first stride s), as in the paper's table 2.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor`` (at least ``divisor``), never more than 10 %
    below ``value``: the rule of the reference implementations (TF slim and torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6: torchvision's ``Conv2dNormActivation`` key layout."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1):
        padding = (kernel - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == out
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
                   nn.Conv2d(hidden, out, 1, bias=False),
                   nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """``forward(x)`` returns the last feature map (``include_top=False``, N x out_channels x H/os x W/os)
    or ImageNet logits (``include_top=True``)."""

    def __init__(self, width: float = 1.0, output_stride: int = 32, include_top: bool = False,
                 num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        if width <= 0:
            raise InvalidInputError(f"MobileNetV2 width multiplier must be > 0, got {width}")
        if output_stride not in (8, 16, 32):
            raise InvalidInputError(f"MobileNetV2 output_stride must be 8, 16 or 32, got {output_stride}")
        self.width, self.output_stride = width, output_stride
        channels = make_divisible(32 * width)
        features: List[nn.Module] = [ConvBNReLU6(3, channels, stride=2)]
        current_stride, rate = 2, 1
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width)
            for i in range(n):
                stride = s if i == 0 else 1
                if current_stride == output_stride:
                    block_stride, block_rate, rate = 1, rate, rate * stride
                else:
                    block_stride, block_rate = stride, 1
                    current_stride *= stride
                features.append(InvertedResidual(channels, out, block_stride, t, dilation=block_rate))
                channels = out
        self.out_channels = channels
        classifier: Optional[nn.Module] = None
        if include_top:
            last = make_divisible(1280 * max(1.0, width))
            features.append(ConvBNReLU6(channels, last, kernel=1))
            classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.features = nn.Sequential(*features)
        self.classifier = classifier
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.classifier is None:
            return x
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def load_imagenet_mobilenetv2(backbone: MobileNetV2, path: str, prefix: str = "") -> dict:
    """Load an ImageNet MobileNetV2 state dict in torchvision's key layout (optionally under
    ``prefix``, e.g. ``backbone.``) into ``backbone``; keys the backbone lacks (the 1280-channel
    layer and the classifier when ``include_top=False``) are skipped and reported.  A shape
    mismatch (another width) or a missing backbone key raises ``ValueError`` naming them.
    Returns {'loaded': n, 'skipped': [keys]}."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InvalidInputError(f"{path}: expected a state dict of MobileNetV2 weights, got {type(state).__name__}")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = backbone.state_dict()
    missing = sorted(k for k in own if k not in state)
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                        for k in own if k in state and state[k].shape != own[k].shape)
    if missing or mismatched:
        raise InvalidInputError(f"{path} does not fit MobileNetV2 (width {backbone.width}): "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"mis-shaped {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}")
    backbone.load_state_dict({k: state[k] for k in own})
    return {"loaded": len(own), "skipped": sorted(k for k in state if k not in own)}
