"""Learned non-uniform downsampling (Marin et al., ICCV 2019): auxiliary net, sampler, un-sampler.

Instead of segmenting a uniformly downsampled image, a tiny auxiliary network predicts an
h x w grid of sampling locations (dense near object boundaries), the image is sampled at
that grid resized to the sampling size, a segmentation network runs on the sampled image,
and its logits are interpolated back to full resolution.

Location convention (shared with ``datasets.nus_targets``): N x h x w x 2 tensors,
``[..., 0]`` the ROW and ``[..., 1]`` the COLUMN in [0, 1], pixel = loc * (size - 1); the
uniform grid has its corners at 0 and 1 (align-corners).

* :class:`AuxiliaryNet`: MobileNetV2 (width 0.25, output stride 8) + DeepLab head on the
  image resized to 64 x 64; 2 output channels ("shifts") at 8 x 8 plus a learned
  ``mean_locations`` grid initialised uniform.
* :func:`resize_locations`, :func:`sample`: the grid resized bilinearly to the sampling size,
  the full-resolution image (or label) gathered at the nearest pixel, as the reference does
  (``mode="bilinear"`` interpolates instead).
* :func:`unsample`: the sampled logits back to full resolution by piecewise-linear
  interpolation over the triangles of the sample grid (each cell split along its Delaunay
  diagonal, as scipy's ``griddata(method="linear")`` triangulates), batched, on the device:
  every pixel's triangle by scanline rasterisation of the grid's edges, then one weighted
  gather of the triangle's logit planes.
* :class:`NUSSegmenter`: any segmentation network of ``get_net`` as "sample -> segment ->
  un-sample".
* :class:`DeepLabV3MobileNetV2`: the reference's segmentation network.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .layers import resize_to
from .mobilenetv2 import MobileNetV2
from utils.errors import InvalidInputError

__all__ = ["AuxiliaryNet", "DeepLabHead", "DeepLabV3MobileNetV2", "NUSSegmenter", "normalize_locations",
           "resize_locations", "sample", "uniform_grid", "unsample"]


# ----------------------------------------------------------------------------- networks
class DeepLabHead(nn.Module):
    """DeepLabv3's head as used with MobileNetV2: image pooling + a 1x1 branch (256 channels
    each, no atrous branches), concatenated, projected to 256, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, out_channels: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()

        def branch(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.pool = branch(in_channels, channels)
        self.conv = branch(in_channels, channels)
        self.project = branch(2 * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        y = self.project(torch.cat([pooled, self.conv(x)], 1))
        return self.classifier(self.dropout(y))


class DeepLabV3MobileNetV2(nn.Module):
    """DeepLabv3 on MobileNetV2 (the reference's segmentation net).  ``net(images)`` returns
    ``{'pred': N x num_classes x H x W logits}`` (bilinear upsampling of the head's output)."""

    def __init__(self, num_classes: int = 19, has_edge: bool = False, width: float = 1.0, output_stride: int = 16):
        super().__init__()
        if has_edge:
            raise InvalidInputError("arch deeplabv3.MobileNetV2 has no edge head: use has_edge False")
        self.backbone = MobileNetV2(width=width, output_stride=output_stride)
        self.head = DeepLabHead(self.backbone.out_channels, num_classes)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.head(self.backbone(images))
        return {"pred": resize_to(logits, images.shape[-2:])}


def uniform_grid(size: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """The uniform h x w x 2 grid (row, col) in [0, 1], corners at 0 and 1."""
    rows = torch.linspace(0, 1, int(size[0]), device=device, dtype=dtype)
    cols = torch.linspace(0, 1, int(size[1]), device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)


class AuxiliaryNet(nn.Module):
    """Predicts N x h x w x 2 sampling locations from the image resized to ``input_size``
    (h = w = input_size / output_stride): a learned mean grid (initialised uniform) plus the
    per-image shifts of MobileNetV2 + DeepLab head.  Raw output; see :func:`normalize_locations`."""

    def __init__(self, input_size: int = 64, width: float = 0.25, output_stride: int = 8):
        super().__init__()
        if input_size % output_stride:
            raise InvalidInputError(f"auxiliary net input_size {input_size} must be a multiple of output_stride "
                             f"{output_stride}")
        self.input_size = int(input_size)
        self.grid_size = (input_size // output_stride,) * 2
        self.backbone = MobileNetV2(width=width, output_stride=output_stride)
        self.head = DeepLabHead(self.backbone.out_channels, 2)
        self.mean_locations = nn.Parameter(uniform_grid(self.grid_size).unsqueeze(0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        shifts = self.head(self.backbone(images)).permute(0, 2, 3, 1)
        return shifts.float() + self.mean_locations


# ----------------------------------------------------------------------------- sampling
def normalize_locations(locations: torch.Tensor) -> torch.Tensor:
    """Snap the first/last row's row coordinate to 0/1 and the first/last column's column
    coordinate to 0/1, clip to [0, 1] (what the reference does before sampling)."""
    loc = locations.clone()
    loc[..., 0, :, 0] = 0
    loc[..., -1, :, 0] = 1
    loc[..., :, 0, 1] = 0
    loc[..., :, -1, 1] = 1
    return loc.clamp(0, 1)


def resize_locations(locations: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """N x h x w x 2 -> N x size[0] x size[1] x 2, bilinear with aligned corners."""
    if tuple(locations.shape[1:3]) == tuple(size):
        return locations
    grid = F.interpolate(locations.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1)


def sample(x: torch.Tensor, locations: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Values of ``x`` (N x C x H x W, or an N x H x W label map) at ``locations`` (N x h x w x 2):
    N x C x h x w (or N x h x w).  ``nearest``: the pixel ``round(loc * (size - 1))``, any dtype
    (labels); ``bilinear``: ``grid_sample`` with aligned corners (floating point only)."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(1)
    n, c, height, width = x.shape
    if locations.dim() != 4 or locations.shape[0] != n or locations.shape[-1] != 2:
        raise ValueError(f"locations must be N x h x w x 2 with N = {n}, got {tuple(locations.shape)}")
    if mode == "nearest":
        rows = torch.round(locations[..., 0].float() * (height - 1)).long().clamp_(0, height - 1)
        cols = torch.round(locations[..., 1].float() * (width - 1)).long().clamp_(0, width - 1)
        index = (rows * width + cols).reshape(n, 1, -1).expand(n, c, -1)
        out = torch.gather(x.reshape(n, c, height * width), 2, index).reshape(n, c, *locations.shape[1:3])
    elif mode == "bilinear":
        grid = locations.flip(-1).to(x.dtype) * 2 - 1  # (x, y) in [-1, 1]
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    else:
        raise ValueError(f"sampling mode must be 'nearest' or 'bilinear', got {mode!r}")
    return out.squeeze(1) if squeeze else out


# ----------------------------------------------------------------------------- un-sampling
def _delaunay_flip(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per grid cell (N x (h-1) x (w-1) bool): split along the 01-10 diagonal instead of 00-11.
    A cell is split along the diagonal that makes its two triangles Delaunay (the opposite corner
    outside the other triangle's circumcircle), as scipy's Delaunay triangulation splits it;
    co-circular cells (e.g. the uniform grid) keep 00-11.  ``rows``/``cols``: N x h x w, float64."""
    dr, dc = rows[:, 1:, :-1], cols[:, 1:, :-1]  # corner 10, the origin of the in-circle test
    ar, ac = rows[:, :-1, :-1] - dr, cols[:, :-1, :-1] - dc  # 00
    br, bc = rows[:, :-1, 1:] - dr, cols[:, :-1, 1:] - dc  # 01
    cr, cc = rows[:, 1:, 1:] - dr, cols[:, 1:, 1:] - dc  # 11
    la, lb, lc = ar * ar + ac * ac, br * br + bc * bc, cr * cr + cc * cc
    det = ar * (bc * lc - lb * cc) - ac * (br * lc - lb * cr) + la * (br * cc - bc * cr)
    orient = (br - ar) * (cc - ac) - (bc - ac) * (cr - ar)
    return det * orient.sign() > 1e-9 * la.clamp_min(1e-12) * lc.clamp_min(1e-12)


def _cell_triangles(flip: torch.Tensor) -> torch.Tensor:
    """Per grid cell, its two triangles: (N*(h-1)*(w-1)) x 2 x 3 vertex indices into the
    flattened N*h*w points, triangle ``2 * cell + k``.  Unflipped cells: (00, 01, 11) and
    (00, 11, 10); flipped: (00, 01, 10) and (01, 11, 10); the first triangle of a cell always
    holds its top edge, the second its bottom edge."""
    n, h1, w1 = flip.shape
    w = w1 + 1
    corner = torch.arange(n * (h1 + 1) * w, device=flip.device).view(n, h1 + 1, w)[:, :-1, :-1].reshape(-1)
    f = flip.reshape(-1).long()
    # offsets (0, 1, w + 1, 0, w + 1, w) unflipped, (0, 1, w, 1, w + 1, w) flipped
    vertices = [corner, corner + 1, corner + (w + 1) - f, corner + f, corner + (w + 1), corner + w]
    return torch.stack(vertices, 1).view(-1, 2, 3)


def _affine_weights(v: torch.Tensor) -> torch.Tensor:
    """T x 3 x 3 coefficients (a, b, c) with barycentric weight k of pixel (row, col) in triangle
    v (T x 3 x 2) equal to a_k * row + b_k * col + c_k."""
    r, c = v[..., 0], v[..., 1]
    area = (r[:, 1] - r[:, 0]) * (c[:, 2] - c[:, 0]) - (c[:, 1] - c[:, 0]) * (r[:, 2] - r[:, 0])
    area = torch.where(area.abs() < 1e-9, torch.full_like(area, 1e-9), area)
    a1, b1 = (c[:, 2] - c[:, 0]) / area, -(r[:, 2] - r[:, 0]) / area
    a2, b2 = -(c[:, 1] - c[:, 0]) / area, (r[:, 1] - r[:, 0]) / area
    c1, c2 = -(a1 * r[:, 0] + b1 * c[:, 0]), -(a2 * r[:, 0] + b2 * c[:, 0])
    return torch.stack([-a1 - a2, -b1 - b2, 1 - c1 - c2, a1, b1, c1, a2, b2, c2], 1).reshape(-1, 3, 3)


def _rasterise(points: torch.Tensor, cells: torch.Tensor, height: int,
               width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every output pixel of every image: (3 vertex indices, 3 barycentric weights) of the
    triangle that holds it.  Every cell enumerates the pixels of its bounding box (one flat
    batched list, no loop); the side of the cell's diagonal picks the triangle, and a pixel is
    owned by a candidate whose triangle holds it.  Pixels no triangle holds (only where a bad
    grid folds over) take the candidate with the largest smallest weight, weights clipped."""
    n = points.shape[0]
    device = points.device
    flat = points.reshape(-1, 2)
    num_cells = cells.shape[0]
    coef = _affine_weights(flat[cells.reshape(-1, 3)]).float()  # (2 * cells) x 3 weights x (a, b, c)
    coef_a, coef_b, coef_c = (coef[..., i].contiguous() for i in range(3))  # each (2 * cells) x 3
    # The side of the diagonal: triangle 1's weight of its corner off the diagonal (>= 0 on its side).
    off = (cells[:, 0, :, None] != cells[:, 1, None, :]).all(2).float().argmax(1)
    side = coef.view(num_cells, 2, 3, 3)[torch.arange(num_cells, device=device), 0, off]  # cells x 3

    corners = torch.cat([flat[cells[:, 0]], flat[cells[:, 1]]], 1)
    lo = torch.ceil(corners.amin(1) - 1e-4).long()
    hi = torch.floor(corners.amax(1) + 1e-4).long()
    limit = (height - 1, width - 1)  # per column of (row, col): no host data copied to the device
    lo = torch.stack([lo[:, i].clamp(0, limit[i]) for i in range(2)], 1)
    hi = torch.stack([hi[:, i].clamp(max=limit[i]) for i in range(2)], 1)
    extent = (hi - lo + 1).clamp_min(0)
    counts = extent[:, 0] * extent[:, 1]
    image_base = cells[:, 0, 0] // (points.shape[1] * points.shape[2]) * (height * width)
    cell = torch.repeat_interleave(torch.arange(num_cells, device=device), counts)
    # Per-cell integers gathered once per candidate (index_select: the fast gather on CPU and GPU).
    per_cell = torch.stack([torch.cumsum(counts, 0) - counts, extent[:, 1], lo[:, 0], lo[:, 1],
                            image_base + lo[:, 0] * width + lo[:, 1]], 1)
    start, box_w, lo_row, lo_col, first = per_cell.index_select(0, cell).unbind(1)
    offset = torch.arange(cell.numel(), device=device) - start
    d_row = torch.div(offset, box_w, rounding_mode="floor")
    d_col = offset - d_row * box_w
    pixel = first + d_row * width + d_col
    row = (lo_row + d_row).float().unsqueeze(1)
    col = (lo_col + d_col).float().unsqueeze(1)
    s = side.index_select(0, cell)
    triangle = cell * 2 + ((s[:, 0:1] * row + s[:, 1:2] * col + s[:, 2:3]).squeeze(1) < 0).long()
    weights = torch.addcmul(coef_c.index_select(0, triangle), coef_a.index_select(0, triangle), row)
    weights.addcmul_(coef_b.index_select(0, triangle), col)  # K x 3
    score = weights.amin(1)
    total_pixels = n * height * width
    owner = torch.full((total_pixels,), -1, dtype=torch.long, device=device)
    inside = torch.nonzero(score >= -1e-4).squeeze(1)
    owner.scatter_reduce_(0, pixel.index_select(0, inside), inside, reduce="amax")
    if bool((owner < 0).any()):  # a folded grid: the least-outside candidate
        best = torch.full((total_pixels,), -float("inf"), device=device)
        best.scatter_reduce_(0, pixel, score, reduce="amax")
        winner = torch.nonzero((score >= best.index_select(0, pixel)) & (owner.index_select(0, pixel) < 0)).squeeze(1)
        owner.scatter_reduce_(0, pixel.index_select(0, winner), winner, reduce="amax")
    claimed = owner >= 0
    owner = owner.clamp_min(0)
    weights = weights.index_select(0, owner).clamp_min(0)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12) * claimed.unsqueeze(1)
    return cells.reshape(-1, 3).index_select(0, triangle.index_select(0, owner)), weights


def _triangle_corners(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """3 x T: a per-point quantity ``x`` (N x h x w) at vertex k of every triangle, numbered as
    :func:`_cell_triangles` numbers them, read from the grid's corner slices (no gather)."""
    x00, x01, x10, x11 = x[:, :-1, :-1], x[:, :-1, 1:], x[:, 1:, :-1], x[:, 1:, 1:]
    return torch.stack([torch.stack([x00, torch.where(flip, x01, x00)], -1),
                        torch.stack([x01, x11], -1),
                        torch.stack([torch.where(flip, x10, x11), x10], -1)]).view(3, -1)


def _plane_coefficients(rows: torch.Tensor, cols: torch.Tensor, flip: torch.Tensor, height: int,
                        width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per triangle, its barycentric weights as planes over the image: coef (3 x T x 3, float32)
    with the weight of vertex k at pixel (r, c) equal to ``coef[0, t, k] + coef[1, t, k] * r'
    + coef[2, t, k] * c'`` in centred coordinates (r' = r - (H - 1) / 2, c' likewise: half the
    magnitude, so float32 keeps ~1e-5).  Degenerate (zero-area) triangles get 1/3 each.
    Also whether the grid folds over (some triangle turned the other way round), a 0-dim bool
    tensor (read on the host with the scanlines' size)."""
    r, c = _triangle_corners(rows, flip), _triangle_corners(cols, flip)  # 3 x T, float64
    e1r, e1c, e2r, e2c = r[1] - r[0], c[1] - c[0], r[2] - r[0], c[2] - c[0]
    area = e1r * e2c - e1c * e2r  # negative for every triangle of an unfolded grid
    folded = (area > 1e-9).any()
    ok = area.abs() > 1e-9
    inv = torch.where(ok, area, torch.ones_like(area)).reciprocal() * ok
    e1r, e1c, e2r, e2c, inv = (v.float() for v in (e1r, e1c, e2r, e2c, inv))
    r0, c0 = (r[0] - (height - 1) / 2).float(), (c[0] - (width - 1) / 2).float()
    coef = torch.empty(3, 3, r.shape[1], device=rows.device)  # (constant, r', c') x vertex k x T
    torch.mul(e2c, inv, out=coef[1, 1])
    torch.mul(e2r, inv, out=coef[2, 1]).neg_()
    torch.mul(e1c, inv, out=coef[1, 2]).neg_()
    torch.mul(e1r, inv, out=coef[2, 2])
    torch.add(coef[1, 1], coef[1, 2], out=coef[1, 0]).neg_()
    torch.add(coef[2, 1], coef[2, 2], out=coef[2, 0]).neg_()
    torch.addcmul(coef[1] * r0, coef[2], c0, out=coef[0]).neg_()
    coef[0, 0] += ok.float()  # a proper triangle: vertex 0 takes what the other two leave
    coef[0] += (~ok).float() / 3  # a degenerate one: its three vertices alike
    return coef.transpose(1, 2).contiguous(), folded


# On a CPU the un-sampler writes tens of MB of fresh memory per call (80 MB for 19 x 1024 x 1024
# logits).  PyTorch's CPU allocator maps it in 4 KiB pages unless THP_MEM_ALLOC_ENABLE=1 was set
# before it started, and on a virtual machine faulting those pages in cost more than the
# interpolation itself (46 vs 9 ms for 80 MB, measured on the project's 2-core machine).  numpy
# asks Linux for transparent huge pages on large arrays, so the big CPU buffers come from numpy.
_HOST_BUFFER_BYTES = 1 << 22
_INT32_LIMIT = 2 ** 31  # per-crossing and pixel indices in int32 below it
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int32: np.int32, torch.int64: np.int64}


def _host_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, backed by a numpy array (transparent huge pages) for large CPU buffers."""
    size = math.prod(shape) if isinstance(shape, (tuple, list)) else int(shape)
    if torch.device(device).type != "cpu" or size * dtype.itemsize < _HOST_BUFFER_BYTES or dtype not in _NUMPY_DTYPES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))


def _host_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _host_empty(shape, dtype, device).zero_()


class _Edges(NamedTuple):
    """Per grid edge, what the scanlines need: its image, its top end (row, and column there),
    its slope (columns per row), the first pixel row crossing it and how many do, and the change
    of triangle id + 1 when it is crossed left to right."""
    image: torch.Tensor
    top: torch.Tensor
    x_top: torch.Tensor
    slope: torch.Tensor
    first_row: torch.Tensor
    count: torch.Tensor
    delta: torch.Tensor


def _grid_edges(rows: torch.Tensor, cols: torch.Tensor, flip: torch.Tensor, height: int) -> _Edges:
    """The edges of a grid (N x h x w rows and columns in output pixels) for
    :func:`_pixel_triangles`: every edge is crossed by the pixel rows it spans (rows y with
    top <= y < bottom, the last image row included, at x = its column there)."""
    n, h, w = rows.shape
    device = rows.device
    vid = torch.arange(n * h * w, device=device).view(n, h, w)
    f = flip.long()
    first = torch.arange(1, 2 * f.numel() + 1, 2, device=device).view(n, h - 1, w - 1)  # 2 * cell + 1
    none = torch.zeros(n, h - 1, 1, dtype=torch.long, device=device)
    corner = vid[:, :-1, :-1]
    # Edges p -> q with the triangles (id + 1, 0 = none) on their two sides, ``plus`` the one on
    # the right of p -> q drawn downwards in the uniform grid: inner horizontal edges (plus: the
    # cell above), vertical edges but the right border (plus: the cell to the right), diagonals.
    p = torch.cat([vid[:, 1:-1, :-1].reshape(-1), vid[:, :-1, :-1].reshape(-1), (corner + f).reshape(-1)])
    q = torch.cat([vid[:, 1:-1, 1:].reshape(-1), vid[:, 1:, :-1].reshape(-1), (corner + (w + 1) - f).reshape(-1)])
    plus = torch.cat([(first[:, :-1] + 1).reshape(-1), (first + 1 - f).reshape(-1), (first + f).reshape(-1)])
    minus = torch.cat([first[:, 1:].reshape(-1), torch.cat([none, first[:, :, :-1] + f[:, :, :-1]], 2).reshape(-1),
                       (first + 1 - f).reshape(-1)])
    rflat, cflat = rows.reshape(-1), cols.reshape(-1)
    rp, rq, cp, cq = rflat.index_select(0, p), rflat.index_select(0, q), cflat.index_select(0, p), cflat.index_select(0, q)
    dr = rq - rp
    down = dr > 0  # drawn upwards in the image: its sides swap
    top, bottom = torch.where(down, rp, rq), torch.where(down, rq, rp)
    slope = (cq - cp) / torch.where(dr == 0, torch.ones_like(dr), dr)
    delta = torch.where(down, plus - minus, minus - plus).int()
    first_row = torch.ceil(top)
    end_row = torch.where(bottom >= height - 1, torch.full_like(bottom, height), torch.ceil(bottom))
    count = ((end_row - first_row) * (dr != 0)).clamp_min_(0).long()
    return _Edges(p // (h * w), top, torch.where(down, cp, cq), slope, first_row, count, delta)


def _pixel_triangles(edges: _Edges, total: int, n: int, height: int, width: int) -> torch.Tensor:
    """Scanline rasterisation of an unfolded grid: for every output pixel (N*H*W, int32) the id
    + 1 of the triangle that holds it, without per-pixel candidate lists.  ``edges`` from
    :func:`_grid_edges`, ``total`` their crossings (``edges.count`` summed, read on the host: it
    sizes the list of crossings).

    Crossing an edge left to right enters the triangle on its right and leaves the one on its
    left, known from the grid's topology and the edge's direction; the difference of their ids
    is added at pixel ``ceil(x)`` and a cumulative sum along each row yields the triangle of
    every pixel (a pixel on an edge belongs to its right side).  The top and bottom borders are
    never crossed, the right border and whatever lies on it is never entered."""
    device = edges.count.device
    offset = torch.cumsum(edges.count, 0) - edges.count
    # Per-crossing arithmetic in int32 where it fits: CPUs convert int32 <-> float64 in vector
    # registers but int64 <-> float64 one element at a time (3x slower here).
    index_dtype = torch.int32 if max(total + n * height, n * height * width) < _INT32_LIMIT else torch.int64
    # Crossing k (global index; row first_row[e] + k - offset[e] of edge e) lies at
    # x = ctop + (row - top) * slope = x0[e] + k * slope[e].
    x0 = torch.addcmul(edges.x_top, edges.first_row - edges.top - offset, edges.slope)
    row0 = (edges.image * height + edges.first_row.long() - offset).to(index_dtype)  # + k: the crossing's image row
    edge = torch.repeat_interleave(edges.count.to(index_dtype), output_size=total)
    k = torch.arange(total, device=device, dtype=index_dtype)
    x = x0.index_select(0, edge).addcmul_(k.double(), edges.slope.index_select(0, edge))
    right_border = x >= width - 1  # nothing is entered there (only zero-width triangles lie beyond)
    pixel = row0.index_select(0, edge).add_(k).mul_(width).add_(x.ceil_().clamp_(0, width - 1).to(index_dtype))
    step = edges.delta.index_select(0, edge).masked_fill_(right_border, 0)
    marks = _host_zeros(n * height * width, torch.int32, device)
    marks.index_add_(0, pixel, step)
    owner = _host_empty((n * height, width), torch.int32, device)
    return torch.cumsum(marks.view(n * height, width), 1, dtype=torch.int32, out=owner).view(-1)


def _interpolate_planes(planes: torch.Tensor, owner: torch.Tensor, n: int, height: int, width: int,
                        rows_per_chunk: int = 64) -> torch.Tensor:
    """(N*H*W) x C: at every pixel, sum_j (1, r', c')_j x planes[j * T + owner - 1] (planes:
    3T x C, r' and c' the centred coordinates).  One embedding_bag of 3 rows per pixel; where
    nothing needs a gradient and the device is a CPU it runs over blocks of rows straight into a
    huge-page output, with the index and coordinates of one block reused (small and cache-hot)."""
    num_tri, c = planes.shape[0] // 3, planes.shape[1]
    device = owner.device

    def plane_rows(pixel_owner: torch.Tensor) -> torch.Tensor:  # pixels x 3 (a stack beats a broadcast add)
        return torch.stack([pixel_owner - 1, pixel_owner + (num_tri - 1), pixel_owner + (2 * num_tri - 1)], 1)

    chunked = device.type == "cpu" and not (torch.is_grad_enabled() and planes.requires_grad)
    rows_per_chunk = rows_per_chunk if chunked else n * height
    coords = torch.empty(rows_per_chunk, width, 3, device=device)
    coords[..., 0] = 1
    coords[..., 2] = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    row_centre = (torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2).repeat(n)
    if not chunked:
        coords[..., 1] = row_centre[:, None]
        return F.embedding_bag(plane_rows(owner), planes, per_sample_weights=coords.view(-1, 3), mode="sum")
    out = _host_empty((n * height * width, c), planes.dtype, device)
    # flat int32 indices with int32 bag offsets: embedding_bag's fastest CPU kernel
    offsets = torch.arange(0, 3 * rows_per_chunk * width, 3, dtype=torch.int32, device=device)
    for start in range(0, n * height, rows_per_chunk):
        stop = min(start + rows_per_chunk, n * height)
        block = coords[:stop - start]
        block[..., 1] = row_centre[start:stop, None]
        index = plane_rows(owner[start * width:stop * width]).view(-1)
        out[start * width:stop * width] = F.embedding_bag(index, planes, offsets[:(stop - start) * width],
                                                          per_sample_weights=block.view(-1), mode="sum")
    return out


def unsample(logits: torch.Tensor, locations: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Logits at sampled positions (N x C x h x w, with ``locations`` N x h x w x 2) back to
    N x C x out_size by piecewise-linear (barycentric) interpolation over the grid's triangles.

    Equals scipy's ``griddata(points, values, pixels, method="linear")`` with points =
    locations * (out_size - 1) wherever both triangulate a cell alike.  ``locations`` are
    snapped and clipped first (:func:`normalize_locations`), so the grid covers the whole image.
    Differentiable w.r.t. ``logits`` (not the locations); output dtype is ``logits.dtype``
    (computed in float32), memory format channels-last.

    How: per triangle, the logits' plane over the image (3 rows of C: constant, row, column
    slopes; one small embedding_bag); per pixel, its triangle by scanline rasterisation
    (:func:`_pixel_triangles`); then one embedding_bag of 3 rows weighted (1, row, col) per pixel.
    A grid that folds over falls back to per-cell candidate pixels (:func:`_rasterise`).

    Host synchronisations: two on a grid that does not fold, one reading whether it folds with
    the number of scanline crossings (data-dependent: it sizes them), one reading whether every
    pixel found its triangle; a folded grid's fallback reads 3 or 4 more (the sizes of its
    candidate lists, whether a pixel is left without a triangle).
    """
    if logits.dim() != 4 or locations.dim() != 4 or locations.shape[-1] != 2:
        raise ValueError(f"unsample expects logits N x C x h x w and locations N x h x w x 2, got "
                         f"{tuple(logits.shape)} and {tuple(locations.shape)}")
    if logits.shape[0] != locations.shape[0] or logits.shape[2:] != locations.shape[1:3]:
        raise ValueError(f"logits {tuple(logits.shape)} and locations {tuple(locations.shape)} disagree "
                         f"on N or the grid size")
    height, width = int(out_size[0]), int(out_size[1])
    n, c, h, w = logits.shape
    if min(h, w, height, width) < 2:
        raise ValueError(f"unsample needs a grid and an output of at least 2 x 2, got grid {h} x {w} and "
                         f"out_size {height} x {width}")
    table = logits.permute(0, 2, 3, 1).reshape(n * h * w, c).float()
    with torch.no_grad(), record_function("unsample/triangulate"):
        loc = normalize_locations(locations.detach().double())
        rows, cols = loc[..., 0] * (height - 1), loc[..., 1] * (width - 1)
        flip = _delaunay_flip(rows, cols)
        triangles = _cell_triangles(flip).view(-1, 3)
        coef, folded = _plane_coefficients(rows, cols, flip, height, width)
        edges = _grid_edges(rows, cols, flip, height)
        # host read 1 of 2: whether the grid folds over, and the scanlines' size
        folded, total = torch.stack([folded.long(), edges.count.sum()]).tolist()
    num_tri = triangles.shape[0]
    if not folded:
        with torch.no_grad(), record_function("unsample/rasterise"):
            owner = _pixel_triangles(edges, total, n, height, width)
            lo, hi = torch.aminmax(owner)
            folded = bool((lo < 1) | (hi > num_tri))  # read 2: a grid degenerate enough to defeat the scanlines
    if folded:
        with torch.no_grad(), record_function("unsample/rasterise_candidates"):
            vertices, weights = _rasterise(torch.stack([rows, cols], -1), triangles.view(-1, 2, 3), height, width)
        with record_function("unsample/interpolate"):
            out = F.embedding_bag(vertices, table, per_sample_weights=weights, mode="sum")
    else:
        with record_function("unsample/planes"):  # row j * T + t: sum_k coef[j, t, k] * logits at vertex k of t
            planes = F.embedding_bag(triangles.int().repeat(3, 1), table, per_sample_weights=coef.view(-1, 3),
                                     mode="sum")
        with record_function("unsample/interpolate"):
            out = _interpolate_planes(planes, owner, n, height, width)
    return out.to(logits.dtype).view(n, height, width, c).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- wrapper
class NUSSegmenter(nn.Module):
    """"Sample -> segment -> un-sample" around any segmentation net returning ``{'pred': ...}``.

    ``aux_net=None`` samples the uniform grid (the baseline).  The auxiliary net is frozen
    (eval mode, no gradient): it is trained separately against the targets.

    ``forward(images, locations=None)`` returns:
      * ``locations``: N x S_h x S_w x 2 sampling locations at the sampling size;
      * ``sampled_image``: N x 3 x S_h x S_w; ``sampled_pred``: the seg net's logits there;
      * in eval mode, ``pred``: N x C x H x W logits un-sampled to the input's resolution.
    ``locations`` (N x h x w x 2, any h x w) overrides the auxiliary net's."""

    def __init__(self, seg_net: nn.Module, aux_net: Optional[AuxiliaryNet] = None,
                 sampling_size: Sequence[int] = (192, 192), mode: str = "nearest"):
        super().__init__()
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"sampling mode must be 'nearest' or 'bilinear', got {mode!r}")
        self.seg_net = seg_net
        self.aux_net = aux_net
        self.sampling_size = (int(sampling_size[0]), int(sampling_size[1]))
        self.mode = mode
        if aux_net is not None:
            aux_net.requires_grad_(False)
            aux_net.eval()

    def train(self, mode: bool = True) -> "NUSSegmenter":
        super().train(mode)
        if self.aux_net is not None:
            self.aux_net.eval()
        return self

    @torch.no_grad()
    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised coarse grid (N x h x w x 2): the auxiliary net's, or uniform 8 x 8."""
        if self.aux_net is None:
            return uniform_grid((8, 8), images.device).expand(images.shape[0], -1, -1, -1)
        return normalize_locations(self.aux_net(images).float())

    def forward(self, images: torch.Tensor, locations: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        coarse = self.grid(images) if locations is None else normalize_locations(locations.float())
        dense = resize_locations(coarse, self.sampling_size)
        sampled = sample(images, dense, self.mode)
        logits = self.seg_net(sampled)["pred"]
        out = {"locations": dense, "sampled_image": sampled, "sampled_pred": logits}
        if not self.training:
            out["pred"] = unsample(logits, dense, images.shape[-2:])
        return out
