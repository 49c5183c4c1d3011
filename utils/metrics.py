"""Segmentation metrics: confusion-matrix scores and boundary metrics.

* Region metrics come from one C x C confusion matrix (rows: ground truth,
  columns: prediction) accumulated on the device with ``bincount`` and summed
  over ranks with one all-reduce, so every pixel is counted exactly once.
  IoU follows the official Cityscapes evaluator: a class with neither ground
  truth nor prediction has no IoU (NaN) and is left out of the mean.
* mBA (mean boundary accuracy) follows CascadePSP's multi-class definition: for
  5 radii r_i = 1 + int((R - 1) / 5 * i), R = (H + W) / 300, the band is the union
  over non-void classes of each class mask's morphological gradient with a disk
  of radius r_i; the score is the pixel accuracy inside the band with void pixels
  left out, averaged over the radii and then over images.  The union of the
  per-class gradients equals "the disk around the pixel holds two different
  labels", i.e. grey dilation != grey erosion of the label map, which is what we
  compute (one dilation and one erosion per radius instead of one per class).
* Boundary F-score: per class, the boundary pixels of the predicted and of the
  ground-truth mask; precision is the share of predicted boundary pixels within
  ``tolerance`` pixels of a ground-truth boundary pixel, recall the converse.
  Matched and total counts are summed over the dataset (so ranks can all-reduce
  them) and F = 2PR / (P + R) per class, averaged over classes that have
  ground-truth boundaries.  Boundary pixels inside void ground truth are ignored.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch


# ----------------------------------------------------------------------------- confusion matrix
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """C x C int64 confusion matrix (rows: target, columns: prediction), on the inputs' device."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(conf: np.ndarray) -> Dict[str, object]:
    """IoU per class, mIoU, pixel accuracy, mean class accuracy, frequency-weighted IoU (fractions)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    union = gt + predicted - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        class_acc = np.where(gt > 0, tp / gt, np.nan)
    total = conf.sum()
    freq = gt / total if total > 0 else np.zeros_like(gt)
    present = gt > 0
    return {
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_acc": float(np.nanmean(class_acc)) if np.any(present) else float("nan"),
        "fwiou": float((freq[present] * iou[present]).sum()) if np.any(present) else float("nan"),
    }


def majority_class_confusion(conf: np.ndarray, majority: Optional[int] = None) -> np.ndarray:
    """The confusion matrix of a predictor that always outputs one class (default: the
    most frequent ground-truth class), the baseline a trained model must beat."""
    conf = np.asarray(conf)
    gt = conf.sum(axis=1)
    majority = int(np.argmax(gt)) if majority is None else majority
    out = np.zeros_like(conf)
    out[:, majority] = gt
    return out


# ----------------------------------------------------------------------------- boundary metrics
def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def mba_radii(height: int, width: int, steps: int = 5) -> List[int]:
    """CascadePSP's radii: 1 + int((R - 1) / steps * i), R = (H + W) / 300."""
    max_radius = (height + width) / 300.0
    return [1 + int((max_radius - 1) / steps * i) for i in range(steps)]


def boundary_band(label: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose disk of ``radius`` (clipped to the image) holds two different labels."""
    label = np.ascontiguousarray(label, dtype=np.uint8)
    kernel = _disk(radius)
    return cv2.dilate(label, kernel) != cv2.erode(label, kernel)


def boundary_accuracy(pred: np.ndarray, target: np.ndarray, ignore_index: int = 255) -> float:
    """mBA of one image (trainId maps, H x W).  NaN if the image has no valid band pixel."""
    if pred.shape != target.shape:
        raise ValueError(f"boundary_accuracy: prediction shape {pred.shape} != target shape {target.shape}")
    h, w = target.shape
    valid = target != ignore_index
    correct = (pred == target) & valid
    accs = []
    for radius in mba_radii(h, w):
        band = boundary_band(target, radius)
        denom = np.count_nonzero(band & valid)
        accs.append(np.count_nonzero(band & correct) / denom if denom else np.nan)
    accs = np.asarray(accs, dtype=np.float64)
    return float(np.mean(accs)) if not np.any(np.isnan(accs)) else float("nan")


def _mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Inner boundary of a binary mask: mask pixels with a 4-neighbour outside the mask.
    The image border does not make a boundary (it is not an object edge)."""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    eroded = cv2.erode(mask, cross, borderType=cv2.BORDER_REPLICATE)
    return (mask > 0) & (eroded == 0)


def boundary_f_counts(pred: np.ndarray, target: np.ndarray, num_classes: int, tolerance: int = 2,
                      ignore_index: int = 255) -> np.ndarray:
    """Per-class counts for the boundary F-score of one image: an array C x 4 of
    [matched predicted boundary px, predicted boundary px, matched gt boundary px, gt boundary px]."""
    if pred.shape != target.shape:
        raise ValueError(f"boundary_f_counts: prediction shape {pred.shape} != target shape {target.shape}")
    counts = np.zeros((num_classes, 4), dtype=np.int64)
    valid = target != ignore_index
    kernel = _disk(tolerance) if tolerance > 0 else np.ones((1, 1), np.uint8)
    present = np.union1d(np.unique(pred), np.unique(target[valid]))
    for c in present:
        if c >= num_classes:
            continue
        pb = _mask_boundary((pred == c).astype(np.uint8)) & valid
        gb = _mask_boundary((target == c).astype(np.uint8)) & valid
        if not pb.any() and not gb.any():
            continue
        gb_near = cv2.dilate(gb.astype(np.uint8), kernel) > 0
        pb_near = cv2.dilate(pb.astype(np.uint8), kernel) > 0
        counts[c] = (np.count_nonzero(pb & gb_near), np.count_nonzero(pb),
                     np.count_nonzero(gb & pb_near), np.count_nonzero(gb))
    return counts


def boundary_f_from_counts(counts: np.ndarray) -> Dict[str, object]:
    """Per-class and mean boundary F-score from summed ``boundary_f_counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1], 0.0)
        recall = np.where(counts[:, 3] > 0, counts[:, 2] / counts[:, 3], np.nan)
        f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f = np.where(counts[:, 3] > 0, f, np.nan)  # only classes with ground-truth boundaries count
    return {
        "per_class_boundary_f": [None if np.isnan(v) else float(v) for v in f],
        "boundary_f": float(np.nanmean(f)) if np.any(~np.isnan(f)) else float("nan"),
    }


def format_table(class_names: Sequence[str], per_class_iou: Sequence[Optional[float]],
                 summary: Dict[str, float], per_class_extra: Optional[Dict[str, Sequence[Optional[float]]]] = None) -> str:
    """A plain-text table of per-class IoU (percent) and the summary figures."""
    extra = per_class_extra or {}
    header = f"{'id':>3}  {'class':<15}{'IoU':>8}" + "".join(f"{name:>12}" for name in extra)
    lines = [header, "-" * len(header)]

    def fmt(v):
        return f"{100 * v:8.2f}" if v is not None and not (isinstance(v, float) and np.isnan(v)) else f"{'n/a':>8}"

    for i, name in enumerate(class_names):
        row = f"{i:>3}  {name:<15}{fmt(per_class_iou[i])}"
        row += "".join(f"{fmt(vals[i]):>12}" for vals in extra.values())
        lines.append(row)
    lines.append("-" * len(header))
    for key, value in summary.items():
        lines.append(f"{key:<20}{fmt(value)}")
    return "\n".join(lines)
