"""Segmentation metrics: confusion-matrix scores and boundary metrics.

* Region metrics come from one C x C confusion matrix (rows: ground truth,
  columns: prediction) accumulated on the device (a sync-free histogram, see
  :func:`class_histogram`) and summed over ranks with one all-reduce, so every
  pixel is counted exactly once.
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
  "Within ``tolerance``" is a true round disk (dy^2 + dx^2 <= tolerance^2), so the score
  does not change when both maps are transposed (OpenCV's ellipse, used before, covers
  17 pixels at tolerance 2 and is not symmetric under transposition).
* Edge-map F-score (ODS): for an edge head's probabilities against the edge targets, the
  same tolerance matching at each threshold t = 0.02, 0.04, ..., 0.98 (pixels with probability
  >= t are edges), counts summed over the dataset, and the F-score at the best single threshold.
  Both maps are bands a few pixels wide (the targets mark pixels within 2 px of a boundary), so
  there is no thinning or one-to-one matching as in the BSDS benchmark.
* Boundary IoU (Cheng et al., CVPR 2021; reference API bowenc0221/boundary-iou-api): per class,
  the IoU of the ground-truth and predicted boundary bands, each the class mask minus its erosion
  by d pixels (the mask padded by one background pixel, so the image border is a boundary),
  d = max(1, round(0.02 x image diagonal)); pixels of void ground truth count in neither band;
  intersections and unions summed over the dataset.

Two implementations of the boundary metrics with the same definitions: the numpy/OpenCV
ones (one image, on the host; the test oracle) and the torch ones (``*_batch``: a whole
batch, on the tensors' device, no host synchronisation), which validation uses.  The
torch versions decompose each disk into rows: a dilation is a horizontal running max per
row half-width followed by one shifted max per row, so its cost grows with the radius,
not with its square, and never depends on the number of classes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch

from utils.determinism import replacing
from utils.errors import InvalidInputError


# ----------------------------------------------------------------------------- confusion matrix
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """C x C int64 confusion matrix (rows: target, columns: prediction), on the inputs' device."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    target, pred = target.long(), pred.long()
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    index = torch.where(valid, target * num_classes + pred, -1)
    return class_histogram(index, num_classes * num_classes).reshape(num_classes, num_classes)


def histogram_method(device: torch.device) -> str:
    """The default of :func:`class_histogram`: 'scatter' on the CPU and wherever ``histc`` has no
    deterministic kernel and deterministic algorithms are on (CUDA, utils/determinism.py),
    else 'histc'."""
    return "scatter" if torch.device(device).type == "cpu" or replacing(device) else "histc"


def class_histogram(label: torch.Tensor, num_classes: int, method: Optional[str] = None) -> torch.Tensor:
    """Counts of the values 0..C-1 of ``label`` (values outside are dropped), as int64 on its
    device, without a host synchronisation (boolean indexing and ``bincount`` make CUDA wait
    for the host to learn a size).  ``method``: 'scatter' or 'histc' (block-local histograms,
    where a scatter-add would pile millions of atomic adds onto the few bins of the frequent
    classes); both exact; default :func:`histogram_method`."""
    index = label.reshape(-1)
    method = method or histogram_method(index.device)
    if method == "scatter":
        index = index.long()
        index = torch.where((index >= 0) & (index < num_classes), index, num_classes)
        counts = torch.zeros(num_classes + 1, dtype=torch.int64, device=label.device)
        counts.scatter_add_(0, index, torch.ones_like(index))
        return counts[:num_classes]
    if method != "histc":
        raise ValueError(f"class_histogram: method must be 'scatter' or 'histc', got {method!r}")
    counts = torch.zeros(num_classes, dtype=torch.int64, device=label.device)
    # float32 bins hold integers exactly up to 2^24: at most that many values per call.
    for chunk in index.split(1 << 24):
        chunk = chunk.float()
        chunk = torch.where((chunk >= 0) & (chunk < num_classes), chunk, -1.0)  # histc counts max itself
        counts += torch.histc(chunk, bins=num_classes, min=0, max=num_classes).long()
    return counts


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
    """CascadePSP's structuring element for mBA (OpenCV's ellipse), kept for its definition."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def round_disk(radius: int) -> np.ndarray:
    """(2r+1) x (2r+1) uint8 mask of the offsets with dy^2 + dx^2 <= r^2: the boundary-F
    tolerance region, symmetric under flips and transposition."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx <= r * r).astype(np.uint8)


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
    kernel = round_disk(tolerance)
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


