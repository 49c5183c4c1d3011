"""Your own images and label maps in a folder layout (as mmsegmentation reads them), with a class table.

Two layouts, chosen by ``layout`` (``'auto'``: the list file when one is given or
``<root>/<split>.txt`` exists, else the folders):

``'folders'``::

    <root>/images/<split>/**/<name>.png | .jpg | .jpeg
    <root>/labels/<split>/**/<name>.png

  an image and its label share the folder below ``<split>`` and the name; ``image_dir``,
  ``label_dir``, ``image_suffix`` (default: any of .png .jpg .jpeg) and ``label_suffix`` (default
  ``.png``) change these names.  Items are sorted by path.  Cityscapes itself reads this way with
  ``image_dir='leftImg8bit', label_dir='gtFine', image_suffix='_leftImg8bit.png',
  label_suffix='_gtFine_labelIds.png', class_table=ClassTable.cityscapes()``.

``'list'``: ``<root>/<split>.txt`` (or ``list_file``), one sample per line,
``image_path label_path`` relative to the root, separated by a tab or spaces (a tab when a path
holds spaces); a line of a split without labels may hold only the image.  Blank lines and lines
starting with ``#`` are skipped; items keep the file's order.

Labels: single-channel 8- or 16-bit PNGs of the values the class table maps to train ids
(``class_table``: a :class:`~datasets.class_table.ClassTable`, a YAML file, or by default
``<root>/classes.yaml``).  A value the table does not know is an error naming the file.  With
``has_labels=None`` a split named ``test`` may come without labels (no label folder; a list whose
lines hold only images); every other split must have them.  ``has_labels=True`` requires them,
``False`` never reads them.

A sample's ``name`` is its image's file name without the suffix; names are unique within a split
(predictions are written by name).  Samples, seeding, class-uniform sampling and its centroid
cache are those of :mod:`datasets.segmentation_dataset`, as for Cityscapes.
"""
import functools
import logging
import os

import cv2
import numpy as np

from utils.errors import InvalidInputError, MissingInputError, UnreadableInputError

from .class_table import CLASS_TABLE_NAME, ClassTable
from .labels import IGNORE_INDEX
from .segmentation_dataset import SegmentationDataset, imread_or_raise, tile_centroids

