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
lattice serves the batch) is packed into one integer (int32 on a CPU when the keys fit, int64
otherwise), a stable sort numbers the vertices, and the blur neighbours of all d + 1 directions
are found with one ``searchsorted``.  Splat, each blur pass and slice are one weighted gather each
(``embedding_bag``: all K channels in one fused pass).  The blur's weights are 0, 1 and 2, so it
rounds exactly as the reference; splat and slice sum the same terms in the same order, but the
fused kernels may use multiply-adds (one rounding instead of two): their results differ from the
reference's by float rounding (at most 2.3e-7 of the largest value measured).  Everything stays
on the input's device, and the host reads one pair of numbers per lattice: the vertex count, which
sizes the lattice, and whether the keys overflowed int64 (a GPU waits for that read; on a CPU,
where reading is free, the key range is also read first, to choose int32 keys).

One detail of the x86 (SSE) build is kept: it processes points in blocks of four and inserts
the vertices of the padding points (feature 0) of the last block into the lattice; they carry
no value but do relay the blur.  ``sse_padding=True`` (the default) reproduces that when the
pixel count of an image is not a multiple of four.
"""
from __future__ import annotations

import math
import struct
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["PermutohedralLattice", "lattice_features"]

_D = 5  # feature dimension: x, y, r, g, b


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _elevation_scales(d: int) -> Tuple[float, ...]:
    """Diagonal of E (Adams et al. p. 5) as the reference rounds it: the standard deviation
    factor in float32, the product in double, the result stored as float32.  Python floats:
    a float32 tensor times one of them is the float32 product, and no host data is copied to
    the device."""
    inv_std_dev = _float32(math.sqrt(2.0 / 3.0) * (d + 1))
    return tuple(_float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev) for i in range(d))


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A float32 0-dim tensor made on ``device`` (a fill: no copy of host data, which would wait
    for a GPU); a tensor divisor, unlike a Python number, is not turned into a reciprocal."""
    return torch.full((), value, dtype=torch.float32, device=device)


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value costs nothing: on a CPU no device has to finish first."""
    return device.type == "cpu"


def _too_fine_error() -> ValueError:
    return ValueError("PermutohedralLattice: the lattice is too fine to index (sigma_xy or sigma_rgb too "
                      "small for this image size); use larger bandwidths or a smaller scale_factor")


def lattice_features(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """N x 3 x H x W RGB -> N x (H W) x 5 float32 features (x / sigma_xy, y / sigma_xy, rgb / sigma_rgb),
    pixels in row-major order, divided (not multiplied by a reciprocal) as the reference does."""
    n, _, h, w = image.shape
    device = image.device
    sxy, srgb = _scalar(sigma_xy, device), _scalar(sigma_rgb, device)
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
        scale = _elevation_scales(d)
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
        down = _scalar(1.0 / (d + 1), dev)
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
        codes, strides, group, too_fine = self._vertex_codes(rem0, rank, image_index)
        # the hash table as a sort: vertex ids in code order; the stable sort keeps, for every
        # vertex, its points in increasing order, the order in which the reference splats them
        sorted_codes, perm = torch.sort(codes, stable=True)
        first = torch.ones_like(sorted_codes, dtype=torch.bool)
        torch.ne(sorted_codes[1:], sorted_codes[:-1], out=first[1:])
        # The one host read of the build: the vertex count sizes the lattice, which the device
        # must allocate (a bound such as (d + 1) x points would blur ~100 times more rows).
        m, too_fine = torch.stack([first.sum(), too_fine.long()]).tolist()
        if too_fine:
            raise _too_fine_error()
        index_dtype = torch.int32 if perm.numel() < 2 ** 31 else torch.int64   # int32: less memory traffic
        vertex_of_sorted = first.cumsum(0, dtype=index_dtype).sub_(1)
        # where each vertex's points begin: the first position of its id (no nonzero: no second read)
        starts = torch.searchsorted(vertex_of_sorted, torch.arange(m, device=dev, dtype=index_dtype))
        unique = sorted_codes.index_select(0, starts).to(torch.int64)
        inverse = torch.empty_like(vertex_of_sorted).scatter_(0, perm, vertex_of_sorted)
        self.num_vertices = m
        # splat and slice as weighted gathers (embedding_bag: one fused pass over all K channels).
        # Splat: vertex v sums weight x value over its points (CSR rows: starts); the padding
        # vertices enter with weight 0 (they exist, they receive nothing).
        flat_bary = bary.reshape(-1)
        if sse_padding:
            flat_bary = torch.cat([flat_bary, flat_bary.new_zeros(n * (d + 1))])
        self._splat_points = torch.div(perm.to(index_dtype), d + 1, rounding_mode="floor").clamp_(max=npts - 1)
        self._splat_weights = flat_bary.index_select(0, perm)
        self._splat_starts = starts.to(index_dtype)
        # Slice: the blur below works on 2^j times the values after j passes (exact: powers of two),
        # so the slice weights carry the 2^-(d+1) back, exactly as well
        alpha = _scalar(1.0 / (1.0 + 2.0 ** -d), dev)
        self._slice_vertices = inverse[: npts * (d + 1)].view(npts, d + 1)
        self._slice_weights = ((bary * alpha) * 2.0 ** -(d + 1)).contiguous()
        # Blur along direction j: 2 old + (n1 + n2), n1 = key - 1 + (d+1) e_j (a vertex of remainder
        # r - 1, d for r = 0, reduced key q + e_j, q - 1 + e_j for r = 0) and n2 its inverse
        # (n1(a) = b <=> n2(b) = a).  One bag per vertex: [n1, n2, self] weighted [1, 1, 2]; a
        # missing neighbour reads row 0 with weight 0.  All weights are 0, 1 or 2, so the sums
        # round exactly as the reference's old + 1/2 (n1 + n2) does, times 2.
        wraps = unique < group                                            # remainder 0
        shift = torch.where(wraps, d * group - strides.sum(), -group)
        steps = torch.cat([strides, strides.new_zeros(1)])                # direction d moves no coordinate
        targets = (unique + shift)[None, :] + steps[:, None]              # (d + 1) x M, all directions at once
        pos = torch.searchsorted(unique, targets.reshape(-1)).clamp_(max=m - 1).view(d + 1, m)
        found = unique[pos] == targets
        ids = torch.arange(m, device=dev)
        n1 = pos * found                                                  # row 0 stands in for a missing one
        slots = n1 + (~found) * m + (torch.arange(d + 1, device=dev) * (m + 1))[:, None]   # m: a spare slot
        n2 = torch.full(((d + 1) * (m + 1),), m, dtype=torch.int64, device=dev).scatter_(
            0, slots.reshape(-1), ids.repeat(d + 1)).view(d + 1, m + 1)[:, :m]
        found2 = n2 < m
        indices = torch.stack([n1, n2 * found2, ids.expand(d + 1, m)], 2).to(index_dtype)
        weights = torch.stack([found, found2, found], 2).to(torch.float32)
        weights[..., 2] = 2.0
        self._blur = list(zip(indices.unbind(0), weights.unbind(0)))

    def _vertex_codes(self, rem0, rank, image_index):
        """The code of every simplex vertex (flat, point-major), the strides of the reduced key,
        the group size G and whether int64 codes overflow (a 0-dim bool, read with the vertex count).

        Vertices of remainder r (r = 0..d) never coincide with those of another remainder: the code
        is r * G + (image, reduced key) in mixed radix, in a box with room for the blur neighbours.
        The box is computed on the device; only on a CPU, where reading it is free, does it pick
        int32 codes (a sort twice as fast) when they fit."""
        d = _D
        dev = self.device
        n = self.num_images
        # rem0 holds exact multiples of d + 1, so rounding the product is an exact (and fast) division
        reduced = torch.round(rem0[:, :d] * (1.0 / (d + 1))).to(torch.int64)
        lo = reduced.min(0).values - 2
        spans = reduced.max(0).values - lo + 3
        suffix = torch.cat([spans.flip(0).cumprod(0).flip(0), spans.new_ones(1)])   # products of spans[k:]
        strides, acc = suffix[1:], suffix[0]
        group = acc * n
        too_fine = spans.double().log2().sum() >= 62 - math.log2(n * (d + 1))
        code_dtype = self._code_dtype(spans)
        base = ((reduced - lo) * strides).sum(1) + image_index * acc
        # vertex r of a simplex: its rem0 plus 1 on the coordinates of rank > d - r, i.e. minus
        # (d + 1) - 1 in reduced terms: the code drops the strides of those coordinates; by rank
        # (coordinate d has no stride), then summed from the highest rank down
        stride_of_rank = torch.zeros(rank.shape, dtype=code_dtype, device=dev).scatter_(
            1, rank, torch.cat([strides, strides.new_zeros(1)]).to(code_dtype).expand(rank.shape[0], d + 1))
        codes = torch.empty(rank.shape, dtype=code_dtype, device=dev)
        codes[:, 0] = base
        for r in range(1, d + 1):
            torch.sub(codes[:, r - 1], stride_of_rank[:, d - r + 1], out=codes[:, r])
        codes += torch.arange(d + 1, device=dev, dtype=code_dtype) * group
        return codes.reshape(-1), strides, group, too_fine

    def _code_dtype(self, spans: torch.Tensor) -> torch.dtype:
        """int32 if every code fits, read (exactly, in Python integers) where reading is free;
        int64 elsewhere."""
        if not _host_reads_are_free(self.device):
            return torch.int64
        size = math.prod(spans.tolist()) * self.num_images * (_D + 1)
        if math.log2(size) >= 62:
            raise _too_fine_error()
        return torch.int32 if size < 2 ** 31 else torch.int64

    # -- filter -----------------------------------------------------------------------------------
    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """A @ values for every image: N x P x K -> N x P x K (float32)."""
        n, p, k = values.shape
        if (n, p) != (self.num_images, self.num_points):
            raise ValueError(f"PermutohedralLattice.apply: values must be {self.num_images} x {self.num_points} x K, "
                             f"got {tuple(values.shape)}")
        flat = values.reshape(n * p, k).to(torch.float32).contiguous()
        grid = F.embedding_bag(self._splat_points, flat, self._splat_starts, mode="sum",
                               per_sample_weights=self._splat_weights)     # M x K
        for indices, weights in self._blur:
            grid = F.embedding_bag(indices, grid, mode="sum", per_sample_weights=weights)
        out = F.embedding_bag(self._slice_vertices, grid, mode="sum", per_sample_weights=self._slice_weights)
        return out.view(n, p, k)

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
