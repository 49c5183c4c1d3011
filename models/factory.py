"""Arch flags -> model builders (the one place that maps names to classes)."""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from torch import nn

from .hrnetv2 import TRUNK_FOR_BASE
from .lighthrnet import LightHRNet
from .nus import DeepLabV3MobileNetV2
from .ocrnet import AuxHRNet, MscaleOCRNet, OCRNet
from utils.errors import InvalidInputError, InvalidOptionError


@dataclass(frozen=True)
class ArchSpec:
    builder: Callable[..., nn.Module]
    default_base: int
    bases: Tuple[int, ...]
    why_not: str  # why the other bases are refused (shown in the error)
    options: Tuple[str, ...] = field(default_factory=tuple)


ARCHS: Dict[str, ArchSpec] = {
    "ocrnet.AuxHRNet": ArchSpec(
        AuxHRNet, 18, (16, 18, 48),
        "the reference's trunk config knows only W16-slim, W18 and W48"),
    "lighthrnet.HRNet16": ArchSpec(
        LightHRNet, 16, (16,),
        "its slim head is hard-wired to the 240 channels of the W16-slim trunk"),
    "ocrnet.HRNet": ArchSpec(
        OCRNet, 48, (16, 48),
        "the reference defines no OCR widths for W18 (it would read a missing "
        "cfg.MODEL.OCR18 and crash)"),
    "ocrnet.HRNet_Mscale": ArchSpec(
        MscaleOCRNet, 48, (16, 48),
        "the reference defines no OCR widths for W18 (it would read a missing "
        "cfg.MODEL.OCR18 and crash)",
        options=("scales", "lo_scale")),
}

# Archs that are not HRNets (no hrnet_base, no edge head, no released InverseForm checkpoint):
# DeepLabv3 on MobileNetV2, the segmentation net of learned non-uniform downsampling (models/nus.py).
OTHER_ARCHS: Dict[str, ArchSpec] = {
    "deeplabv3.MobileNetV2": ArchSpec(
        DeepLabV3MobileNetV2, 0, (), "it is not an HRNet (its options: width, output_stride)",
        options=("width", "output_stride")),
}


def _parse_base(hrnet_base) -> int:
    if isinstance(hrnet_base, bool):
        raise InvalidInputError(f"hrnet_base must be an integer such as 18, got {hrnet_base!r}")
    if isinstance(hrnet_base, str) and hrnet_base.strip().isdigit():
        return int(hrnet_base)
    if isinstance(hrnet_base, int):
        return hrnet_base
    raise InvalidInputError(f"hrnet_base must be an integer such as 18, got {hrnet_base!r}")


