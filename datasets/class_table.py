"""A dataset's classes: names, colours and how the values stored in its label PNGs map to train ids.

Models are trained on *train ids* 0..C-1 (255 = ignore); label PNGs store *label values*, which
may be the train ids themselves or other numbers (Cityscapes' label ids, NYUv2's 1..40 with 0 for
unlabeled).  A :class:`ClassTable` holds the mapping and converts whole arrays with one lookup
table.  :meth:`ClassTable.cityscapes` is Cityscapes' table (:mod:`datasets.labels`); others are
read from YAML with :meth:`ClassTable.from_yaml`.

YAML format (every key but ``names`` optional)::

    names: [wall, floor, cabinet]       # one entry per class; train id = position (0, 1, 2)
    colors: [[174, 199, 232], [152, 223, 138], [31, 119, 180]]
                                        # RGB per class, 3 ints in 0..255 (default: a fixed palette)
    label_ids: [1, 2, 3]                # the value stored in the label PNGs for each class
                                        # (default: the train ids 0..C-1); 0..65535 (8- or 16-bit PNGs)
    ignore_label_ids: [0]               # stored values meaning "not annotated": mapped to 255
    unknown_label_ids: error            # a stored value in neither list: 'error' (default) stops
                                        # with the file and the values; 'ignore' maps it to 255

255 is always ignore: it may not be a class's label id.  Each bad entry is a one-line error
naming the file and the key.  At most 255 classes (train ids are stored as uint8 beside 255).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Sequence

import cv2
import numpy as np

from utils.errors import InvalidInputError, MissingInputError, UnreadableInputError

from .labels import IGNORE_INDEX, TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES, labels as CITYSCAPES_LABELS

__all__ = ["ClassTable", "bit_interleaved_palette", "MAX_LABEL_VALUE", "CLASS_TABLE_NAME"]

MAX_LABEL_VALUE = 65535  # label PNGs are 8- or 16-bit
CLASS_TABLE_NAME = "classes.yaml"  # a folder dataset's table, beside its images/ and labels/
_KEYS = ("names", "colors", "label_ids", "ignore_label_ids", "unknown_label_ids")
_UNKNOWN_POLICIES = ("error", "ignore")


def bit_interleaved_palette(n: int) -> np.ndarray:
    """n x 3 uint8: the PASCAL VOC devkit's colour of index i (bits of i spread over R, G, B)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _default_colors(num_classes: int) -> np.ndarray:
    # VOC's palette from index 1: index 0 is black, the colour of ignored pixels
    return bit_interleaved_palette(num_classes + 1)[1:]


