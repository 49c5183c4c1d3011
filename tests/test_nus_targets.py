"""Target sampling locations of learned non-uniform downsampling (datasets.nus_targets)."""
import os

import numpy as np
import pytest
import torch

from datasets.nus_targets import (NUSTargets, boundary_pixels, raw_targets, regularise, target_locations,
                                  uniform_locations)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "nus", "ceres_targets.npz")


def energy_gradient(x, t, alpha):
    """dE/dx of E = alpha |x - t|^2 + (1 - sqrt(alpha)) sum_{p~q} |x_p - x_q|^2 (4-neighbours)."""
    beta = 1 - np.sqrt(alpha)
    grad = 2 * alpha * (x - t)
    for axis in (0, 1):
        d = np.diff(x, axis=axis)
        pad = [(0, 0)] * 3
        pad[axis] = (1, 0)
        forward = np.pad(d, pad)       # x_p - x_{p-1}
        pad[axis] = (0, 1)
        backward = np.pad(d, pad)      # x_{p+1} - x_p
        grad += 2 * beta * (forward - backward)
    return grad


@pytest.mark.parametrize("size,alpha", [((8, 8), 0.5), ((5, 11), 0.3), ((12, 7), 0.9), ((2, 3), 0.5)])
def test_regularise_is_the_exact_constrained_minimiser(size, alpha):
    rng = np.random.default_rng(0)
    t = rng.random(size + (2,))
    x = regularise(t, alpha)
    h, w = size
    # Constraints: rows of the top/bottom rows, columns of the left/right columns.
    np.testing.assert_array_equal(x[0, :, 0], 0)
    np.testing.assert_array_equal(x[-1, :, 0], 1)
    np.testing.assert_array_equal(x[:, 0, 1], 0)
    np.testing.assert_array_equal(x[:, -1, 1], 1)
    grad = energy_gradient(x, t, alpha)
    free_row = np.ones((h, w), bool)
    free_row[[0, -1], :] = False
    free_col = np.ones((h, w), bool)
    free_col[:, [0, -1]] = False
    assert np.abs(grad[..., 0][free_row]).max() < 1e-10 if free_row.any() else True
    assert np.abs(grad[..., 1][free_col]).max() < 1e-10 if free_col.any() else True
    # And it is a minimum: any feasible perturbation raises the energy.
    def energy(y):
        beta = 1 - np.sqrt(alpha)
        return alpha * ((y - t) ** 2).sum() + beta * ((np.diff(y, axis=0) ** 2).sum() + (np.diff(y, axis=1) ** 2).sum())
    for _ in range(5):
        d = rng.normal(size=x.shape) * 1e-2
        d[..., 0][~free_row] = 0
        d[..., 1][~free_col] = 0
        assert energy(x + d) > energy(x)


def test_equal_to_the_reference_ceres_solver_on_square_label_maps():
    """The fixture holds synthetic 128 x 128 label crops and the targets of the reference's own
    pipeline (its edge rule and grid, its Ceres solver binary); see make_ceres_fixture.py."""
    data = np.load(FIXTURE)
    for k, alpha in enumerate(data["alphas"]):
        expected = data[f"targets_{k}"]
        ours = target_locations(data["labels"][k], expected.shape[:2], float(alpha))
        assert np.abs(ours - expected).max() < 1e-3


def test_boundaries_only_of_target_classes_and_not_ignored():
    label = np.zeros((10, 10), np.uint8)          # road
    label[2:5, 2:5] = 11                           # a person
    label[6:9, 6:9] = 255                          # void
    edges = boundary_pixels(label)
    assert edges[2:5, 2:5].sum() == 8              # the person's border ring (both sides: only its own side counts)
    assert not edges[label == 0].any() and not edges[label == 255].any()
    both = boundary_pixels(label, target_classes=(0, 11))
    assert both[1, 3] and both[3, 1]               # the road side of the person's boundary


def test_raw_targets_use_width_for_columns_on_non_square_maps():
    label = np.zeros((9, 33), np.uint8)
    label[:, 30:] = 13                             # a car at the right edge: boundary at column 30
    raw = raw_targets(boundary_pixels(label), (3, 3))
    np.testing.assert_allclose(raw[..., 1], 30 / 32)
    label[:, :] = 0
    label[7:, :] = 13                              # boundary at row 7, all columns
    raw = raw_targets(boundary_pixels(label), (3, 5))
    np.testing.assert_allclose(raw[..., 0], 7 / 8)
    # Grid columns at linspace(0, W - 1, w): the nearest boundary pixel is straight below them.
    np.testing.assert_allclose(raw[..., 1], np.linspace(0, 32, 5).astype(int)[None].repeat(3, 0) / 32)


def test_uniform_grid_without_target_boundaries():
    label = np.zeros((40, 60), np.uint8)
    label[10:20, 10:20] = 5                        # a pole: not a target class
    np.testing.assert_array_equal(target_locations(label), uniform_locations((8, 8)))
    grid = uniform_locations((3, 4))
    np.testing.assert_allclose(grid[..., 0][:, 0], [0, 0.5, 1])
    np.testing.assert_allclose(grid[..., 1][0], [0, 1 / 3, 2 / 3, 1])


def test_targets_pull_samples_towards_the_boundary():
    label = np.zeros((64, 64), np.uint8)
    label[24:40, 24:40] = 13
    loc = target_locations(label)
    assert loc.shape == (8, 8, 2) and loc.dtype == np.float32
    assert loc.min() >= 0 and loc.max() <= 1
    pixels = loc * 63
    near = (np.abs(pixels[..., 0] - 31.5) < 12) & (np.abs(pixels[..., 1] - 31.5) < 12)
    uniform = uniform_locations((8, 8)) * 63
    near_uniform = (np.abs(uniform[..., 0] - 31.5) < 12) & (np.abs(uniform[..., 1] - 31.5) < 12)
    assert near.sum() > near_uniform.sum()


@pytest.mark.parametrize("kwargs,match", [({"size": (1, 8)}, "size"), ({"alpha": 0.0}, "alpha"),
                                          ({"alpha": 1.5}, "alpha")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        target_locations(np.zeros((8, 8), np.uint8), **kwargs)
    with pytest.raises(ValueError, match="H x W"):
        target_locations(np.zeros((8, 8, 3), np.uint8))


def test_dataset_wrapper_adds_locations():
    label = np.zeros((32, 32), np.int64)
    label[8:16, 8:16] = 11
    base = [{"image": torch.zeros(3, 32, 32), "label": torch.from_numpy(label)}]
    data = NUSTargets(base, size=(4, 4))
    sample = data[0]
    assert sample["locations"].shape == (4, 4, 2)
    np.testing.assert_allclose(sample["locations"].numpy(), target_locations(label, (4, 4)))
    assert len(data) == 1
