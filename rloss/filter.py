"""The DenseCRF affinity filter ``A @ values`` for a batch, usable on its own.

A_n is the Gaussian kernel exp(-|f_i - f_j|^2 / 2) over the pixels of image n, on the features
f = (x / sigma_xy, y / sigma_xy, r / sigma_rgb, g / sigma_rgb, b / sigma_rgb) (x = column,
y = row, RGB in [0, 255]), self term included, not normalised.  Two ways to apply it:

* ``kernel="permutohedral"`` (default): the reference's permutohedral-lattice approximation,
  reproduced exactly (see :mod:`rloss.lattice`).  Linear in the pixel count.  This is the
  kernel the published DenseCRF weights (2e-9) were tuned on.
* ``kernel="exact"``: the dense Gaussian sum, in blocks of rows (quadratic in the pixel count:
  for small images and for checking).  The lattice is not the exact Gaussian: on natural
  images its loss is about 0.57 times the exact one (docs/rloss.md), so a weight
  tuned on the lattice maps to about 0.57 x that weight with ``kernel="exact"``.
"""
from __future__ import annotations

import concurrent.futures

import torch

from .lattice import PermutohedralLattice, filter_shape_check, lattice_features

__all__ = ["KERNELS", "bilateral_filter", "exact_filter", "lattice_filter"]

KERNELS = ("permutohedral", "exact")


def exact_filter(features: torch.Tensor, values: torch.Tensor, block_elements: int = 1 << 23) -> torch.Tensor:
    """Dense Gaussian filter: N x P x 5 features, N x P x K values -> N x P x K (float32).

    Rows are processed in blocks so that a block of the P x P affinity holds about
    ``block_elements`` entries."""
    n, p, _ = features.shape
    features = features.to(torch.float32)
    values = values.to(torch.float32)
    out = torch.empty_like(values)
    rows = max(1, block_elements // max(p, 1))
    for b in range(n):
        f = features[b]
        for start in range(0, p, rows):
            block = f[start:start + rows]
            dist2 = torch.cdist(block, f, compute_mode="donot_use_mm_for_euclid_dist").square_()
            out[b, start:start + rows] = torch.exp(dist2.mul_(-0.5)) @ values[b]
    return out


def bilateral_filter(image: torch.Tensor, values: torch.Tensor, sigma_rgb: float, sigma_xy: float,
                     kernel: str = "permutohedral") -> torch.Tensor:
    """``A_n @ values_n`` for every image n of a batch, all channels in one pass.

    Args:
        image: N x 3 x H x W RGB in [0, 255] (float).
        values: N x K x H x W, e.g. softmax probabilities.
        sigma_rgb, sigma_xy: bandwidths, in colour levels and in pixels of ``image``.
        kernel: "permutohedral" (the reference's lattice) or "exact" (dense sum).

    Returns N x K x H x W float32 on the input's device; no gradient flows through it.
    """
    n, k, h, w = filter_shape_check(image, values)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not (sigma_rgb > 0 and sigma_xy > 0):
        raise ValueError(f"sigma_rgb and sigma_xy must be > 0, got {sigma_rgb} and {sigma_xy}")
    with torch.no_grad():
        features = lattice_features(image.detach(), sigma_rgb, sigma_xy)
        flat = values.detach().to(torch.float32).reshape(n, k, h * w).transpose(1, 2)
        if kernel == "exact":
            out = exact_filter(features, flat)
        else:
            out = lattice_filter(features, flat)
        return out.transpose(1, 2).contiguous().view(n, k, h, w)   # NCHW: a channels-last view here made
        # the backward of the bilinear downscale, and its copy into the leaf gradient, several times slower


# On a CPU the lattice of a few images at a time stays in cache: 8 images of 256 x 256 filter
# 3.6x faster one by one than all at once.  A GPU takes the whole batch in one pass.
CPU_CHUNK_POINTS = 1 << 16


def lattice_filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The permutohedral filter of a batch (N x P x 5 features, N x P x K values -> N x P x K).

    On a GPU the whole batch at once.  On a CPU in chunks of about ``CPU_CHUNK_POINTS`` pixels
    (the same result: images share no vertex), spread over torch's CPU threads one chunk per
    thread and at least one chunk per thread, as the reference spreads images over OpenMP
    threads: chunks in parallel use the cores better than each small operation does (8 images of
    256 x 256 on 2 threads: 0.63 s against 1.25 s one chunk after another), and single-threaded
    workers do not spin against each other on a busy machine."""
    n, p, _ = features.shape
    threads = torch.get_num_threads()
    per = n if features.device.type != "cpu" else max(1, CPU_CHUNK_POINTS // max(p, 1))
    if features.device.type == "cpu" and threads > 1:
        per = min(per, -(-n // threads))          # at least one chunk per thread
    if per >= n:
        return PermutohedralLattice(features).apply(values)
    out = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    chunks = [slice(start, start + per) for start in range(0, n, per)]

    def run(chunk, single_thread=False):
        if single_thread:   # a worker thread: one OpenMP thread for its operations (the caller's stay)
            torch.set_num_threads(1)
        try:
            with torch.no_grad():
                out[chunk] = PermutohedralLattice(features[chunk]).apply(values[chunk])
        finally:
            if single_thread:   # the process-wide default that threads started later read
                torch.set_num_threads(threads)

    workers = min(threads, len(chunks))
    if workers <= 1:
        for chunk in chunks:
            run(chunk)
        return out
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(run, chunk, True) for chunk in chunks]:
            done.result()
    return out