class ClassTable:
    """Class names, colours and the map from stored label values to train ids.

    Args:
        names: class names, train id = position; unique, non-empty.
        colors: RGB per class (None: :func:`bit_interleaved_palette` from index 1).
        label_to_train: stored value -> train id (0..C-1, or ``ignore_index`` for values that
            mean "ignore"); every class needs at least one value.  None: the identity 0..C-1.
        ignore_index: the train id of ignored pixels (255 in this project).
        unknown_to_ignore: a stored value missing from ``label_to_train`` becomes ``ignore_index``
            instead of being an error.
        source: where the table comes from, named in error messages (a YAML path).
    """

    def __init__(self, names: Sequence[str], colors: Optional[Sequence[Sequence[int]]] = None,
                 label_to_train: Optional[Dict[int, int]] = None, ignore_index: int = IGNORE_INDEX,
                 unknown_to_ignore: bool = False, source: str = "ClassTable"):
        self.source = source
        self.names = tuple(_check_names(names, source))
        self.ignore_index = int(ignore_index)
        if not len(self.names) <= self.ignore_index <= 255:
            raise InvalidInputError(f"{source}: ignore_index must be in {len(self.names)}..255 (after the "
                                    f"train ids 0..{len(self.names) - 1}), got {ignore_index}")
        self.colors = tuple(map(tuple, _check_colors(colors, len(self.names), source)))
        if label_to_train is None:
            label_to_train = {i: i for i in range(len(self.names))}
        self.label_to_train = _check_mapping(label_to_train, len(self.names), self.ignore_index, source)
        self.unknown_to_ignore = bool(unknown_to_ignore)
        self._build_tables()

    # -- construction ----------------------------------------------------------------------
    def _build_tables(self):
        self._lut = np.full(MAX_LABEL_VALUE + 1, self.ignore_index, dtype=np.uint8)
        self._known = np.zeros(MAX_LABEL_VALUE + 1, dtype=bool)
        for value, train_id in self.label_to_train.items():
            self._lut[value] = train_id
            self._known[value] = True
        self._known[255] = True  # 255 is always ignore
        self._unknown8 = (~self._known[:256]).astype(np.uint8)
        # to_label_ids: each class's smallest stored value; ignore -> the smallest ignore value (else 255)
        self._inverse = np.zeros(256, dtype=np.int64)
        self._valid_train = np.zeros(256, dtype=bool)
        for value in sorted(self.label_to_train, reverse=True):
            self._inverse[self.label_to_train[value]] = value
        ignored = [v for v, t in self.label_to_train.items() if t == self.ignore_index]
        self._inverse[self.ignore_index] = min(ignored) if ignored else 255
        self._valid_train[:self.num_classes] = True
        self._valid_train[self.ignore_index] = True
        self._palette = np.zeros((256, 3), dtype=np.uint8)
        self._palette[:self.num_classes] = np.asarray(self.colors, dtype=np.uint8).reshape(-1, 3)

    @classmethod
    def from_yaml(cls, path) -> "ClassTable":
        """Read a table in the format of the module docstring."""
        import yaml

        from utils.config import ConfigError, NoAliasLoader

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingInputError(f"class table {path} not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=NoAliasLoader)
        except ConfigError as err:  # an alias: refused like in configs
            raise InvalidInputError(f"class table {path}: {err}") from None
        except OSError as err:
            raise UnreadableInputError(f"cannot read class table {path}: {err.strerror or err}") from err
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise InvalidInputError(f"class table {path}: not valid YAML{line}") from err
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data, source: str = "ClassTable") -> "ClassTable":
        """A table from the parsed YAML mapping (keys of the module docstring)."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"{source}: expected a mapping with the key 'names', got "
                                    f"{type(data).__name__}")
        unknown = sorted(set(map(str, data)) - set(_KEYS))
        if unknown:
            raise InvalidInputError(f"{source}: unknown key {unknown[0]!r}; expected some of {', '.join(_KEYS)}")
        if "names" not in data:
            raise InvalidInputError(f"{source}: key 'names' is missing (the list of class names)")
        names = _check_names(data["names"], source)
        label_ids = _int_list(data.get("label_ids", list(range(len(names)))), "label_ids", source)
        ignore_ids = _int_list(data.get("ignore_label_ids", []), "ignore_label_ids", source)
        if len(label_ids) != len(names):
            raise InvalidInputError(f"{source}: key 'label_ids' has {len(label_ids)} entries but 'names' has "
                                    f"{len(names)}; give one stored value per class")
        policy = data.get("unknown_label_ids", "error")
        if policy not in _UNKNOWN_POLICIES:
            raise InvalidInputError(f"{source}: key 'unknown_label_ids' must be one of {_UNKNOWN_POLICIES}, "
                                    f"got {policy!r}")
        mapping = _label_map(label_ids, ignore_ids, source)
        return cls(names, data.get("colors"), mapping, unknown_to_ignore=policy == "ignore", source=source)

    @classmethod
    def cityscapes(cls) -> "ClassTable":
        """Cityscapes' 19 train classes over its label ids 0..33 (:mod:`datasets.labels`); any
        other stored value is ignored, as the Cityscapes dataset has always done (it warns)."""
        mapping = {lb.id: lb.trainId for lb in CITYSCAPES_LABELS if lb.id >= 0}
        return cls(TRAIN_CLASS_NAMES, TRAIN_CLASS_COLORS, mapping, unknown_to_ignore=True, source="Cityscapes")

    def to_dict(self) -> dict:
        """The YAML mapping of this table (what :meth:`from_yaml` reads back)."""
        label_ids = [int(self._inverse[c]) for c in range(self.num_classes)]
        ignore_ids = sorted(v for v, t in self.label_to_train.items() if t == self.ignore_index)
        extra = sorted(v for v, t in self.label_to_train.items() if t != self.ignore_index and v != label_ids[t])
        if extra:
            raise InvalidInputError(f"{self.source}: classes with several stored values (e.g. {extra[0]}) "
                                    f"cannot be written as YAML (one label id per class)")
        data = {"names": list(self.names), "colors": [list(c) for c in self.colors]}
        if label_ids != list(range(self.num_classes)):
            data["label_ids"] = label_ids
        if ignore_ids:
            data["ignore_label_ids"] = ignore_ids
        if self.unknown_to_ignore:
            data["unknown_label_ids"] = "ignore"
        return data

    def write_yaml(self, path) -> None:
        """Write :meth:`to_dict` to ``path`` (one class per line of each list)."""
        data = self.to_dict()
        lines = [f"names: [{', '.join(_yaml_str(n) for n in data['names'])}]",
                 "colors: [" + ", ".join(f"[{r}, {g}, {b}]" for r, g, b in data["colors"]) + "]"]
        for key in ("label_ids", "ignore_label_ids"):
            if key in data:
                lines.append(f"{key}: [{', '.join(map(str, data[key]))}]")
        if "unknown_label_ids" in data:
            lines.append(f"unknown_label_ids: {data['unknown_label_ids']}")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    # -- conversions ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.names)

    def unknown_values(self, label: np.ndarray) -> list:
        """Sorted stored values of ``label`` that the table does not know (255 is known: ignore)."""
        label = np.asarray(label)
        if label.dtype == np.uint8 and label.ndim == 2 and label.size:
            if not cv2.countNonZero(cv2.LUT(np.ascontiguousarray(label), self._unknown8)):
                return []
        elif label.dtype in (np.uint8, np.uint16) and self._known[label].all():
            return []
        values = np.unique(label)
        inside = (values >= 0) & (values <= MAX_LABEL_VALUE)
        return [int(v) for v, ok in zip(values, inside) if not ok or not self._known[int(v)]]

    def to_train_ids(self, label: np.ndarray, path: str = "label array") -> np.ndarray:
        """Train ids (uint8, same shape, ``ignore_index`` = ignore) of stored label values.

        A value the table does not know is an error naming ``path`` and the values found,
        unless the table maps unknown values to ignore."""
        label = np.asarray(label)
        if not np.issubdtype(label.dtype, np.integer):
            raise InvalidInputError(f"{path}: label values must be integers, got pixel type {label.dtype}")
        if not self.unknown_to_ignore:
            bad = self.unknown_values(label)
            if bad:
                raise InvalidInputError(f"{path}: values {bad[:10]} are not in the class table {self.source} "
                                        f"(label values {self._known_summary()})")
        if label.dtype == np.uint8 and label.ndim == 2 and label.size:
            return cv2.LUT(np.ascontiguousarray(label), self._lut[:256])
        if label.dtype in (np.uint8, np.uint16):
            return self._lut[label]
        inside = (label >= 0) & (label <= MAX_LABEL_VALUE)
        return np.where(inside, self._lut[np.where(inside, label, 255)], self.ignore_index).astype(np.uint8)

    def to_label_ids(self, train_ids: np.ndarray) -> np.ndarray:
        """Stored label values of a train-id map (the inverse, for writing predictions): a class's
        smallest label value; ignore becomes the smallest ignore value (255 if the table has none).
        Any other value is an error.  uint8 when every value fits, else uint16."""
        arr = np.asarray(train_ids)
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInputError(f"to_label_ids expects integer train ids, got pixel type {arr.dtype}")
        inside = (arr >= 0) & (arr <= 255)
        valid = np.where(inside, self._valid_train[np.where(inside, arr, 0)], False)
        if not valid.all():
            bad = np.unique(arr[~valid])[:10].tolist()
            raise InvalidInputError(f"to_label_ids: values {bad} are not train ids of {self.source} "
                                    f"(expected 0..{self.num_classes - 1} or {self.ignore_index})")
        out_type = np.uint8 if self._inverse.max() <= 255 else np.uint16
        return self._inverse.astype(out_type)[arr.astype(np.uint8)]

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """H x W train-id map -> H x W x 3 uint8 RGB; ignore and unknown values are black."""
        arr = np.asarray(train_ids)
        if arr.ndim != 2:
            raise InvalidInputError(f"colorize expects an H x W train-id map, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.where((arr >= 0) & (arr < 256), arr, self.ignore_index).astype(np.uint8)
        return self._palette[arr]

    def fingerprint(self) -> str:
        """A short text that changes whenever the mapping does (part of cache keys)."""
        pairs = ",".join(f"{v}:{t}" for v, t in sorted(self.label_to_train.items()))
        return f"C{self.num_classes};I{self.ignore_index};U{int(self.unknown_to_ignore)};{pairs}"

    def _known_summary(self) -> str:
        classes = sorted(v for v, t in self.label_to_train.items() if t != self.ignore_index)
        ignored = sorted(v for v, t in self.label_to_train.items() if t == self.ignore_index)
        text = f"{_ranges(classes)} for classes"
        return text + (f", {_ranges(ignored + [255])} ignored" if ignored else ", 255 ignored")

    def __eq__(self, other):
        return (isinstance(other, ClassTable) and self.names == other.names and self.colors == other.colors
                and self.label_to_train == other.label_to_train and self.ignore_index == other.ignore_index
                and self.unknown_to_ignore == other.unknown_to_ignore)

    def __repr__(self):
        return f"ClassTable({self.source!r}, {self.num_classes} classes)"


# ---------------------------------------------------------------------------------------------- checks
def _check_names(names, source):
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise InvalidInputError(f"{source}: key 'names' must be a non-empty list of class names, got {names!r}")
    if len(names) > 255:
        raise InvalidInputError(f"{source}: key 'names' has {len(names)} classes; at most 255 fit beside "
                                f"the ignore value 255")
    seen = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError(f"{source}: key 'names', entry {i} is {name!r}; expected a non-empty string")
        if name in seen:
            raise InvalidInputError(f"{source}: key 'names': {name!r} appears twice (entries {seen[name]} and {i})")
        seen[name] = i
    return names


def _check_colors(colors, num_classes, source):
    if colors is None:
        return _default_colors(num_classes).tolist()
    if isinstance(colors, str) or not isinstance(colors, (list, tuple)):
        raise InvalidInputError(f"{source}: key 'colors' must be a list of [R, G, B], got {colors!r}")
    if len(colors) != num_classes:
        raise InvalidInputError(f"{source}: key 'colors' has {len(colors)} entries but 'names' has "
                                f"{num_classes}; give one colour per class")
    for i, color in enumerate(colors):
        if (isinstance(color, str) or not isinstance(color, (list, tuple)) or len(color) != 3
                or not all(_is_int(v) and 0 <= v <= 255 for v in color)):
            raise InvalidInputError(f"{source}: key 'colors', entry {i} is {color!r}; expected 3 integers "
                                    f"in 0..255")
    return [[int(v) for v in color] for color in colors]


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _int_list(values, key, source):
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise InvalidInputError(f"{source}: key {key!r} must be a list of integers, got {values!r}")
    for i, value in enumerate(values):
        if not _is_int(value) or not 0 <= value <= MAX_LABEL_VALUE:
            raise InvalidInputError(f"{source}: key {key!r}, entry {i} is {value!r}; expected an integer "
                                    f"in 0..{MAX_LABEL_VALUE}")
    return [int(v) for v in values]


def _label_map(label_ids, ignore_ids, source):
    mapping, where = {}, {}
    for key, values in (("label_ids", label_ids), ("ignore_label_ids", ignore_ids)):
        for i, value in enumerate(values):
            if value in where:
                raise InvalidInputError(f"{source}: label id {value} is listed twice ({where[value]} and "
                                        f"{key} entry {i})")
            where[value] = f"{key} entry {i}"
            mapping[value] = i if key == "label_ids" else IGNORE_INDEX
    if 255 in label_ids:
        raise InvalidInputError(f"{source}: key 'label_ids', entry {label_ids.index(255)} is 255, which always "
                                f"means ignore; store that class under another value")
    return mapping


def _check_mapping(label_to_train, num_classes, ignore_index, source):
    mapping = {}
    for value, train_id in dict(label_to_train).items():
        if not _is_int(value) or not 0 <= value <= MAX_LABEL_VALUE:
            raise InvalidInputError(f"{source}: label value {value!r} is not an integer in 0..{MAX_LABEL_VALUE}")
        if not _is_int(train_id) or not (0 <= train_id < num_classes or train_id == ignore_index):
            raise InvalidInputError(f"{source}: label value {value} maps to {train_id!r}; expected a train id "
                                    f"0..{num_classes - 1} or {ignore_index} (ignore)")
        if value == 255 and train_id != ignore_index:
            raise InvalidInputError(f"{source}: label value 255 always means ignore; it cannot map to class "
                                    f"{train_id}")
        mapping[int(value)] = int(train_id)
    missing = sorted(set(range(num_classes)) - set(mapping.values()))
    if missing:
        raise InvalidInputError(f"{source}: class {missing[0]} has no label value mapping to it")
    return mapping


def _ranges(values: Iterable[int]) -> str:
    """'0..3, 7, 9..10' for sorted integers."""
    values = sorted(set(values))
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts) if parts else "none"


def _yaml_str(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a valid YAML flow scalar
