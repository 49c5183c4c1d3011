"""Cityscapes over the official directory layout, with class-uniform sampling.

Layout (NOTES.md)::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Each sample is a dict ``{'image': float32 3 x H x W (normalised), 'label': int64 H x W
train ids (255 = ignore), 'edge': float32 1 x H x W in {0, 1}, 'name': str}``.

Test split: the official test labels carry no classes, so they are never read; a test
sample has ``label`` all 255 and ``edge`` all 0 (same shapes as for the other splits, so
collation and evaluation code need no special case).

Seeding (deterministic, resumable, independent of workers):
  * the random state of sample ``index`` in epoch ``e`` is
    ``np.random.default_rng([seed, e, index])`` - a pure function of these numbers, so
    the result does not depend on which DataLoader worker or rank draws it, on the number
    of workers, or on what was drawn before; resuming in the middle of an epoch
    (``DistributedTrainSampler.set_start``) reproduces the same samples;
  * ``index`` is the position in this epoch's list.  Without class-uniform sampling the
    list is the images in sorted order; with it, the list is rebuilt by ``set_epoch(e)``
    from ``np.random.default_rng([seed, e, 1 << 20])`` alone, so every rank builds the
    same list and the sampler's shuffle (also seeded by (seed, epoch)) partitions it;
  * call ``dataset.set_epoch(e)`` *and* ``sampler.set_epoch(e)`` before iterating epoch e
    in the main process.  DataLoader workers receive a copy of the dataset when the
    iterator is created, so do not use ``persistent_workers=True`` with this dataset alone
    (the workers would keep the epoch they were started with); ``datasets/epoch_aware.py``
    makes persistent workers exact by passing the epoch with every index.

OpenCV note: do not call ``cv2.setNumThreads`` inside forked DataLoader workers (e.g. in a
``worker_init_fn``) once the parent process has used OpenCV: with opencv-python 5.0 this
deadlocks in the child while tearing down the inherited thread pool (observed here).

Class-uniform sampling (as in NVIDIA's HMS training): each label image is cut into
tiles of ``class_uniform_tile`` pixels; for every class in a tile one representative
pixel is recorded - the class pixel nearest to the class's centre of mass in that tile
(HMS records the centre of mass itself, which may fall outside a non-convex region; we
keep a pixel *of* the class so the crop provably contains it).  Each epoch,
``round(class_uniform_fraction * len)`` samples are such crops, split evenly over the
classes that have any centroid (remainder to randomly chosen classes), centroids of a
class drawn by cycling through a random permutation; the rest are plain random crops of
distinct random images.  The epoch always has ``len(dataset)`` samples.

The centroids are computed once (progress bar, process pool) and cached in
``<root>/class_centroids_<split>_tile<T>.json``; when the root is not writable, in
``cache_dir`` (argument, else ``$INVERSEFORM_CACHE_DIR``, else
``~/.cache/inverseform/centroids``) under a name that includes a hash of the root path.
The cache is keyed by a SHA-1 of every label file's relative path, size and mtime, and is
recomputed when any of them changes.  Each rank computes it if it is missing (the result
is identical; writes are atomic), so no barrier is needed.
"""
import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile
import warnings

import cv2
import numpy as np
from torch.utils.data import Dataset

from .labels import IGNORE_INDEX, NUM_CLASSES, VALID_LABEL_IDS, labelid_to_trainid
from .transforms import ValTransform

