"""The permutohedral lattice of the reference, in tensor operations, for a whole batch at once.

This reproduces the filter that meng-tang/rloss calls through SWIG (Kraehenbuehl's DenseCRF
lattice, itself after Adams et al. 2010), step for step and in the same float32 arithmetic,
so that the same points land in the same simplices with the same barycentric weights:

1. features (x / sigma_xy, y / sigma_xy, r / sigma_rgb, g / sigma_rgb, b / sigma_rgb) are
   elevated into d + 1 = 6 dimensions (scale sqrt(2/3) * (d + 1));
2. the enclosing simplex comes from rounding to the nearest 0-coloured point (round half to
   even, as the SSE build does), ranking the remainders and wrapping them back onto the plane;
3. values are splatted with barycentric weights onto the d + 1 simplex vertices, blurred with
   [1/2, 1, 1/2] along each of the d + 1 lattice directions in turn (no normalisation), and
   sliced back with the same weights times alpha = 1 / (1 + 2^-d).

The reference's hash table becomes a sort: every vertex key (image index included, so one
lattice serves the batch) is packed into one int64, ``torch.unique`` numbers the vertices, and
the blur neighbours are found with ``searchsorted``.  Everything stays on the input's device.

One detail of the x86 (SSE) build is kept: it processes points in blocks of four and inserts
the vertices of the padding points (feature 0) of the last block into the lattice; they carry
no value but do relay the blur.  ``sse_padding=True`` (the default) reproduces that when the
pixel count of an image is not a multiple of four.
"""
from __future__ import annotations

import math
import warnings
from typing import Tuple

import torch

__all__ = ["PermutohedralLattice", "lattice_features"]

_D = 5  # feature dimension: x, y, r, g, b


def _elevation_scales(d: int) -> torch.Tensor:
    """Diagonal of E (Adams et al. p. 5) as the reference rounds it: the standard deviation
    factor in float32, the product in double, the result stored as float32."""
    inv_std_dev = torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32).item()
    return torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)], dtype=torch.float32)


