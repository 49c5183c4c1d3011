"""Prediction heads: per-pixel classifiers, the edge head, the OCR block and the
scale-attention head of HMS.

Attribute names mirror the released checkpoints (``last_layer``,
``conv3x3_ocr``, ``ocr_distri_head.object_context_block.f_pixel`` ...).
"""
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from .layers import batch_norm, bn_relu, conv1x1


def pixel_classifier(in_ch: int, num_outputs: int, mid_ch: Optional[int] = None,
                     bias: bool = True) -> nn.Sequential:
    """1x1 conv -> BN-ReLU -> 1x1 conv, the head shape used throughout these models.

    ``mid_ch`` defaults to ``in_ch``.  Index 1 is a nested BN-ReLU Sequential,
    hence names like ``aux_head.1.0.weight``.
    """
    mid_ch = in_ch if mid_ch is None else mid_ch
    return nn.Sequential(
        conv1x1(in_ch, mid_ch, bias=bias),
        bn_relu(mid_ch),
        conv1x1(mid_ch, num_outputs, bias=bias),
    )


class HRHead(nn.Module):
    """Segmentation head on the concatenated trunk features (``hrhead``).

    HRNet-18-IF uses a full-width hidden layer with biases; the slim HRNet-16
    uses a 120-channel hidden layer without biases (``mid_ch=120, bias=False``).
    """

    def __init__(self, in_ch: int, num_classes: int, mid_ch: Optional[int] = None,
                 bias: bool = True):
        super().__init__()
        self.last_layer = pixel_classifier(in_ch, num_classes, mid_ch, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(x)


class EdgeHead(nn.Module):
    """Boundary head on the trunk features: 1x1 conv, BN, ReLU, 1x1 conv to 1 channel.

    Returns LOGITS.  The reference ends this head with a sigmoid; the models here
    apply that sigmoid themselves where the reference output is a probability,
    so losses can be given logits.  (BN and ReLU are flat here, not nested, which
    is why the checkpoint names are ``last_layer.1`` and ``last_layer.3``.)
    """

    def __init__(self, in_ch: int):
        super().__init__()
        self.last_layer = nn.Sequential(
            conv1x1(in_ch, in_ch),
            batch_norm(in_ch),
            nn.ReLU(),
            conv1x1(in_ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(x)


class SpatialGather(nn.Module):
    """Object-region representations: a softmax over pixels of each class's coarse
    logits weights the pixel features.  Output N x C x K x 1 (K classes)."""

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n, k = logits.shape[:2]
        weights = F.softmax(logits.reshape(n, k, -1), dim=2)          # N x K x HW
        pixels = feats.reshape(n, feats.shape[1], -1).permute(0, 2, 1)  # N x HW x C
        regions = torch.matmul(weights, pixels)                       # N x K x C
        return regions.permute(0, 2, 1).unsqueeze(3)


class ObjectAttention(nn.Module):
    """Each pixel attends over the K object regions (scaled dot product, softmax
    over regions) and the attended region values are projected back to the
    input width."""

    def __init__(self, in_ch: int, key_ch: int):
        super().__init__()
        self.key_ch = key_ch

        def proj(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(conv1x1(a, b, bias=False), bn_relu(b))

        self.f_pixel = nn.Sequential(*proj(in_ch, key_ch), *proj(key_ch, key_ch))
        self.f_object = nn.Sequential(*proj(in_ch, key_ch), *proj(key_ch, key_ch))
        self.f_down = proj(in_ch, key_ch)
        self.f_up = proj(key_ch, in_ch)

    def forward(self, x: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        query = self.f_pixel(x).reshape(n, self.key_ch, -1).permute(0, 2, 1)   # N x HW x D
        key = self.f_object(regions).reshape(n, self.key_ch, -1)                # N x D x K
        value = self.f_down(regions).reshape(n, self.key_ch, -1).permute(0, 2, 1)  # N x K x D
        sim = torch.matmul(query, key) * (self.key_ch ** -0.5)
        sim = F.softmax(sim, dim=-1)
        # Made contiguous (NCHW) before f_up: a strided view here would steer the conv
        # and BatchNorm kernels to another memory layout and summation order.
        context = torch.matmul(sim, value).transpose(1, 2).contiguous()
        return self.f_up(context.reshape(n, self.key_ch, h, w))


class SpatialOCR(nn.Module):
    """Object context, concatenated BEFORE the pixel features, fused by 1x1 conv +
    BN-ReLU + Dropout2d."""

    def __init__(self, in_ch: int, key_ch: int, out_ch: int, dropout: float):
        super().__init__()
        self.object_context_block = ObjectAttention(in_ch, key_ch)
        self.conv_bn_dropout = nn.Sequential(
            conv1x1(2 * in_ch, out_ch, bias=False),
            bn_relu(out_ch),
            nn.Dropout2d(dropout),
        )

    def forward(self, feats: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        context = self.object_context_block(feats, regions)
        return self.conv_bn_dropout(torch.cat([context, feats], dim=1))


class OCRBlock(nn.Module):
    """Object-contextual representations (OCR) over trunk features.

    ``aux_head`` predicts coarse class logits from the trunk features; they
    define the soft object regions.  Returns (class logits, aux logits, OCR
    features), all at the trunk's resolution.
    """

    def __init__(self, in_ch: int, num_classes: int, mid_ch: int = 512, key_ch: int = 256,
                 dropout: float = 0.05):
        super().__init__()
        self.mid_channels = mid_ch
        self.conv3x3_ocr = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, kernel_size=3, stride=1, padding=1),
            bn_relu(mid_ch),
        )
        self.ocr_gather_head = SpatialGather()
        self.ocr_distri_head = SpatialOCR(mid_ch, key_ch, mid_ch, dropout)
        self.cls_head = conv1x1(mid_ch, num_classes)
        self.aux_head = pixel_classifier(in_ch, num_classes)

    def forward(self, trunk_feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.conv3x3_ocr(trunk_feats)
        aux = self.aux_head(trunk_feats)
        regions = self.ocr_gather_head(feats, aux)
        ocr_feats = self.ocr_distri_head(feats, regions)
        return self.cls_head(ocr_feats), aux, ocr_feats


def scale_attention_head(in_ch: int, mid_ch: int = 256) -> nn.Sequential:
    """HMS attention: 3x3 conv-BN-ReLU twice, 1x1 conv to one channel, sigmoid.

    The output is the weight (in [0, 1]) given to this scale's prediction.
    """
    return nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(in_ch, mid_ch, kernel_size=3, padding=1, bias=False)),
        ("bn0", batch_norm(mid_ch)),
        ("re0", nn.ReLU(inplace=True)),
        ("conv1", nn.Conv2d(mid_ch, mid_ch, kernel_size=3, padding=1, bias=False)),
        ("bn1", batch_norm(mid_ch)),
        ("re1", nn.ReLU(inplace=True)),
        ("conv2", nn.Conv2d(mid_ch, 1, kernel_size=1, bias=False)),
        ("sig", nn.Sigmoid()),
    ]))
