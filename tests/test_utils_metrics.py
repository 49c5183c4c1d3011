"""utils.metrics: confusion-matrix scores on hand-made matrices, mBA against a per-class
implementation of CascadePSP's definition, boundary F-score behaviour."""
import math

import cv2
import numpy as np
import pytest
import torch

from utils.metrics import (boundary_accuracy, boundary_f_counts, boundary_f_from_counts, confusion_matrix,
                           format_table, majority_class_confusion, mba_radii, scores_from_confusion)


def test_confusion_matrix_counts_and_ignores():
    target = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 2]])
    conf = confusion_matrix(pred, target, num_classes=3)
    expected = torch.tensor([[1, 1, 0],   # gt 0: pred 0, pred 1
                             [0, 2, 1],   # gt 1: pred 1 x2, pred 2
                             [1, 0, 1]])  # gt 2: pred 2, pred 0
    assert torch.equal(conf, expected)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(pred[:1], target, 3)


def test_scores_on_a_hand_made_matrix():
    conf = np.array([[3, 1, 0],
                     [0, 2, 2],
                     [0, 0, 0]])  # class 2: never in the ground truth, predicted twice
    s = scores_from_confusion(conf)
    # IoU: c0 = 3 / (4 + 3 - 3) = 3/4; c1 = 2 / (4 + 3 - 2) = 2/5; c2 = 0 / (0 + 2 - 0) = 0
    assert s["per_class_iou"] == pytest.approx([0.75, 0.4, 0.0])
    assert s["miou"] == pytest.approx((0.75 + 0.4 + 0.0) / 3)
    assert s["pixel_acc"] == pytest.approx(5 / 8)
    assert s["mean_class_acc"] == pytest.approx((3 / 4 + 2 / 4) / 2)  # class 2 has no gt
    assert s["fwiou"] == pytest.approx(0.5 * 0.75 + 0.5 * 0.4)


def test_absent_class_has_no_iou_and_is_left_out():
    conf = np.diag([5, 0, 7])
    s = scores_from_confusion(conf)
    assert s["per_class_iou"] == [1.0, None, 1.0]
    assert s["miou"] == 1.0 and s["pixel_acc"] == 1.0 and s["fwiou"] == pytest.approx(1.0)


def test_majority_baseline():
    conf = np.array([[2, 3], [1, 9]])  # gt counts: 5, 10 -> class 1 is the majority
    base = majority_class_confusion(conf)
    assert base.tolist() == [[0, 5], [0, 10]]
    s = scores_from_confusion(base)
    assert s["per_class_iou"] == pytest.approx([0.0, 10 / 15])


def cascadepsp_mba(gt, seg, void=255):
    """Straightforward per-class implementation of CascadePSP's multi-class boundary accuracy."""
    h, w = gt.shape
    max_radius = (w + h) / 300
    accs = []
    for i in range(5):
        r = 1 + int((max_radius - 1) / 5 * i)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        band = np.zeros_like(gt, dtype=np.int32)
        for c in np.unique(gt):
            if c == void:
                continue
            band += cv2.morphologyEx((gt == c).astype(np.uint8), cv2.MORPH_GRADIENT, kernel)
        band = band > 0
        g, s = gt[band], seg[band]
        valid = g != void
        accs.append(((g == s) & valid).sum() / valid.sum())
    return float(np.mean(accs))


def blob_labels(rng, h, w, n_classes=6, void_frac=0.05):
    lab = np.zeros((h, w), np.uint8)
    for _ in range(12):
        c = rng.integers(0, n_classes)
        y, x = rng.integers(0, h), rng.integers(0, w)
        cv2.circle(lab, (int(x), int(y)), int(rng.integers(3, max(4, h // 3))), int(c), -1)
    lab[rng.random((h, w)) < void_frac] = 255
    return lab


@pytest.mark.parametrize("h, w", [(64, 128), (300, 600), (512, 1024)])
def test_mba_equals_per_class_definition(h, w):
    rng = np.random.default_rng(h)
    gt = blob_labels(rng, h, w)
    seg = gt.copy()
    seg[gt == 255] = 0
    seg = np.roll(seg, 2, axis=1)  # an imperfect prediction
    seg[rng.random((h, w)) < 0.05] = 3
    assert boundary_accuracy(seg, gt) == pytest.approx(cascadepsp_mba(gt, seg), rel=1e-12)
    perfect = np.where(gt == 255, 0, gt)
    assert boundary_accuracy(perfect, gt) == 1.0


def test_mba_radii_match_cascadepsp_for_cityscapes():
    assert mba_radii(1024, 2048) == [1, 2, 4, 6, 8]
    assert mba_radii(64, 128) == [1, 1, 1, 1, 1]


def test_mba_of_uniform_image_is_nan():
    gt = np.full((20, 30), 4, np.uint8)
    assert math.isnan(boundary_accuracy(gt, gt))


def test_boundary_f_perfect_shifted_and_missing():
    gt = np.zeros((40, 60), np.uint8)
    gt[10:30, 20:40] = 1
    perfect = boundary_f_from_counts(boundary_f_counts(gt, gt, num_classes=3, tolerance=1))
    assert perfect["boundary_f"] == 1.0
    assert perfect["per_class_boundary_f"][2] is None  # no ground-truth boundary: not counted
    near = np.roll(gt, 1, axis=1)   # within tolerance 1: still perfect
    assert boundary_f_from_counts(boundary_f_counts(near, gt, 3, tolerance=1))["boundary_f"] == 1.0
    far = np.roll(gt, 5, axis=1)
    f_far = boundary_f_from_counts(boundary_f_counts(far, gt, 3, tolerance=1))["boundary_f"]
    assert 0.0 < f_far < 1.0
    missing = np.zeros_like(gt)  # the square is never predicted
    f_missing = boundary_f_from_counts(boundary_f_counts(missing, gt, 3, tolerance=1))
    assert f_missing["per_class_boundary_f"][1] == 0.0


def test_boundary_f_ignores_void():
    gt = np.zeros((40, 60), np.uint8)
    gt[10:30, 20:40] = 1
    gt[:, 50:] = 255
    pred = gt.copy()
    pred[:, 50:] = 2  # whatever is predicted on void does not count
    assert boundary_f_from_counts(boundary_f_counts(pred, gt, 3, tolerance=0))["boundary_f"] == 1.0


def test_counts_add_up_over_images():
    rng = np.random.default_rng(0)
    gts = [blob_labels(rng, 48, 64) for _ in range(3)]
    preds = [np.roll(g, 1, axis=0) for g in gts]
    total = sum(boundary_f_counts(p, g, 6, 1) for p, g in zip(preds, gts))
    assert total.shape == (6, 4) and (total[:, 0] <= total[:, 1]).all() and (total[:, 2] <= total[:, 3]).all()


def test_table_formats_percentages():
    text = format_table(["road", "sky"], [0.5, None], {"mIoU": 0.5})
    assert "road" in text and "50.00" in text and "n/a" in text
