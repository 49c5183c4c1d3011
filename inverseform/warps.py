"""Spatial transforms used to train and interpret inverse-transformation regressors.

A regressor's output is a vector of *deviations from the identity transform* in one of
these parameterisations (all in the normalised coordinates of ``F.affine_grid``, where a
tile spans [-1, 1] on both axes, so a shift of 0.1 is 5% of the tile's width):

=============  ==  ==========================================================
kind           P   matrix built from the deviation vector ``d``
=============  ==  ==========================================================
``shift``      2   [[1, 0, d0], [0, 1, d1], [0, 0, 1]]
``scale_shift`` 4  [[1 + d0, 0, d2], [0, 1 + d1, d3], [0, 0, 1]]  (sx, sy, tx, ty)
``affine``     6   [[1 + d0, d1, d2], [d3, 1 + d4, d5], [0, 0, 1]]
``homography`` 8   [[1 + d0, d1, d2], [d3, 1 + d4, d5], [d6, d7, 1]]
=============  ==  ==========================================================

Every deviation is one matrix entry minus the identity's, so ``||M - I||_F`` equals the
L2 norm of the deviation vector, and the zero vector is exactly the identity.

Matrices map *output* (warped) coordinates to the *input* coordinates that are sampled,
as ``F.affine_grid`` does: a positive x-shift moves the content to the left.

Everything here is pure torch and device-agnostic; nothing syncs with the host.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "KIND_NUM_PARAMS",
    "KIND_COMPONENTS",
    "DEFAULT_RANGES",
    "params_to_matrix",
    "matrix_to_params",
    "warp",
    "sample_deviations",
    "warp_pairs",
    "matrix_components",
    "ParamNormaliser",
]

KIND_NUM_PARAMS: Dict[str, int] = {"shift": 2, "scale_shift": 4, "affine": 6, "homography": 8}

# Which entries of the row-major 3x3 matrix each deviation adds to.
_KIND_ENTRIES: Dict[str, tuple] = {
    "shift": (2, 5),
    "scale_shift": (0, 4, 2, 5),
    "affine": (0, 1, 2, 3, 4, 5),
    "homography": (0, 1, 2, 3, 4, 5, 6, 7),
}

# The transform components a kind can express; sample_deviations draws only these.
KIND_COMPONENTS: Dict[str, tuple] = {
    "shift": ("shift",),
    "scale_shift": ("scale", "shift"),
    "affine": ("scale", "shift", "rotation", "shear"),
    "homography": ("scale", "shift", "rotation", "shear", "perspective"),
}

# Half-widths of the uniform ranges used when none are given (rotation in degrees, the
# rest in normalised coordinates / relative scale). Small: the regressor must resolve
# transforms near identity, which is where a good segmentation's boundaries lie.
DEFAULT_RANGES: Dict[str, float] = {
    "scale": 0.1,
    "shift": 0.1,
    "rotation": 10.0,
    "shear": 0.1,
    "perspective": 0.05,
}


def _check_kind(kind: str) -> str:
    if kind not in KIND_NUM_PARAMS:
        raise ValueError(
            f"unknown transform kind {kind!r}; expected one of {sorted(KIND_NUM_PARAMS)}")
    return kind


def _check_params(dev: torch.Tensor, kind: str) -> None:
    expected = KIND_NUM_PARAMS[_check_kind(kind)]
    if dev.dim() != 2 or dev.shape[1] != expected:
        raise ValueError(
            f"deviations for kind {kind!r} must be N x {expected}, got shape {tuple(dev.shape)}")


def params_to_matrix(dev: torch.Tensor, kind: str) -> torch.Tensor:
    """N x P deviations from identity -> N x 3 x 3 matrices (differentiable)."""
    _check_params(dev, kind)
    # the nine entries stacked (no index tensor: host data would be a blocking copy to the device)
    deviation = dict(zip(_KIND_ENTRIES[kind], dev.unbind(1)))
    zero = dev.new_zeros(()).expand(dev.shape[0])
    entries = [deviation.get(k, zero) + 1.0 if k in (0, 4, 8) else deviation.get(k, zero) for k in range(9)]
    return torch.stack(entries, 1).reshape(-1, 3, 3)


def matrix_to_params(matrices: torch.Tensor, kind: str) -> torch.Tensor:
    """N x 3 x 3 matrices -> N x P deviations from identity.

    Homographies are first scaled so that their bottom-right entry is 1. Entries that the
    kind cannot express (e.g. a shear for ``scale_shift``) are dropped: this is the
    coordinate projection onto the kind, the inverse of :func:`params_to_matrix` on its
    image.
    """
    _check_kind(kind)
    if matrices.dim() != 3 or matrices.shape[1:] != (3, 3):
        raise ValueError(f"matrices must be N x 3 x 3, got shape {tuple(matrices.shape)}")
    if kind == "homography":
        matrices = matrices / matrices[:, 2:3, 2:3]
    n = matrices.shape[0]
    eye = torch.eye(3, dtype=matrices.dtype, device=matrices.device).reshape(1, 9)
    index = torch.tensor(_KIND_ENTRIES[kind], device=matrices.device)
    return (matrices.reshape(n, 9) - eye).index_select(1, index)


def _sampling_dtype(device: torch.device) -> torch.dtype:
    # float32 grids are off by up to 1e-5 pixel at 224 px, enough to blur an identity
    # warp of a binary tile by 3e-5; float64 keeps the identity exact. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _base_grid(n: int, h: int, w: int, dtype, device) -> torch.Tensor:
    """N x H x W x 3 homogeneous pixel-centre coordinates (align_corners=False)."""
    xs = (torch.arange(w, dtype=dtype, device=device) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=dtype, device=device) * 2 + 1) / h - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)
    return grid.unsqueeze(0).expand(n, h, w, 3)


def warp(tiles: torch.Tensor, matrices: torch.Tensor, kind: Optional[str] = None,
         padding_mode: str = "zeros") -> torch.Tensor:
    """Warp tiles (N x C x H x W, or N x H x W) by N x 3 x 3 (or N x 2 x 3) matrices.

    Affine kinds (a 2 x 3 matrix, or ``kind`` in shift/scale_shift/affine) go through
    ``F.affine_grid``; homographies through a projective sampling grid. Both sample
    bilinearly with align_corners=False, pixels outside the tile read as 0 (no boundary
    there). Sampling runs in float64 (float32 on MPS) so that identity parameters give
    back the tile unchanged; the result has the tiles' dtype.
    """
    squeeze = tiles.dim() == 3
    if squeeze:
        tiles = tiles.unsqueeze(1)
    if tiles.dim() != 4:
        raise ValueError(f"tiles must be N x C x H x W or N x H x W, got {tuple(tiles.shape)}")
    n, c, h, w = tiles.shape
    if matrices.dim() != 3 or matrices.shape[0] != n or matrices.shape[1:] not in ((2, 3), (3, 3)):
        raise ValueError(
            f"matrices must be {n} x 3 x 3 or {n} x 2 x 3 for {n} tiles, got {tuple(matrices.shape)}")
    if kind is not None:
        _check_kind(kind)
    dtype = _sampling_dtype(tiles.device)
    affine = matrices.shape[1] == 2 or (kind is not None and kind != "homography")
    src = tiles.to(dtype)
    if affine:
        grid = F.affine_grid(matrices[:, :2].to(dtype), [n, c, h, w], align_corners=False)
    else:
        base = _base_grid(n, h, w, dtype, tiles.device)
        projected = torch.einsum("nij,nhwj->nhwi", matrices.to(dtype), base)
        denom = projected[..., 2:3]
        # A point mapped to the line at infinity has no finite source; keep it far outside.
        tiny = torch.finfo(dtype).eps
        denom = torch.where(denom.abs() < tiny, torch.full_like(denom, tiny), denom)
        grid = projected[..., :2] / denom
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode=padding_mode,
                        align_corners=False).to(tiles.dtype)
    return out.squeeze(1) if squeeze else out


def _check_ranges(kind: str, ranges: Optional[Mapping[str, float]]) -> Dict[str, float]:
    allowed = KIND_COMPONENTS[kind]
    if ranges is None:
        return {name: DEFAULT_RANGES[name] for name in allowed}
    unknown = set(ranges) - set(DEFAULT_RANGES)
    if unknown:
        raise ValueError(
            f"unknown range name(s) {sorted(unknown)}; expected some of {sorted(DEFAULT_RANGES)}")
    out = {}
    for name, value in ranges.items():
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"range {name!r} must be a finite half-width >= 0, got {value}")
        if name not in allowed and value != 0:
            raise ValueError(
                f"range {name!r}={value} cannot be expressed by kind {kind!r}, which has only "
                f"{list(allowed)}; set it to 0 or choose another parameterisation")
        out[name] = value
    if out.get("scale", 0.0) >= 1:
        raise ValueError(f"range 'scale' must be < 1 (scale factors stay positive), got {out['scale']}")
    if out.get("rotation", 0.0) > 180:
        raise ValueError(f"range 'rotation' is in degrees and must be <= 180, got {out['rotation']}")
    return {name: out.get(name, 0.0) for name in allowed}


def sample_deviations(n: int, kind: str, ranges: Optional[Mapping[str, float]] = None,
                      identity_fraction: float = 0.0,
                      generator: Optional[torch.Generator] = None,
                      device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw ``n`` transforms near identity and return their N x P deviation vectors.

    Each component is uniform in [-r, r] for its half-width r in ``ranges`` (missing names
    mean 0): ``scale`` (relative, per axis: factor 1 + u), ``shift`` (normalised
    coordinates, per axis), ``rotation`` (degrees), ``shear`` (x-shear factor),
    ``perspective`` (bottom-row entries). The matrix is R(rotation) @ [[sx, shear*sy],
    [0, sy]] plus the shift column and the perspective row, so :func:`matrix_components`
    recovers the components exactly. ``round(n * identity_fraction)`` rows, at random
    positions, are exact zeros (the identity): pairs that must map to distance 0.
    ``ranges=None`` uses :data:`DEFAULT_RANGES` for the kind's components; a non-zero range
    for a component the kind cannot express is an error rather than silently dropped.
    """
    _check_kind(kind)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= identity_fraction <= 1.0:
        raise ValueError(f"identity_fraction must be in [0, 1], got {identity_fraction}")
    r = _check_ranges(kind, ranges)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    work = torch.float64 if torch.device(device).type != "mps" else torch.float32

    def uniform(half_width: float, count: int = 1) -> torch.Tensor:
        u = torch.rand(n, count, generator=generator, device=device, dtype=work) * 2 - 1
        return u * half_width

    if kind == "shift":
        dev = uniform(r["shift"], 2)
    elif kind == "scale_shift":
        dev = torch.cat([uniform(r["scale"], 2), uniform(r["shift"], 2)], dim=1)
    else:
        scale = 1 + uniform(r["scale"], 2)
        sx, sy = scale[:, 0], scale[:, 1]
        angle = uniform(math.radians(r["rotation"]))[:, 0]
        shear = uniform(r["shear"])[:, 0]
        shift = uniform(r["shift"], 2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        a00, a01 = cos * sx, cos * shear * sy - sin * sy
        a10, a11 = sin * sx, sin * shear * sy + cos * sy
        cols = [a00 - 1, a01, shift[:, 0], a10, a11 - 1, shift[:, 1]]
        if kind == "homography":
            persp = uniform(r["perspective"], 2)
            cols += [persp[:, 0], persp[:, 1]]
        dev = torch.stack(cols, dim=1)
    n_identity = int(round(n * identity_fraction))
    if n_identity:
        rows = torch.randperm(n, generator=generator, device=device)[:n_identity]
        keep = torch.ones(n, 1, dtype=work, device=device).index_fill(0, rows, 0.0)
        dev = dev * keep
    return dev.to(dtype)


def warp_pairs(tiles: torch.Tensor, kind: str, ranges: Optional[Mapping[str, float]] = None,
               identity_fraction: float = 0.0, generator: Optional[torch.Generator] = None):
    """Training pairs for a regressor: ``(warped, deviations)`` for N x C x H x W ``tiles``.

    ``warped[i] = warp(tiles[i], params_to_matrix(deviations[i]))``, deviations drawn by
    :func:`sample_deviations` on the tiles' device (``generator`` must live there too).
    Feed the regressor ``(warped, tiles)`` and regress the normalised deviations.
    """
    dev = sample_deviations(tiles.shape[0], kind, ranges, identity_fraction, generator,
                            device=tiles.device, dtype=torch.float32)
    return warp(tiles, params_to_matrix(dev, kind), kind=kind), dev


def matrix_components(matrices: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Decompose N x 3 x 3 matrices built as in :func:`sample_deviations`.

    Returns per-matrix ``rotation`` (degrees), ``scale_x``/``scale_y`` (deviation of the
    factor from 1), ``shear``, ``shift_x``/``shift_y`` and ``perspective_x``/``_y``, from
    the factorisation A = R(rotation) @ [[sx, shear*sy], [0, sy]] of the top-left 2 x 2
    block (unique while sx, sy > 0). Useful to check ranges and to report the magnitude of
    a transform.
    """
    if matrices.dim() != 3 or matrices.shape[1:] != (3, 3):
        raise ValueError(f"matrices must be N x 3 x 3, got shape {tuple(matrices.shape)}")
    m = matrices / matrices[:, 2:3, 2:3]
    a, b, d, e = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    sx = torch.hypot(a, d)
    angle = torch.atan2(d, a)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sy = -b * sin + e * cos
    shear = (b * cos + e * sin) / sy
    return {
        "rotation": torch.rad2deg(angle),
        "scale_x": sx - 1,
        "scale_y": sy - 1,
        "shear": shear,
        "shift_x": m[:, 0, 2],
        "shift_y": m[:, 1, 2],
        "perspective_x": m[:, 2, 0],
        "perspective_y": m[:, 2, 1],
    }


class ParamNormaliser:
    """Per-parameter affine normalisation ``(x - mean) / std`` of deviation vectors.

    Regressor targets are normalised so that the Euclidean loss weighs every parameter
    evenly (a shift of 0.1 and a rotation entry of 0.01 would otherwise differ tenfold).
    ``fit`` defaults to ``center=False`` (mean 0, std = root mean square about 0): the
    identity must keep mapping to the zero vector, which is what makes the regressor's
    output norm a distance to "perfect match".
    """

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if self.mean.shape != self.std.shape:
            raise ValueError(
                f"mean and std must have the same length, got {self.mean.numel()} and {self.std.numel()}")
        if not bool(torch.isfinite(self.mean).all()) or not bool((self.std > 0).all()) \
                or not bool(torch.isfinite(self.std).all()):
            raise ValueError(
                f"normalisation needs finite mean and finite std > 0, got mean={self.mean.tolist()} "
                f"std={self.std.tolist()}")

    @property
    def num_params(self) -> int:
        return self.mean.numel()

    @classmethod
    def fit(cls, samples: torch.Tensor, center: bool = False, min_std: float = 1e-8) -> "ParamNormaliser":
        """Statistics of N x P ``samples``; a parameter that never varies gets std 1."""
        if samples.dim() != 2 or samples.shape[0] < 1:
            raise ValueError(f"samples must be N x P with N >= 1, got shape {tuple(samples.shape)}")
        x = samples.detach().to(torch.float64)
        if center:
            mean = x.mean(0)
            spread = (x - mean).pow(2).mean(0).sqrt()
        else:
            mean = torch.zeros_like(x[0])
            spread = x.pow(2).mean(0).sqrt()
        std = torch.where(spread > min_std, spread, torch.ones_like(spread))
        return cls(mean.float().cpu(), std.float().cpu())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)

    def to_dict(self) -> Dict[str, list]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ParamNormaliser":
        if not isinstance(d, Mapping) or "mean" not in d or "std" not in d:
            raise ValueError(f"normalisation must be a mapping with 'mean' and 'std' lists, got {d!r}")
        return cls(d["mean"], d["std"])

    def __repr__(self) -> str:
        return f"ParamNormaliser(mean={self.mean.tolist()}, std={self.std.tolist()})"