__all__ = ["FolderSegmentation", "read_label_values", "IMAGE_EXTENSIONS", "CLASS_TABLE_NAME"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LAYOUTS = ("auto", "folders", "list")
_MAX_SHOWN = 5


def read_label_values(path):
    """H x W stored label values (uint8 or uint16) of a single-channel label PNG, as stored."""
    label = imread_or_raise(path, cv2.IMREAD_UNCHANGED, "label")
    if label.ndim != 2:
        raise InvalidInputError(f"label file {path} has {label.shape[2]} channels; expected a single-channel "
                                f"PNG of label values (not a colour visualisation)")
    if label.dtype not in (np.uint8, np.uint16):
        raise InvalidInputError(f"label file {path} has pixel type {label.dtype}; expected 8- or 16-bit "
                                f"label values")
    return label


def _train_ids(label_path, table):
    return table.to_train_ids(read_label_values(label_path), label_path)


def _centroid_job(table, job):
    label_path, tile = job
    return tile_centroids(_train_ids(label_path, table), tile, table.num_classes)


def _class_table(class_table, root, kind):
    if isinstance(class_table, ClassTable):
        table = class_table
    else:
        path = os.fspath(class_table) if class_table is not None else os.path.join(root, CLASS_TABLE_NAME)
        if class_table is None and not os.path.isfile(path):
            raise MissingInputError(f"{kind}: no class table: {path} does not exist; put one there or pass "
                                    f"class_table= (a ClassTable or a YAML file, see datasets/class_table.py)")
        table = ClassTable.from_yaml(path)
    if table.ignore_index != IGNORE_INDEX:
        raise InvalidInputError(f"{kind}: class table {table.source} has ignore_index {table.ignore_index}; "
                                f"the transforms, edge targets and losses use {IGNORE_INDEX}")
    return table


def _problems(kind, split, what, problems):
    shown = "; ".join(problems[:_MAX_SHOWN])
    more = f" (and {len(problems) - _MAX_SHOWN} more)" if len(problems) > _MAX_SHOWN else ""
    return MissingInputError(f"{kind} {split}: {len(problems)} {what}: {shown}{more}")


class FolderSegmentation(SegmentationDataset):
    """Images and label maps in a folder or list-file layout (module docstring).

    Args:
        root, split, transform, edge_radius, class_uniform_fraction, class_uniform_tile, seed,
        cache_dir, centroid_workers, progress: as :class:`~datasets.cityscapes.Cityscapes`
            (``split`` is any folder or list-file name: train, val, test, training...).
        class_table: a ClassTable, a YAML path, or None for ``<root>/classes.yaml``.
        layout: 'auto', 'folders' or 'list'.
        image_dir, label_dir: the folders under the root ('folders' layout).
        image_suffix: how image file names end (None: .png, .jpg or .jpeg, any case).
        label_suffix: how label file names end, after the image's name.
        list_file: the list of the split ('list' layout; relative to the root), default
            ``<split>.txt``.
        has_labels: None (labels where the split has them; only 'test' may lack them), True, False.
    """

    kind = "FolderSegmentation"

    def __init__(self, root, split, transform=None, edge_radius=2, class_uniform_fraction=0.0,
                 class_uniform_tile=1024, seed=0, cache_dir=None, centroid_workers=None, progress=True, *,
                 class_table=None, layout="auto", image_dir="images", label_dir="labels", image_suffix=None,
                 label_suffix=".png", list_file=None, has_labels=None):
        if layout not in LAYOUTS:
            raise InvalidInputError(f"{self.kind}: layout must be one of {LAYOUTS}, got {layout!r}")
        if has_labels not in (None, True, False):
            raise InvalidInputError(f"{self.kind}: has_labels must be None, True or False, got {has_labels!r}")
        self.class_table = _class_table(class_table, os.fspath(root), self.kind)
        self.layout = layout
        self.image_dir, self.label_dir = image_dir, label_dir
        self.image_suffix, self.label_suffix = image_suffix, label_suffix
        self.list_file = list_file
        self._wants_labels = has_labels
        super().__init__(root, split, transform, edge_radius, class_uniform_fraction, class_uniform_tile,
                         seed, cache_dir, centroid_workers, progress)

    def _check_split(self, split):
        if not isinstance(split, str) or not split or split in (".", "..") or "/" in split or os.sep in split:
            raise InvalidInputError(f"{self.kind}: split must be a plain folder or file name (train, val, "
                                    f"test...), got {split!r}")

    # -- discovery ------------------------------------------------------------------------
    def _scan(self):
        if not os.path.isdir(self.root):
            raise MissingInputError(f"{self.kind} root {self.root!r} does not exist or is not a directory; "
                                    f"expected {self._expected()}")
        list_path = self._list_path()
        use_list = self.layout == "list" or (self.layout == "auto" and (
            self.list_file is not None or os.path.isfile(list_path)))
        items = self._scan_list(list_path) if use_list else self._scan_folders()
        self.layout_used = "list" if use_list else "folders"
        self._check_unique_names(items)
        return items

    def _list_path(self):
        return os.path.join(self.root, self.list_file or f"{self.split}.txt")

    def _expected(self):
        image_end = "<name>.png|.jpg|.jpeg" if self.image_suffix is None else f"<name>{self.image_suffix}"
        return (f"<root>/{self.image_dir}/{self.split}/**/{image_end} and "
                f"<root>/{self.label_dir}/{self.split}/**/<name>{self.label_suffix}, or a list file "
                f"<root>/{self.list_file or self.split + '.txt'} of 'image_path label_path' lines")

    def _decide_labels(self, found, where):
        """Whether the split has labels, given whether they were ``found`` (at ``where``)."""
        if self._wants_labels is False:
            return False
        if found:
            return True
        if self._wants_labels is None and self.split == "test":
            return False
        why = "" if self._wants_labels else " (only a split named 'test' may come without labels)"
        raise MissingInputError(f"{self.kind} labels for split {self.split!r} not found: {where}{why}; "
                                f"expected {self._expected()}")

    def _image_name(self, file_name):
        """The sample name of an image file, or None when the file is not an image of the layout."""
        if self.image_suffix is not None:
            return file_name[:-len(self.image_suffix)] if file_name.endswith(self.image_suffix) else None
        stem, ext = os.path.splitext(file_name)
        return stem if ext.lower() in IMAGE_EXTENSIONS and stem else None

    def _scan_folders(self):
        image_root = os.path.join(self.root, self.image_dir, self.split)
        if not os.path.isdir(image_root):
            raise MissingInputError(f"{self.kind} split {self.split!r} not found: {image_root} is missing; "
                                    f"expected {self._expected()}")
        label_root = os.path.join(self.root, self.label_dir, self.split)
        self.has_labels = self._decide_labels(os.path.isdir(label_root), f"{label_root} is missing")
        images, unexpected = self._walk_images(image_root)
        listings = {}
        items, missing = [], []
        for rel_dir, file_name, name in images:
            image_path = os.path.join(image_root, rel_dir, file_name)
            label_path = None
            if self.has_labels:
                label_dir = os.path.join(label_root, rel_dir)
                if label_dir not in listings:
                    listings[label_dir] = set(os.listdir(label_dir)) if os.path.isdir(label_dir) else set()
                label_path = os.path.join(label_dir, name + self.label_suffix)
                if name + self.label_suffix not in listings[label_dir]:
                    missing.append(f"{image_path} has no label file {label_path}")
                    continue
            items.append((name, image_path, label_path))
        if unexpected:
            log.warning("%s %s: ignoring %d files that are not images of the layout, e.g. %s", self.kind,
                        self.split, len(unexpected), unexpected[0])
        if missing:
            raise _problems(self.kind, self.split, "image(s) without a label file", missing)
        if not items:
            raise MissingInputError(f"{self.kind} split {self.split!r}: {image_root} holds no images; "
                                    f"expected {self._expected()}")
        return items

    def _walk_images(self, image_root):
        """[(relative folder, file name, sample name)] sorted by path, and the other files."""
        found, unexpected = [], []
        for directory, subdirs, files in os.walk(image_root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            rel_dir = os.path.relpath(directory, image_root)
            rel_dir = "" if rel_dir == "." else rel_dir
            for file_name in files:
                if file_name.startswith("."):
                    continue
                name = self._image_name(file_name)
                if name is None:
                    unexpected.append(os.path.join(directory, file_name))
                else:
                    found.append((rel_dir, file_name, name))
        found.sort(key=lambda entry: (tuple(entry[0].split(os.sep)) if entry[0] else (), entry[1]))
        return found, unexpected

    def _read_list(self, list_path):
        """[(line number, image path, label path or None)] of a list file, relative to the root."""
        if not os.path.isfile(list_path):
            raise MissingInputError(f"{self.kind} split {self.split!r}: list file {list_path} not found; "
                                    f"expected {self._expected()}")
        try:
            with open(list_path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UnreadableInputError(f"cannot read list file {list_path}: {err}") from err
        entries = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = [f.strip() for f in (text.split("\t") if "\t" in text else text.split()) if f.strip()]
            if len(fields) > 2:
                raise InvalidInputError(f"{list_path} line {number}: expected 'image_path label_path', got "
                                        f"{len(fields)} fields (separate paths holding spaces by a tab)")
            entries.append((number, fields[0], fields[1] if len(fields) == 2 else None))
        return entries

    def _scan_list(self, list_path):
        entries = self._read_list(list_path)
        if not entries:
            raise MissingInputError(f"{self.kind} split {self.split!r}: list file {list_path} names no images")
        image_only = [(number, image) for number, image, label in entries if label is None]
        if image_only and len(image_only) < len(entries) and self._wants_labels is not False:
            number, image = image_only[0]
            raise InvalidInputError(f"{list_path} line {number} names only an image ({image}) while other lines "
                                    f"name labels; give every line 'image_path label_path'")
        where = f"{list_path} line {image_only[0][0]} names only an image" if image_only else list_path
        self.has_labels = self._decide_labels(not image_only, where)
        items, problems = [], []
        for number, image, label in entries:
            image_path = os.path.join(self.root, image)
            label_path = os.path.join(self.root, label) if self.has_labels else None
            problem = self._list_problem(list_path, number, image_path, label_path)
            if problem:
                problems.append(problem)
                continue
            name = self._image_name(os.path.basename(image_path)) or os.path.splitext(os.path.basename(image))[0]
            items.append((name, image_path, label_path))
        if problems:
            raise _problems(self.kind, self.split, f"missing file(s) in {list_path}", problems)
        return items

    @staticmethod
    def _list_problem(list_path, number, image_path, label_path):
        has_image = os.path.isfile(image_path)
        has_label = label_path is None or os.path.isfile(label_path)
        if not has_image and label_path is not None and has_label:
            return f"line {number}: label {label_path} has no image ({image_path} does not exist)"
        if not has_image:
            return f"line {number}: image {image_path} does not exist"
        if not has_label:
            return f"line {number}: image {image_path} has no label file {label_path}"
        return None

    def _check_unique_names(self, items):
        seen = {}
        for name, image_path, _ in items:
            if name in seen:
                raise InvalidInputError(f"{self.kind} {self.split}: two images named {name!r}: {seen[name]} and "
                                        f"{image_path}; names must be unique within a split (predictions are "
                                        f"written by name)")
            seen[name] = image_path

    # -- labels and centroids -------------------------------------------------------------
    def _train_ids(self, label_path):
        return _train_ids(label_path, self.class_table)

    def _centroid_function(self):
        return functools.partial(_centroid_job, self.class_table)

    def _cache_key_extra(self):
        return self.class_table.fingerprint()

    def __repr__(self):
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, n={len(self)}, "
                f"layout={self.layout_used!r}, classes={self.num_classes}, transform={self.transform!r}, "
                f"class_uniform_fraction={self.class_uniform_fraction})")