# ----------------------------------------------------------------------------- boundary metrics on the device
def _row_half_widths(kernel: np.ndarray) -> List[int]:
    """Half-width of each row of a (2r+1)-square kernel whose rows are centred intervals
    (OpenCV's ellipse and the round disk are); -1 for an empty row."""
    kernel = np.asarray(kernel) > 0
    size = kernel.shape[0]
    if kernel.shape != (size, size) or size % 2 == 0:
        raise ValueError(f"expected an odd square kernel, got shape {kernel.shape}")
    r = size // 2
    widths = []
    for row in kernel:
        w = int(row.sum()) // 2
        if row.sum() and not (row.sum() % 2 == 1 and row[r - w:r + w + 1].all()):
            raise ValueError("kernel rows must be intervals centred on the anchor")
        widths.append(w if row.sum() else -1)
    return widths


def _shift_pair(offset: int, size: int):
    """Slices (dst, src) with dst[i] = src[i + offset] for the in-range i."""
    if offset >= 0:
        return slice(0, size - offset), slice(offset, size)
    return slice(-offset, size), slice(0, size + offset)


def _morphology(x: torch.Tensor, kernel: np.ndarray, op) -> torch.Tensor:
    """Grey dilation (op=torch.maximum) or erosion (torch.minimum) of B x H x W ``x`` by a
    row-decomposable kernel, as cv2.dilate/erode with the default border (pixels outside
    the image are left out)."""
    widths = _row_half_widths(kernel)
    r = len(widths) // 2
    h, w = x.shape[-2:]
    rows = {0: x}
    running = x
    for half in range(1, max(widths) + 1):  # running[..., j] = op over x[..., j - half : j + half]
        running = running.clone()
        if half < w:
            dst, src = _shift_pair(half, w)
            running[..., dst] = op(running[..., dst], x[..., src])
            dst, src = _shift_pair(-half, w)
            running[..., dst] = op(running[..., dst], x[..., src])
        rows[half] = running
    out = rows[widths[r]].clone()
    for ky, half in enumerate(widths):
        dy = ky - r
        if half < 0 or dy == 0 or abs(dy) >= h:
            continue
        dst, src = _shift_pair(dy, h)
        out[..., dst, :] = op(out[..., dst, :], rows[half][..., src, :])
    return out


def _check_batch(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"{name}: expected prediction and target of the same shape B x H x W, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")


def _on_host(tensor: torch.Tensor, host: Optional[bool]) -> bool:
    """Whether to use the host kernels: by default for CPU tensors, where OpenCV and numpy
    (single-threaded, SIMD) beat many small multi-threaded torch ops; torch everywhere else."""
    return tensor.device.type == "cpu" if host is None else host


def boundary_accuracy_batch(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, *,
                            host: Optional[bool] = None) -> torch.Tensor:
    """mBA of each image of a batch (B x H x W trainId tensors, values < 256 apart from
    ``ignore_index``), on their device: float64, B values, NaN where an image has no valid
    band pixel at some radius.  Same definition (and OpenCV ellipse) as :func:`boundary_accuracy`.
    ``host``: use OpenCV on the (CPU) tensors' memory; default: only for CPU tensors."""
    _check_batch(pred, target, "boundary_accuracy_batch")
    if _on_host(pred, host):
        p, t = pred.cpu().to(torch.uint8).numpy(), target.cpu().to(torch.uint8).numpy()
        values = [boundary_accuracy(p[i], t[i], ignore_index) for i in range(len(p))]
        return torch.tensor(values, dtype=torch.float64, device=pred.device)
    h, w = target.shape[-2:]
    label = target.to(torch.uint8)
    valid = target != ignore_index
    correct = (pred == target) & valid
    accs = []
    for radius in mba_radii(h, w):
        kernel = _disk(radius)
        band = _morphology(label, kernel, torch.maximum) != _morphology(label, kernel, torch.minimum)
        band &= valid
        denom = band.sum((-2, -1), dtype=torch.float64)
        accs.append((band & correct).sum((-2, -1), dtype=torch.float64) / denom)  # 0 / 0 = NaN
    return torch.stack(accs, 1).mean(1)  # NaN if any radius is NaN, as the numpy version


