"""rloss/: the permutohedral lattice against an independent point-by-point NumPy version and against
numbers stored from the reference's C++ build (tests/fixtures/rloss_reference.npz, made by
tools/make_rloss_fixture.py); the exact kernel against a dense sum; the loss's value, its
reference backward, the roi, autocast and input checks."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rloss import DenseCRFLoss, PermutohedralLattice, bilateral_filter, densecrf_loss, exact_filter, lattice_features

FIXTURE = Path(__file__).parent / "fixtures" / "rloss_reference.npz"


# ----------------------------------------------------------------------------- independent NumPy lattice
def numpy_lattice_filter(image, values, sigma_rgb, sigma_xy, pad_to_four=True):
    """A @ values for one image (3 x H x W, K x H x W), one point at a time with a dict as the hash
    table, in float32 like the C++ code (the SSE build's rounding and its padding points)."""
    f32 = np.float32
    d = 5
    _, h, w = image.shape
    feats = []
    for y in range(h):
        for x in range(w):
            feats.append([f32(x) / f32(sigma_xy), f32(y) / f32(sigma_xy)] +
                         [f32(image[c, y, x]) / f32(sigma_rgb) for c in range(3)])
    n_real = len(feats)
    if pad_to_four:
        feats += [[f32(0)] * d] * ((-n_real) % 4)
    inv_std = f32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    table, splat = {}, []
    for f in feats:
        elevated = [f32(0)] * (d + 1)
        sm = f32(0)
        for j in range(d, 0, -1):
            cf = f32(f[j - 1] * scale[j - 1])
            elevated[j] = f32(sm - f32(j) * cf)
            sm = f32(sm + cf)
        elevated[0] = sm
        down = f32(1.0 / (d + 1))
        rem0 = [f32(np.rint(f32(down * e)) * f32(d + 1)) for e in elevated]
        total = int(sum(np.rint(f32(down * e)) for e in elevated))
        rank = [0] * (d + 1)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if f32(elevated[i] - rem0[i]) < f32(elevated[j] - rem0[j]):
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] = f32(rem0[i] + d + 1)
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] = f32(rem0[i] - (d + 1))
        bary = [f32(0)] * (d + 2)
        for i in range(d + 1):
            v = f32(f32(elevated[i] - rem0[i]) * down)
            bary[d - rank[i]] = f32(bary[d - rank[i]] + v)
            bary[d - rank[i] + 1] = f32(bary[d - rank[i] + 1] - v)
        bary[0] = f32(bary[0] + f32(1 + bary[d + 1]))
        entry = []
        for r in range(d + 1):
            key = tuple(int(rem0[i]) + (r if rank[i] <= d - r else r - d - 1) for i in range(d))
            entry.append((table.setdefault(key, len(table)), bary[r]))
        splat.append(entry)
    m = len(table)
    k = values.shape[0]
    flat = values.reshape(k, -1).T.astype(np.float32)
    grid = np.zeros((m + 1, k), np.float32)      # row m: missing neighbour
    for p in range(n_real):
        for vertex, weight in splat[p]:
            grid[vertex] += f32(weight) * flat[p]
    keys = list(table)
    for j in range(d + 1):
        n1 = [table.get(tuple(key[i] - 1 + (d + 1 if i == j else 0) for i in range(d)), m) for key in keys]
        n2 = [table.get(tuple(key[i] + 1 - (d + 1 if i == j else 0) for i in range(d)), m) for key in keys]
        new = grid.copy()
        new[:m] = grid[:m] + f32(0.5) * (grid[n1] + grid[n2])
        grid = new
    alpha = f32(1.0 / (1.0 + 2.0 ** -d))
    out = np.zeros((n_real, k), np.float32)
    for p in range(n_real):
        for vertex, weight in splat[p]:
            out[p] += f32(weight * alpha) * grid[vertex]
    return out.T.reshape(values.shape)


def smooth_image(n, h, w, seed, noise=8.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 3, 4, generator=g) * 255
    image = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (image + noise * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).round()


def probabilities(n, k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, k, h, w, generator=g), 1)


