"""Cityscapes over the official directory layout, with class-uniform sampling.

Layout (NOTES.md)::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Samples, seeding (sample ``index`` of epoch ``e`` uses ``np.random.default_rng([seed, e,
index])``), class-uniform sampling and its centroid cache
(``<root>/class_centroids_<split>_tile<T>.json``) are those of every dataset of this project:
:mod:`datasets.segmentation_dataset` describes them.  Label ids map to the 19 train ids through
:meth:`datasets.class_table.ClassTable.cityscapes`; a value that is not a Cityscapes label id
becomes ignore (255), reported once per file.

Test split: the official test labels carry no classes, so they are never read; a test
sample has ``label`` all 255 and ``edge`` all 0 (same shapes as for the other splits, so
collation and evaluation code need no special case).
"""
import logging
import os
import warnings

import cv2
import numpy as np

from utils.errors import InvalidInputError, MissingInputError

from .class_table import ClassTable
from .labels import IGNORE_INDEX, NUM_CLASSES, labelid_to_trainid
from .segmentation_dataset import (SegmentationDataset, atomic_write_json, imread_or_raise, read_image,
                                   tile_centroids)

__all__ = ["Cityscapes", "SPLITS", "EXPECTED_LAYOUT", "compute_image_centroids", "read_image",
           "read_label_ids"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
EXPECTED_LAYOUT = ("<root>/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
                   "<root>/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png")

# The writer of the centroid cache, looked up when called: a module attribute, so that a caller
# (a test simulating a read-only root) can replace it.
_atomic_write_json = atomic_write_json


def read_label_ids(path):
    """H x W label-id array (uint8 or uint16) of a *_gtFine_labelIds.png."""
    label = imread_or_raise(path, cv2.IMREAD_UNCHANGED, "label")
    if label.ndim != 2:
        raise InvalidInputError(f"label file {path} has {label.shape[2]} channels; expected a single-channel "
                                f"*_gtFine_labelIds.png (not the colour visualisation)")
    if label.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"label file {path} has pixel type {label.dtype}; expected 8-bit label ids")
    return label


def compute_image_centroids(label_path, tile):
    """[(class_id, x, y), ...]: per tile and class, the class pixel nearest to the class's
    centre of mass in that tile (:func:`datasets.segmentation_dataset.tile_centroids`)."""
    return tile_centroids(labelid_to_trainid(read_label_ids(label_path)), tile, NUM_CLASSES)


def _centroid_job(args):
    return compute_image_centroids(*args)


