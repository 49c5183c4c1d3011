"""Edge targets: bit-exact against a straightforward per-class distance-transform oracle."""
import cv2
import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from datasets.edges import edge_target
from datasets.labels import labelid_to_trainid
from datasets.synthetic import render_scene


def oracle(trainid_mask, radius=2, num_classes=19):
    """The definition, spelled out as the reference's loader does it: one-hot channels for
    ids 1..num_classes, zero padding, EDT of mask + EDT of complement, crop, threshold."""
    onehot = np.array([trainid_mask == (i + 1) for i in range(num_classes)]).astype(np.uint8)
    padded = np.pad(onehot, ((0, 0), (1, 1), (1, 1)), mode="constant", constant_values=0)
    edgemap = np.zeros(trainid_mask.shape)
    for i in range(num_classes):
        dist = distance_transform_edt(padded[i]) + distance_transform_edt(1.0 - padded[i])
        dist = dist[1:-1, 1:-1]
        dist[dist > radius] = 0
        edgemap += dist
    return (edgemap > 0).astype(np.uint8)


def random_label_map(rng, height, width):
    kind = rng.integers(4)
    values = rng.choice(np.r_[0:20, 255, 77], size=rng.integers(1, 7))
    if kind == 0:  # salt and pepper
        return values[rng.integers(0, len(values), (height, width))].astype(np.uint8)
    if kind == 1:  # blocks
        small = values[rng.integers(0, len(values), (max(1, height // 5), max(1, width // 5)))]
        return cv2.resize(small.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    label = np.full((height, width), values[0], np.uint8)  # shapes on a background
    for value in values[1:]:
        cx, cy = (int(v) for v in rng.integers(0, (width, height)))
        if kind == 2:
            cv2.circle(label, (cx, cy), int(rng.integers(1, 12)), int(value), -1)
        else:
            cv2.line(label, (cx, cy), tuple(int(v) for v in rng.integers(0, (width, height))),
                     int(value), int(rng.integers(1, 3)))
    return label


def assert_same(label, radius):
    ours, expected = edge_target(label, radius), oracle(label, radius)
    assert ours.dtype == np.uint8 and ours.shape == label.shape
    assert set(np.unique(ours)) <= {0, 1}
    mismatch = np.argwhere(ours != expected)
    assert mismatch.size == 0, f"radius {radius}, shape {label.shape}: first mismatches {mismatch[:5]}"


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_random_label_maps_at_many_odd_sizes(radius):
    rng = np.random.default_rng(radius)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 64, 2))
        assert_same(random_label_map(rng, height, width), radius)


def test_non_integer_radii():
    rng = np.random.default_rng(7)
    for radius in (0, 0.5, 1.5, 2.2, 2.5):
        for _ in range(20):
            assert_same(random_label_map(rng, *(int(v) for v in rng.integers(1, 30, 2))), radius)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_synthetic_labels(radius):
    for seed in range(2):
        _, label_ids = render_scene(np.random.default_rng(seed), 96, 160)
        assert_same(labelid_to_trainid(label_ids), radius)


def test_touching_the_border_absent_classes_and_ignore():
    # a class filling the whole image: only the 2-pixel frame is edge (border = outside)
    full = np.full((9, 11), 5, np.uint8)
    assert_same(full, 2)
    assert edge_target(full, 2)[2:-2, 2:-2].sum() == 0 and edge_target(full, 2)[0].all()
    # road (0) and ignore (255) have no channel: a map of them has no edge at radius 2
    for value in (0, 255, 19 + 1):
        assert edge_target(np.full((6, 7), value, np.uint8), 2).sum() == 0
        assert_same(np.full((6, 7), value, np.uint8), 3)  # radius 3: the absent-class corner quirk
    # ignore regions next to classes, classes in corners, every class present (no absent
    # class except 19, which never occurs as a train id)
    label = np.full((20, 40), 255, np.uint8)
    label[:, :19] = np.arange(19, dtype=np.uint8)[None, :]
    label[15:, 30:] = 7
    label[0, 39] = 12
    for radius in (1, 2, 3):
        assert_same(label, radius)
    # 19 itself is a channel of the reference (ids 1..19): present or absent
    label[5:9, 22:26] = 19
    assert_same(label, 3)


def test_accepts_wider_integer_types_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    label = random_label_map(rng, 17, 23)
    assert np.array_equal(edge_target(label.astype(np.int64)), edge_target(label))
    wide = label.astype(np.int32)
    wide[0, 0] = 1000  # not a class: behaves like 255
    narrow = label.copy()
    narrow[0, 0] = 255
    assert np.array_equal(edge_target(wide), edge_target(narrow))
    with pytest.raises(ValueError, match="H x W"):
        edge_target(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match="radius"):
        edge_target(label, -1)
    assert edge_target(np.zeros((0, 5), np.uint8)).shape == (0, 5)
