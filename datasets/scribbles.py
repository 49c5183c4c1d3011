"""Scribbles: partial labels for weakly-supervised training (255 = unlabeled).

Real scribbles (PASCAL VOC's ``pascal_2012_scribble``) are read by :mod:`datasets.voc`. Here
they are drawn from full labels (of Cityscapes, the synthetic one, or a folder dataset), so that
scribble training runs with no download: every object (connected region of one class, at least
``min_area`` pixels) gets one straight stroke ``width`` pixels wide, through a point well inside it, along its
main axis (turned by up to 20 degrees at random), as long as needed to cover about
``fraction`` of the region, and kept inside the region (one pixel away from its border).
Like hand-drawn scribbles they sit inside objects and leave the boundaries unlabeled.
The strokes of image ``i`` depend only on ``(seed, i)``.
"""
import math

import cv2
import numpy as np

from utils.errors import InvalidInputError

from .cityscapes import Cityscapes
from .folder import FolderSegmentation
from .labels import IGNORE_INDEX

__all__ = ["draw_scribbles", "ScribbleLabels", "ScribbleCityscapes", "ScribbleFolderSegmentation",
           "labeled_fraction"]


def labeled_fraction(label, ignore_index=IGNORE_INDEX):
    """Share of the pixels of ``label`` that carry a class."""
    return float(np.count_nonzero(label != ignore_index)) / max(1, label.size)


def _stroke(component, rng, fraction, width):
    """A stroke mask for one connected region (H x W bool of the region's bounding box)."""
    area = int(component.sum())
    # outside the bounding box is outside the region (the default border would count it as inside)
    inside = cv2.erode(component.astype(np.uint8), np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                       borderValue=0).astype(bool)
    if not inside.any():
        inside = component
    dist = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 3)
    deep = np.argwhere(dist >= 0.5 * dist.max())
    cy, cx = deep[rng.integers(len(deep))]
    ys, xs = np.nonzero(component)
    if area > 1:
        cov = np.cov(np.stack([xs, ys]).astype(np.float64))
        evals, evecs = np.linalg.eigh(cov)
        angle = math.atan2(evecs[1, -1], evecs[0, -1])
    else:
        angle = 0.0
    angle += math.radians(rng.uniform(-20.0, 20.0))
    length = max(float(width), fraction * area / width)
    dx, dy = 0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle)
    canvas = np.zeros(component.shape, np.uint8)
    cv2.line(canvas, (int(round(cx - dx)), int(round(cy - dy))), (int(round(cx + dx)), int(round(cy + dy))), 1,
             thickness=max(1, int(width)), lineType=cv2.LINE_8)
    return canvas.astype(bool) & inside


def draw_scribbles(label, rng, fraction=0.03, width=3, min_area=30, ignore_index=IGNORE_INDEX):
    """Partial labels drawn from the full label map ``label`` (H x W uint8, ``ignore_index`` = void).

    Returns an H x W uint8 map equal to ``label`` on the strokes and ``ignore_index`` elsewhere.
    ``rng`` (a numpy Generator) supplies all randomness; regions are visited in a fixed order
    (class, then component label), so the result is a pure function of (label, rng state).
    """
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"draw_scribbles: label must be an H x W uint8 map, got {label.shape} {label.dtype}")
    out = np.full(label.shape, ignore_index, dtype=np.uint8)
    for cls in np.unique(label):
        if cls == ignore_index:
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats((label == cls).astype(np.uint8), connectivity=8)
        for comp in range(1, count):
            x, y, w, h, area = stats[comp]
            if area < min_area:
                continue
            box = components[y:y + h, x:x + w] == comp
            stroke = _stroke(box, rng, fraction, width)
            out[y:y + h, x:x + w][stroke] = cls
    return out


class ScribbleLabels:
    """Mixin for a dataset of :mod:`datasets.segmentation_dataset` (Cityscapes, FolderSegmentation):
    its labels become scribbles drawn from the full labels (:func:`draw_scribbles`), deterministic
    by ``(scribble_seed, image index)``; the transform should carry the roi
    (``TrainTransform(with_roi=True)``).  Validation uses the plain dataset with full labels.
    List it first: ``class ScribbleX(ScribbleLabels, X)``."""

    def __init__(self, root, split, transform=None, scribble_seed=0, scribble_fraction=0.03, stroke_width=3,
                 min_area=30, precompute=False, **kwargs):
        super().__init__(root, split, transform=transform, **kwargs)
        if not self.has_labels:
            raise InvalidInputError(f"{type(self).__name__}: split {split!r} has no labels to draw scribbles from")
        self.scribble_seed = int(scribble_seed)
        self.scribble_fraction = float(scribble_fraction)
        self.stroke_width = int(stroke_width)
        self.min_area = int(min_area)
        self._index_of_label = {item[2]: i for i, item in enumerate(self.items)}
        # precompute=True draws every image's scribbles now (in the main process, so DataLoader
        # workers inherit them): for small datasets, where drawing per sample would repeat each epoch
        self._cache = {}
        if precompute:
            for _, _, label_path in self.items:
                self._cache[label_path] = self._draw(label_path)

    def _draw(self, label_path):
        full = super()._train_ids(label_path)
        rng = np.random.default_rng([self.scribble_seed, self._index_of_label[label_path]])
        return draw_scribbles(full, rng, self.scribble_fraction, self.stroke_width, self.min_area)

    def _train_ids(self, label_path):
        cached = self._cache.get(label_path)
        return cached.copy() if cached is not None else self._draw(label_path)

    def full_label(self, item_index):
        """The full train-id map of image ``item_index`` (what the scribbles were drawn from)."""
        return super()._train_ids(self.items[item_index][2])

    def __repr__(self):
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, n={len(self)}, "
                f"seed={self.scribble_seed}, fraction={self.scribble_fraction}, width={self.stroke_width})")


class ScribbleCityscapes(ScribbleLabels, Cityscapes):
    """Cityscapes (real or synthetic) with scribbles drawn from its full labels (:class:`ScribbleLabels`)."""


class ScribbleFolderSegmentation(ScribbleLabels, FolderSegmentation):
    """A :class:`~datasets.folder.FolderSegmentation` with scribbles drawn from its full labels
    (:class:`ScribbleLabels`)."""
