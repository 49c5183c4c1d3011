"""The label table against the official cityscapesscripts one, and the id conversions."""
import numpy as np
import pytest

from datasets import labels as L



@pytest.fixture(scope="module")
def official():
    return pytest.importorskip("cityscapesscripts.helpers.labels")


def test_table_equals_cityscapesscripts(official):
    assert len(L.labels) == len(official.labels) == 35
    for ours, theirs in zip(L.labels, official.labels):
        assert ours._fields == theirs._fields
        assert tuple(ours) == tuple(theirs)


def test_train_class_names_colors_and_counts(official):
    train = sorted((lb.trainId, lb.name, lb.color) for lb in official.labels
                   if 0 <= lb.trainId < 255)
    assert L.NUM_CLASSES == len(train) == 19 and L.IGNORE_INDEX == 255
    assert list(L.TRAIN_CLASS_NAMES) == [name for _, name, _ in train]
    assert list(L.TRAIN_CLASS_COLORS) == [color for _, _, color in train]


def test_labelid_to_trainid_matches_official_mapping_for_every_value(official):
    values = np.arange(256, dtype=np.uint8)
    expected = np.array([official.id2label[v].trainId if v in official.id2label else 255
                         for v in range(256)])
    assert np.array_equal(L.labelid_to_trainid(values), expected)
    # other integer types, including values that are no label id at all
    wide = np.array([[-1, 7, 33], [34, 1000, 26]], dtype=np.int64)
    assert L.labelid_to_trainid(wide).tolist() == [[255, 0, 18], [255, 255, 13]]
    assert L.labelid_to_trainid(wide.astype(np.uint16)[:, 1:]).tolist() == [[0, 18], [255, 13]]


def test_round_trip_labelids_trainids_labelids_for_every_trainid(official):
    rng = np.random.default_rng(0)
    train_ids = rng.choice(np.r_[np.arange(19), 255], size=(37, 53)).astype(np.uint8)
    train_ids[0, :20] = np.r_[np.arange(19), 255]  # every train id for sure
    label_ids = L.trainid_to_labelid(train_ids)
    for tid in range(19):
        expected = official.trainId2label[tid].id
        assert set(np.unique(label_ids[train_ids == tid])) == {expected}
    assert set(np.unique(label_ids[train_ids == 255])) == {0}
    assert np.array_equal(L.labelid_to_trainid(label_ids), train_ids)


def test_trainid_to_labelid_rejects_non_train_ids():
    with pytest.raises(ValueError, match="not train ids"):
        L.trainid_to_labelid(np.array([[0, 19]], dtype=np.uint8))
    with pytest.raises(ValueError, match="not train ids"):
        L.trainid_to_labelid(np.array([-1, 3]))


def test_colorize_uses_official_colors_and_black_for_ignore(official):
    train_ids = np.array([[0, 13, 255], [18, 10, 200]], dtype=np.uint8)
    rgb = L.colorize(train_ids)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == official.trainId2label[0].color
    assert tuple(rgb[0, 1]) == official.trainId2label[13].color
    assert tuple(rgb[1, 0]) == official.trainId2label[18].color
    assert tuple(rgb[0, 2]) == (0, 0, 0) and tuple(rgb[1, 2]) == (0, 0, 0)
    with pytest.raises(ValueError, match="H x W"):
        L.colorize(np.zeros((2, 2, 3), np.uint8))
