"""InverseForm and the joint edge/segmentation loss of the reference, vectorised.

Every loss here runs on its inputs' device without host round trips (no ``.item()``,
``.cpu()``, numpy or branching on tensor values), and computes in float32 with autocast
disabled, whatever the autocast state of the caller. The one deliberate exception is the
optional input check (``check_inputs=True``): finding non-finite logits or out-of-range
labels needs the answer on the host, which costs one synchronisation per call. Shape
checks are free and always on. Pass ``check_inputs=False`` for a sync-free loss.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .distances import DISTANCES, regressor_distance
from .regressor import InverseNet
from .tiling import image_to_tiles, resize_for_tiling

__all__ = [
    "pixel_nll",
    "image_weighted_cross_entropy",
    "ImageWeightedCrossEntropy",
    "balanced_bce_with_logits",
    "edge_attention_cross_entropy",
    "InverseFormLoss",
    "JointEdgeSegLoss",
]

PathLike = Union[str, os.PathLike]


# helpers ---------------------------------------------------------------------------------
def _fp32_region(device: torch.device):
    """Disable autocast for ``device``: the losses are computed in float32."""
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _require_float(x: torch.Tensor, name: str) -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor (logits), got dtype {x.dtype}")


def _label_map(target: torch.Tensor, name: str, expected: Sequence[int]) -> torch.Tensor:
    """N x H x W (or N x 1 x H x W) labels -> N x H x W int64, checked against ``expected``."""
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3 or tuple(target.shape) != tuple(expected):
        n, h, w = expected
        raise ValueError(f"{name} must be {n} x {h} x {w} (or {n} x 1 x {h} x {w}) to match the logits, "
                         f"got {tuple(target.shape)}")
    if target.dtype == torch.bool or target.is_complex() or torch.is_floating_point(target):
        # A float label such as 2.7 would be truncated to class 2 without a word.
        raise ValueError(f"{name} must hold integer class ids, got dtype {target.dtype}"
                         + (" (convert whole-number labels with .long())" if torch.is_floating_point(target) else ""))
    return target.long()


def _non_empty(n: int, what: str) -> None:
    if n == 0:
        raise ValueError(f"{what}: the batch is empty (N = 0); the loss of no images is undefined")


def _edge_map(x: torch.Tensor, name: str, expected: Optional[Sequence[int]] = None) -> torch.Tensor:
    """N x 1 x H x W or N x H x W -> N x 1 x H x W (same dtype), optionally shape-checked."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be N x 1 x H x W (or N x H x W), got {tuple(x.shape)}")
    if expected is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} to match the logits, got {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    return x


def _check_values(checks: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Raise if any named boolean 0-dim tensor is False; a single host sync for all."""
    if not checks:
        return
    flags = torch.stack([flag for _, flag in checks])
    if bool(flags.all()):
        return
    failed = [message for message, flag in checks if not bool(flag)]
    raise ValueError("; ".join(failed))


def _finite(x: torch.Tensor, name: str) -> Tuple[str, torch.Tensor]:
    # NaN and +-Inf all propagate into the sum: one reduction pass instead of an
    # element-wise isfinite map. (Finite values summing past float max are reported too.)
    total = x.sum(dtype=torch.float32) if torch.is_floating_point(x) else x.sum().float()
    return (f"{name} contains NaN or Inf values (or values so large that their sum overflows)",
            torch.isfinite(total))


# Edge targets, one rule for every edge term: 1 is a boundary pixel, 0 is not, and any other
# value (``ignore_index``, 255 by convention) is ignored: balanced BCE gives it weight 0 and
# InverseForm masks it out of both the predicted and the ground-truth map before tiling.
def _edge_valid(target: torch.Tensor) -> torch.Tensor:
    return (target == 0) | (target == 1)


def _edge_values(t: torch.Tensor, ignore_index: int, name: str) -> Tuple[str, torch.Tensor]:
    ok = _edge_valid(t) | (t == ignore_index)
    return (f"{name} holds values other than 0, 1 and ignore_index={ignore_index}", ok.all())


def _soft_edge_values(t: torch.Tensor, ignore_index: int, name: str) -> Tuple[str, torch.Tensor]:
    ok = ((t >= 0) & (t <= 1)) | (t == ignore_index)
    return (f"{name} holds values outside [0, 1] that are not ignore_index={ignore_index}", ok.all())


def _labels_in_range(t: torch.Tensor, num_classes: int, ignore_index: int, name: str):
    ok = ((t >= 0) & (t < num_classes)) | (t == ignore_index)
    return (f"{name} holds labels outside [0, {num_classes - 1}] that are not ignore_index={ignore_index}",
            ok.all())


# cross-entropy -----------------------------------------------------------------------------
_CPU_CHUNK_ELEMENTS = 1 << 21  # logits per block of pixel_nll on a CPU (8 MB of float32: reused, cache-near)


class _PixelNLL(torch.autograd.Function):
    """-log_softmax(x)[target] per pixel; backward recomputes the softmax instead of storing
    the N x C x H x W log-probabilities, and fuses the one-hot subtraction."""

    @staticmethod
    def forward(ctx, logits, target):
        ctx.save_for_backward(logits, target)
        index = target.unsqueeze(1)
        n, c, h, w = logits.shape
        rows = max(1, _CPU_CHUNK_ELEMENTS // max(1, n * c * w))
        if logits.device.type != "cpu" or rows >= h:
            return -F.log_softmax(logits, dim=1).gather(1, index).squeeze(1)
        # On a CPU, blocks of rows: the full N x C x H x W log-probabilities are fresh memory
        # whose page faults cost more than the softmax (170 -> 70 ms at 19 x 1024 x 2048, 1 thread).
        out = torch.empty(n, h, w, dtype=logits.dtype)
        for start in range(0, h, rows):
            block = slice(start, start + rows)
            torch.neg(F.log_softmax(logits[:, :, block], dim=1).gather(1, index[:, :, block]).squeeze(1),
                      out=out[:, block])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, target = ctx.saved_tensors
        g = grad.unsqueeze(1)
        out = torch.softmax(logits, dim=1).mul_(g)
        out.scatter_add_(1, target.unsqueeze(1), -g)
        return out, None


def pixel_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """N x C x H x W logits, N x H x W int64 classes in [0, C) -> N x H x W NLL."""
    return _PixelNLL.apply(logits, target)


def _label_parts(target: torch.Tensor, num_classes: int, ignore_index: int):
    """(bins, counted, valid) of an int64 label map, each computed once and shared by the
    cross-entropy terms: ``bins`` the labels clipped to [0, C - 1] (a valid pixel's class and a
    safe gather index for every other pixel, whose weight is 0); ``counted`` the pixels the
    reference's ``torch.histc(target, bins=C, min=0, max=C)`` counts (labels 0..C, C landing
    in the last bin); ``valid`` the pixels the loss uses (0..C-1, not ``ignore_index``)."""
    bins = target.clamp(0, num_classes - 1)
    counted = (target >= 0) & (target <= num_classes)
    valid = counted & (target != num_classes) & (target != ignore_index)
    return bins, counted, valid


def _class_weights(bins: torch.Tensor, counted: torch.Tensor, num_classes: int, per_image: bool) -> torch.Tensor:
    """N x C weights 1 + [h_c > 0] (1 - h_c) from the normalised class histogram h of the
    ``counted`` pixels (see :func:`_label_parts`).  ``per_image`` histograms each image;
    otherwise the whole batch (then every image gets the same weights, which is what the
    reference's code computes)."""
    n = bins.shape[0]
    counts = torch.zeros(n, num_classes, dtype=torch.int32, device=bins.device)
    counts.scatter_add_(1, bins.reshape(n, -1), counted.reshape(n, -1).int())  # int32: half the memory
    counts = counts.long()
    if not per_image:
        counts = counts.sum(0, keepdim=True).expand(n, num_classes)
    # An image without a counted pixel has h = 0 (not 0/0): weights 1, and no pixel uses them.
    hist = counts.double() / counts.sum(1, keepdim=True).clamp_min(1)
    return (1.0 + (counts > 0).double() * (1.0 - hist)).float()


def _weighted_nll_sum(nll: torch.Tensor, bins: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over images of the class-weighted mean NLL of each image's valid pixels.

    Per image: sum(w_y * nll) / sum(w_y) over valid pixels, as ``nn.NLLLoss(weight=w)``.
    An image without a valid pixel contributes exactly 0 (and no gradient); the reference
    returns NaN there (0/0), which would poison the whole batch.
    """
    n = nll.shape[0]
    pixel_w = weights.gather(1, bins.reshape(n, -1)) * valid.reshape(n, -1)
    numerator = (pixel_w * nll.reshape(n, -1)).sum(1)
    denominator = pixel_w.sum(1)
    # Weights are >= 1, so any valid pixel makes the denominator >= 1: clamping is exact.
    return (numerator / denominator.clamp_min(1.0)).sum()


def image_weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, num_classes: int = 19,
                                 ignore_index: int = 255, per_image_weights: bool = True) -> torch.Tensor:
    """Image-weighted CE of the reference, summed over images (see ImageWeightedCrossEntropy)."""
    bins, counted, valid = _label_parts(target.long(), num_classes, ignore_index)
    with _fp32_region(logits.device):
        nll = pixel_nll(logits.float(), bins)
        return _weighted_nll_sum(nll, bins, valid, _class_weights(bins, counted, num_classes, per_image_weights))


class ImageWeightedCrossEntropy(nn.Module):
    """Cross-entropy whose class weights come from each image's own label histogram.

    For image i with normalised histogram h (over its pixels labelled 0..C-1),
    w_c = 1 + [h_c > 0] (1 - h_c): classes present but rare weigh almost 2, the dominant
    class about 1. The loss is the weighted NLL of log_softmax, averaged per image as
    ``nn.NLLLoss`` does (sum w_y nll / sum w_y over valid pixels), then SUMMED over images.
    Vectorised over the batch. An image with no valid pixel contributes 0, not NaN.

    ``per_image_weights=False`` takes the histogram over the whole batch instead, which is
    what the reference's code actually does (its per-image loop passes the batch's targets).
    ``check_inputs`` verifies finiteness and label range (one host sync).
    """

    def __init__(self, num_classes: int = 19, ignore_index: int = 255,
                 per_image_weights: bool = True, check_inputs: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.per_image_weights = per_image_weights
        self.check_inputs = check_inputs

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be N x {self.num_classes} x H x W, got {tuple(logits.shape)}")
        _require_float(logits, "logits")
        n, _, h, w = logits.shape
        t = _label_map(target, "target", (n, h, w))
        if self.check_inputs:
            _check_values([_finite(logits, "logits"),
                           _labels_in_range(t, self.num_classes, self.ignore_index, "target")])
        return image_weighted_cross_entropy(logits, t, self.num_classes, self.ignore_index,
                                            self.per_image_weights)


# balanced BCE and edge attention -------------------------------------------------------------
def balanced_bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE over the whole batch, as the reference's ``bce2d``.

    Positives (target == 1) weigh neg/(pos+neg), negatives (target == 0) pos/(pos+neg),
    anything else (ignored, e.g. 255) 0; the mean runs over ALL elements, ignored ones included.
    ``target`` may be N x H x W for N x 1 x H x W logits; any real dtype.
    """
    if target.shape != logits.shape:
        if target.dim() == logits.dim() - 1 and logits.dim() == 4 and logits.shape[1] == 1:
            target = target.unsqueeze(1)
        if target.shape != logits.shape:
            raise ValueError(f"edge target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    with _fp32_region(logits.device):
        x = logits.float()
        t = target.float()
        pos = t == 1
        neg = t == 0
        n_pos = pos.sum().float()
        n_neg = neg.sum().float()
        total = (n_pos + n_neg).clamp_min(1.0)
        zero = torch.zeros((), device=x.device)
        weight = torch.where(pos, n_neg / total, torch.where(neg, n_pos / total, zero))
        return F.binary_cross_entropy_with_logits(x, t, weight=weight, reduction="mean")


def edge_attention_cross_entropy(seg_logits: torch.Tensor, seg_target: torch.Tensor, edge: torch.Tensor,
                                 threshold: float = 0.8, num_classes: int = 19, ignore_index: int = 255,
                                 per_image_weights: bool = True) -> torch.Tensor:
    """Image-weighted CE restricted to pixels where ``edge``'s channel max exceeds ``threshold``.

    As in the reference the threshold applies to the tensor given (in its training loop,
    the edge head's output), all other pixels become ``ignore_index``.
    """
    t = seg_target.long()
    mask = edge.detach().amax(1) > threshold
    return image_weighted_cross_entropy(seg_logits, torch.where(mask, t, torch.full_like(t, ignore_index)),
                                        num_classes, ignore_index, per_image_weights)


# InverseForm -----------------------------------------------------------------------------------
class InverseFormLoss(nn.Module):
    """InverseForm distance between predicted and ground-truth boundaries (the reference's
    ``InverseTransform2D``), with the predicted boundary taken as sigmoid(edge logits).

    Both maps are resized bilinearly (align_corners=False) to (tile_factor*T) x
    (2*tile_factor*T), cut into a grid of T x T tiles, all tiles of the batch go through the
    frozen regressor in one call, and the loss is the mean over tiles of the distance of the
    predicted transform to the identity (``distance``: 'euclidean' as released, 'normalised',
    or 'geodesic'; see :func:`inverseform.distances.regressor_distance`).

    ``regressor`` is an :class:`InverseNet` or a path to a checkpoint. It is frozen (no
    parameter gradients) and kept in eval mode even when this module is put in train mode;
    gradients still flow to the edge logits. Edge targets are 1 (boundary) or 0; pixels with any
    other value (``ignore_index``, 255) are ignored: zero in both maps, as the balanced BCE gives
    them weight 0. ``check_inputs`` refuses other values, and an empty batch is always refused.
    ``tile_grid`` (rows, cols) resizes to (rows*T) x (cols*T) instead, for crops whose aspect is
    not 1:2 (NYU's 3:4: (3, 4)); ``resized_size`` (int S for S x 2S, or (H, W), multiples of T)
    overrides both.
    """

    def __init__(self, regressor: Union[InverseNet, PathLike], tile_factor: int = 3,
                 resized_size: Optional[Union[int, Tuple[int, int]]] = None, distance: str = "euclidean",
                 geodesic_lambda: float = 0.1, check_inputs: bool = True, ignore_index: int = 255,
                 tile_grid: Optional[Tuple[int, int]] = None):
        super().__init__()
        if isinstance(regressor, (str, os.PathLike)):
            regressor = InverseNet.from_checkpoint(regressor)
        elif not isinstance(regressor, InverseNet):
            raise TypeError(f"regressor must be an InverseNet or a checkpoint path, got {type(regressor).__name__}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")
        tile = regressor.tile_size
        if resized_size is None and tile_grid is not None:
            grid = tuple(tile_grid)
            if len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
                raise ValueError(f"tile_grid must be two positive ints (rows, cols), got {tile_grid!r}")
            size = (grid[0] * tile, grid[1] * tile)
        elif resized_size is None:
            if not isinstance(tile_factor, int) or tile_factor < 1:
                raise ValueError(f"tile_factor must be a positive int, got {tile_factor!r}")
            size = (tile_factor * tile, 2 * tile_factor * tile)
        elif isinstance(resized_size, int):
            size = (resized_size, 2 * resized_size)
        else:
            size = tuple(int(s) for s in resized_size)
        if len(size) != 2 or min(size) < 1 or size[0] % tile or size[1] % tile:
            raise ValueError(f"resized_size {size} must be positive multiples of the regressor's tile size {tile}")
        regressor.requires_grad_(False)
        regressor.eval()
        self.regressor = regressor
        self.resized_size = size
        self.grid = (size[0] // tile, size[1] // tile)
        self.distance = distance
        self.geodesic_lambda = geodesic_lambda
        self.check_inputs = check_inputs
        self.ignore_index = ignore_index

    def train(self, mode: bool = True) -> "InverseFormLoss":
        super().train(mode)
        self.regressor.eval()  # frozen: dropout/batch-norm-like behaviour must never switch
        return self

    def extra_repr(self) -> str:
        return f"resized_size={self.resized_size}, grid={self.grid}, distance={self.distance!r}"

    def tile_distances(self, pred_prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-tile distances, N x rows x cols, for boundary probabilities and targets.

        Maps are N x 1 x H x W or N x H x W; prediction and target may differ in size (each
        is resized to the grid), not in batch.  Here the target may be a soft boundary map in
        [0, 1] (a resized or warped tile, as in regressor training); pixels equal to
        ``ignore_index`` are left out of both maps.
        """
        pred = _edge_map(pred_prob, "pred_prob")
        target = _edge_map(target, "edge_target")
        if pred.shape[0] != target.shape[0]:
            raise ValueError(f"pred_prob has {pred.shape[0]} maps but edge_target has {target.shape[0]}")
        if self.check_inputs:
            _check_values([_finite(pred, "pred_prob"), _soft_edge_values(target, self.ignore_index, "edge_target")])
        if pred.shape == target.shape:
            ignored = target == self.ignore_index
            return self._tile_distances(pred.masked_fill(ignored, 0), target.masked_fill(ignored, 0))
        return self._tile_distances(pred, target.masked_fill(target == self.ignore_index, 0))

    def _tile_distances(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = pred.shape[0]
        rows, cols = self.grid
        tile = self.regressor.tile_size
        with _fp32_region(pred.device):
            pred_tiles = image_to_tiles(resize_for_tiling(pred.float(), self.resized_size), tile)
            target_tiles = image_to_tiles(resize_for_tiling(target.float(), self.resized_size), tile)
            weight_dtype = self.regressor.fc[0].weight.dtype
            params = self.regressor(pred_tiles.to(weight_dtype), target_tiles.to(weight_dtype)).float()
            distances = regressor_distance(params, self.regressor.parameterisation, self.distance,
                                           self.regressor.param_mean, self.regressor.param_std,
                                           self.geodesic_lambda)
        return distances.float().reshape(n, rows, cols)

    def forward(self, edge_logits: torch.Tensor, edge_target: torch.Tensor) -> torch.Tensor:
        """Edge logits N x 1 x H x W, targets N x 1 x H x W in {0, 1} -> scalar mean distance."""
        logits = _edge_map(edge_logits, "edge_logits")
        _require_float(logits, "edge_logits")
        target = _edge_map(edge_target, "edge_target")
        if logits.shape[0] != target.shape[0]:
            raise ValueError(f"edge_logits has {logits.shape[0]} maps but edge_target has {target.shape[0]}")
        _non_empty(logits.shape[0], "InverseFormLoss")
        if self.check_inputs:
            _check_values([_finite(logits, "edge_logits"), _edge_values(target, self.ignore_index, "edge_target")])
        return self._loss(logits, target)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean tile distance; ignored target pixels (not 0 or 1) are zero in both maps."""
        with _fp32_region(logits.device):
            valid = _edge_valid(target)
            pred = torch.sigmoid(logits.float()) * valid
            target = torch.where(valid, target.float(), torch.zeros((), device=target.device))
            return self._tile_distances(pred, target).mean()


# joint loss ----------------------------------------------------------------------------------
class JointEdgeSegLoss(nn.Module):
    """The reference's joint loss: seg_weight * image-weighted CE(seg)
    + edge_weight * balanced BCE(edge) + att_weight * edge-attention CE
    + inv_weight * InverseForm(edge).

    ``forward(seg_logits, edge_logits, seg_target, edge_target) -> (total, parts)``:
    ``parts`` holds the UNWEIGHTED terms as detached 0-dim tensors for logging, keys 'seg',
    'edge_bce', 'edge_att' and, when ``inverseform`` is given, 'inverseform'. With
    ``edge_logits=None`` only 'seg' is computed and total = seg_weight * seg.

    ``inverseform``: an :class:`InverseFormLoss`, an :class:`InverseNet` or a checkpoint path
    (the latter two get default InverseFormLoss settings). The seg and attention terms share
    one log-softmax pass. ``attention_threshold`` applies to ``edge_logits`` as given (the
    reference thresholds the edge output it receives). ``check_inputs`` verifies finite
    logits and valid labels at the cost of one host sync per call; shapes are always checked.

    ``edge_reduction``: the two cross-entropy terms are SUMMED over the batch's images (the
    reference's), the balanced BCE and InverseForm terms are averaged over the batch ("mean",
    the reference's), so the weight of the edge terms relative to the segmentation shrinks as
    1 / N with the batch size N (the reference's recipes put one to three images on a GPU).
    "sum" multiplies those two terms by N, so that every term counts per image and the balance
    does not depend on the batch size; ``parts`` still report them averaged.
    """

    def __init__(self, num_classes: int = 19, ignore_index: int = 255, seg_weight: float = 1.0,
                 edge_weight: float = 0.3, att_weight: float = 0.1, inv_weight: float = 0.3,
                 inverseform: Optional[Union[InverseFormLoss, InverseNet, PathLike]] = None,
                 attention_threshold: float = 0.8, check_inputs: bool = True,
                 per_image_weights: bool = True, edge_reduction: str = "mean"):
        super().__init__()
        if edge_reduction not in ("mean", "sum"):
            raise ValueError(f"JointEdgeSegLoss: edge_reduction must be 'mean' or 'sum', got {edge_reduction!r}")
        self.edge_reduction = edge_reduction
        if inverseform is not None and not isinstance(inverseform, InverseFormLoss):
            inverseform = InverseFormLoss(inverseform)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.seg_weight = seg_weight
        self.edge_weight = edge_weight
        self.att_weight = att_weight
        self.inv_weight = inv_weight
        self.inverseform = inverseform
        self.attention_threshold = attention_threshold
        self.check_inputs = check_inputs
        self.per_image_weights = per_image_weights

    def forward(self, seg_logits: torch.Tensor, edge_logits: Optional[torch.Tensor],
                seg_target: torch.Tensor, edge_target: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.num_classes
        if seg_logits.dim() != 4 or seg_logits.shape[1] != c:
            raise ValueError(f"seg_logits must be N x {c} x H x W, got {tuple(seg_logits.shape)}")
        _require_float(seg_logits, "seg_logits")
        n, _, h, w = seg_logits.shape
        _non_empty(n, "JointEdgeSegLoss")
        t = _label_map(seg_target, "seg_target", (n, h, w))
        checks = []
        if edge_logits is not None:
            edge = _edge_map(edge_logits, "edge_logits", (n, 1, h, w))
            _require_float(edge, "edge_logits")
            if edge_target is None:
                raise ValueError("edge_target is required when edge_logits is given")
            edge_t = _edge_map(edge_target, "edge_target", (n, 1, h, w))
            if self.check_inputs:
                checks += [_finite(edge, "edge_logits"), _edge_values(edge_t, self.ignore_index, "edge_target")]
        if self.check_inputs:
            checks = [_finite(seg_logits, "seg_logits"),
                      _labels_in_range(t, c, self.ignore_index, "seg_target")] + checks
            _check_values(checks)

        with _fp32_region(seg_logits.device):
            bins, counted, valid = _label_parts(t, c, self.ignore_index)
            nll = pixel_nll(seg_logits.float(), bins)
            seg = _weighted_nll_sum(nll, bins, valid, _class_weights(bins, counted, c, self.per_image_weights))
            parts = {"seg": seg}
            total = self.seg_weight * seg
            if edge_logits is not None:
                edge = edge.float()
                edge_bce = balanced_bce_with_logits(edge, edge_t)
                attention = edge.detach().amax(1) > self.attention_threshold
                # the reference's target: t on the attention pixels, ignore_index elsewhere
                if 0 <= self.ignore_index <= c:  # then its histogram counts the ignored pixels too
                    att_bins, att_counted, _ = _label_parts(
                        torch.where(attention, t, torch.full_like(t, self.ignore_index)), c, self.ignore_index)
                    att_weights = _class_weights(att_bins, att_counted, c, self.per_image_weights)
                else:
                    att_weights = _class_weights(bins, counted & attention, c, self.per_image_weights)
                edge_att = _weighted_nll_sum(nll, bins, valid & attention, att_weights)
                parts.update(edge_bce=edge_bce, edge_att=edge_att)
                per_batch = n if self.edge_reduction == "sum" else 1  # see the class docstring
                total = total + per_batch * self.edge_weight * edge_bce + self.att_weight * edge_att
                if self.inverseform is not None:
                    inv = self.inverseform._loss(edge, edge_t)
                    parts["inverseform"] = inv
                    total = total + per_batch * self.inv_weight * inv
        return total, {k: v.detach() for k, v in parts.items()}
