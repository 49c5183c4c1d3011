"""Segmentation networks on HRNetV2 trunks: Aux-HRNet, OCRNet and HMS-OCRNet.

All three return a dict of tensors and contain no loss; the output keys are
specified in :func:`models.get_net`.  Resizes are bilinear with
``align_corners=False``.

Edge heads (``has_edge=True``) add boundary outputs used by the InverseForm
training recipe; they never feed back into the segmentation path, so a model
built with ``has_edge=False`` gives bit-identical segmentation for the same weights.
"""
from typing import Dict, Iterable, Sequence, Tuple

import torch
from torch import nn

from .heads import EdgeHead, HRHead, OCRBlock, pixel_classifier, scale_attention_head
from .hrnetv2 import hrnetv2
from .layers import conv1x1, rescale, resize_as, resize_to
from utils.errors import InvalidInputError

Outputs = Dict[str, torch.Tensor]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"expected an image tensor N x 3 x H x W, got {type(images).__name__}; "
            "the model takes the image batch itself, not a dict")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape N x 3 x H x W, got {tuple(images.shape)}")


def _add_edge_outputs(out: Outputs, net: nn.Module, edge_logits: torch.Tensor, trunk_feats: torch.Tensor,
                      size) -> None:
    """The edge outputs of AuxHRNet/OCRNet: in training the main edge logits and the auxiliary
    ``edge_head`` logits (sigmoid left to the loss); in evaluation the reference's ``edge_pred``
    (logits) and its probability."""
    edge = resize_to(edge_logits, size)
    if net.training:
        out["edge"] = edge
        out["edge_aux"] = resize_to(net.edge_head(trunk_feats), size)
    else:
        out["edge_pred"] = edge
        out["edge_prob"] = torch.sigmoid(edge)