# These two work on torch tensors and numpy arrays alike (slicing and elementwise operators only).
def _boundary_pixels(label):
    """Pixels with an in-image 4-neighbour of another label: the union over classes of
    :func:`_mask_boundary` (each boundary pixel belongs to its own label's boundary)."""
    out = label != label
    vertical = label[..., 1:, :] != label[..., :-1, :]
    horizontal = label[..., :, 1:] != label[..., :, :-1]
    out[..., 1:, :] |= vertical
    out[..., :-1, :] |= vertical
    out[..., :, 1:] |= horizontal
    out[..., :, :-1] |= horizontal
    return out


def _matched_within(points, labels, others, kernel: np.ndarray):
    """``points`` & (some pixel within ``kernel`` holds ``others`` == this pixel's ``labels``);
    ``others`` holds -1 where there is no boundary pixel."""
    matched = points != points
    h, w = labels.shape[-2:]
    r = kernel.shape[0] // 2
    for dy, dx in zip(*np.nonzero(kernel)):
        dy, dx = int(dy) - r, int(dx) - r
        if abs(dy) >= h or abs(dx) >= w:
            continue
        (ydst, ysrc), (xdst, xsrc) = _shift_pair(dy, h), _shift_pair(dx, w)
        matched[..., ydst, xdst] |= others[..., ysrc, xsrc] == labels[..., ydst, xdst]
    return matched & points


def boundary_f_counts_batch(pred: torch.Tensor, target: torch.Tensor, num_classes: int, tolerance: int = 2,
                            ignore_index: int = 255, *, host: Optional[bool] = None) -> torch.Tensor:
    """Per-class boundary-F counts of a whole batch (B x H x W), summed over its images, on the
    inputs' device: C x 4 int64, equal to the sum of :func:`boundary_f_counts` over the images.
    Instead of one dilation per class: a boundary pixel of class c is matched when a pixel of
    the disk around it is a boundary pixel of class c in the other map (one comparison per
    disk offset).  ``host``: numpy on the (CPU) tensors' memory; default: only for CPU tensors."""
    _check_batch(pred, target, "boundary_f_counts_batch")
    on_host = _on_host(pred, host)
    if on_host:
        p, t = pred.cpu().to(torch.int16).numpy(), target.cpu().to(torch.int16).numpy()
        where = np.where
    else:
        p, t = pred.to(torch.int16), target.to(torch.int16)
        where = torch.where
    valid = t != ignore_index
    pred_b = _boundary_pixels(p) & valid & (p < num_classes)
    gt_b = _boundary_pixels(t) & valid & (t < num_classes)
    kernel = round_disk(tolerance)
    pred_hit = _matched_within(pred_b, p, where(gt_b, t, -1), kernel)
    gt_hit = _matched_within(gt_b, t, where(pred_b, p, -1), kernel)
    if on_host:
        counts = [np.bincount(label[mask], minlength=num_classes)[:num_classes]
                  for mask, label in ((pred_hit, p), (pred_b, p), (gt_hit, t), (gt_b, t))]
        return torch.from_numpy(np.stack(counts, 1).astype(np.int64)).to(pred.device)
    return torch.stack([class_histogram(torch.where(mask, label, num_classes), num_classes)
                        for mask, label in ((pred_hit, p), (pred_b, p), (gt_hit, t), (gt_b, t))], 1)


# ----------------------------------------------------------------------------- Boundary IoU
def boundary_iou_dilation(height: int, width: int, dilation_ratio: float = 0.02, pixels: Optional[int] = None) -> int:
    """The width d of the Boundary IoU band: ``pixels`` when given, else the reference API's
    ``max(1, int(round(dilation_ratio * image diagonal)))``."""
    if pixels is not None:
        if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 1:
            raise InvalidInputError(f"boundary IoU: pixels must be an integer >= 1, got {pixels!r}")
        return int(pixels)
    if not dilation_ratio > 0:
        raise InvalidInputError(f"boundary IoU: dilation_ratio must be > 0, got {dilation_ratio!r}")
    return max(1, int(round(dilation_ratio * np.sqrt(height ** 2 + width ** 2))))


def _class_or_sentinel(label, num_classes: int, on_host: bool):
    """``label`` with every value outside 0..C-1 replaced by C (uint8, or uint16 beyond 255 classes,
    on the host; int16 on the device): a class mask only asks "== c", so all other values may be one."""
    if on_host:
        dtype = np.uint8 if num_classes <= 255 else np.uint16
        if label.dtype == dtype:
            return np.minimum(label, dtype(num_classes))
        # -1 wraps to the type's maximum, which the minimum brings down to C
        return np.minimum(np.clip(label, -1, num_classes).astype(dtype), dtype(num_classes))
    label = label.to(torch.int32)
    return torch.where((label >= 0) & (label < num_classes), label, num_classes).to(torch.int16)


