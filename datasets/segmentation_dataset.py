"""What every image + label-map dataset of this project shares: epochs, seeding, class-uniform
sampling, samples.  :class:`datasets.cityscapes.Cityscapes` and
:class:`datasets.folder.FolderSegmentation` differ only in how they find their files and turn
a label file into train ids.

Each sample is a dict ``{'image': float32 3 x H x W (normalised), 'label': int64 H x W
train ids (255 = ignore), 'edge': float32 1 x H x W in {0, 1}, 'name': str}`` (plus what the
transform adds, e.g. ``roi``).  A split without labels gives ``label`` all 255 and ``edge`` all 0
(same shapes as for the other splits, so collation and evaluation code need no special case).

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

Images are read without applying an EXIF orientation tag: label maps are stored as they are,
so an image turned by its tag would no longer lie on its label.

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
The cache is keyed by a SHA-1 of every label file's relative path, size and mtime (and of the
class table, where a dataset's table is configurable), and is recomputed when any of them
changes.  Each rank computes it if it is missing (the result is identical; writes are
atomic), so no barrier is needed.
"""
import concurrent.futures
import hashlib
import json
import logging
import os

import cv2
import numpy as np
from torch.utils.data import Dataset

from utils.errors import InvalidInputError, MissingInputError, UnreadableInputError
from utils.io import atomic_write_text

from .transforms import ValTransform

__all__ = ["SegmentationDataset", "imread_or_raise", "read_image", "tile_centroids", "atomic_write_json"]

log = logging.getLogger(__name__)

CENTROID_FORMAT = 1
_EPOCH_STREAM = 1 << 20  # keeps the epoch-list random stream apart from sample streams
IMAGE_READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


# ----------------------------------------------------------------------------------------
# File reading with errors that name the file
# ----------------------------------------------------------------------------------------
def imread_or_raise(path, flags, kind="image"):
    """cv2.imread that raises naming the file (and ``kind``: image, label) when it is missing or
    undecodable, instead of returning None."""
    array = cv2.imread(path, flags)
    if array is None:
        if not os.path.isfile(path):
            raise MissingInputError(f"{kind} file not found: {path}")
        raise UnreadableInputError(f"cannot read {kind} file {path}: unreadable, truncated or not an image")
    return array


def read_image(path):
    """H x W x 3 uint8 RGB, as stored (an EXIF orientation tag is not applied); raises naming
    the file when it is missing or undecodable."""
    return cv2.cvtColor(imread_or_raise(path, IMAGE_READ_FLAGS), cv2.COLOR_BGR2RGB)


def _nbytes(arrays):
    """Bytes of the arrays of an (image, label) pair; a missing label counts 0."""
    return sum(a.nbytes for a in arrays if a is not None)


def atomic_write_json(path, payload):
    """Write ``payload`` as compact JSON to ``path`` atomically, with the mode the umask gives."""
    atomic_write_text(path, json.dumps(payload, separators=(",", ":")))


# ----------------------------------------------------------------------------------------
# Class centroids
# ----------------------------------------------------------------------------------------
def tile_centroids(train_ids, tile, num_classes):
    """[(class_id, x, y), ...]: per tile and class (< ``num_classes``), the class pixel nearest
    to the class's centre of mass in that tile.  Tiles cover the whole image (edge tiles may
    be smaller)."""
    height, width = train_ids.shape
    found = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            patch = train_ids[y0:y0 + tile, x0:x0 + tile]
            ph, pw = patch.shape
            flat = patch.ravel()
            counts = np.bincount(flat, minlength=256)[:num_classes]
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


