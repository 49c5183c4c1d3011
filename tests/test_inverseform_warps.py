"""inverseform.warps: transforms, sampling near identity and parameter normalisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from inverseform.warps import (
    KIND_COMPONENTS,
    KIND_NUM_PARAMS,
    ParamNormaliser,
    matrix_components,
    matrix_to_params,
    params_to_matrix,
    sample_deviations,
    warp,
    warp_pairs,
)

KINDS = sorted(KIND_NUM_PARAMS)


def _binary_tiles(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) > 0.7).float()


@pytest.mark.parametrize("size", [224, 37])
def test_identity_warp_returns_tile_unchanged(size):
    tiles = _binary_tiles(3, size) * torch.rand(3, 1, size, size)
    eye3 = torch.eye(3).expand(3, 3, 3)
    for kind in KINDS:
        zero = torch.zeros(3, KIND_NUM_PARAMS[kind])
        out = warp(tiles, params_to_matrix(zero, kind), kind=kind)
        assert (out - tiles).abs().max() <= 1e-6, kind
    # 2 x 3 affine input, generic 3 x 3 (projective path) and N x H x W tiles.
    assert (warp(tiles, eye3[:, :2]) - tiles).abs().max() <= 1e-6
    assert (warp(tiles, eye3) - tiles).abs().max() <= 1e-6
    assert (warp(tiles[:, 0], eye3) - tiles[:, 0]).abs().max() <= 1e-6


@pytest.mark.parametrize("kind", ["shift", "affine", "homography"])
def test_known_shift_moves_pattern_by_expected_pixels(kind):
    size, row, col, k = 32, 10, 20, 3
    tile = torch.zeros(1, 1, size, size)
    tile[0, 0, row, col] = 1.0
    dev = torch.zeros(1, KIND_NUM_PARAMS[kind])
    m = params_to_matrix(dev, kind)
    m[0, 0, 2] = 2.0 * k / size      # sample k pixels to the right: content moves left by k
    m[0, 1, 2] = -2.0 * 2 / size     # sample 2 pixels up: content moves down by 2
    out = warp(tile, m, kind=kind)
    expected = torch.zeros_like(tile)
    expected[0, 0, row + 2, col - k] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_affine_and_projective_paths_agree():
    dev = sample_deviations(4, "affine", generator=torch.Generator().manual_seed(1))
    m = params_to_matrix(dev, "affine")
    tiles = _binary_tiles(4, 40, seed=2)
    torch.testing.assert_close(warp(tiles, m, kind="affine"), warp(tiles, m, kind="homography"),
                               atol=1e-5, rtol=0)


def test_warp_scale_matches_affine_grid_convention():
    tiles = _binary_tiles(2, 24, seed=3)
    m = params_to_matrix(torch.tensor([[0.2, -0.1, 0.05, 0.0]] * 2), "scale_shift")
    grid = F.affine_grid(m[:, :2].double(), [2, 1, 24, 24], align_corners=False)
    expected = F.grid_sample(tiles.double(), grid, align_corners=False).float()
    torch.testing.assert_close(warp(tiles, m), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_params_matrix_round_trip(kind):
    g = torch.Generator().manual_seed(4)
    dev = (torch.rand(6, KIND_NUM_PARAMS[kind], generator=g, dtype=torch.float64) - 0.5) * 0.2
    m = params_to_matrix(dev, kind)
    assert m.shape == (6, 3, 3)
    # ||M - I||_F is the norm of the deviations: every deviation is one entry.
    torch.testing.assert_close(torch.linalg.matrix_norm(m - torch.eye(3, dtype=m.dtype)), dev.norm(dim=1))
    torch.testing.assert_close(matrix_to_params(m, kind), dev)
    if kind == "homography":  # a homography is defined up to scale
        torch.testing.assert_close(matrix_to_params(3.0 * m, kind), dev)


def test_params_to_matrix_layout():
    m = params_to_matrix(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), "scale_shift")[0]
    torch.testing.assert_close(m, torch.tensor([[1.1, 0.0, 0.3], [0.0, 1.2, 0.4], [0.0, 0.0, 1.0]]))
    h = params_to_matrix(torch.arange(1.0, 9.0).unsqueeze(0), "homography")[0]
    torch.testing.assert_close(h, torch.tensor([[2.0, 2, 3], [4, 6, 6], [7, 8, 1]]))
    with pytest.raises(ValueError, match="N x 6"):
        params_to_matrix(torch.zeros(2, 4), "affine")
    with pytest.raises(ValueError, match="unknown transform kind"):
        params_to_matrix(torch.zeros(2, 4), "similarity")


def test_normaliser_round_trip_and_dict():
    g = torch.Generator().manual_seed(5)
    samples = torch.randn(500, 4, generator=g) * torch.tensor([0.05, 0.1, 2.0, 0.0])
    norm = ParamNormaliser.fit(samples)
    assert torch.all(norm.mean == 0)                       # identity stays at 0
    assert norm.std[3] == 1.0                              # a never-varied parameter
    torch.testing.assert_close(norm.std[:3], samples[:, :3].pow(2).mean(0).sqrt(), rtol=1e-5, atol=0)
    z = norm.normalise(samples)
    torch.testing.assert_close(z[:, :3].pow(2).mean(0), torch.ones(3), rtol=1e-4, atol=0)
    torch.testing.assert_close(norm.denormalise(z), samples, rtol=1e-5, atol=1e-7)
    again = ParamNormaliser.from_dict(norm.to_dict())
    torch.testing.assert_close(again.mean, norm.mean)
    torch.testing.assert_close(again.std, norm.std)
    centred = ParamNormaliser.fit(samples + 1.0, center=True)
    torch.testing.assert_close(centred.denormalise(centred.normalise(samples)), samples, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(centred.mean[:3], (samples + 1.0)[:, :3].mean(0), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="std > 0"):
        ParamNormaliser([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        ParamNormaliser.from_dict({"mean": [0.0]})


RANGES = {"scale": 0.2, "shift": 0.15, "rotation": 12.0, "shear": 0.1, "perspective": 0.03}


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_respects_ranges_and_identity_fraction(kind):
    ranges = {name: RANGES[name] for name in KIND_COMPONENTS[kind]}
    n = 4000
    dev = sample_deviations(n, kind, ranges, identity_fraction=0.25,
                            generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert dev.shape == (n, KIND_NUM_PARAMS[kind])
    identity = (dev == 0).all(dim=1)
    assert int(identity.sum()) == 1000
    comps = matrix_components(params_to_matrix(dev, kind))
    named = {
        "scale": ("scale_x", "scale_y"), "shift": ("shift_x", "shift_y"), "rotation": ("rotation",),
        "shear": ("shear",), "perspective": ("perspective_x", "perspective_y"),
    }
    for name, keys in named.items():
        for key in keys:
            values = comps[key][~identity]
            if name in ranges:
                r = ranges[name]
                assert values.abs().max() <= r * (1 + 1e-9) + 1e-12, (kind, key)
                assert values.abs().max() >= 0.95 * r, (kind, key)   # the range is used
                assert values.min() < 0 < values.max()
            else:
                assert values.abs().max() <= 1e-12, (kind, key)       # not part of the kind
    again = sample_deviations(n, kind, ranges, identity_fraction=0.25,
                              generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert torch.equal(dev, again)


def test_sampling_rejects_bad_ranges():
    with pytest.raises(ValueError, match="cannot be expressed"):
        sample_deviations(4, "scale_shift", {"rotation": 5.0})
    with pytest.raises(ValueError, match="unknown range"):
        sample_deviations(4, "affine", {"zoom": 0.1})
    with pytest.raises(ValueError, match="identity_fraction"):
        sample_deviations(4, "affine", identity_fraction=1.5)
    with pytest.raises(ValueError, match="scale"):
        sample_deviations(4, "affine", {"scale": 1.0})
    # zero ranges for components the kind lacks are fine (a shared config)
    dev = sample_deviations(4, "shift", {"shift": 0.1, "rotation": 0.0})
    assert dev.shape == (4, 2)


def test_matrix_components_of_a_known_transform():
    angle = math.radians(30.0)
    c, s = math.cos(angle), math.sin(angle)
    sx, sy, sh = 1.2, 0.9, 0.1
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    a = rotation @ torch.tensor([[sx, sh * sy], [0, sy]], dtype=torch.float64)
    m = torch.eye(3, dtype=torch.float64)
    m[:2, :2] = a
    m[0, 2], m[1, 2], m[2, 0], m[2, 1] = 0.3, -0.2, 0.01, -0.02
    comps = matrix_components(m.unsqueeze(0))
    expected = {"rotation": 30.0, "scale_x": 0.2, "scale_y": -0.1, "shear": 0.1, "shift_x": 0.3,
                "shift_y": -0.2, "perspective_x": 0.01, "perspective_y": -0.02}
    for key, value in expected.items():
        assert abs(float(comps[key][0]) - value) < 1e-9, key


def test_warp_pairs():
    tiles = _binary_tiles(40, 24, seed=7)
    warped, dev = warp_pairs(tiles, "affine", {"shift": 0.2, "rotation": 10.0}, identity_fraction=0.25,
                             generator=torch.Generator().manual_seed(8))
    assert warped.shape == tiles.shape and dev.shape == (40, 6)
    identity = (dev == 0).all(dim=1)
    assert int(identity.sum()) == 10
    assert (warped[identity] - tiles[identity]).abs().max() <= 1e-6
    assert ((warped[~identity] - tiles[~identity]).abs().flatten(1).amax(1) > 0.1).all()
    torch.testing.assert_close(warped, warp(tiles, params_to_matrix(dev, "affine")), atol=1e-6, rtol=0)