@pytest.mark.parametrize("h,w,sigma_rgb,sigma_xy", [(12, 16, 15.0, 8.0), (9, 11, 6.0, 3.0)])
def test_lattice_matches_independent_numpy_version(h, w, sigma_rgb, sigma_xy):
    image, values = smooth_image(2, h, w, seed=h), probabilities(2, 3, h, w, seed=w)
    ours = bilateral_filter(image, values, sigma_rgb, sigma_xy)
    for b in range(2):
        expected = numpy_lattice_filter(image[b].numpy(), values[b].numpy(), sigma_rgb, sigma_xy)
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["even", "odd"])
def test_lattice_matches_stored_reference_output(case):
    data = np.load(FIXTURE)
    sigma_rgb, sigma_xy = (float(v) for v in data[f"{case}_sigmas"])
    ours = bilateral_filter(torch.from_numpy(data[f"{case}_image"]), torch.from_numpy(data[f"{case}_values"]),
                            sigma_rgb, sigma_xy)
    expected = data[f"{case}_filtered"]
    assert np.abs(ours.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


def test_sse_padding_vertices_matter_for_odd_pixel_counts():
    """13 x 15 = 195 pixels: the reference's SSE build adds the origin simplex's vertices; they relay
    the blur, so leaving them out changes the result, and the stored reference has them."""
    data = np.load(FIXTURE)
    image, values = torch.from_numpy(data["odd_image"]), torch.from_numpy(data["odd_values"])
    sigma_rgb, sigma_xy = (float(v) for v in data["odd_sigmas"])
    feats = lattice_features(image, sigma_rgb, sigma_xy)
    flat = values.reshape(2, 3, -1).transpose(1, 2)
    with_pad = PermutohedralLattice(feats, sse_padding=True)
    without = PermutohedralLattice(feats, sse_padding=False)
    assert with_pad.num_vertices > without.num_vertices
    expected = torch.from_numpy(data["odd_filtered"]).reshape(2, 3, -1).transpose(1, 2)
    err_with = (with_pad.apply(flat) - expected).abs().max()
    err_without = (without.apply(flat) - expected).abs().max()
    assert err_with <= 1e-5 * expected.abs().max() < err_without


def test_batch_lattice_equals_per_image_lattices():
    image, values = smooth_image(3, 10, 14, seed=3), probabilities(3, 4, 10, 14, seed=4)
    together = bilateral_filter(image, values, 10.0, 5.0)
    for b in range(3):
        alone = bilateral_filter(image[b:b + 1], values[b:b + 1], 10.0, 5.0)
        torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-6, atol=1e-7)


def test_cpu_chunks_give_the_batch_lattice_bit_for_bit(monkeypatch):
    """On a CPU bilateral_filter builds the lattice a few images at a time (cache locality); images
    share no vertex, so this is the batch lattice's result exactly."""
    import rloss.filter

    image, values = smooth_image(5, 11, 13, seed=8), probabilities(5, 4, 11, 13, seed=9)
    flat = values.reshape(5, 4, -1).transpose(1, 2)
    whole = PermutohedralLattice(lattice_features(image, 10.0, 5.0)).apply(flat).transpose(1, 2).reshape(5, 4, 11, 13)
    threads = torch.get_num_threads()
    try:
        for workers in (1, 2):                           # one after another; in a pool of threads
            torch.set_num_threads(workers)
            for points in (1, 2 * 11 * 13, 10 ** 9):     # one image, two (a short last chunk), all at once
                monkeypatch.setattr(rloss.filter, "CPU_CHUNK_POINTS", points)
                assert torch.equal(bilateral_filter(image, values, 10.0, 5.0), whole)
    finally:
        torch.set_num_threads(threads)


def test_filter_returns_contiguous_nchw():
    """A channels-last view out of the filter made the backward of the loss's bilinear downscale,
    and the copy into the leaf's gradient, several times slower (benchmarks/bench_rloss.py)."""
    image, values = smooth_image(2, 10, 14, seed=1), probabilities(2, 3, 10, 14, seed=2)
    for kernel in ("permutohedral", "exact"):
        assert bilateral_filter(image, values, 10.0, 5.0, kernel=kernel).is_contiguous()


def test_lattice_is_linear_in_values():
    image = smooth_image(1, 10, 12, seed=5)
    a, b = probabilities(1, 2, 10, 12, seed=6), probabilities(1, 2, 10, 12, seed=7)
    lhs = bilateral_filter(image, 2 * a + 3 * b, 12.0, 6.0)
    rhs = 2 * bilateral_filter(image, a, 12.0, 6.0) + 3 * bilateral_filter(image, b, 12.0, 6.0)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- exact kernel