def _band_counts(gt_key, pred_key, num_classes: int, histogram) -> tuple:
    """(|G_c|, |P_c|, |G_c & P_c|) per class from the class of each pixel's ground-truth band and
    predicted band (C where none): one joint (C+1) x (C+1) histogram, whose diagonal is the
    intersection."""
    joint = histogram(gt_key, pred_key).reshape(num_classes + 1, num_classes + 1)
    return joint[:num_classes].sum(1), joint[:, :num_classes].sum(0), joint.diagonal()[:num_classes]


def _joint_histogram_host(gt_key: np.ndarray, pred_key: np.ndarray, num_classes: int) -> np.ndarray:
    bins = num_classes + 1
    if gt_key.dtype == np.uint8 and gt_key.size < (1 << 24):  # float32 bins count exactly below 2^24
        hist = cv2.calcHist([gt_key, pred_key], [0, 1], None, [bins, bins], [0, bins, 0, bins])
        return hist.astype(np.int64)
    return np.bincount((gt_key.astype(np.int64) * bins + pred_key).ravel(), minlength=bins * bins)


def _uniform_box_host(label: np.ndarray, d: int) -> np.ndarray:
    """H x W bool: the (2d+1)-square around the pixel lies inside the image and holds one value."""
    h, w = label.shape
    inside = np.zeros((h, w), dtype=bool)
    if h <= 2 * d or w <= 2 * d:
        return inside
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * d + 1, 2 * d + 1))
    uniform = cv2.dilate(label, kernel) == cv2.erode(label, kernel)
    inside[d:h - d, d:w - d] = uniform[d:h - d, d:w - d]
    return inside


def _uniform_box_device(label: torch.Tensor, d: int) -> torch.Tensor:
    """:func:`_uniform_box_host` for a B x H x W batch on its device: a (2d+1)-square max and min
    as two separable max-pools each (the values are small integers, exact in float32)."""
    h, w = label.shape[-2:]
    inside = torch.zeros(label.shape, dtype=torch.bool, device=label.device)
    if h <= 2 * d or w <= 2 * d:
        return inside
    k = 2 * d + 1
    x = label.to(torch.float32).unsqueeze(1)

    def box_max(t):
        t = torch.nn.functional.max_pool2d(t, (1, k), stride=1, padding=(0, d))
        return torch.nn.functional.max_pool2d(t, (k, 1), stride=1, padding=(d, 0))

    uniform = (box_max(x) == -box_max(-x)).squeeze(1)
    inside[..., d:h - d, d:w - d] = uniform[..., d:h - d, d:w - d]
    return inside


def boundary_iou_counts_batch(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                              dilation_ratio: float = 0.02, pixels: Optional[int] = None, ignore_index: int = 255,
                              *, host: Optional[bool] = None) -> torch.Tensor:
    """Boundary IoU counts of a batch (B x H x W train ids), summed over its images, on the inputs'
    device: C x 2 int64, per class [|G_c & P_c|, |G_c | P_c|] (Cheng et al., CVPR 2021).

    G_c is the band of the ground-truth mask of class c: the mask minus its erosion by d pixels
    (d from :func:`boundary_iou_dilation`), the mask padded by one pixel of background first, as
    the reference API's ``mask_to_boundary`` (so the image border counts as a boundary); P_c the
    same for the prediction.  Pixels whose ground truth is ``ignore_index`` count in neither band.
    The erosion is not computed per class: a mask pixel survives d erosions by the 3 x 3 square
    exactly when the (2d+1)-square around it lies inside the image and holds its class only,
    i.e. when the label map's grey dilation and erosion by that square agree there.
    ``host``: OpenCV/numpy on the (CPU) tensors' memory; default: only for CPU tensors."""
    _check_batch(pred, target, "boundary_iou_counts_batch")
    d = boundary_iou_dilation(*target.shape[-2:], dilation_ratio=dilation_ratio, pixels=pixels)
    if _on_host(pred, host):
        return _boundary_iou_counts_host(pred, target, num_classes, d, ignore_index)
    valid = target != ignore_index
    p = _class_or_sentinel(pred, num_classes, on_host=False)
    t = _class_or_sentinel(target, num_classes, on_host=False)
    gt_key = torch.where(valid & ~_uniform_box_device(t, d), t, num_classes).long()
    pred_key = torch.where(valid & ~_uniform_box_device(p, d), p, num_classes).long()
    bins = num_classes + 1
    gt_n, pred_n, both_n = _band_counts(gt_key, pred_key, num_classes,
                                        lambda g, q: class_histogram(g * bins + q, bins * bins))
    return torch.stack([both_n, gt_n + pred_n - both_n], 1)


