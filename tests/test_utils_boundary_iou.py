"""Boundary IoU (utils.metrics.boundary_iou_counts_batch) against an oracle written from the paper's
definition and the reference API's mask_to_boundary (per image, per class: pad, erode d times with a
3 x 3 kernel, subtract, mask out void, count): equal counts on hundreds of random maps, the image
border as a boundary on hand-worked examples, the device path equal to the host path."""
import math

import cv2
import numpy as np
import pytest
import torch

from utils.errors import InvalidInputError
from utils.metrics import boundary_iou_counts_batch, boundary_iou_dilation, boundary_iou_from_counts

NUM_CLASSES = 8  # 0..4 in both maps, 5 in the ground truth only, 6 in predictions only, 7 in neither


def reference_dilation(h, w, dilation_ratio):
    """bowenc0221/boundary-iou-api, boundary_iou/utils/boundary_utils.py."""
    img_diag = np.sqrt(h ** 2 + w ** 2)
    dilation = int(round(dilation_ratio * img_diag))
    return 1 if dilation < 1 else dilation


def mask_to_boundary(mask, dilation):
    """The reference API's mask_to_boundary with the dilation given (uint8 0/1 mask)."""
    h, w = mask.shape
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    new_mask_erode = cv2.erode(new_mask, np.ones((3, 3), dtype=np.uint8), iterations=dilation)
    return mask - new_mask_erode[1:h + 1, 1:w + 1]


def oracle_counts(preds, gts, num_classes, dilation, ignore_index=255):
    counts = np.zeros((num_classes, 2), dtype=np.int64)
    for pred, gt in zip(preds, gts):
        valid = gt != ignore_index
        for c in range(num_classes):
            gt_band = mask_to_boundary((gt == c).astype(np.uint8), dilation).astype(bool) & valid
            pred_band = mask_to_boundary((pred == c).astype(np.uint8), dilation).astype(bool) & valid
            counts[c] += (np.count_nonzero(gt_band & pred_band), np.count_nonzero(gt_band | pred_band))
    return counts