def dense_gaussian(image, values, sigma_rgb, sigma_xy):
    _, h, w = image.shape
    ys, xs = np.mgrid[0:h, 0:w]
    f = np.concatenate([xs.reshape(1, -1) / sigma_xy, ys.reshape(1, -1) / sigma_xy,
                        image.reshape(3, -1).astype(np.float64) / sigma_rgb]).T
    d2 = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)
    return (np.exp(-0.5 * d2) @ values.reshape(values.shape[0], -1).T.astype(np.float64)).T.reshape(values.shape)


def test_exact_kernel_is_the_dense_gaussian_sum():
    image, values = smooth_image(2, 9, 13, seed=8), probabilities(2, 3, 9, 13, seed=9)
    ours = bilateral_filter(image, values, 10.0, 4.0, kernel="exact")
    for b in range(2):
        np.testing.assert_allclose(ours[b].numpy(), dense_gaussian(image[b].numpy(), values[b].numpy(), 10.0, 4.0),
                                   rtol=1e-5)
    # blocks of a few rows give the same result
    feats = lattice_features(image, 10.0, 4.0)
    flat = values.reshape(2, 3, -1).transpose(1, 2)
    torch.testing.assert_close(exact_filter(feats, flat, block_elements=200), exact_filter(feats, flat))


def test_lattice_is_about_057_times_the_exact_kernel():
    """The lattice is not the exact Gaussian: the published weights were tuned on it.  Its loss is
    about 0.57 x the exact one on image-like inputs (docs/rloss.md); the gradients point the same way."""
    image, seg = smooth_image(2, 32, 40, seed=10), probabilities(2, 5, 32, 40, seed=11)
    roi = torch.ones(2, 32, 40)
    lat = densecrf_loss(image, seg, roi, 1.0, 15.0, 20.0)
    exact = densecrf_loss(image, seg, roi, 1.0, 15.0, 20.0, kernel="exact")
    assert 0.45 < (lat / exact).item() < 0.7
    a = bilateral_filter(image, seg, 15.0, 20.0).flatten()
    b = bilateral_filter(image, seg, 15.0, 20.0, kernel="exact").flatten()
    assert F.cosine_similarity(a, b, dim=0) > 0.98


