"""PASCAL VOC 2012 with scribbles, in the layout of the DenseCRF-loss reference (meng-tang/rloss)::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClassAug/<id>.png       full labels (0-20, 255 = void), for validation
    <root>/pascal_2012_scribble/<id>.png       scribbles (0-20 on the strokes, 255 elsewhere)
    <root>/ImageSets/SegmentationAug/<split>.txt   image ids (else ImageSets/Segmentation/<split>.txt)

Samples are dicts like :class:`datasets.cityscapes.Cityscapes` gives (``image``, ``label``,
``edge``, ``name``, plus ``roi`` when the transform makes one).  Label PNGs may be single-channel
class indices or VOC's colour-palette images (mapped back through the VOC colour map).
"""
import os

import cv2
import numpy as np
from torch.utils.data import Dataset

from utils.errors import InvalidInputError, MissingInputError

from .class_table import ClassTable, bit_interleaved_palette
from .segmentation_dataset import imread_or_raise, read_image
from .transforms import ValTransform

__all__ = ["VOC_CLASSES", "VOC_NUM_CLASSES", "VOCSegmentation", "voc_class_table", "voc_colormap"]

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
VOC_NUM_CLASSES = len(VOC_CLASSES)
LABEL_DIRS = {"scribble": "pascal_2012_scribble", "full": "SegmentationClassAug"}


def voc_colormap(n=256):
    """The VOC palette: RGB of class index i (bit-interleaved, as the devkit defines it)."""
    return bit_interleaved_palette(n)


def voc_class_table():
    """The 21 VOC classes, stored as their indices, in the VOC palette."""
    return ClassTable(VOC_CLASSES, voc_colormap(VOC_NUM_CLASSES).tolist(), source="PASCAL VOC 2012")


def read_voc_label(path):
    """H x W uint8 class indices (255 = void/unlabeled) of a VOC label PNG."""
    label = imread_or_raise(path, cv2.IMREAD_UNCHANGED, "label")
    if label.ndim == 3:  # a palette PNG decoded to colours: map them back
        rgb = cv2.cvtColor(label[:, :, :3], cv2.COLOR_BGR2RGB).astype(np.int32)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        cmap = voc_colormap().astype(np.int32)
        table = {int((r << 16) | (g << 8) | b): i for i, (r, g, b) in enumerate(cmap[:VOC_NUM_CLASSES])}
        table[(224 << 16) | (224 << 8) | 192] = 255   # the void border colour
        table[(255 << 16) | (255 << 8) | 255] = 255
        values, inverse = np.unique(codes, return_inverse=True)
        unknown = [hex(v) for v in values if int(v) not in table]
        if unknown:
            raise InvalidInputError(f"label file {path}: colours {unknown[:5]} are not VOC classes")
        label = np.array([table[int(v)] for v in values], dtype=np.uint8)[inverse.reshape(codes.shape)]
    if label.dtype != np.uint8:
        raise InvalidInputError(f"label file {path} has pixel type {label.dtype}; expected 8-bit class indices")
    bad = np.setdiff1d(np.unique(label), np.r_[np.arange(VOC_NUM_CLASSES), 255])
    if bad.size:
        raise InvalidInputError(f"label file {path}: values {bad[:10].tolist()} are not VOC classes (0-20 or 255)")
    return label


class VOCSegmentation(Dataset):
    """VOC 2012 images with scribbles (``labels="scribble"``, for training) or full labels
    (``labels="full"``, for validation).  Randomness as in Cityscapes: sample ``index`` of epoch
    ``e`` uses ``np.random.default_rng([seed, e, index])``."""

    def __init__(self, root, split, labels="scribble", transform=None, seed=0):
        if labels not in LABEL_DIRS:
            raise InvalidInputError(f"VOCSegmentation: labels must be one of {sorted(LABEL_DIRS)}, got {labels!r}")
        self.root, self.split, self.labels = root, split, labels
        self.class_table = voc_class_table()
        self.transform = transform or ValTransform()
        self.edge_radius = getattr(self.transform, "edge_radius", 2)
        self.seed, self.epoch = int(seed), 0
        lists = [os.path.join(root, "ImageSets", d, f"{split}.txt") for d in ("SegmentationAug", "Segmentation")]
        list_path = next((p for p in lists if os.path.isfile(p)), None)
        if list_path is None:
            raise MissingInputError(f"VOC split {split!r}: neither {lists[0]} nor {lists[1]} exists "
                                    f"(expected the layout of meng-tang/rloss under {root})")
        with open(list_path, encoding="utf-8") as f:
            ids = [line.split()[0] for line in f if line.strip()]
        label_dir = os.path.join(root, LABEL_DIRS[labels])
        self.items = [(i, os.path.join(root, "JPEGImages", i + ".jpg"), os.path.join(label_dir, i + ".png")) for i in ids]
        missing = [p for item in self.items for p in item[1:] if not os.path.isfile(p)]
        if missing:
            raise MissingInputError(f"VOC split {split!r} ({list_path}): {len(missing)} file(s) missing, e.g. "
                                    f"{'; '.join(missing[:3])}")

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.items)

    def load_label(self, index):
        return read_voc_label(self.items[index][2])

    def __getitem__(self, index):
        name, image_path, label_path = self.items[index]
        image = read_image(image_path)
        label = read_voc_label(label_path)
        if label.shape != image.shape[:2]:
            raise InvalidInputError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                                    f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        sample = self.transform(image, label, rng=np.random.default_rng([self.seed, self.epoch, index]))
        sample["name"] = name
        return sample

    def __repr__(self):
        return f"VOCSegmentation(root={self.root!r}, split={self.split!r}, labels={self.labels!r}, n={len(self)})"