def random_maps(rng, h, w, batch):
    """Blobs and stripes of classes 0..4 (class 5 in the ground truth only), void patches and speckle;
    predictions are shifted, noisy copies with class 6 added (and, rarely, a value >= C)."""
    gts, preds = [], []
    for _ in range(batch):
        gt = rng.integers(0, 5, (1, 1)).astype(np.uint8).repeat(h, 0).repeat(w, 1)
        for _ in range(int(rng.integers(1, 8))):
            cls = int(rng.integers(0, 6)) if rng.random() < 0.9 else 5
            cv2.circle(gt, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(0, max(1, h // 2))),
                       cls, -1)
        if rng.random() < 0.3:
            gt[:, int(rng.integers(0, w)):] = int(rng.integers(0, 5))
        gt[rng.random((h, w)) < 0.03] = 255
        if rng.random() < 0.3:
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            gt[y:y + 4, x:x + 4] = 255
        pred = np.roll(np.where(gt == 255, 0, gt), int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
        pred[pred == 5] = int(rng.integers(0, 5))
        noise = rng.random((h, w)) < 0.05
        pred[noise] = rng.choice([0, 1, 2, 3, 4, 6], int(noise.sum()))
        if rng.random() < 0.1:
            pred[rng.random((h, w)) < 0.01] = 9
        gts.append(gt)
        preds.append(pred.astype(np.uint8))
    return np.stack(preds), np.stack(gts)


SIZES = [(1, 5), (5, 1), (3, 3), (2, 2), (1, 1), (4, 9), (7, 7), (13, 31), (37, 91), (64, 128), (101, 67),
         (150, 300)]
SETTINGS = [dict(), dict(dilation_ratio=0.05), dict(dilation_ratio=0.1), dict(pixels=1), dict(pixels=2),
            dict(pixels=3), dict(pixels=6)]


def oracle_cases():
    """The maps of the oracle test: (predictions, ground truths, keyword arguments), 3 maps each."""
    rng = np.random.default_rng(5)
    for trial in range(72):
        h, w = SIZES[trial % len(SIZES)]
        preds, gts = random_maps(rng, h, w, batch=3)
        yield preds, gts, SETTINGS[trial % len(SETTINGS)]


@pytest.mark.parametrize("host", [True, False], ids=["host", "torch"])
def test_counts_equal_the_oracle_on_many_random_maps(host):
    maps = 0
    for preds, gts, setting in oracle_cases():
        h, w = gts.shape[1:]
        maps += len(preds)
        d = setting.get("pixels") or reference_dilation(h, w, setting.get("dilation_ratio", 0.02))
        counts = boundary_iou_counts_batch(torch.from_numpy(preds), torch.from_numpy(gts), NUM_CLASSES,
                                           host=host, **setting)
        assert counts.dtype == torch.int64 and counts.shape == (NUM_CLASSES, 2)
        assert counts.tolist() == oracle_counts(preds, gts, NUM_CLASSES, d).tolist(), (h, w, setting)
    assert maps >= 200


def test_the_oracle_maps_cover_the_cases():
    """Classes in one map only and in neither, void pixels, values >= C, bands as wide as the map."""
    cases = list(oracle_cases())
    preds = np.concatenate([p.ravel() for p, _, _ in cases])
    gts = np.concatenate([g.ravel() for _, g, _ in cases])
    assert (gts == 5).any() and not (preds == 5).any()
    assert (preds == 6).any() and not (gts == 6).any()
    assert not (preds == 7).any() and not (gts == 7).any()
    assert (gts == 255).any() and (preds == 9).any()
    widths = [s.get("pixels") or reference_dilation(*g.shape[1:], s.get("dilation_ratio", 0.02)) for _, g, s in cases]
    assert any(2 * d >= min(g.shape[1:]) for d, (_, g, _) in zip(widths, cases))
    assert any(2 * d < min(g.shape[1:]) for d, (_, g, _) in zip(widths, cases))
    counts = sum(boundary_iou_counts_batch(torch.from_numpy(p), torch.from_numpy(g), NUM_CLASSES, **s)
                 for p, g, s in cases)
    assert counts[5, 0] == 0 < counts[5, 1] and counts[6, 0] == 0 < counts[6, 1] and counts[7].tolist() == [0, 0]


def test_dilation_follows_the_reference_rounding():
    for h in (1, 3, 17, 64, 255, 480, 512, 1024):
        for w in (1, 5, 25, 128, 640, 1000, 2048):
            for ratio in (0.001, 0.005, 0.02, 0.0221, 0.1):
                assert boundary_iou_dilation(h, w, ratio) == reference_dilation(h, w, ratio), (h, w, ratio)
    assert boundary_iou_dilation(1024, 2048) == 46  # 0.02 * 2289.7 = 45.8
    assert boundary_iou_dilation(10, 10, pixels=7) == 7
    with pytest.raises(InvalidInputError, match="pixels must be an integer >= 1, got 0"):
        boundary_iou_dilation(10, 10, pixels=0)
    with pytest.raises(InvalidInputError, match="dilation_ratio must be > 0"):
        boundary_iou_dilation(10, 10, dilation_ratio=0)


# Worked by hand: class 1 is a 4 x 4 square in the top-left corner of a 6 x 7 map, class 0 the rest.
# With d = 1 a pixel leaves the band only if its 3 x 3 neighbourhood lies inside the image and holds
# its own class alone; rows 0 and 5 and columns 0 and 6 touch the border, so they are all band.
CORNER = np.array([[1, 1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0, 0]], np.uint8)
CORNER_BAND_1 = np.array([[1, 1, 1, 1, 0, 0, 0],
                          [1, 0, 0, 1, 0, 0, 0],
                          [1, 0, 0, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0, 0]], np.uint8)
CORNER_BAND_0 = np.array([[0, 0, 0, 0, 1, 1, 1],
                          [0, 0, 0, 0, 1, 0, 1],
                          [0, 0, 0, 0, 1, 0, 1],
                          [0, 0, 0, 0, 1, 0, 1],
                          [1, 1, 1, 1, 1, 0, 1],
                          [1, 1, 1, 1, 1, 1, 1]], np.uint8)


def test_image_border_is_a_boundary_on_a_hand_worked_example():
    assert np.array_equal(mask_to_boundary((CORNER == 1).astype(np.uint8), 1), CORNER_BAND_1)
    assert np.array_equal(mask_to_boundary((CORNER == 0).astype(np.uint8), 1), CORNER_BAND_0)
    label = torch.from_numpy(CORNER)[None]
    for host in (True, False):
        counts = boundary_iou_counts_batch(label, label, 2, pixels=1, host=host)
        assert counts.tolist() == [[22, 22], [12, 12]]  # bands of 26 - 4 and 16 - 4 pixels
    # d = 2 on a 5 x 5 map of one class: only the centre is two pixels away from the border
    full = torch.zeros(1, 5, 5, dtype=torch.uint8)
    for host in (True, False):
        assert boundary_iou_counts_batch(full, full, 1, pixels=2, host=host).tolist() == [[24, 24]]
        assert boundary_iou_counts_batch(full, full, 1, pixels=3, host=host).tolist() == [[25, 25]]


def test_void_ground_truth_counts_in_neither_band():
    gt = torch.from_numpy(CORNER.copy())[None]
    pred = gt.clone()
    gt[0, 0, 0] = 255   # a band pixel of class 1 becomes void
    gt[0, 2, 5] = 255   # an interior pixel of class 0: its neighbours join the class-0 band
    for host in (True, False):
        counts = boundary_iou_counts_batch(pred, gt, 2, pixels=1, host=host)
        # void is "not class c" to the ground-truth masks: class 1 loses (0, 0) from both bands, and
        # (1, 1) joins its ground-truth band; class 0 gains (1, 5) and (3, 5) in the ground truth, and
        # (2, 5) itself counts nowhere
        assert counts.tolist() == [[22, 24], [11, 12]], host
    result = boundary_iou_from_counts(counts)
    assert result["per_class_boundary_iou"] == [22 / 24, 11 / 12]
    assert result["boundary_iou"] == pytest.approx((22 / 24 + 11 / 12) / 2)


def test_classes_with_an_empty_union_have_no_score():
    result = boundary_iou_from_counts(torch.tensor([[3, 4], [0, 0], [0, 5]]))
    assert result["per_class_boundary_iou"] == [0.75, None, 0.0]
    assert result["boundary_iou"] == pytest.approx(0.375)
    assert math.isnan(boundary_iou_from_counts(np.zeros((3, 2)))["boundary_iou"])


def test_device_path_equals_host_path_on_cityscapes_sized_maps():
    rng = np.random.default_rng(2)
    gts = np.zeros((2, 256, 512), np.uint8)
    for gt in gts:
        for _ in range(60):
            cv2.circle(gt, (int(rng.integers(0, 512)), int(rng.integers(0, 256))), int(rng.integers(2, 60)),
                       int(rng.integers(0, 19)), -1)
        gt[rng.random(gt.shape) < 0.02] = 255
    preds = np.roll(np.where(gts == 255, 0, gts), 3, axis=2).astype(np.int64)
    pred_t, gt_t = torch.from_numpy(preds), torch.from_numpy(gts).long()
    host = boundary_iou_counts_batch(pred_t, gt_t, 19, host=True)
    device = boundary_iou_counts_batch(pred_t, gt_t, 19, host=False)
    assert device.tolist() == host.tolist()
    assert boundary_iou_counts_batch(pred_t.to(torch.uint8), gt_t.to(torch.uint8), 19).tolist() == host.tolist()
    summed = sum(boundary_iou_counts_batch(pred_t[i:i + 1], gt_t[i:i + 1], 19) for i in range(2))
    assert summed.tolist() == host.tolist()  # counts add up over images
    assert (host[:, 1] > 0).sum() == 19


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        boundary_iou_counts_batch(torch.zeros(1, 4, 5), torch.zeros(1, 5, 4), 2)