class AuxHRNet(nn.Module):
    """HRNet + a per-pixel head (``ocrnet.AuxHRNet``; ``lighthrnet.HRNet16`` with a
    slim head).

    Heads on the stride-4 trunk features: ``hrhead`` (main logits), ``aux_head``
    (auxiliary logits, training only) and, with ``has_edge``, ``edge_head``
    (auxiliary edge) and ``edgeocr_cls_head`` (a 1x1 conv giving the main edge
    logits).
    """

    def __init__(self, num_classes: int = 19, has_edge: bool = False, trunk: str = "w18",
                 head_mid_channels: int = None, head_bias: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.has_edge = has_edge
        self.backbone = hrnetv2(trunk)
        ch = self.backbone.out_channels
        self.aux_head = pixel_classifier(ch, num_classes)
        self.hrhead = HRHead(ch, num_classes, head_mid_channels, head_bias)
        if has_edge:
            self.edge_head = EdgeHead(ch)
            self.edgeocr_cls_head = conv1x1(ch, 1)

    def forward(self, images: torch.Tensor) -> Outputs:
        _check_images(images)
        size = images.shape[-2:]
        feats = self.backbone(images)
        out = {"pred": resize_to(self.hrhead(feats), size)}
        if self.training:
            out["aux"] = resize_to(self.aux_head(feats), size)
        if self.has_edge:
            _add_edge_outputs(out, self, self.edgeocr_cls_head(feats), feats, size)
        return out


class OCRNet(nn.Module):
    """HRNet + OCR (``ocrnet.HRNet``).

    ``ocr.aux_head`` gives the soft object regions (and the auxiliary logits);
    ``ocr.cls_head`` the main logits.  With ``has_edge``: ``edge_head`` on the
    trunk features (auxiliary edge) and ``edgeocr_cls_head`` on the OCR features
    (main edge logits).
    """

    def __init__(self, num_classes: int = 19, has_edge: bool = False, trunk: str = "w48",
                 ocr_mid_channels: int = 512, ocr_key_channels: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.has_edge = has_edge
        self.backbone = hrnetv2(trunk)
        ch = self.backbone.out_channels
        self.ocr = OCRBlock(ch, num_classes, ocr_mid_channels, ocr_key_channels)
        if has_edge:
            self.edge_head = EdgeHead(ch)
            self.edgeocr_cls_head = conv1x1(ocr_mid_channels, 1)

    def forward(self, images: torch.Tensor) -> Outputs:
        _check_images(images)
        size = images.shape[-2:]
        feats = self.backbone(images)
        cls, aux, ocr_feats = self.ocr(feats)
        out = {"pred": resize_to(cls, size)}
        if self.training:
            out["aux"] = resize_to(aux, size)
        if self.has_edge:
            _add_edge_outputs(out, self, self.edgeocr_cls_head(ocr_feats), feats, size)
        return out


DEFAULT_EVAL_SCALES = (0.25, 0.5, 1.0, 2.0)


def _validate_scales(scales: Iterable[float]) -> Tuple[float, ...]:
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise InvalidInputError(f"scales must be a sequence of numbers, got {scales!r}") from None
    if 1.0 not in values:
        raise InvalidInputError(f"scales must contain 1.0 (the output resolution), got {values}")
    if any(s <= 0 for s in values):
        raise InvalidInputError(f"scales must be positive, got {values}")
    if len(set(values)) != len(values):
        raise InvalidInputError(f"scales must not repeat, got {values}")
    return values


class MscaleOCRNet(nn.Module):
    """OCRNet with hierarchical multi-scale attention (HMS, ``ocrnet.HRNet_Mscale``).

    One network runs on several rescaled copies of the image; ``scale_attn``
    predicts, at each scale, how much to trust that scale's prediction versus
    the combination of the higher-resolution scales.

    * Evaluation: all of ``self.scales`` (default 0.25, 0.5, 1.0, 2.0; set the
      attribute or pass ``scales=`` to change them; 1.0 must be included).
    * Training: two scales, ``lo_scale`` (0.5) and 1.0.

    ``edge_head`` (with ``has_edge``) runs on the trunk features; there is no
    ``edgeocr_cls_head`` in this model.
    """

    def __init__(self, num_classes: int = 19, has_edge: bool = False, trunk: str = "w48",
                 ocr_mid_channels: int = 512, ocr_key_channels: int = 256,
                 scales: Sequence[float] = DEFAULT_EVAL_SCALES, lo_scale: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.has_edge = has_edge
        self.backbone = hrnetv2(trunk)
        ch = self.backbone.out_channels
        self.ocr = OCRBlock(ch, num_classes, ocr_mid_channels, ocr_key_channels)
        self.scale_attn = scale_attention_head(ocr_mid_channels)
        if has_edge:
            self.edge_head = EdgeHead(ch)
        self.scales = scales
        if not 0.0 < float(lo_scale) < 1.0:
            raise InvalidInputError(f"lo_scale must be in (0, 1), got {lo_scale}")
        self.lo_scale = float(lo_scale)

    @property
    def scales(self) -> Tuple[float, ...]:
        """Evaluation scales; validated on assignment."""
        return self._scales

    @scales.setter
    def scales(self, value: Sequence[float]) -> None:
        self._scales = _validate_scales(value)

    def _single_scale(self, x: torch.Tensor, with_aux: bool, with_edge: bool,
                      with_attn: bool = True) -> Outputs:
        """Logits at x's resolution; optionally the attention and aux logits (resized)
        and edge LOGITS (at the trunk's stride-4 resolution, not resized).

        At evaluation the attention of the highest scale is never used, so it is
        not computed (the reference computes and discards it: at 2.0x that is the
        two 3x3 convs of ``scale_attn`` on four times the pixels)."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        cls, aux, ocr_feats = self.ocr(feats)
        out = {"cls": resize_to(cls, size)}
        if with_attn:
            out["attn"] = resize_to(self.scale_attn(ocr_feats), size)
        if with_aux:
            out["aux"] = resize_to(aux, size)
        if with_edge:
            out["edge"] = self.edge_head(feats)
        return out

    def forward(self, images: torch.Tensor) -> Outputs:
        _check_images(images)
        if self.training:
            return self._two_scale_forward(images)
        return self._multi_scale_forward(images, self._scales)

    def _multi_scale_forward(self, images: torch.Tensor, scales: Sequence[float]) -> Outputs:
        """Hierarchical combination, from the highest scale down.

        Starting from the highest scale's prediction p, each next scale s with
        attention a and prediction q updates
          s >= 1: p = a * q + (1 - a) * down(p)           (at scale s's size)
          s <  1: p = up(a * q) + (1 - up(a)) * p          (p keeps its size)
        so the result ends at the 1.0 scale's size (the input's).  The attention
        of the first (highest) scale is not used.
        """
        pred = None
        edge_pred = None
        for s in sorted(scales, reverse=True):
            want_edge = self.has_edge and s == 1.0
            o = self._single_scale(rescale(images, s), with_aux=False, with_edge=want_edge,
                                   with_attn=pred is not None)
            cls, attn = o["cls"], o.get("attn")
            if pred is None:
                pred = cls
            elif s >= 1.0:
                pred = attn * cls + (1 - attn) * resize_as(pred, cls)
            else:
                pred = resize_as(attn * cls, pred) + (1 - resize_as(attn, pred)) * pred
            if want_edge:
                # The reference takes the sigmoid before upsampling; keep that order.
                edge_pred = resize_to(torch.sigmoid(o["edge"]), images.shape[-2:])
        out = {"pred": pred}
        if self.has_edge:
            out["edge_pred"] = edge_pred
            out["edge_prob"] = edge_pred
        return out

    def _two_scale_forward(self, images: torch.Tensor) -> Outputs:
        """Training: the lo-scale prediction, weighted by its attention and
        upsampled, plus (1 - attention) times the 1.0-scale prediction."""
        size = images.shape[-2:]
        lo_images = rescale(images, self.lo_scale)
        lo = self._single_scale(lo_images, with_aux=True, with_edge=self.has_edge)
        # The 1.0x attention is not used, but it is computed as in the reference:
        # in training that call also updates scale_attn's BatchNorm running stats.
        hi = self._single_scale(images, with_aux=True, with_edge=self.has_edge)
        lo_attn = lo["attn"]
        attn = resize_to(lo_attn, size)
        out = {
            "pred": resize_to(lo_attn * lo["cls"], size) + (1 - attn) * hi["cls"],
            "aux": resize_to(lo_attn * lo["aux"], size) + (1 - attn) * hi["aux"],
            "pred_05x": resize_to(lo["cls"], size),
            "pred_10x": hi["cls"],
        }
        if self.has_edge:
            out["edge"] = resize_to(hi["edge"], size)
            # Two resizes, as the reference does: to the lo-scale input, then to the input.
            out["edge_aux"] = resize_to(resize_to(lo["edge"], lo_images.shape[-2:]), size)
        return out