# ----------------------------------------------------------------------------- the loss
def test_loss_and_gradient_match_the_stored_reference():
    data = np.load(FIXTURE)
    weight, sigma_rgb, sigma_xy, scale = (float(v) for v in data["loss_params"])
    seg = torch.from_numpy(data["loss_seg"]).requires_grad_(True)
    loss = DenseCRFLoss(weight, sigma_rgb, sigma_xy, scale)(torch.from_numpy(data["loss_image"]), seg,
                                                            torch.from_numpy(data["loss_roi"]))
    loss.backward()
    assert loss.dim() == 0
    assert abs(loss.item() - float(data["loss_value64"])) <= 1e-5 * abs(float(data["loss_value64"]))
    assert abs(loss.item() - float(data["loss_value"])) <= 1e-5 * abs(float(data["loss_value"]))
    expected = torch.from_numpy(data["loss_grad"])
    assert (seg.grad - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("kernel", ["permutohedral", "exact"])
def test_loss_value_and_reference_backward(kernel):
    n, k, h, w = 2, 3, 10, 12
    image, seg = smooth_image(n, h, w, seed=12), probabilities(n, k, h, w, seed=13)
    roi = torch.ones(n, h, w)
    roi[1, :, 9:] = 0
    seg = seg.requires_grad_(True)
    loss = densecrf_loss(image, seg, roi, 0.5, 12.0, 6.0, kernel=kernel)
    masked = seg.detach() * roi[:, None]
    oracle = numpy_lattice_filter if kernel == "permutohedral" else dense_gaussian  # computed another way
    filtered = torch.from_numpy(np.stack([oracle(image[b].numpy(), masked[b].numpy(), 12.0, 6.0)
                                          for b in range(n)])).float()
    assert loss.item() == pytest.approx(-0.5 * (masked * filtered).sum().item() / n, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(seg.grad, -2 * 0.5 * filtered * roi[:, None] / n, rtol=1e-4, atol=1e-6)
    assert seg.grad[1, :, :, 9:].abs().max() == 0


def test_gradient_flows_through_the_downscaling():
    n, k, h, w = 1, 2, 16, 20
    image, seg = smooth_image(n, h, w, seed=14), probabilities(n, k, h, w, seed=15)
    roi = torch.ones(n, h, w)
    seg = seg.requires_grad_(True)
    densecrf_loss(image, seg, roi, 1.0, 10.0, 8.0, scale_factor=0.5).backward()
    small = F.interpolate(seg.detach(), scale_factor=0.5, mode="bilinear", align_corners=False).requires_grad_(True)
    filtered = bilateral_filter(F.interpolate(image, scale_factor=0.5), small.detach(), 10.0, 4.0)
    expected, = torch.autograd.grad(F.interpolate(seg, scale_factor=0.5, mode="bilinear", align_corners=False),
                                    seg, grad_outputs=-2 * filtered / n)
    torch.testing.assert_close(seg.grad, expected)


def test_roi_outside_gets_no_loss_and_no_gradient():
    n, k, h, w = 1, 3, 8, 10
    image, seg = smooth_image(n, h, w, seed=16), probabilities(n, k, h, w, seed=17).requires_grad_(True)
    loss = densecrf_loss(image, seg, torch.zeros(n, h, w), 1.0, 10.0, 5.0)
    loss.backward()
    assert loss.item() == 0 and seg.grad.abs().max() == 0


def test_loss_prefers_segmentations_that_follow_the_image():
    """Two flat colour regions: a segmentation along the colour edge costs less than one across it."""
    h, w = 12, 16
    image = torch.zeros(1, 3, h, w)
    image[..., w // 2:] = 200
    follow = torch.zeros(1, 2, h, w)
    follow[:, 0, :, : w // 2] = 1
    follow[:, 1, :, w // 2:] = 1
    across = torch.zeros(1, 2, h, w)
    across[:, 0, : h // 2] = 1
    across[:, 1, h // 2:] = 1
    roi = torch.ones(1, h, w)
    assert densecrf_loss(image, follow, roi, 1.0, 15.0, 20.0) < densecrf_loss(image, across, roi, 1.0, 15.0, 20.0)


def test_autocast_and_half_inputs_compute_in_float32():
    image, seg = smooth_image(1, 8, 8, seed=18), probabilities(1, 2, 8, 8, seed=19)
    roi = torch.ones(1, 8, 8)
    full = densecrf_loss(image, seg, roi, 1.0, 10.0, 5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = densecrf_loss(image, seg.bfloat16().requires_grad_(True), roi, 1.0, 10.0, 5.0)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(full.item(), rel=2e-2)


def test_bad_inputs_are_refused_with_clear_messages():
    image, seg, roi = torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4), torch.ones(1, 4, 4)
    with pytest.raises(ValueError, match="image must be N x 3"):
        densecrf_loss(torch.zeros(1, 4, 4), seg, roi, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="segmentation must be N x K x H x W"):
        densecrf_loss(image, torch.zeros(1, 2, 4, 5), roi, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="roi must be N x H x W"):
        densecrf_loss(image, seg, torch.ones(1, 1, 4, 4), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        DenseCRFLoss(1.0, 1.0, 1.0, 1.0, kernel="gauss")
    with pytest.raises(ValueError, match="must be > 0"):
        DenseCRFLoss(1.0, 0.0, 1.0, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    image, seg = smooth_image(2, 32, 48, seed=20), probabilities(2, 21, 32, 48, seed=21)
    roi = torch.ones(2, 32, 48)
    cpu = seg.clone().requires_grad_(True)
    gpu = seg.cuda().requires_grad_(True)
    lc = densecrf_loss(image, cpu, roi, 1e-3, 15.0, 30.0, 0.5)
    lg = densecrf_loss(image.cuda(), gpu, roi.cuda(), 1e-3, 15.0, 30.0, 0.5)
    lc.backward()
    lg.backward()
    assert lg.device.type == "cuda"
    assert abs(lg.item() - lc.item()) <= 1e-5 * abs(lc.item())
    assert (gpu.grad.cpu() - cpu.grad).abs().max() <= 1e-5 * cpu.grad.abs().max()