def lattice_features(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """N x 3 x H x W RGB -> N x (H W) x 5 float32 features (x / sigma_xy, y / sigma_xy, rgb / sigma_rgb),
    pixels in row-major order, divided (not multiplied by a reciprocal) as the reference does."""
    n, _, h, w = image.shape
    device = image.device
    sxy = torch.tensor(sigma_xy, dtype=torch.float32, device=device)
    srgb = torch.tensor(sigma_rgb, dtype=torch.float32, device=device)
    xs = (torch.arange(w, device=device, dtype=torch.float32) / sxy).expand(h, w)
    ys = (torch.arange(h, device=device, dtype=torch.float32) / sxy)[:, None].expand(h, w)
    rgb = image.to(torch.float32) / srgb                                 # N x 3 x H x W
    xy = torch.stack([xs, ys]).expand(n, 2, h, w)
    return torch.cat([xy, rgb], 1).reshape(n, _D, h * w).transpose(1, 2)


class PermutohedralLattice:
    """The lattice of a batch of feature sets, built once and applied to any number of channels.

    Args:
        features: N x P x 5 float32 (see :func:`lattice_features`).
        sse_padding: insert the padding vertices of the reference's SSE build (see module doc).

    ``lattice.apply(values)`` maps N x P x K to N x P x K: A_n @ values_n for every image n.
    """

    def __init__(self, features: torch.Tensor, sse_padding: bool = True):
        if features.dim() != 3 or features.shape[-1] != _D:
            raise ValueError(f"PermutohedralLattice: features must be N x P x {_D}, got {tuple(features.shape)}")
        self.num_images, self.num_points, _ = features.shape
        self.device = features.device
        rem0, rank, bary = self._simplices(features.to(torch.float32))
        self._index(rem0, rank, bary, sse_padding and self.num_points % 4 != 0)

    # -- build ------------------------------------------------------------------------------------
    @staticmethod
    def _simplices(f: torch.Tensor):
        """Per point: the remainder-0 point (NP x (d+1) float), the rank of each coordinate
        (NP x (d+1) int64) and the barycentric weights of the d + 1 vertices (NP x (d+1))."""
        d = _D
        dev = f.device
        scale = _elevation_scales(d).to(dev)
        n, p, _ = f.shape
        f = f.reshape(n * p, d)
        # elevate (y = E f), accumulating from the last coordinate as the reference does
        elevated = [None] * (d + 1)
        sm = torch.zeros(n * p, dtype=torch.float32, device=dev)
        for j in range(d, 0, -1):
            cf = f[:, j - 1] * scale[j - 1]
            elevated[j] = sm - float(j) * cf
            sm = sm + cf
        elevated[0] = sm
        elevated = torch.stack(elevated, 1)                               # NP x (d+1)
        down = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=dev)
        up = float(d + 1)
        v = torch.round(elevated * down)                                  # half to even, as cvtps2dq
        rem0 = v * up
        total = v.sum(1, keepdim=True)                                    # an exact integer
        # rank of each remainder: rank[i] = #{j > i: di < dj} + #{j < i: dj >= di}
        diff = elevated - rem0
        rank = torch.zeros(n * p, d + 1, dtype=torch.float32, device=dev)
        for i in range(d):
            less = (diff[:, i:i + 1] < diff[:, i + 1:]).to(torch.float32)   # di < dj for j > i
            rank[:, i] += less.sum(1)
            rank[:, i + 1:] += 1.0 - less
        rank += total
        shift = ((rank < 0).to(torch.float32) - (rank >= up).to(torch.float32)) * up
        rank += shift
        rem0 += shift
        rank = rank.to(torch.int64)
        # barycentric coordinates: b[p] = v_(rank d-p) - v_(rank d-p+1), b[0] wrapped around
        vals = (elevated - rem0) * down
        by_rank = torch.empty_like(vals).scatter_(1, rank, vals)          # by_rank[q] = v of the rank-q coordinate
        flipped = by_rank.flip(1)                                         # flipped[p] = v of rank d-p
        bary = torch.empty_like(vals)
        bary[:, 1:] = flipped[:, 1:] - flipped[:, :d]
        bary[:, 0] = by_rank[:, d] + (1.0 - by_rank[:, 0])
        return rem0, rank, bary

    def _index(self, rem0, rank, bary, sse_padding):
        d = _D
        dev = self.device
        n, p = self.num_images, self.num_points
        npts = n * p
        if sse_padding:  # the origin simplex of every image: rem0 = 0, ranks 0..d, weight 0
            rem0 = torch.cat([rem0, rem0.new_zeros(n, d + 1)])
            rank = torch.cat([rank, torch.arange(d + 1, device=dev).expand(n, d + 1)])
        image_index = torch.arange(n, device=dev).repeat_interleave(p)
        if sse_padding:
            image_index = torch.cat([image_index, torch.arange(n, device=dev)])
        # vertices of remainder r (r = 0..d) never coincide with those of another remainder: the code
        # is r * G + (image, reduced key) in mixed radix, in a box with room for the blur neighbours
        reduced = torch.div(rem0[:, :d], d + 1, rounding_mode="floor").to(torch.int64)
        lo = reduced.min(0).values - 2
        spans = [int(v) for v in (reduced.max(0).values - lo + 3).tolist()]
        stride_list, acc = [], 1
        for span in reversed(spans):
            stride_list.append(acc)
            acc *= span
        group = acc * n
        if math.log2(group * (d + 1)) >= 62:
            raise ValueError("PermutohedralLattice: the lattice is too fine to index (sigma_xy or sigma_rgb too "
                             "small for this image size); use larger bandwidths or a smaller scale_factor")
        code_dtype = torch.int32 if group * (d + 1) < 2 ** 31 else torch.int64   # int32 sorts twice as fast
        strides = torch.tensor(list(reversed(stride_list)), dtype=torch.int64, device=dev)
        base = ((reduced - lo) * strides).sum(1) + image_index * acc
        above = torch.zeros_like(base)
        codes = torch.empty(base.numel(), d + 1, dtype=code_dtype, device=dev)
        for r in range(d + 1):
            if r:  # coordinates with rank > d - r, i.e. rank == d - r + 1 added to those of r - 1
                above += ((rank[:, :d] == d - r + 1).to(torch.int64) * strides).sum(1)
            codes[:, r] = base - above + r * group
        codes = codes.reshape(-1)
        # the hash table as a sort: vertex ids in code order
        sorted_codes, perm = torch.sort(codes, stable=True)
        first = torch.ones_like(sorted_codes, dtype=torch.bool)
        torch.ne(sorted_codes[1:], sorted_codes[:-1], out=first[1:])
        vertex_of_sorted = first.cumsum(0) - 1
        m = int(vertex_of_sorted[-1]) + 1                                 # the one host sync of the build
        unique = torch.empty(m, dtype=codes.dtype, device=dev).scatter_(0, vertex_of_sorted, sorted_codes)
        inverse = torch.empty_like(vertex_of_sorted).scatter_(0, perm, vertex_of_sorted)
        offsets = inverse[: npts * (d + 1)]
        self.num_vertices = m
        # splat (M x NP) and slice (NP x M) as sparse matrices with the barycentric weights; the
        # padding vertices enter the splat with weight 0 (they exist, they receive nothing)
        flat_bary = bary.reshape(-1)
        if sse_padding:
            flat_bary = torch.cat([flat_bary, flat_bary.new_zeros(n * (d + 1))])
        points = torch.div(perm, d + 1, rounding_mode="floor").clamp_(max=npts - 1)
        crow = torch.zeros(m + 2, dtype=torch.int64, device=dev)    # row m: the empty "missing neighbour"
        crow[1:m + 1] = torch.bincount(vertex_of_sorted, minlength=m).cumsum(0)
        crow[m + 1] = crow[m]
        alpha = torch.tensor(1.0 / (1.0 + 2.0 ** -d), dtype=torch.float32, device=dev)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the operations used here are stable
            warnings.simplefilter("ignore", UserWarning)
            self.splat = torch.sparse_csr_tensor(crow, points, flat_bary[perm], (m + 1, npts))
            # the blur below works on 2^j times the values after j passes (exact: powers of two),
            # so the slice weights carry the 2^-(d+1) back, exactly as well
            self.slice = torch.sparse_csr_tensor(torch.arange(0, npts * (d + 1) + 1, d + 1, device=dev), offsets,
                                                 (bary.reshape(-1) * alpha) * 2.0 ** -(d + 1), (npts, m + 1))
        # n1 along direction j: key - 1 + (d+1) e_j, a vertex of remainder r - 1 (d for r = 0) with
        # reduced key q + e_j (q - 1 + e_j for r = 0); n2 is the inverse of n1 (n1(a) = b <=> n2(b) = a)
        unique = unique.to(torch.int64)
        wraps = unique < group                                            # remainder 0
        shift = torch.where(wraps, d * group - strides.sum(), torch.full_like(unique, -group))
        neighbours = []
        ids = torch.arange(m, device=dev)
        for j in range(d + 1):
            target = unique + shift + (strides[j] if j < d else 0)
            pos = torch.searchsorted(unique, target).clamp_(max=m - 1)
            found = unique[pos] == target
            n1 = torch.where(found, pos, torch.full_like(pos, m))
            n2 = torch.full((m + 1,), m, dtype=torch.int64, device=dev).scatter_(0, n1, ids)[:m]
            neighbours.append((n1, n2))
        self.neighbours = neighbours

    # -- filter -----------------------------------------------------------------------------------
    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """A @ values for every image: N x P x K -> N x P x K (float32)."""
        n, p, k = values.shape
        if (n, p) != (self.num_images, self.num_points):
            raise ValueError(f"PermutohedralLattice.apply: values must be {self.num_images} x {self.num_points} x K, "
                             f"got {tuple(values.shape)}")
        flat = values.reshape(n * p, k).to(torch.float32)
        m = self.num_vertices
        grid = torch.sparse.mm(self.splat, flat)                          # (M + 1) x K, row M zero
        other = torch.empty_like(grid)
        other[m] = 0
        gathered = torch.empty_like(grid[:m])
        for n1, n2 in self.neighbours:
            # the reference's old + 1/2 (n1 + n2), kept as 2 old + (n1 + n2): the same float
            # result times 2, since scaling by two is exact
            inner = other[:m]
            torch.index_select(grid, 0, n1, out=inner)
            torch.index_select(grid, 0, n2, out=gathered)
            inner.add_(gathered).add_(grid[:m], alpha=2.0)
            grid, other = other, grid
        return torch.sparse.mm(self.slice, grid).view(n, p, k)

    def __repr__(self) -> str:
        return (f"PermutohedralLattice(images={self.num_images}, points={self.num_points}, "
                f"vertices={self.num_vertices})")


def filter_shape_check(image: torch.Tensor, values: torch.Tensor) -> Tuple[int, int, int, int]:
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be N x 3 x H x W (RGB in [0, 255]), got {tuple(image.shape)}")
    if values.dim() != 4 or values.shape[0] != image.shape[0] or values.shape[2:] != image.shape[2:]:
        raise ValueError(f"values must be N x K x H x W with the image's N, H, W {tuple(image.shape[:1])} "
                         f"{tuple(image.shape[2:])}, got {tuple(values.shape)}")
    return tuple(values.shape)
