"""Target sampling locations for learned non-uniform downsampling (Marin et al., ICCV 2019).

From a train-id label map, the h x w grid of sampling locations the auxiliary network learns
to predict: sample points pulled towards the nearest boundary of a target class, kept spread
out by a smoothness term.  Conventions (shared with ``models.nus``): an h x w x 2 float
array, ``[..., 0]`` the ROW and ``[..., 1]`` the COLUMN, normalised to [0, 1]
(pixel = loc * (size - 1)); the uniform grid has its corners at 0 and 1.

Steps, as in the reference (dmitrii-marin/adaptive-sampling, ``utils/nus``):

1. boundary pixels: a pixel whose label differs from a 4-neighbour (both sides marked),
   minus pixels labelled ``ignore_index`` and pixels whose own label is not a target class;
2. raw targets t: at the grid pixels ``mgrid[0:H-1:h, 0:W-1:w]`` (truncated), the nearest
   boundary pixel (Euclidean distance transform), divided by (H - 1, W - 1).  The reference
   spaces the columns by H - 1 too, which only agrees on square maps; W - 1 is used here;
3. regularised targets x = argmin E(x) with
   ``E = alpha * sum_p |x_p - t_p|^2 + (1 - sqrt(alpha)) * sum_{p~q} |x_p - x_q|^2``
   (4-neighbours), row coordinate fixed to 0 / 1 on the top / bottom rows, column
   coordinate fixed to 0 / 1 on the left / right columns.  The reference minimises E with
   Ceres; E is quadratic and the two coordinates decouple, so the minimiser is an exact
   affine map x = M t + b per (h, w, alpha), computed once and cached (no solver dependency);
4. a label map without any target-class boundary gives the uniform grid (the reference
   would squeeze every target to the top-left corner: its distance transform of an empty
   edge map points nowhere).

``NUSTargets`` wraps a dataset so these targets are computed in the DataLoader workers.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .labels import IGNORE_INDEX

__all__ = ["CITYSCAPES_TARGET_CLASSES", "NUSTargets", "boundary_pixels", "raw_targets", "regularise",
           "regularisation_map", "target_locations", "uniform_locations"]

# Cityscapes train ids 11..18: person, rider, car, truck, bus, train, motorcycle, bicycle
# (the reference's ``nus_target_classes`` in its Cityscapes scripts).
CITYSCAPES_TARGET_CLASSES: Tuple[int, ...] = tuple(range(11, 19))


def _check_size(size: Sequence[int]) -> Tuple[int, int]:
    if len(size) != 2 or any(isinstance(s, bool) or int(s) != s or s < 2 for s in size):
        raise ValueError(f"size must be two integers >= 2 (grid rows, columns), got {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return float(alpha)


def uniform_locations(size: Sequence[int] = (8, 8)) -> np.ndarray:
    """The uniform h x w x 2 grid (row, col) in [0, 1], corners at 0 and 1."""
    h, w = _check_size(size)
    rows, cols = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    return np.stack([rows, cols], axis=-1).astype(np.float32)


def boundary_pixels(label: np.ndarray, target_classes: Iterable[int] = CITYSCAPES_TARGET_CLASSES,
                    ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """H x W bool: pixels of a target class with a differently labelled 4-neighbour."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be an H x W map of train ids, got shape {label.shape}")
    edges = np.zeros(label.shape, dtype=bool)
    horizontal = label[:, 1:] != label[:, :-1]
    vertical = label[1:, :] != label[:-1, :]
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    edges[1:, :] |= vertical
    edges[:-1, :] |= vertical
    edges &= label != ignore_index
    edges &= np.isin(label, np.asarray(list(target_classes), dtype=label.dtype if label.dtype.kind in "iu"
                                       else np.int64))
    return edges


def raw_targets(edges: np.ndarray, size: Sequence[int] = (8, 8)) -> np.ndarray:
    """h x w x 2 float64: for each grid pixel, the nearest boundary pixel (row, col) / (H - 1, W - 1).
    ``edges`` must hold at least one boundary pixel."""
    h, w = _check_size(size)
    height, width = edges.shape
    if height < 2 or width < 2:
        raise ValueError(f"label map must be at least 2 x 2, got {height} x {width}")
    grid_r = np.linspace(0, height - 1, h).astype(int)
    grid_c = np.linspace(0, width - 1, w).astype(int)
    # The transform of the whole map is what the reference computes; only the grid pixels are read.
    _, nearest = ndimage.distance_transform_edt(~edges, return_indices=True)
    rows = nearest[0][np.ix_(grid_r, grid_c)] / (height - 1)
    cols = nearest[1][np.ix_(grid_r, grid_c)] / (width - 1)
    return np.stack([rows, cols], axis=-1)