class Cityscapes(SegmentationDataset):
    """Cityscapes (or the synthetic stand-in) in the official layout.

    Args:
        root: dataset root (see :func:`datasets.resolve_root`).
        split: 'train', 'val' or 'test'.
        transform: a :class:`~datasets.transforms.TrainTransform`/``ValTransform`` or any
            callable with their signature; None means ``ValTransform(edge_radius=...)``.
        edge_radius: radius of the edge target; must equal the transform's.
        class_uniform_fraction: fraction of each epoch made of class-uniform crops
            (HMS uses 0.5 for training); 0 disables it.
        class_uniform_tile: tile size (pixels) for the per-image centroids (HMS: 1024).
        seed: base seed of every random choice (see :mod:`datasets.segmentation_dataset`).
        cache_dir: where to cache centroids if the root is not writable.
        centroid_workers: processes for the one-time centroid pass (None: automatic).
        progress: show a progress bar for the centroid pass.
    """

    kind = "Cityscapes"

    def __init__(self, root, split, transform=None, edge_radius=2, class_uniform_fraction=0.0,
                 class_uniform_tile=1024, seed=0, cache_dir=None, centroid_workers=None, progress=True):
        self.class_table = ClassTable.cityscapes()
        self._warned_files = set()
        super().__init__(root, split, transform, edge_radius, class_uniform_fraction, class_uniform_tile,
                         seed, cache_dir, centroid_workers, progress)

    def _check_split(self, split):
        if split not in SPLITS:
            raise InvalidInputError(f"Cityscapes: unknown split {split!r}; expected one of {SPLITS}")

    # -- discovery ------------------------------------------------------------------------
    def _scan(self):
        root, split = self.root, self.split
        self.has_labels = split != "test"
        layout = EXPECTED_LAYOUT.format(split=split)
        if not os.path.isdir(root):
            raise MissingInputError(f"Cityscapes root {root!r} does not exist or is not a directory; "
                                    f"expected {layout}")
        image_dir = os.path.join(root, "leftImg8bit", split)
        if not os.path.isdir(image_dir):
            raise MissingInputError(f"Cityscapes split {split!r} not found: {image_dir} is missing; "
                                    f"expected {layout}")
        label_dir = os.path.join(root, "gtFine", split)
        if self.has_labels and not os.path.isdir(label_dir):
            raise MissingInputError(f"Cityscapes labels for split {split!r} not found: {label_dir} is "
                                    f"missing; expected {layout}")
        items, missing, unexpected = [], [], []
        for city in sorted(os.listdir(image_dir)):
            city_dir = os.path.join(image_dir, city)
            if not os.path.isdir(city_dir):
                unexpected.append(city_dir)
                continue
            found, lost = self._scan_city(city_dir, os.path.join(label_dir, city), unexpected)
            items.extend(found)
            missing.extend(lost)
        if unexpected:
            log.warning("Cityscapes %s: ignoring %d entries that are not *%s images, e.g. %s",
                        split, len(unexpected), IMAGE_SUFFIX, unexpected[0])
        if missing:
            shown = "; ".join(f"{img} has no label file {lbl}" for img, lbl in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise MissingInputError(f"Cityscapes {split}: {len(missing)} image(s) without a label file: "
                                    f"{shown}{more}")
        if not items:
            raise MissingInputError(f"Cityscapes split {split!r} under {root!r} holds no images; "
                                    f"expected {layout}")
        return items

    def _scan_city(self, city_dir, city_label_dir, unexpected):
        """Items of one city folder, and its (image, label) pairs whose label file is missing."""
        label_names = set()
        if self.has_labels and os.path.isdir(city_label_dir):
            label_names = set(os.listdir(city_label_dir))
        items, missing = [], []
        for file_name in sorted(os.listdir(city_dir)):
            if not file_name.endswith(IMAGE_SUFFIX):
                if not file_name.startswith("."):
                    unexpected.append(os.path.join(city_dir, file_name))
                continue
            name = file_name[:-len(IMAGE_SUFFIX)]
            image_path = os.path.join(city_dir, file_name)
            label_path = None
            if self.has_labels:
                label_path = os.path.join(city_label_dir, name + LABEL_SUFFIX)
                if name + LABEL_SUFFIX not in label_names:
                    missing.append((image_path, label_path))
                    continue
            items.append((name, image_path, label_path))
        return items, missing

    # -- labels and centroids -------------------------------------------------------------
    def _train_ids(self, label_path):
        label_ids = read_label_ids(label_path)
        if label_path not in self._warned_files:
            bad = self.class_table.unknown_values(label_ids)
            if bad:
                self._warned_files.add(label_path)
                message = (f"{label_path}: values {bad[:10]} are not Cityscapes label ids "
                           f"(valid: 0..33); mapped to ignore ({IGNORE_INDEX})")
                log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
        return self.class_table.to_train_ids(label_ids, label_path)

    def _centroid_function(self):
        return _centroid_job

    def _write_cache(self, path, payload):
        _atomic_write_json(path, payload)

    def __repr__(self):
        return (f"Cityscapes(root={self.root!r}, split={self.split!r}, n={len(self)}, "
                f"transform={self.transform!r}, class_uniform_fraction={self.class_uniform_fraction})")