# ----------------------------------------------------------------------------------------
# The base class
# ----------------------------------------------------------------------------------------
class SegmentationDataset(Dataset):
    """Images with label maps: epochs, seeding, class-uniform sampling and samples (module docstring).

    A subclass sets ``kind`` (its name in messages) and ``class_table`` (a
    :class:`~datasets.class_table.ClassTable`) before calling ``__init__``, and provides:

    * ``_check_split(split)``: raise on a split name it cannot hold;
    * ``_scan()``: the sorted list of ``(name, image_path, label_path or None)``; it sets
      ``self.has_labels``;
    * ``_train_ids(label_path)``: the train-id map (H x W uint8) of a label file;
    * ``_centroid_function()``: a picklable callable of ``(label_path, tile)`` giving
      :func:`tile_centroids` of that file (run in worker processes);
    * optionally ``_cache_key_extra()``: text mixed into the centroid cache key.

    Args: as :class:`~datasets.cityscapes.Cityscapes`.
    """

    kind = "SegmentationDataset"

    def __init__(self, root, split, transform=None, edge_radius=2, class_uniform_fraction=0.0,
                 class_uniform_tile=1024, seed=0, cache_dir=None, centroid_workers=None, progress=True):
        self._check_split(split)
        if not 0.0 <= class_uniform_fraction <= 1.0:
            raise InvalidInputError(f"{self.kind}: class_uniform_fraction must be in [0, 1], got "
                                    f"{class_uniform_fraction}")
        if transform is None:
            transform = ValTransform(edge_radius=edge_radius)
        transform_radius = getattr(transform, "edge_radius", edge_radius)
        if transform_radius != edge_radius:
            raise InvalidInputError(f"{self.kind}: edge_radius={edge_radius} but the transform computes edges "
                                    f"with edge_radius={transform_radius}; pass the same radius to both")
        self.root = os.fspath(root)
        self.split = split
        self.transform = transform
        self.edge_radius = edge_radius
        self.class_uniform_fraction = float(class_uniform_fraction)
        self.class_uniform_tile = int(class_uniform_tile)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.items = self._scan()
        self._decoded = None  # (image, label) per item once keep_decoded() has read them
        if self.class_uniform_fraction > 0 and not self.has_labels:
            raise InvalidInputError(f"{self.kind}: class-uniform sampling needs labels; the {split} split has none")
        self.centroids = None  # class id -> int array (n, 3) of (image index, x, y)
        if self.class_uniform_fraction > 0:
            self.centroids = self._load_or_build_centroids(centroid_workers, progress)
        self.epoch = 0
        self._epoch_items = None
        self.set_epoch(0)

    @property
    def num_classes(self):
        return self.class_table.num_classes

    def _cache_key_extra(self):
        return None

    # -- class-uniform centroids ----------------------------------------------------------
    def _label_key(self):
        digest = hashlib.sha1()
        for _, _, label_path in self.items:
            st = os.stat(label_path)
            rel = os.path.relpath(label_path, self.root)
            digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        extra = self._cache_key_extra()
        if extra:
            digest.update(f"table\t{extra}\n".encode())
        return digest.hexdigest()

    def _cache_candidates(self):
        name = f"class_centroids_{self.split}_tile{self.class_uniform_tile}.json"
        beside = os.path.join(self.root, name)
        cache_root = (self.cache_dir or os.environ.get("INVERSEFORM_CACHE_DIR")
                      or os.path.join(os.path.expanduser("~"), ".cache", "inverseform", "centroids"))
        root_hash = hashlib.sha1(os.path.abspath(self.root).encode()).hexdigest()[:12]
        elsewhere = os.path.join(cache_root, f"{root_hash}_{name}")
        return beside, elsewhere

    def _write_cache(self, path, payload):
        atomic_write_json(path, payload)

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
                   "num_classes": self.num_classes, "key": key, "num_images": len(self.items),
                   "label_files": [os.path.relpath(p, self.root) for _, _, p in self.items],
                   "centroids": rows}
        for path in candidates:
            try:
                self._write_cache(path, payload)
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

        function = self._centroid_function()
        jobs = [(label_path, self.class_uniform_tile) for _, _, label_path in self.items]
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if len(jobs) >= 64 else 0
        bar = tqdm(total=len(jobs), desc=f"class centroids ({self.split})", unit="img",
                   disable=not progress, leave=False)
        rows = []
        try:
            if workers and workers > 1:
                with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                    results = pool.map(function, jobs, chunksize=8)
                    for index, found in enumerate(results):
                        rows.extend([index, c, x, y] for c, x, y in found)
                        bar.update(1)
            else:
                for index, job in enumerate(jobs):
                    rows.extend([index, c, x, y] for c, x, y in function(job))
                    bar.update(1)
        finally:
            bar.close()
        return rows

    def _centroid_arrays(self, rows):
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        return {c: table[table[:, 1] == c][:, [0, 2, 3]] for c in range(self.num_classes)}

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
        classes = [c for c in range(self.num_classes) if len(self.centroids[c])]
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
            raise InvalidInputError(f"{self.kind}: split {self.split!r} has no labels")
        return self._train_ids(self.items[item_index][2])

    def __len__(self):
        return len(self.items)

    def read_item(self, item_index):
        """(image, train-id map or None) of image ``item_index`` in sorted order, decoded from
        its files (or kept in memory by :meth:`keep_decoded`: read-only arrays)."""
        if self._decoded is not None:
            return self._decoded[item_index]
        _, image_path, label_path = self.items[item_index]
        image = read_image(image_path)
        label = self._train_ids(label_path) if self.has_labels else None
        if label is not None and label.shape != image.shape[:2]:
            raise InvalidInputError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                                    f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        return image, label

    def keep_decoded(self, max_bytes):
        """Decode every image and label now and keep them in memory if they fit in ``max_bytes``
        (estimated from the first pair): a small split is then not decoded again at every epoch,
        and DataLoader workers forked later share the arrays.  They are made read-only, so a
        transform that wrote into its input would fail instead of changing later epochs.
        Returns the bytes kept (0: too large, nothing kept)."""
        first = self.read_item(0)
        if _nbytes(first) * len(self.items) > max_bytes:
            return 0
        decoded = [first] + [self.read_item(i) for i in range(1, len(self.items))]
        for array in (a for pair in decoded for a in pair if a is not None):
            array.flags.writeable = False
        self._decoded = decoded
        return sum(_nbytes(pair) for pair in decoded)

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        item_index, center, _ = self.sample_info(index)
        image, label = self.read_item(item_index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample = self.transform(image, label, rng=rng, center=center)
        sample["name"] = self.items[item_index][0]
        return sample