@functools.lru_cache(maxsize=32)
def regularisation_map(h: int, w: int, alpha: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(M_row, b_row, M_col, b_col): the exact minimiser of E is ``x[..., k] = M_k @ t[..., k] + b_k``
    (flattened row-major).  Per coordinate, with Laplacian L of the h x w 4-neighbour grid,
    beta = 1 - sqrt(alpha), free set F and fixed set C (with values c), dE/dx_F = 0 reads
    ``(alpha I + beta L_FF) x_F = alpha t_F - beta L_FC c``; fixed entries map to their value."""
    h, w = _check_size((h, w))
    alpha = _check_alpha(alpha)
    beta = 1.0 - np.sqrt(alpha)
    n = h * w
    index = np.arange(n).reshape(h, w)
    laplacian = np.zeros((n, n))
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])):
        a, b = a.ravel(), b.ravel()
        laplacian[a, b] -= 1.0
        laplacian[b, a] -= 1.0
        np.add.at(laplacian, (a, a), 1.0)
        np.add.at(laplacian, (b, b), 1.0)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    maps = []
    for fixed, value in (((rows == 0) | (rows == h - 1), rows / (h - 1)),
                         ((cols == 0) | (cols == w - 1), cols / (w - 1))):
        fixed, value = fixed.ravel(), value.ravel().astype(np.float64)
        free = ~fixed
        system = alpha * np.eye(int(free.sum())) + beta * laplacian[np.ix_(free, free)]
        inverse = np.linalg.inv(system)
        matrix = np.zeros((n, n))
        matrix[np.ix_(free, free)] = alpha * inverse
        offset = np.where(fixed, value, 0.0)
        offset[free] = -beta * inverse @ (laplacian[np.ix_(free, fixed)] @ value[fixed])
        maps += [matrix, offset]
    for array in maps:
        array.setflags(write=False)
    return tuple(maps)


def regularise(raw: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The exact minimiser of E (module docstring) for raw targets ``raw`` (h x w x 2)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 3 or raw.shape[2] != 2:
        raise ValueError(f"raw targets must be h x w x 2, got shape {raw.shape}")
    h, w = raw.shape[:2]
    m_row, b_row, m_col, b_col = regularisation_map(h, w, float(alpha))
    out = np.empty_like(raw)
    out[..., 0] = (m_row @ raw[..., 0].ravel() + b_row).reshape(h, w)
    out[..., 1] = (m_col @ raw[..., 1].ravel() + b_col).reshape(h, w)
    return out


def target_locations(label: np.ndarray, size: Sequence[int] = (8, 8), alpha: float = 0.5,
                     target_classes: Iterable[int] = CITYSCAPES_TARGET_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """h x w x 2 float32 regularised target sampling locations (row, col) in [0, 1] of a train-id
    label map (H x W); the uniform grid when the map has no target-class boundary pixel."""
    size = _check_size(size)
    alpha = _check_alpha(alpha)
    edges = boundary_pixels(label, target_classes, ignore_index)
    if not edges.any():
        return uniform_locations(size)
    return regularise(raw_targets(edges, size), alpha).astype(np.float32)


class NUSTargets:
    """Dataset wrapper: each sample (a dict with an H x W ``label``) gains ``locations``, the
    h x w x 2 float32 tensor of :func:`target_locations`, computed in the loader workers.
    Other attributes (``set_epoch``, ``items``, ...) are the wrapped dataset's."""

    def __init__(self, dataset, size: Sequence[int] = (8, 8), alpha: float = 0.5,
                 target_classes: Iterable[int] = CITYSCAPES_TARGET_CLASSES, ignore_index: int = IGNORE_INDEX):
        self.dataset = dataset
        self.size = _check_size(size)
        self.alpha = _check_alpha(alpha)
        self.target_classes = tuple(int(c) for c in target_classes)
        self.ignore_index = int(ignore_index)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        import torch

        sample = self.dataset[index]
        label = sample["label"]
        label = label.numpy() if hasattr(label, "numpy") else np.asarray(label)
        sample["locations"] = torch.from_numpy(
            target_locations(label, self.size, self.alpha, self.target_classes, self.ignore_index))
        return sample

    def __getattr__(self, name):
        if name == "dataset":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"NUSTargets({self.dataset!r}, size={self.size}, alpha={self.alpha})"
