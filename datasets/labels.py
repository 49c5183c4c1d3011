"""The Cityscapes label table and conversions between its id spaces.

Cityscapes stores ground truth as *label ids* (0..33, see the table) while models are
trained on 19 *train ids* (0..18, everything else 255 = ignored).  The official table
lives in ``cityscapesscripts``; it is only a test dependency here, so this module carries
its own copy and the tests check the two are equal field by field.
"""
from collections import namedtuple

import cv2
import numpy as np

__all__ = [
    "Label", "labels", "NUM_CLASSES", "IGNORE_INDEX", "TRAIN_CLASS_NAMES",
    "TRAIN_CLASS_COLORS", "VALID_LABEL_IDS", "name_to_label", "id_to_label", "labelid_to_trainid",
    "invalid_label_ids", "trainid_to_labelid", "colorize",
]

# Same fields and meaning as cityscapesscripts.helpers.labels.Label.
Label = namedtuple("Label", [
    "name",          # unique class name
    "id",            # value stored in *_gtFine_labelIds.png (-1: never stored)
    "trainId",       # training class, 255 = ignored
    "category",      # coarse category name
    "categoryId",    # coarse category id
    "hasInstances",  # whether instances are annotated separately
    "ignoreInEval",  # whether the official evaluation skips this class
    "color",         # RGB colour of the official colour images
])