def _boundary_iou_counts_host(pred: torch.Tensor, target: torch.Tensor, num_classes: int, d: int,
                              ignore_index: int) -> torch.Tensor:
    counts = np.zeros((3, num_classes), dtype=np.int64)  # |G_c|, |P_c|, |G_c & P_c|
    for p, t in zip(pred.cpu().numpy(), target.cpu().numpy()):
        valid = t != ignore_index
        p = _class_or_sentinel(p, num_classes, on_host=True)
        t = _class_or_sentinel(t, num_classes, on_host=True)
        gt_key = np.where(valid & ~_uniform_box_host(t, d), t, t.dtype.type(num_classes))
        pred_key = np.where(valid & ~_uniform_box_host(p, d), p, p.dtype.type(num_classes))
        counts += np.stack(_band_counts(gt_key, pred_key, num_classes,
                                        lambda g, q: _joint_histogram_host(g, q, num_classes)))
    union = counts[0] + counts[1] - counts[2]
    return torch.from_numpy(np.stack([counts[2], union], 1)).to(pred.device)


def boundary_iou_from_counts(counts) -> Dict[str, object]:
    """Per-class and mean Boundary IoU from summed :func:`boundary_iou_counts_batch` counts: I / U per
    class; a class whose union is empty over the whole set has no score (None) and is left out
    of the mean (NaN when no class has one)."""
    counts = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1], np.nan)
    return {
        "per_class_boundary_iou": [None if np.isnan(v) else float(v) for v in iou],
        "boundary_iou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
    }


# ----------------------------------------------------------------------------- edge maps
# The edge F-score thresholds the probabilities at the levels i / EDGE_LEVELS, i = 1 .. EDGE_LEVELS - 1
# (0.02, 0.04, ..., 0.98): a pixel is an edge at level i when floor(EDGE_LEVELS * p) >= i, with the
# product in float32 (so that both implementations below agree bit for bit).
EDGE_LEVELS = 50
EDGE_THRESHOLDS = tuple(i / EDGE_LEVELS for i in range(1, EDGE_LEVELS))


def edge_f_counts(prob: np.ndarray, target: np.ndarray, tolerance: int = 2) -> np.ndarray:
    """Counts for the edge-map F-score of one image (the oracle of :func:`edge_f_counts_batch`):
    (EDGE_LEVELS - 1) x 4 int64, per threshold, [predicted edge px within ``tolerance`` of a
    target edge px, predicted edge px, target edge px within ``tolerance`` of a predicted one,
    target edge px]."""
    if prob.shape != target.shape or prob.ndim != 2:
        raise ValueError(f"edge_f_counts: expected two H x W maps of one shape, got {prob.shape} and {target.shape}")
    kernel = round_disk(tolerance)
    tgt = (np.asarray(target) > 0.5).astype(np.uint8)
    tgt_near = cv2.dilate(tgt, kernel) > 0
    level = np.floor(np.clip(np.asarray(prob, dtype=np.float32), 0, 1) * np.float32(EDGE_LEVELS))
    counts = np.zeros((EDGE_LEVELS - 1, 4), dtype=np.int64)
    for i in range(1, EDGE_LEVELS):
        pred = (level >= i).astype(np.uint8)
        pred_near = cv2.dilate(pred, kernel) > 0
        counts[i - 1] = (np.count_nonzero(pred & tgt_near), np.count_nonzero(pred),
                         np.count_nonzero(tgt & pred_near), np.count_nonzero(tgt))
    return counts


def _level_histogram(levels: torch.Tensor, bins: int, host: bool) -> torch.Tensor:
    """Counts of the values 0..bins-1 of a uint8 map (all below ``bins``): ``bincount`` on the host
    (the fastest there; on a GPU its length would wait for the data's maximum), else the
    fixed-size :func:`class_histogram`."""
    if host:
        return torch.bincount(levels.flatten(), minlength=bins)
    return class_histogram(levels, bins)