__all__ = ["Cityscapes", "SPLITS", "EXPECTED_LAYOUT", "compute_image_centroids", "read_image",
           "read_label_ids"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
EXPECTED_LAYOUT = ("<root>/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
                   "<root>/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png")
CENTROID_FORMAT = 1
_EPOCH_STREAM = 1 << 20  # keeps the epoch-list random stream apart from sample streams

_LUT16_VALID = np.zeros(65536, dtype=bool)
_LUT16_VALID[list(VALID_LABEL_IDS)] = True
_LUT8_INVALID = (~_LUT16_VALID[:256]).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# File reading with errors that name the file
# ----------------------------------------------------------------------------------------
def imread_or_raise(path, flags, kind="image"):
    """cv2.imread that raises naming the file (and ``kind``: image, label) when it is missing or
    undecodable, instead of returning None."""
    array = cv2.imread(path, flags)
    if array is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{kind} file not found: {path}")
        raise OSError(f"cannot read {kind} file {path}: unreadable, truncated or not an image")
    return array


def read_image(path):
    """H x W x 3 uint8 RGB; raises naming the file when it is missing or undecodable."""
    return cv2.cvtColor(imread_or_raise(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def read_label_ids(path):
    """H x W label-id array (uint8 or uint16) of a *_gtFine_labelIds.png."""
    label = imread_or_raise(path, cv2.IMREAD_UNCHANGED, "label")
    if label.ndim != 2:
        raise ValueError(f"label file {path} has {label.shape[2]} channels; expected a single-channel "
                         f"*_gtFine_labelIds.png (not the colour visualisation)")
    if label.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"label file {path} has pixel type {label.dtype}; expected 8-bit label ids")
    return label


def _invalid_ids(label):
    if label.dtype == np.uint8:
        if not cv2.countNonZero(cv2.LUT(label, _LUT8_INVALID)):
            return []
    elif _LUT16_VALID[label].all():
        return []
    values = np.unique(label)
    return [int(v) for v in values if not _LUT16_VALID[v]]


# ----------------------------------------------------------------------------------------
# Class centroids
# ----------------------------------------------------------------------------------------
def compute_image_centroids(label_path, tile):
    """[(class_id, x, y), ...]: per tile and class, the class pixel nearest to the class's
    centre of mass in that tile.  Tiles cover the whole image (edge tiles may be smaller).
    """
    train_ids = labelid_to_trainid(read_label_ids(label_path))
    height, width = train_ids.shape
    found = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            patch = train_ids[y0:y0 + tile, x0:x0 + tile]
            ph, pw = patch.shape
            flat = patch.ravel()
            counts = np.bincount(flat, minlength=256)[:NUM_CLASSES]
            present = np.flatnonzero(counts)
            if present.size == 0:
                continue
            sum_y = np.bincount(flat, weights=np.repeat(np.arange(ph, dtype=np.float64), pw),
                                minlength=256)
            sum_x = np.bincount(flat, weights=np.tile(np.arange(pw, dtype=np.float64), ph),
                                minlength=256)
            for cls in present:
                cy = min(ph - 1, int(sum_y[cls] / counts[cls]))
                cx = min(pw - 1, int(sum_x[cls] / counts[cls]))
                if patch[cy, cx] != cls:
                    ys, xs = np.nonzero(patch == cls)
                    nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
                    cy, cx = int(ys[nearest]), int(xs[nearest])
                found.append((int(cls), x0 + cx, y0 + cy))
    return found


def _centroid_job(args):
    return compute_image_centroids(*args)


def _atomic_write_json(path, payload):
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------
class Cityscapes(Dataset):
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
        seed: base seed of every random choice (see module docstring).
        cache_dir: where to cache centroids if the root is not writable.
        centroid_workers: processes for the one-time centroid pass (None: automatic).
        progress: show a progress bar for the centroid pass.
    """

    def __init__(self, root, split, transform=None, edge_radius=2, class_uniform_fraction=0.0,
                 class_uniform_tile=1024, seed=0, cache_dir=None, centroid_workers=None, progress=True):
        if split not in SPLITS:
            raise ValueError(f"Cityscapes: unknown split {split!r}; expected one of {SPLITS}")
        if not 0.0 <= class_uniform_fraction <= 1.0:
            raise ValueError(f"Cityscapes: class_uniform_fraction must be in [0, 1], got "
                             f"{class_uniform_fraction}")
        if class_uniform_fraction > 0 and split == "test":
            raise ValueError("Cityscapes: class-uniform sampling needs labels; the test split has none")
        if transform is None:
            transform = ValTransform(edge_radius=edge_radius)
        transform_radius = getattr(transform, "edge_radius", edge_radius)
        if transform_radius != edge_radius:
            raise ValueError(f"Cityscapes: edge_radius={edge_radius} but the transform computes edges "
                             f"with edge_radius={transform_radius}; pass the same radius to both")
        self.root = os.fspath(root)
        self.split = split
        self.transform = transform
        self.edge_radius = edge_radius
        self.has_labels = split != "test"
        self.class_uniform_fraction = float(class_uniform_fraction)
        self.class_uniform_tile = int(class_uniform_tile)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.items = self._scan()
        self._warned_files = set()
        self.centroids = None  # class id -> int array (n, 3) of (image index, x, y)
        if self.class_uniform_fraction > 0:
            self.centroids = self._load_or_build_centroids(centroid_workers, progress)
        self.epoch = 0
        self._epoch_items = None
        self.set_epoch(0)

    # -- discovery ------------------------------------------------------------------------
    def _scan(self):
        root, split = self.root, self.split
        layout = EXPECTED_LAYOUT.format(split=split)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Cityscapes root {root!r} does not exist or is not a directory; "
                                    f"expected {layout}")
        image_dir = os.path.join(root, "leftImg8bit", split)
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"Cityscapes split {split!r} not found: {image_dir} is missing; "
                                    f"expected {layout}")
        label_dir = os.path.join(root, "gtFine", split)
        if self.has_labels and not os.path.isdir(label_dir):
            raise FileNotFoundError(f"Cityscapes labels for split {split!r} not found: {label_dir} is "
                                    f"missing; expected {layout}")
        items, missing, unexpected = [], [], []
        for city in sorted(os.listdir(image_dir)):
            city_dir = os.path.join(image_dir, city)
            if not os.path.isdir(city_dir):
                unexpected.append(city_dir)
                continue
            label_names = set()
            if self.has_labels and os.path.isdir(os.path.join(label_dir, city)):
                label_names = set(os.listdir(os.path.join(label_dir, city)))
            for file_name in sorted(os.listdir(city_dir)):
                if not file_name.endswith(IMAGE_SUFFIX):
                    if not file_name.startswith("."):
                        unexpected.append(os.path.join(city_dir, file_name))
                    continue
                name = file_name[:-len(IMAGE_SUFFIX)]
                image_path = os.path.join(city_dir, file_name)
                label_path = None
                if self.has_labels:
                    label_path = os.path.join(label_dir, city, name + LABEL_SUFFIX)
                    if name + LABEL_SUFFIX not in label_names:
                        missing.append((image_path, label_path))
                        continue
                items.append((name, image_path, label_path))
        if unexpected:
            log.warning("Cityscapes %s: ignoring %d entries that are not *%s images, e.g. %s",
                        split, len(unexpected), IMAGE_SUFFIX, unexpected[0])
        if missing:
            shown = "; ".join(f"{img} has no label file {lbl}" for img, lbl in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(f"Cityscapes {split}: {len(missing)} image(s) without a label file: "
                                    f"{shown}{more}")
        if not items:
            raise FileNotFoundError(f"Cityscapes split {split!r} under {root!r} holds no images; "
                                    f"expected {layout}")
        return items

    # -- class-uniform centroids ----------------------------------------------------------
    def _label_key(self):
        digest = hashlib.sha1()
        for _, _, label_path in self.items:
            st = os.stat(label_path)
            rel = os.path.relpath(label_path, self.root)
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _cache_candidates(self):
        name = f"class_centroids_{self.split}_tile{self.class_uniform_tile}.json"
        beside = os.path.join(self.root, name)
        cache_root = (self.cache_dir or os.environ.get("INVERSEFORM_CACHE_DIR")
                      or os.path.join(os.path.expanduser("~"), ".cache", "inverseform", "centroids"))
        root_hash = hashlib.sha1(os.path.abspath(self.root).encode()).hexdigest()[:12]
        elsewhere = os.path.join(cache_root, f"{root_hash}_{name}")
        return beside, elsewhere

    def _load_or_build_centroids(self, workers, progress):
        key = self._label_key()
        candidates = self._cache_candidates()
        for path in candidates:
            payload = self._read_cache(path, key)
            if payload is not None:
                log.info("class-uniform centroids loaded from %s", path)
                return self._centroid_arrays(payload["centroids"])
        rows = self._compute_centroids(workers, progress)
        payload = {"format": CENTROID_FORMAT, "split": self.split, "tile": self.class_uniform_tile,
                   "num_classes": NUM_CLASSES, "key": key, "num_images": len(self.items),
                   "label_files": [os.path.relpath(p, self.root) for _, _, p in self.items],
                   "centroids": rows}
        for path in candidates:
            try:
                _atomic_write_json(path, payload)
                log.info("class-uniform centroids cached in %s", path)
                break
            except OSError as err:
                log.info("cannot write centroid cache %s (%s)", path, err)
        else:
            log.warning("could not cache class-uniform centroids in any of %s; they will be "
                        "recomputed next time", list(candidates))
        return self._centroid_arrays(rows)

    def _read_cache(self, path, key):
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError) as err:
            log.warning("ignoring unreadable centroid cache %s (%s); recomputing", path, err)
            return None
        if (payload.get("format") != CENTROID_FORMAT or payload.get("key") != key
                or payload.get("tile") != self.class_uniform_tile
                or payload.get("num_images") != len(self.items)):
            log.info("centroid cache %s does not match the label files; recomputing", path)
            return None
        return payload

    def _compute_centroids(self, workers, progress):
        from tqdm import tqdm

        jobs = [(label_path, self.class_uniform_tile) for _, _, label_path in self.items]
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if len(jobs) >= 64 else 0
        bar = tqdm(total=len(jobs), desc=f"class centroids ({self.split})", unit="img",
                   disable=not progress, leave=False)
        rows = []
        try:
            if workers and workers > 1:
                with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                    results = pool.map(_centroid_job, jobs, chunksize=8)
                    for index, found in enumerate(results):
                        rows.extend([index, c, x, y] for c, x, y in found)
                        bar.update(1)
            else:
                for index, job in enumerate(jobs):
                    rows.extend([index, c, x, y] for c, x, y in _centroid_job(job))
                    bar.update(1)
        finally:
            bar.close()
        return rows

    @staticmethod
    def _centroid_arrays(rows):
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        return {c: table[table[:, 1] == c][:, [0, 2, 3]] for c in range(NUM_CLASSES)}

    # -- epochs ---------------------------------------------------------------------------
    def set_epoch(self, epoch):
        """Select epoch ``epoch``: rebuilds the class-uniform list (identical on every rank,
        since it depends on (seed, epoch) only) and the per-sample random streams."""
        self.epoch = int(epoch)
        n = len(self.items)
        if not self.centroids or self.class_uniform_fraction == 0:
            self._epoch_items = None  # identity: sample i is image i, random crop
            return
        rng = np.random.default_rng([self.seed, self.epoch, _EPOCH_STREAM])
        classes = [c for c in range(NUM_CLASSES) if len(self.centroids[c])]
        n_uniform = int(round(n * self.class_uniform_fraction)) if classes else 0
        per_class = np.full(len(classes), n_uniform // max(1, len(classes)), dtype=np.int64)
        if classes:
            per_class[rng.permutation(len(classes))[:n_uniform % len(classes)]] += 1
        entries = [(int(i), None, -1) for i in rng.permutation(n)[:n - n_uniform]]
        for cls, count in zip(classes, per_class):
            table = self.centroids[cls]
            picks = rng.permutation(len(table))[np.arange(count) % len(table)]
            entries.extend((int(table[p, 0]), (int(table[p, 1]), int(table[p, 2])), cls) for p in picks)
        self._epoch_items = entries

    def sample_info(self, index):
        """(image index, centre (x, y) or None, class id or -1) of sample ``index`` in the
        current epoch."""
        if self._epoch_items is None:
            if not 0 <= index < len(self.items):
                raise IndexError(index)
            return index, None, -1
        return self._epoch_items[index]

    # -- samples --------------------------------------------------------------------------
    def load_label(self, item_index):
        """Train-id map (H x W uint8, 255 = ignore) of image ``item_index`` in sorted order (not of
        this epoch's sample list), read without its image."""
        if not self.has_labels:
            raise ValueError(f"Cityscapes: split {self.split!r} has no labels")
        return self._train_ids(self.items[item_index][2])

    def _train_ids(self, label_path):
        label_ids = read_label_ids(label_path)
        bad = _invalid_ids(label_ids)
        if bad and label_path not in self._warned_files:
            self._warned_files.add(label_path)
            message = (f"{label_path}: values {bad[:10]} are not Cityscapes label ids "
                       f"(valid: 0..33); mapped to ignore ({IGNORE_INDEX})")
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return labelid_to_trainid(label_ids)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        item_index, center, _ = self.sample_info(index)
        name, image_path, label_path = self.items[item_index]
        image = read_image(image_path)
        label = self._train_ids(label_path) if self.has_labels else None
        if label is not None and label.shape != image.shape[:2]:
            raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = self.transform(image, label, rng=rng, center=center)
        sample["name"] = name
        return sample

    def __repr__(self):
        return (f"Cityscapes(root={self.root!r}, split={self.split!r}, n={len(self)}, "
                f"transform={self.transform!r}, class_uniform_fraction={self.class_uniform_fraction})")