labels = [
    #      name                    id  trainId category        catId inst   ignore color
    Label("unlabeled",             0,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("ego vehicle",           1,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("rectification border",  2,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("out of roi",            3,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("static",                4,  255, "void",          0, False, True,  (0, 0, 0)),
    Label("dynamic",               5,  255, "void",          0, False, True,  (111, 74, 0)),
    Label("ground",                6,  255, "void",          0, False, True,  (81, 0, 81)),
    Label("road",                  7,    0, "flat",          1, False, False, (128, 64, 128)),
    Label("sidewalk",              8,    1, "flat",          1, False, False, (244, 35, 232)),
    Label("parking",               9,  255, "flat",          1, False, True,  (250, 170, 160)),
    Label("rail track",           10,  255, "flat",          1, False, True,  (230, 150, 140)),
    Label("building",             11,    2, "construction",  2, False, False, (70, 70, 70)),
    Label("wall",                 12,    3, "construction",  2, False, False, (102, 102, 156)),
    Label("fence",                13,    4, "construction",  2, False, False, (190, 153, 153)),
    Label("guard rail",           14,  255, "construction",  2, False, True,  (180, 165, 180)),
    Label("bridge",               15,  255, "construction",  2, False, True,  (150, 100, 100)),
    Label("tunnel",               16,  255, "construction",  2, False, True,  (150, 120, 90)),
    Label("pole",                 17,    5, "object",        3, False, False, (153, 153, 153)),
    Label("polegroup",            18,  255, "object",        3, False, True,  (153, 153, 153)),
    Label("traffic light",        19,    6, "object",        3, False, False, (250, 170, 30)),
    Label("traffic sign",         20,    7, "object",        3, False, False, (220, 220, 0)),
    Label("vegetation",           21,    8, "nature",        4, False, False, (107, 142, 35)),
    Label("terrain",              22,    9, "nature",        4, False, False, (152, 251, 152)),
    Label("sky",                  23,   10, "sky",           5, False, False, (70, 130, 180)),
    Label("person",               24,   11, "human",         6, True,  False, (220, 20, 60)),
    Label("rider",                25,   12, "human",         6, True,  False, (255, 0, 0)),
    Label("car",                  26,   13, "vehicle",       7, True,  False, (0, 0, 142)),
    Label("truck",                27,   14, "vehicle",       7, True,  False, (0, 0, 70)),
    Label("bus",                  28,   15, "vehicle",       7, True,  False, (0, 60, 100)),
    Label("caravan",              29,  255, "vehicle",       7, True,  True,  (0, 0, 90)),
    Label("trailer",              30,  255, "vehicle",       7, True,  True,  (0, 0, 110)),
    Label("train",                31,   16, "vehicle",       7, True,  False, (0, 80, 100)),
    Label("motorcycle",           32,   17, "vehicle",       7, True,  False, (0, 0, 230)),
    Label("bicycle",              33,   18, "vehicle",       7, True,  False, (119, 11, 32)),
    Label("license plate",        -1,   -1, "vehicle",       7, False, True,  (0, 0, 142)),
]

NUM_CLASSES = 19
IGNORE_INDEX = 255

name_to_label = {label.name: label for label in labels}
id_to_label = {label.id: label for label in labels}

# For each train id the first label of the table that maps to it (road -> 7, ...), the
# same convention cityscapesscripts uses for its inverse mapping.
_TRAIN_LABELS = []
for _train_id in range(NUM_CLASSES):
    _TRAIN_LABELS.append(next(lb for lb in labels if lb.trainId == _train_id))

TRAIN_CLASS_NAMES = tuple(lb.name for lb in _TRAIN_LABELS)
TRAIN_CLASS_COLORS = tuple(lb.color for lb in _TRAIN_LABELS)

# Lookup tables indexed by the stored value.  Only ids 0..33 exist in label images;
# every other value (and the never-stored -1) is not a valid label id -> ignore.
_LABELID_TO_TRAINID = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
for _lb in labels:
    if _lb.id >= 0:
        _LABELID_TO_TRAINID[_lb.id] = _lb.trainId
VALID_LABEL_IDS = tuple(sorted(lb.id for lb in labels if lb.id >= 0))

_TRAINID_TO_LABELID = np.zeros(256, dtype=np.uint8)
_VALID_TRAINID = np.zeros(256, dtype=bool)
for _train_id, _lb in enumerate(_TRAIN_LABELS):
    _TRAINID_TO_LABELID[_train_id] = _lb.id
    _VALID_TRAINID[_train_id] = True
_TRAINID_TO_LABELID[IGNORE_INDEX] = 0  # ignored pixels become 'unlabeled'
_VALID_TRAINID[IGNORE_INDEX] = True

_PALETTE = np.zeros((256, 3), dtype=np.uint8)
_PALETTE[:NUM_CLASSES] = np.array(TRAIN_CLASS_COLORS, dtype=np.uint8)


def labelid_to_trainid(label_ids):
    """Map an array of Cityscapes label ids to train ids (uint8, same shape).

    Values that are not label ids of the table (anything outside 0..33) become 255, so a
    corrupt or foreign label image can never leak a bogus class into training; callers
    that want to report such values use :func:`invalid_label_ids`.
    """
    arr = np.asarray(label_ids)
    if arr.dtype == np.uint8 and arr.ndim == 2 and arr.size:
        return cv2.LUT(np.ascontiguousarray(arr), _LABELID_TO_TRAINID[:256])  # fast path
    if arr.dtype == np.uint8 or arr.dtype == np.uint16:
        return _LABELID_TO_TRAINID[arr]
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labelid_to_trainid expects an integer array, got dtype {arr.dtype}")
    inside = (arr >= 0) & (arr < _LABELID_TO_TRAINID.size)
    return np.where(inside, _LABELID_TO_TRAINID[np.where(inside, arr, 0)], IGNORE_INDEX).astype(np.uint8)


def invalid_label_ids(label_ids):
    """Sorted list of the distinct values in ``label_ids`` that are not label ids."""
    values = np.unique(np.asarray(label_ids))
    valid = set(VALID_LABEL_IDS)
    return [int(v) for v in values if int(v) not in valid]


def trainid_to_labelid(train_ids):
    """Map train ids (0..18, 255) back to label ids, e.g. to write predictions for the
    official evaluator.  255 becomes 0 ('unlabeled'); any other value is an error."""
    arr = np.asarray(train_ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"trainid_to_labelid expects an integer array, got dtype {arr.dtype}")
    if arr.dtype != np.uint8:
        bad = (arr < 0) | (arr > 255)
        if bad.any():
            raise ValueError(f"trainid_to_labelid: values {np.unique(arr[bad])[:10].tolist()} "
                             f"are not train ids (expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX})")
        arr = arr.astype(np.uint8)
    if not _VALID_TRAINID[arr].all():
        bad_values = np.unique(arr[~_VALID_TRAINID[arr]])
        raise ValueError(f"trainid_to_labelid: values {bad_values[:10].tolist()} are not train ids "
                         f"(expected 0..{NUM_CLASSES - 1} or {IGNORE_INDEX})")
    return _TRAINID_TO_LABELID[arr]


def colorize(trainid_map):
    """H x W train-id map -> H x W x 3 uint8 RGB image in the official colours.

    Ignored pixels (255), and any other value that is not a train id, are black.
    """
    arr = np.asarray(trainid_map)
    if arr.ndim != 2:
        raise ValueError(f"colorize expects an H x W train-id map, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.where((arr >= 0) & (arr < 256), arr, IGNORE_INDEX).astype(np.uint8)
    return _PALETTE[arr]