def edge_f_counts_batch(prob: torch.Tensor, target: torch.Tensor, tolerance: int = 2, *,
                        host: Optional[bool] = None) -> torch.Tensor:
    """:func:`edge_f_counts` summed over a batch (B x H x W edge probabilities and {0, 1} targets),
    on their device, without a threshold loop: a pixel is an edge at every level up to its own,
    and a target pixel is matched at every level up to the highest level in its disk (one grey
    dilation of the levels), so two histograms of the levels give all the counts.  ``host``:
    count with ``bincount`` (default: for CPU tensors only); otherwise no host synchronisation."""
    if prob.shape != target.shape or prob.dim() != 3:
        raise ValueError(f"edge_f_counts_batch: expected prediction and target of the same shape B x H x W, "
                         f"got {tuple(prob.shape)} and {tuple(target.shape)}")
    n = EDGE_LEVELS
    # level 0..n-1 (uint8; truncation = floor for p >= 0), and its maximum over each disk
    level = (prob.float().clamp(0, 1) * n).to(torch.uint8).clamp_(max=n - 1)
    tgt = (target > 0.5).to(torch.uint8)
    kernel = round_disk(tolerance)
    level_near = _morphology(level, kernel, torch.maximum)
    tgt_near = _morphology(tgt, kernel, torch.maximum)
    # one histogram per pair: levels of all pixels (first n bins) and of the flagged ones (last n)
    on_host = _on_host(prob, host)
    by_pred = _level_histogram(level + n * tgt_near, 2 * n, on_host).view(2, n)
    by_target = _level_histogram(level_near + n * tgt, 2 * n, on_host)[n:]

    def at_least(hist: torch.Tensor) -> torch.Tensor:
        """How many pixels have level >= i, for i = 1 .. n-1."""
        return hist.flip(0).cumsum(0).flip(0)[1:]

    all_pixels = at_least(by_pred.sum(0))
    return torch.stack([at_least(by_pred[1]), all_pixels, at_least(by_target),
                        tgt.sum(dtype=torch.int64).expand(n - 1)], 1).to(torch.int64)


def edge_f_from_counts(counts: np.ndarray, thresholds: Sequence[float] = EDGE_THRESHOLDS) -> Dict[str, float]:
    """The ODS edge F-score from dataset-summed counts: the best F = 2PR / (P + R) over one
    threshold shared by all images, with that threshold and its precision and recall."""
    counts = np.asarray(counts, dtype=np.float64)
    if not counts[:, 3].any():
        return {"edge_f": float("nan"), "edge_f_threshold": float("nan"), "edge_precision": float("nan"),
                "edge_recall": float("nan")}
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1], 0.0)
        recall = counts[:, 2] / counts[:, 3]
        f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f))
    return {"edge_f": float(f[best]), "edge_f_threshold": float(thresholds[best]),
            "edge_precision": float(precision[best]), "edge_recall": float(recall[best])}


def format_table(class_names: Sequence[str], per_class_iou: Sequence[Optional[float]],
                 summary: Dict[str, float], per_class_extra: Optional[Dict[str, Sequence[Optional[float]]]] = None) -> str:
    """A plain-text table of per-class IoU (percent) and the summary figures."""
    extra = per_class_extra or {}
    widths = [max(12, len(name) + 2) for name in extra]
    name_width = max([15] + [len(n) + 1 for n in class_names])
    header = f"{'id':>3}  {'class':<{name_width}}{'IoU':>8}" + "".join(
        f"{name:>{w}}" for name, w in zip(extra, widths))
    lines = [header, "-" * len(header)]

    def fmt(v):
        return f"{100 * v:8.2f}" if v is not None and not (isinstance(v, float) and np.isnan(v)) else f"{'n/a':>8}"

    for i, name in enumerate(class_names):
        row = f"{i:>3}  {name:<{name_width}}{fmt(per_class_iou[i])}"
        row += "".join(f"{fmt(vals[i]):>{w}}" for vals, w in zip(extra.values(), widths))
        lines.append(row)
    lines.append("-" * len(header))
    key_width = max([20] + [len(k) + 1 for k in summary])
    for key, value in summary.items():
        lines.append(f"{key:<{key_width}}{fmt(value)}")
    return "\n".join(lines)
