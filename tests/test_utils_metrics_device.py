"""utils.metrics on tensors: the batched torch (device) and host versions of mBA and the
boundary-F counts equal the per-image numpy/OpenCV oracle on many maps; the boundary-F
tolerance region is a true round disk; the confusion matrix needs no host round trip."""
import math

import cv2
import numpy as np
import pytest
import torch

from utils.metrics import (boundary_accuracy, boundary_accuracy_batch, boundary_f_counts, boundary_f_counts_batch,
                           boundary_f_from_counts, class_histogram, confusion_matrix, round_disk)

SIZES = [(64, 128), (37, 91), (150, 300), (5, 7), (1, 9), (9, 1), (301, 600)]


def random_maps(rng, h, w, batch=3, num_classes=6):
    """Blobs of classes with void speckle, and predictions that are shifted, noisy copies."""
    gts, preds = [], []
    for _ in range(batch):
        gt = np.zeros((h, w), np.uint8)
        for _ in range(10):
            cv2.circle(gt, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(1, max(2, h // 3))),
                       int(rng.integers(0, num_classes)), -1)
        gt[rng.random((h, w)) < 0.05] = 255
        pred = np.roll(np.where(gt == 255, 0, gt), int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
        pred[rng.random((h, w)) < 0.05] = rng.integers(0, num_classes)
        gts.append(gt)
        preds.append(pred.astype(np.uint8))
    return np.stack(preds), np.stack(gts)


@pytest.mark.parametrize("host", [False, True], ids=["torch", "host"])
def test_batched_metrics_equal_the_numpy_oracle_on_many_maps(host):
    rng = np.random.default_rng(11)
    for trial in range(28):
        h, w = SIZES[trial % len(SIZES)]
        preds, gts = random_maps(rng, h, w)
        tolerance = trial % 4
        pred_t, gt_t = torch.from_numpy(preds).long(), torch.from_numpy(gts).long()
        mba = boundary_accuracy_batch(pred_t, gt_t, host=host)
        expected = np.array([boundary_accuracy(p, g) for p, g in zip(preds, gts)])
        assert mba.dtype == torch.float64 and mba.shape == (len(preds),)
        np.testing.assert_allclose(mba.numpy(), expected, rtol=1e-12, equal_nan=True)
        counts = boundary_f_counts_batch(pred_t, gt_t, 6, tolerance, host=host)
        oracle = sum(boundary_f_counts(p, g, 6, tolerance) for p, g in zip(preds, gts))
        assert counts.dtype == torch.int64 and counts.tolist() == oracle.tolist(), (trial, tolerance)


def test_cityscapes_sized_map_with_all_classes():
    rng = np.random.default_rng(3)
    preds, gts = random_maps(rng, 256, 512, batch=2, num_classes=19)
    gts[0, :, :7] = 30  # a value >= num_classes that is not void: left out, as by the oracle
    pred_t, gt_t = torch.from_numpy(preds), torch.from_numpy(gts)
    for host in (False, True):
        np.testing.assert_allclose(boundary_accuracy_batch(pred_t, gt_t, host=host).numpy(),
                                   [boundary_accuracy(p, g) for p, g in zip(preds, gts)], rtol=1e-12)
        oracle = sum(boundary_f_counts(p, g, 19, 2) for p, g in zip(preds, gts))
        assert boundary_f_counts_batch(pred_t, gt_t, 19, 2, host=host).tolist() == oracle.tolist()


def test_tolerance_region_is_a_round_disk():
    assert round_disk(0).tolist() == [[1]]
    assert round_disk(1).sum() == 5
    assert round_disk(2).sum() == 13  # OpenCV's ellipse covered 17 pixels here
    for r in range(6):
        disk = round_disk(r)
        assert np.array_equal(disk, disk.T) and np.array_equal(disk, disk[::-1]) and np.array_equal(disk, disk[:, ::-1])
        yy, xx = np.nonzero(disk)
        assert ((yy - r) ** 2 + (xx - r) ** 2 <= r * r).all() and disk.sum() == sum(
            1 for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r)


@pytest.mark.parametrize("host", [False, True], ids=["torch", "host"])
def test_boundary_f_is_unchanged_by_transposing_both_maps(host):
    rng = np.random.default_rng(5)
    preds, gts = random_maps(rng, 60, 60)
    for tolerance in (1, 2, 3):
        a = boundary_f_counts_batch(torch.from_numpy(preds), torch.from_numpy(gts), 6, tolerance, host=host)
        b = boundary_f_counts_batch(torch.from_numpy(preds.transpose(0, 2, 1).copy()),
                                    torch.from_numpy(gts.transpose(0, 2, 1).copy()), 6, tolerance, host=host)
        assert a.tolist() == b.tolist()


def test_diagonal_shift_by_two_is_outside_tolerance_two():
    """A pixel at offset (2, 2) is 2.83 px away: outside a round disk of radius 2."""
    gt = np.zeros((1, 30, 30), np.uint8)
    gt[0, 10:20, 10:20] = 1
    pred = np.roll(np.roll(gt, 2, axis=1), 2, axis=2)
    counts = boundary_f_counts_batch(torch.from_numpy(pred), torch.from_numpy(gt), 2, 2)
    # the boundary corners of the shifted square are farther than 2 px from any gt boundary pixel
    assert counts[1, 0] < counts[1, 1]
    assert counts.tolist() == boundary_f_counts(pred[0], gt[0], 2, 2).tolist()
    assert boundary_f_from_counts(counts.numpy())["boundary_f"] < 1.0


def test_batched_mba_nan_for_a_uniform_image_and_shape_errors():
    gt = torch.full((2, 20, 30), 4)
    gt[1, :, 15:] = 2
    mba = boundary_accuracy_batch(gt.clone(), gt)
    assert math.isnan(mba[0]) and mba[1] == 1.0
    with pytest.raises(ValueError, match="B x H x W"):
        boundary_accuracy_batch(gt[0], gt[0])
    with pytest.raises(ValueError, match="B x H x W"):
        boundary_f_counts_batch(gt[:1], gt, 19)


@pytest.mark.parametrize("method", ["scatter", "histc"])
def test_class_histogram_is_exact_and_drops_out_of_range_values(method):
    label = torch.tensor([0, 2, 2, 5, -1, 255, 3])
    assert class_histogram(label, 3, method).tolist() == [1, 0, 2]  # 3 == C is out of range too
    rng = torch.Generator().manual_seed(0)
    for n, classes in ((0, 19), (1, 19), (100_003, 19), (3_000_000, 361)):
        values = torch.randint(-2, classes + 40, (n,), generator=rng)
        kept = values[(values >= 0) & (values < classes)]
        assert class_histogram(values, classes, method).tolist() == torch.bincount(kept, minlength=classes).tolist()


def test_confusion_matrix_drops_out_of_range_values():
    target = torch.tensor([[0, 1, 255, 7]])
    pred = torch.tensor([[1, 1, 0, 0]])
    assert confusion_matrix(pred, target, 3).tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
