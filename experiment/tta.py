"""Test-time inference modes for a segmentation network: whole image, sliding window,
horizontal flip and multi-scale averaging.

Why: a model trained on crops is often evaluated on 1024 x 2048 images by sliding a window
over them and averaging the overlapping logits (HRNet-OCR, mmsegmentation), and flip /
multi-scale averaging are the usual test-time augmentations.  One function,
:func:`predict`, gives ``experiment.validation`` and ``experiment.infer`` the same modes, so
that a mode's effect on mIoU is measured with exactly the code that produces the images.

HMS (``ocrnet.HRNet_Mscale``) keeps its own attention-weighted multi-scale inference: for it
``scales`` are the attention scales (``net.scales``, see :func:`configure_net`) and are not
averaged here; flip and sliding window apply to the whole HMS forward like to any network.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from models.layers import rescale, resize_to

HMS_ARCH = "ocrnet.HRNet_Mscale"

Outputs = Dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class InferenceMode:
    """How :func:`predict` turns a network into per-pixel logits.

    ``sliding_window``: run the network on ``window`` (H, W) crops placed every ``stride``
    pixels (the last crop of a row/column is aligned with the image's edge) and average the
    logits where crops overlap.  ``flip``: average with the prediction of the horizontally
    flipped image.  ``scales``: average the logits over these input scales (resized back to
    the input's size); (1.0,) is single scale.  Everything combines: each scale is flipped
    and windowed.
    """
    sliding_window: bool = False
    window: Tuple[int, int] = (1024, 1024)
    stride: Tuple[int, int] = (768, 768)
    flip: bool = False
    scales: Tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        window = tuple(int(v) for v in self.window)
        stride = tuple(int(v) for v in self.stride)
        scales = tuple(float(s) for s in self.scales)
        if len(window) != 2 or min(window) < 1:
            raise ValueError(f"sliding-window size must be two positive ints (H, W), got {self.window}")
        if len(stride) != 2 or min(stride) < 1:
            raise ValueError(f"sliding-window stride must be two positive ints (H, W), got {self.stride}")
        if stride[0] > window[0] or stride[1] > window[1]:
            raise ValueError(f"sliding-window stride {stride} must not exceed the window {window}: "
                             "pixels between windows would get no prediction")
        if not scales or any(s <= 0 for s in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"inference scales must be distinct positive numbers, got {self.scales}")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "scales", scales)

    @property
    def is_whole(self) -> bool:
        """True when :func:`predict` is a single forward pass of the whole image."""
        return not self.sliding_window and not self.flip and self.scales == (1.0,)

    def describe(self) -> str:
        parts = []
        if self.sliding_window:
            parts.append(f"sliding window {self.window[0]}x{self.window[1]} stride {self.stride[0]}x{self.stride[1]}")
        if self.flip:
            parts.append("horizontal flip")
        if self.scales != (1.0,):
            parts.append("scales " + ",".join(f"{s:g}" for s in self.scales))
        return ", ".join(parts) if parts else "whole image"


WHOLE = InferenceMode()


def inference_mode_from_config(val_cfg, model_cfg) -> InferenceMode:
    """The mode of ``val.sliding_window / window_size / window_stride / flip`` and, for archs
    other than HMS, ``model.eval_scales`` (averaged scales; HMS uses them as attention scales)."""
    scales = (1.0,)
    if model_cfg.eval_scales is not None and model_cfg.arch != HMS_ARCH:
        scales = tuple(model_cfg.eval_scales)
    try:
        return InferenceMode(sliding_window=bool(val_cfg.sliding_window), window=tuple(val_cfg.window_size),
                             stride=tuple(val_cfg.window_stride), flip=bool(val_cfg.flip), scales=scales)
    except ValueError as exc:
        raise ValueError(f"config keys val.window_size / val.window_stride / model.eval_scales: {exc}") from None


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Start offsets of windows of ``window`` pixels every ``stride`` pixels covering ``length``;
    the last one ends at the edge.  A dimension no longer than the window gets one window."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def _accumulate(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    return value.float() if total is None else total + value.float()


def sliding_window_forward(net: nn.Module, images: torch.Tensor, window: Sequence[int],
                           stride: Sequence[int]) -> Outputs:
    """Logits (and edge probabilities) of ``net`` from overlapping crops, averaged per pixel.

    Each crop holds the whole batch, so memory grows with the window, not with the image.
    Outputs are float32."""
    height, width = images.shape[-2:]
    win_h, win_w = min(window[0], height), min(window[1], width)
    pred_sum: Optional[torch.Tensor] = None
    edge_sum: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, height, width, device=images.device, dtype=torch.float32)
    for y in window_starts(height, win_h, stride[0]):
        for x in window_starts(width, win_w, stride[1]):
            out = net(images[:, :, y:y + win_h, x:x + win_w])
            logits = out["pred"].float()
            if pred_sum is None:
                pred_sum = logits.new_zeros(logits.shape[0], logits.shape[1], height, width)
            pred_sum[:, :, y:y + win_h, x:x + win_w] += logits
            edge = out.get("edge_prob")
            if edge is not None:
                if edge_sum is None:
                    edge_sum = logits.new_zeros(edge.shape[0], edge.shape[1], height, width)
                edge_sum[:, :, y:y + win_h, x:x + win_w] += edge.float()
            count[:, :, y:y + win_h, x:x + win_w] += 1
    result = {"pred": pred_sum / count}
    if edge_sum is not None:
        result["edge_prob"] = edge_sum / count
    return result


def predict(net: nn.Module, images: torch.Tensor, mode: InferenceMode = WHOLE) -> Outputs:
    """``{"pred": N x C x H x W logits, "edge_prob": N x 1 x H x W (with an edge head)}`` of an
    eval-mode ``net`` on ``images`` under ``mode``.

    Whole-image mode is ``net(images)`` itself (bit-identical, every output key kept).  Other
    modes average logits (not probabilities, as HRNet-OCR and mmsegmentation do) and edge
    probabilities, in float32 whatever the autocast dtype."""
    if mode.is_whole:
        return net(images)
    size = images.shape[-2:]
    pred_sum: Optional[torch.Tensor] = None
    edge_sum: Optional[torch.Tensor] = None
    passes = 0
    for scale in mode.scales:
        scaled = rescale(images, scale)
        for flipped in ((False, True) if mode.flip else (False,)):
            x = scaled.flip(-1) if flipped else scaled
            if mode.sliding_window:
                out = sliding_window_forward(net, x, mode.window, mode.stride)
            else:
                out = net(x)
            logits, edge = out["pred"].float(), out.get("edge_prob")
            if flipped:
                logits = logits.flip(-1)
                edge = None if edge is None else edge.flip(-1)
            if logits.shape[-2:] != size:
                logits = resize_to(logits, size)
                edge = None if edge is None else resize_to(edge.float(), size)
            pred_sum = _accumulate(pred_sum, logits)
            if edge is not None:
                edge_sum = _accumulate(edge_sum, edge)
            passes += 1
    result = {"pred": pred_sum / passes}
    if edge_sum is not None:
        result["edge_prob"] = edge_sum / passes
    return result


def configure_net(net: nn.Module, arch: str, scales: Optional[Sequence[float]]) -> None:
    """Apply ``scales`` to an HMS network's attention scales (``net.scales``); a no-op for
    other archs, whose scales are averaged by :func:`predict` instead."""
    if scales is not None and arch == HMS_ARCH:
        net.scales = tuple(float(s) for s in scales)