def get_net(arch: str, num_classes: int = 19, has_edge: bool = False,
            hrnet_base: Optional[int] = None, **options) -> nn.Module:
    """Build a segmentation network by the reference's arch flag.

    Arch flags, their default ``hrnet_base`` and the bases they accept:

    ======================= ======= =========== ================================
    arch                    default accepted    model
    ======================= ======= =========== ================================
    ``ocrnet.AuxHRNet``     18      16, 18, 48  HRNet + hrhead (HRNet-18-IF)
    ``lighthrnet.HRNet16``  16      16          HRNet-16-Slim (slim head)
    ``ocrnet.HRNet``        48      16, 48      OCRNet-48
    ``ocrnet.HRNet_Mscale`` 48      16, 48      HMS-OCRNet-48
    ======================= ======= =========== ================================

    Also ``deeplabv3.MobileNetV2`` (DeepLabv3 on MobileNetV2, models/nus.py): no
    ``hrnet_base``, no edge head, options ``width`` (1.0) and ``output_stride`` (16).

    The released checkpoints use the defaults.  The other bases are the ones the
    reference code can also build (W18 with OCR cannot: the reference has no OCR
    widths for it); they are checked against it by
    ``tools/check_against_reference.py`` but were never trained there.
    Base 16 is always the *slim* trunk (extra 2x2 stride-2 conv ``backbone.conv0``
    before the stem), as in the reference.  ``options`` are only accepted by
    ``ocrnet.HRNet_Mscale``: ``scales`` (evaluation scales, default
    (0.25, 0.5, 1.0, 2.0), must contain 1.0; also settable later through
    ``net.scales = (...)``) and ``lo_scale`` (the low training scale, 0.5).
    Unknown arch, base or option -> ``ValueError`` / ``TypeError`` listing the valid ones.

    Output contract: ``net(images)`` with ``images`` an N x 3 x H x W float tensor
    (RGB in [0, 1], ImageNet-normalised) returns a dict; every tensor is
    N x C x H x W at the input resolution (C = num_classes, or 1 for edges).

    Evaluation mode (``net.eval()``):
      * ``pred``: class logits.  HMS: the hierarchical multi-scale combination
        over ``net.scales``.
      * with ``has_edge``, ``edge_pred`` exactly as the reference computes it:
        AuxHRNet / HRNet16 / OCRNet: upsampled ``edgeocr_cls_head`` LOGITS;
        HMS: the 1.0-scale ``edge_head`` output, a sigmoid PROBABILITY
        (sigmoid taken before the upsample, like the reference).
      * with ``has_edge``, ``edge_prob``: N x 1 x H x W edge probability in [0, 1]
        for every arch (``sigmoid(edge_pred)``, or ``edge_pred`` itself for HMS).

    Training mode (``net.train()``); no loss is computed inside the model:
      * ``pred``: main logits (HMS: the attention-combined 0.5x/1.0x prediction).
      * ``aux``: auxiliary-head logits (HMS: their attention combination).
      * with ``has_edge``, ``edge``: edge LOGITS supervised together with ``pred``
        (``edgeocr_cls_head``; HMS: the 1.0-scale ``edge_head`` before its sigmoid).
      * with ``has_edge``, ``edge_aux``: edge LOGITS supervised with ``aux``
        (``edge_head`` before its sigmoid; HMS: the 0.5-scale one, resized to the
        0.5x input and then to the input, as the reference).
      * HMS only: ``pred_05x`` (0.5-scale logits resized to the input) and
        ``pred_10x`` (1.0-scale logits).

    The reference applied its losses to the sigmoid of ``edge_head``; here the
    heads return logits and the sigmoid is applied outside (same weights, no
    extra state_dict keys).  ``has_edge=False`` builds the same network without
    the edge heads; for the same weights ``pred`` is bit-identical.

    Weights are initialised as the reference does (trunk convs N(0, 0.001), BN 1/0,
    heads PyTorch defaults); load trained weights with
    :func:`models.load_checkpoint` or an ImageNet trunk with
    :func:`models.load_pretrained_backbone`.  The returned module carries
    ``arch`` and ``hrnet_base`` attributes.
    """
    if arch not in ARCHS and arch not in OTHER_ARCHS:
        raise InvalidInputError(f"unknown arch {arch!r}; valid: {', '.join(list(ARCHS) + list(OTHER_ARCHS))}")
    spec = ARCHS.get(arch) or OTHER_ARCHS[arch]
    if not spec.bases:  # not an HRNet (OTHER_ARCHS)
        if hrnet_base is not None:
            raise InvalidInputError(f"arch {arch} takes no hrnet_base, got {hrnet_base!r}: {spec.why_not}")
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise InvalidOptionError(f"arch {arch} got unknown option(s) {unknown}; accepted: {', '.join(spec.options)}")
        net = spec.builder(num_classes=num_classes, has_edge=bool(has_edge), **options)
        net.arch, net.hrnet_base = arch, None
        return net
    base = spec.default_base if hrnet_base is None else _parse_base(hrnet_base)
    if base not in spec.bases:
        raise InvalidInputError(
            f"arch {arch} accepts hrnet_base {', '.join(map(str, spec.bases))} "
            f"(default {spec.default_base}), got {base}: {spec.why_not}")
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) if spec.options else "none"
        raise InvalidOptionError(f"arch {arch} got unknown option(s) {unknown}; accepted: {accepted}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidInputError(f"num_classes must be a positive integer, got {num_classes!r}")
    net = spec.builder(num_classes=num_classes, has_edge=bool(has_edge),
                       trunk=TRUNK_FOR_BASE[base], **options)
    net.arch = arch
    net.hrnet_base = base
    return net
