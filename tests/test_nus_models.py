"""MobileNetV2, the NUS auxiliary net, sampler, un-sampler and wrapper (models.mobilenetv2, models.nus)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.interpolate import griddata

from datasets.labels import labelid_to_trainid
from datasets.nus_targets import target_locations
from datasets.synthetic import render_scene
from models import get_net
from models.mobilenetv2 import MobileNetV2, load_imagenet_mobilenetv2
from models.nus import (AuxiliaryNet, NUSSegmenter, normalize_locations, resize_locations, sample, uniform_grid,
                        unsample)


def test_mobilenetv2_matches_torchvision_layout_and_size():
    net = MobileNetV2(1.0, include_top=True)
    # torchvision.models.mobilenet_v2(): 3,504,872 parameters, 314 state-dict entries.
    assert sum(p.numel() for p in net.parameters()) == 3_504_872
    state = net.state_dict()
    assert len(state) == 314
    expected = {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
                "features.1.conv.1.weight": (16, 32, 1, 1), "features.2.conv.0.0.weight": (96, 16, 1, 1),
                "features.17.conv.2.weight": (320, 960, 1, 1), "features.18.0.weight": (1280, 320, 1, 1),
                "classifier.1.weight": (1000, 1280)}
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_mobilenetv2_output_stride(output_stride):
    net = MobileNetV2(0.25, output_stride=output_stride).eval()
    out = net(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, net.out_channels, 64 // output_stride, 64 // output_stride)
    assert net.out_channels == 80  # 320 x 0.25


def test_imagenet_checkpoint_in_torchvision_layout_loads(tmp_path):
    full = MobileNetV2(1.0, include_top=True)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(full.state_dict(), path)
    seg = get_net("deeplabv3.MobileNetV2")
    report = load_imagenet_mobilenetv2(seg.backbone, str(path))
    assert "classifier.1.weight" in report["skipped"] and "features.18.0.weight" in report["skipped"]
    for key, value in seg.backbone.state_dict().items():
        assert torch.equal(value, full.state_dict()[key])
    torch.save(MobileNetV2(0.5, include_top=True).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit MobileNetV2"):
        load_imagenet_mobilenetv2(seg.backbone, str(path))


def test_deeplabv3_arch_in_factory():
    net = get_net("deeplabv3.MobileNetV2", num_classes=5).eval()
    assert net(torch.zeros(1, 3, 40, 56))["pred"].shape == (1, 5, 40, 56)
    with pytest.raises(ValueError, match="no edge head"):
        get_net("deeplabv3.MobileNetV2", has_edge=True)
    with pytest.raises(ValueError, match="takes no hrnet_base"):
        get_net("deeplabv3.MobileNetV2", hrnet_base=18)
    with pytest.raises(TypeError, match="unknown option"):
        get_net("deeplabv3.MobileNetV2", scales=(1.0,))


def test_auxiliary_net_starts_from_the_uniform_grid_and_learns():
    torch.manual_seed(0)
    net = AuxiliaryNet()
    assert net.grid_size == (8, 8)
    np.testing.assert_allclose(net.mean_locations.detach()[0].numpy(), uniform_grid((8, 8)).numpy())
    images = torch.randn(4, 3, 128, 96)
    out = net(images)
    assert out.shape == (4, 8, 8, 2)
    loss = F.mse_loss(out, uniform_grid((8, 8)).expand(4, -1, -1, -1))
    loss.backward()
    assert net.mean_locations.grad is not None and net.backbone.features[0][0].weight.grad.abs().sum() > 0


def test_normalize_and_resize_locations():
    loc = torch.rand(2, 8, 8, 2) * 1.4 - 0.2
    norm = normalize_locations(loc)
    assert norm.min() >= 0 and norm.max() <= 1
    assert (norm[:, 0, :, 0] == 0).all() and (norm[:, -1, :, 0] == 1).all()
    assert (norm[:, :, 0, 1] == 0).all() and (norm[:, :, -1, 1] == 1).all()
    dense = resize_locations(uniform_grid((8, 8))[None], (5, 7))
    torch.testing.assert_close(dense[0], uniform_grid((5, 7)))


def test_nearest_sampling_is_the_reference_gather():
    image = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    loc = torch.rand(2, 4, 5, 2)
    out = sample(image, loc)
    rows = np.round(loc[..., 0].numpy() * 9).astype(int)
    cols = np.round(loc[..., 1].numpy() * 11).astype(int)
    for n in range(2):
        np.testing.assert_array_equal(out[n].numpy(), image[n].numpy()[:, rows[n], cols[n]])
    labels = torch.randint(0, 19, (2, 10, 12))
    np.testing.assert_array_equal(sample(labels, loc)[1].numpy(), labels[1].numpy()[rows[1], cols[1]])
    # Bilinear at the grid's pixels equals nearest; uniform grid at full size is the identity.
    full = uniform_grid((10, 12))[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(sample(image, full, "bilinear"), image)
    torch.testing.assert_close(sample(image, full), image)


def _realistic_case(seed, height, width, grid):
    _, ids = render_scene(np.random.default_rng(seed), height, width)
    label = labelid_to_trainid(ids).astype(np.int64)
    coarse = torch.from_numpy(target_locations(label))[None]
    loc = normalize_locations(resize_locations(coarse, grid).double())
    sampled = sample(torch.from_numpy(label)[None], loc).clamp(max=18)
    gen = torch.Generator().manual_seed(seed)
    logits = 4 * F.one_hot(sampled, 19).permute(0, 3, 1, 2).double() + torch.randn(1, 19, *grid, generator=gen,
                                                                                     dtype=torch.float64)
    return label, loc, logits


def _griddata(loc, logits, height, width):
    points = loc[0].numpy().reshape(-1, 2) * np.array([height - 1, width - 1])
    values = logits[0].permute(1, 2, 0).reshape(-1, logits.shape[1]).numpy()
    pixels = np.stack(np.mgrid[:height, :width], -1).reshape(-1, 2)
    return griddata(points, values, pixels, method="linear").reshape(height, width, -1)


@pytest.mark.parametrize("seed", [0, 1])
def test_unsample_argmax_equals_griddata_linear(seed):
    """On learned-looking grids (regularised targets of synthetic scenes) and noisy logits."""
    height, width = 128, 256
    label, loc, logits = _realistic_case(seed, height, width, (32, 64))
    ours = unsample(logits, loc, (height, width))[0].permute(1, 2, 0).numpy()
    ref = _griddata(loc, logits, height, width)
    valid = ~np.isnan(ref).any(-1)
    assert valid.mean() > 0.99
    agree = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
    assert agree >= 0.995, agree


def test_unsample_reproduces_linear_functions_and_sample_values():
    torch.manual_seed(0)
    coarse = normalize_locations(uniform_grid((8, 8))[None] + 0.03 * torch.randn(2, 8, 8, 2))
    loc = resize_locations(coarse, (12, 16)).double()
    height, width = 50, 70
    points = normalize_locations(loc) * torch.tensor([height - 1, width - 1], dtype=torch.float64)
    # Values that are affine in (row, col): any triangulation reproduces them exactly.
    logits = torch.stack([points[..., 0], points[..., 1], 2 * points[..., 0] - points[..., 1] + 3], 1)
    out = unsample(logits, loc, (height, width))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    expected = torch.stack([rows, cols, 2 * rows - cols + 3])[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=0)
    # The uniform grid at the output size gives the logits back.
    same = torch.randn(1, 4, 9, 11)
    torch.testing.assert_close(unsample(same, uniform_grid((9, 11))[None], (9, 11)), same, atol=1e-5, rtol=0)


def test_unsample_is_batched_differentiable_and_checks_shapes():
    torch.manual_seed(0)
    loc = resize_locations(normalize_locations(uniform_grid((8, 8))[None] + 0.02 * torch.randn(3, 8, 8, 2)),
                           (10, 10))
    logits = torch.randn(3, 5, 10, 10, requires_grad=True)
    out = unsample(logits, loc, (33, 41))
    assert out.shape == (3, 5, 33, 41)
    for n in range(3):
        torch.testing.assert_close(out[n:n + 1], unsample(logits[n:n + 1], loc[n:n + 1], (33, 41)))
    out.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="disagree"):
        unsample(logits, loc[:2], (33, 41))


def test_wrapper_samples_segments_and_unsamples():
    torch.manual_seed(0)
    seg = get_net("deeplabv3.MobileNetV2", num_classes=4, width=0.35, output_stride=16)
    net = NUSSegmenter(seg, AuxiliaryNet(), sampling_size=(16, 24))
    images = torch.randn(2, 3, 40, 64)
    net.train()
    assert not net.aux_net.training
    out = net(images)
    assert out["sampled_pred"].shape == (2, 4, 16, 24) and out["locations"].shape == (2, 16, 24, 2)
    assert "pred" not in out
    out["sampled_pred"].sum().backward()
    assert all(p.grad is None for p in net.aux_net.parameters())  # frozen
    net.eval()
    out = net(images)
    assert out["pred"].shape == (2, 4, 40, 64)
    baseline = NUSSegmenter(seg, None, sampling_size=(16, 24)).eval()
    torch.testing.assert_close(baseline(images)["locations"][0], uniform_grid((16, 24)))


@pytest.mark.parametrize("grid, out_size", [((12, 16), (50, 70)), ((64, 48), (40, 36)), ((7, 5), (97, 61))])
def test_unsample_scanlines_reproduce_affine_values_on_coarse_and_fine_grids(grid, out_size):
    """Affine values are reproduced by any triangulation: every pixel must find a triangle that
    holds it, also where triangles are much smaller than a pixel (grid finer than the output)."""
    torch.manual_seed(1)
    coarse = normalize_locations(uniform_grid((8, 8))[None] + 0.035 * torch.randn(3, 8, 8, 2))
    loc = resize_locations(coarse, grid).double()
    height, width = out_size
    points = normalize_locations(loc) * torch.tensor([height - 1, width - 1], dtype=torch.float64)
    logits = torch.stack([0.5 * points[..., 0] - points[..., 1], points[..., 1] + 2, -points[..., 0]], 1)
    out = unsample(logits, loc, out_size)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    expected = torch.stack([0.5 * rows - cols, cols + 2, -rows])[None].expand(3, -1, -1, -1)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=0)


def test_unsample_values_equal_griddata_linear():
    """Not only the argmax: the values themselves, on a jittered grid (no co-circular cells, so
    the Delaunay triangulation is unique and griddata's and ours must be the same)."""
    torch.manual_seed(0)
    h, w, height, width = 24, 32, 96, 160
    jitter = (torch.rand(2, h, w, 2, dtype=torch.float64) - 0.5) * torch.tensor([0.3 / (h - 1), 0.3 / (w - 1)],
                                                                                 dtype=torch.float64)
    loc = normalize_locations(uniform_grid((h, w), dtype=torch.float64)[None] + jitter)
    logits = torch.randn(2, 5, h, w, dtype=torch.float64)
    out = unsample(logits, loc, (height, width))
    for n in range(2):
        ref = _griddata(loc[n:n + 1], logits[n:n + 1], height, width)
        np.testing.assert_allclose(out[n].permute(1, 2, 0).numpy(), ref, atol=1e-4, rtol=0)


def test_unsample_degenerate_and_folded_grids():
    """Points clipped onto the border (zero-area triangles) keep the fast scanlines exact; a grid
    that folds over takes the per-cell candidates: finite, a convex combination of the logits."""
    torch.manual_seed(2)
    height, width = 45, 60
    loc = uniform_grid((9, 9))[None].clone()
    loc[0, 1, 2:6, 0] = -0.3  # second row pushed above the image: clipped onto the top border
    loc[0, 3:6, -2, 1] = 1.4  # second-to-last column clipped onto the right border
    points = normalize_locations(loc.double()) * torch.tensor([height - 1, width - 1], dtype=torch.float64)
    logits = torch.stack([points[..., 0] + 2 * points[..., 1], points[..., 1] - 3], 1)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    expected = torch.stack([rows + 2 * cols, cols - 3])[None]
    torch.testing.assert_close(unsample(logits, loc, (height, width)), expected, atol=2e-3, rtol=0)

    folded = uniform_grid((9, 9))[None].clone()
    folded[0, 4, 4], folded[0, 4, 5] = folded[0, 4, 5].clone(), folded[0, 4, 4].clone()  # two points swapped
    values = torch.randn(1, 4, 9, 9)
    out = unsample(values, folded, (height, width))
    assert torch.isfinite(out).all()
    low, high = values.amin((2, 3))[..., None, None], values.amax((2, 3))[..., None, None]
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    # Away from the fold the result is the plain interpolation (the same grid without the fold).
    plain = unsample(values, uniform_grid((9, 9))[None], (height, width))
    far = torch.ones(height, width, dtype=torch.bool)
    far[10:36, 16:48] = False  # the cells around the two swapped points
    torch.testing.assert_close(out[..., far], plain[..., far], atol=1e-5, rtol=0)


def test_unsample_rejects_tiny_grids_and_outputs():
    with pytest.raises(ValueError, match="at least 2 x 2"):
        unsample(torch.zeros(1, 2, 1, 5), torch.zeros(1, 1, 5, 2), (10, 10))
    with pytest.raises(ValueError, match="at least 2 x 2"):
        unsample(torch.zeros(1, 2, 4, 4), uniform_grid((4, 4))[None], (1, 10))


def test_unsample_fast_cpu_paths_equal_the_plain_ones(monkeypatch):
    """Without a gradient the CPU interpolates blocks of 64 rows into a huge-page buffer, and the
    scanlines index in int32: both must equal the one-shot autograd path and int64 indices, also
    where a block spans two images of the batch (2 x 100 rows) and where buffers pass the numpy
    threshold."""
    import models.nus as nus

    torch.manual_seed(3)
    loc = resize_locations(normalize_locations(uniform_grid((8, 8))[None] + 0.03 * torch.randn(2, 8, 8, 2)),
                           (24, 20))
    logits = torch.randn(2, 6, 24, 20, requires_grad=True)
    plain = unsample(logits, loc, (100, 130))  # needs a gradient: one embedding_bag, torch buffers
    assert plain.requires_grad
    with torch.no_grad():
        blocked = unsample(logits, loc, (100, 130))
        monkeypatch.setattr(nus, "_HOST_BUFFER_BYTES", 1)  # every buffer from numpy
        monkeypatch.setattr(nus, "_INT32_LIMIT", 0)  # int64 scanline indices
        numpy_int64 = unsample(logits, loc, (100, 130))
    torch.testing.assert_close(blocked, plain.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(numpy_int64, blocked, atol=0, rtol=0)


def test_bench_nus_runs_and_checks_its_thread_counts():
    """The benchmark runs end to end on a small case (one child process per thread count, the
    griddata side, the argmax agreement) and refuses a bad ``--threads`` in one line."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_nus.py"
    small = ["--device", "cpu", "--size", "96", "--grid", "12", "--repeats", "1", "--warmup", "1",
             "--griddata-repeats", "1"]
    done = subprocess.run([sys.executable, str(script), *small, "--threads", "1,2"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 thread " in done.stdout and "2 threads" in done.stdout and "scipy griddata" in done.stdout
    agreement = float(done.stdout.split("argmax agreement")[1].split("%")[0])
    assert agreement >= 99.5
    bad = subprocess.run([sys.executable, str(script), *small, "--threads", "1,zero"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "--threads expects comma-separated positive integers, got '1,zero'" in bad.stderr


def test_degenerate_triangles_weigh_their_vertices_equally():
    """A cell collapsed onto a line has two zero-area triangles: each vertex weighs 1/3 everywhere
    (the weights of any triangle sum to 1); a proper triangle keeps its barycentric planes."""
    from models.nus import _plane_coefficients

    rows = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [4.0, 4.0]]], dtype=torch.float64)
    cols = torch.tensor([[[0.0, 4.0], [0.0, 4.0]], [[0.0, 4.0], [0.0, 4.0]]], dtype=torch.float64)
    flip = torch.zeros(2, 1, 1, dtype=torch.bool)
    coef, _ = _plane_coefficients(rows, cols, flip, 5, 5)  # (constant, r', c') x triangle x vertex
    degenerate, proper = coef[:, :2], coef[:, 2:]
    torch.testing.assert_close(degenerate[0], torch.full((2, 3), 1 / 3))
    assert degenerate[1:].abs().max() == 0
    for r, c in ((0.0, 0.0), (2.0, 1.0), (4.0, 4.0)):  # the weights of a proper triangle sum to 1
        weights = proper[0] + proper[1] * (r - 2) + proper[2] * (c - 2)
        torch.testing.assert_close(weights.sum(1), torch.ones(2))
