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
  diagonal, as scipy's ``griddata(method="linear")`` triangulates), batched, on the device.
* :class:`NUSSegmenter`: any segmentation network of ``get_net`` as "sample -> segment ->
  un-sample".
* :class:`DeepLabV3MobileNetV2`: the reference's segmentation network.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .mobilenetv2 import MobileNetV2

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
            raise ValueError("arch deeplabv3.MobileNetV2 has no edge head: use has_edge False")
        self.backbone = MobileNetV2(width=width, output_stride=output_stride)
        self.head = DeepLabHead(self.backbone.out_channels, num_classes)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.head(self.backbone(images))
        return {"pred": F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)}


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
            raise ValueError(f"auxiliary net input_size {input_size} must be a multiple of output_stride "
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
def _cell_triangles(points: torch.Tensor) -> torch.Tensor:
    """Per grid cell, its two triangles: (N*(h-1)*(w-1)) x 2 x 3 vertex indices into the
    flattened N*h*w points (N x h x w x 2 pixel coordinates).  Each cell is split along the
    diagonal that makes the pair Delaunay (the opposite corner outside the other triangle's
    circumcircle), as scipy's Delaunay triangulation splits it; the first triangle of a cell
    always holds the first corner of its diagonal's opposite pair."""
    n, h, w, _ = points.shape
    index = torch.arange(n * h * w, device=points.device).reshape(n, h, w)
    i00, i01, i10, i11 = index[:, :-1, :-1], index[:, :-1, 1:], index[:, 1:, :-1], index[:, 1:, 1:]
    p = points.double()
    a, b, c, d = p[:, :-1, :-1], p[:, :-1, 1:], p[:, 1:, 1:], p[:, 1:, :-1]  # a cell's corners in order
    # In-circle determinant of d w.r.t. triangle (a, b, c), sign-corrected by its orientation.
    ad, bd, cd = a - d, b - d, c - d

    def lift(v):
        return (v ** 2).sum(-1)

    det = (ad[..., 0] * (bd[..., 1] * lift(cd) - lift(bd) * cd[..., 1])
           - ad[..., 1] * (bd[..., 0] * lift(cd) - lift(bd) * cd[..., 0])
           + lift(ad) * (bd[..., 0] * cd[..., 1] - bd[..., 1] * cd[..., 0]))
    orient = (b - a)[..., 0] * (c - a)[..., 1] - (b - a)[..., 1] * (c - a)[..., 0]
    scale = lift(ad).clamp_min(1e-12) * lift(cd).clamp_min(1e-12)
    flip = ((det * orient.sign()) > 1e-9 * scale)[..., None]  # d inside: split along b-d instead of a-c
    t1 = torch.where(flip, torch.stack([i00, i01, i10], -1), torch.stack([i00, i01, i11], -1))
    t2 = torch.where(flip, torch.stack([i01, i11, i10], -1), torch.stack([i00, i11, i10], -1))
    return torch.stack([t1, t2], -2).reshape(-1, 2, 3)


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
    limit = torch.tensor([height - 1, width - 1], device=device)
    lo = torch.minimum(lo.clamp_min(0), limit)
    hi = torch.minimum(hi, limit)
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


def unsample(logits: torch.Tensor, locations: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Logits at sampled positions (N x C x h x w, with ``locations`` N x h x w x 2) back to
    N x C x out_size by piecewise-linear (barycentric) interpolation over the grid's triangles.

    Equals scipy's ``griddata(points, values, pixels, method="linear")`` with points =
    locations * (out_size - 1) wherever both triangulate a cell alike.  ``locations`` are
    snapped and clipped first (:func:`normalize_locations`), so the grid covers the whole image.
    Differentiable w.r.t. ``logits`` (not the locations); output dtype is ``logits.dtype``.
    """
    if logits.dim() != 4 or locations.dim() != 4 or locations.shape[-1] != 2:
        raise ValueError(f"unsample expects logits N x C x h x w and locations N x h x w x 2, got "
                         f"{tuple(logits.shape)} and {tuple(locations.shape)}")
    if logits.shape[0] != locations.shape[0] or logits.shape[2:] != locations.shape[1:3]:
        raise ValueError(f"logits {tuple(logits.shape)} and locations {tuple(locations.shape)} disagree "
                         f"on N or the grid size")
    height, width = int(out_size[0]), int(out_size[1])
    n, c, h, w = logits.shape
    scale = torch.tensor([height - 1, width - 1], device=locations.device, dtype=torch.float64)
    points = normalize_locations(locations.detach().double()) * scale
    with torch.no_grad():
        vertices, weights = _rasterise(points, _cell_triangles(points), height, width)
    # One fused gather-multiply-sum (differentiable w.r.t. the table, i.e. the logits).
    table = logits.permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = F.embedding_bag(vertices, table.float(), per_sample_weights=weights, mode="sum")
    return out.to(logits.dtype).reshape(n, height, width, c).permute(0, 3, 1, 2)


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
