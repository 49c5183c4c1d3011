"""inverseform.distances: Euclidean and guarded geodesic distances."""
import math

import numpy as np
import pytest
import torch

from inverseform.distances import (
    euclidean_distance,
    frobenius_distance,
    geodesic_distance,
    matrix_kind,
    regressor_distance,
    safe_arccos,
    so3_projection,
)
from inverseform.warps import KIND_NUM_PARAMS, params_to_matrix


def _rotation_z(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _random_rotations(n, g):
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q * torch.sign(torch.linalg.det(q)).reshape(n, 1, 1)


def test_geodesic_is_zero_at_identity_and_positive_elsewhere():
    eye = torch.eye(3).expand(4, 3, 3)
    assert geodesic_distance(eye).abs().max() < 1e-6
    g = torch.Generator().manual_seed(0)
    others = torch.eye(3) + 0.05 * torch.randn(16, 3, 3, generator=g)
    assert (geodesic_distance(others) > 0).all()
    # a pure rotation: the angle itself, no residual
    angle = 0.3
    assert abs(float(geodesic_distance(_rotation_z(angle))) - angle) < 1e-9
    # a uniform scaling s I: no rotation, residual 3 (s - 1)^2 weighted by lambda
    s = 1.2
    expected = 0.1 * 3 * (s - 1) ** 2
    assert abs(float(geodesic_distance(s * torch.eye(3, dtype=torch.float64))) - expected) < 1e-9
    # relative to a given theta: theta^-1 theta_hat
    theta = _rotation_z(0.2) @ torch.diag(torch.tensor([1.1, 0.9, 1.0], dtype=torch.float64))
    assert float(geodesic_distance(theta, theta)) < 1e-7


def test_projection_is_the_nearest_rotation():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(32, 3, 3, generator=g, dtype=torch.float64)
    p = so3_projection(m)
    torch.testing.assert_close(p @ p.mT, torch.eye(3, dtype=torch.float64).expand(32, 3, 3), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.linalg.det(p), torch.ones(32, dtype=torch.float64))
    best = torch.linalg.matrix_norm(m - p)
    for _ in range(4):  # no random rotation is closer
        assert (torch.linalg.matrix_norm(m - _random_rotations(32, g)) >= best - 1e-12).all()
    rotations = _random_rotations(8, g)
    torch.testing.assert_close(so3_projection(rotations), rotations)


@pytest.mark.parametrize("negative_det", [False, True])
def test_projection_gradient_matches_svd_autograd_for_distinct_singular_values(negative_det):
    g = torch.Generator().manual_seed(2)
    m = torch.randn(10, 3, 3, generator=g, dtype=torch.float64)
    flip = torch.where(torch.linalg.det(m) < 0, -1.0, 1.0).to(m.dtype) * (-1.0 if negative_det else 1.0)
    m = m * flip.reshape(10, 1, 1)
    weights = torch.randn(10, 3, 3, generator=g, dtype=torch.float64)

    a = m.clone().requires_grad_(True)
    (so3_projection(a, eps=1e-12) * weights).sum().backward()

    b = m.clone().requires_grad_(True)
    u, s, vh = torch.linalg.svd(b)
    d = torch.sign(torch.linalg.det(u @ vh)).detach()
    diag = torch.stack([torch.ones_like(d), torch.ones_like(d), d], dim=-1)
    ((u @ (diag.unsqueeze(-1) * vh)) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-8, rtol=1e-6)


def test_projection_gradcheck():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(3, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: so3_projection(x, eps=1e-12), (m,))


def _svd_projection(m):
    """The definition: U diag(1, 1, det(U V^T)) V^T from an SVD."""
    u, _, vh = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vh))
    return u @ (torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1).unsqueeze(-1) * vh)


def _svd_guarded_gradient(m, grad_p, eps):
    """The guarded backward written in the SVD's bases: with sigma = d_i d_j, W_ij = (U^T G V)_ij d_j
    / (s_j + sigma s_i) (each 1/x as x / (x^2 + eps^2), W_ii = 0) and dL/dM = U (W - sigma W^T) V^T."""
    u, s, vh = torch.linalg.svd(m)
    det = torch.sign(torch.linalg.det(u @ vh))
    d = torch.stack([torch.ones_like(det), torch.ones_like(det), det], -1)
    sigma = d.unsqueeze(-1) * d.unsqueeze(-2)
    denom = s.unsqueeze(-2) + sigma * s.unsqueeze(-1)
    w = (u.mT @ grad_p @ vh.mT) * d.unsqueeze(-2) * denom / (denom * denom + eps ** 2) \
        * (1.0 - torch.eye(3, dtype=m.dtype))
    return u @ (w - sigma * w.mT) @ vh


def _hard_matrices(n, g):
    """Random 3 x 3 matrices of every kind a regressor's tile can give, degenerate ones included."""
    eye = torch.eye(3, dtype=torch.float64)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    scale_shift = eye.repeat(n, 1, 1)
    scale_shift[:, [0, 1], [0, 1]] += 0.5 * r(n, 2)
    scale_shift[:, [0, 1], [2, 2]] = r(n, 2)
    return {
        "random": r(n, 3, 3), "near identity": eye + 0.05 * r(n, 3, 3), "nearer identity": eye + 1e-7 * r(n, 3, 3),
        "rank 2": r(n, 3, 2) @ r(n, 2, 3) + 1e-9 * r(n, 3, 3),
        "reflected": torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)) @ (eye + 0.1 * r(n, 3, 3)),
        "scale and shift": scale_shift, "tiny": 1e-6 * r(n, 3, 3), "large": 1e4 * r(n, 3, 3),
        "exact": torch.stack([eye, 2 * eye, torch.zeros(3, 3, dtype=torch.float64),
                              torch.diag(torch.tensor([1.0, 1e-9, 1e-9], dtype=torch.float64)),
                              torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)), _rotation_z(2.0)]),
    }


def test_projection_and_guarded_gradient_equal_the_svd_formulas():
    """No SVD inside (its convergence check would read the device), the same values: the
    projection to 1e-10 and the guarded gradient to 1e-9 of its size, per matrix.  Where two
    singular values sum to far less than eps (the rank-1 diag(1, 1e-9, 1e-9)), the damped
    gradient's slope 1 / eps^2 makes rounding count: 1e-7 there."""
    g = torch.Generator().manual_seed(7)
    for name, m in _hard_matrices(500, g).items():
        torch.testing.assert_close(so3_projection(m), _svd_projection(m), atol=1e-10, rtol=0, msg=name)
        weights = torch.randn(m.shape, generator=g, dtype=torch.float64)
        for eps in (1e-4, 1e-12):
            x = m.clone().requires_grad_(True)
            (so3_projection(x, eps=eps) * weights).sum().backward()
            expected = _svd_guarded_gradient(m, weights, eps)
            size = expected.abs().amax((-2, -1), keepdim=True)
            tolerance = 1e-7 if name == "exact" else 1e-9
            assert ((x.grad - expected).abs() <= tolerance * size).all(), (name, eps)


def test_projection_is_exact_for_the_zero_and_positive_diagonal_matrices():
    eye = torch.eye(3, dtype=torch.float64)
    for m in (torch.zeros(3, 3, dtype=torch.float64), torch.diag(torch.tensor([2.0, 1e-9, 1e-9], dtype=torch.float64)),
              0.5 * eye):
        assert torch.equal(so3_projection(m), eye)


def _geodesic_grad(m, **kwargs):
    x = m.clone().requires_grad_(True)
    geodesic_distance(x, **kwargs).sum().backward()
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_geodesic_gradients_finite_at_identity_and_degenerate_matrices(dtype):
    eye = torch.eye(3, dtype=dtype)
    cases = {
        "identity": eye.expand(2, 3, 3),
        "near identity": eye + 1e-9 * torch.randn(2, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(4)),
        "rank 2": torch.diag(torch.tensor([1.0, 1.0, 1e-9], dtype=dtype)),
        "rank 1": torch.diag(torch.tensor([1.0, 1e-9, 1e-9], dtype=dtype)),
        "zero": torch.zeros(3, 3, dtype=dtype),
        "reflection": torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=dtype)),
        "rotation by pi": torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=dtype)),
        "uniform scale": 2.0 * eye,
    }
    for name, m in cases.items():
        grad = _geodesic_grad(m)
        assert torch.isfinite(grad).all(), name
    # at the identity the distance is minimal: its gradient vanishes
    assert _geodesic_grad(eye.expand(2, 3, 3)).abs().max() < 1e-6
    # away from degeneracies the guarded gradient is the true one (finite differences)
    m = eye.double() + 0.1 * torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.autograd.gradcheck(lambda x: geodesic_distance(x, svd_eps=1e-12), (m.requires_grad_(True),))


def test_safe_arccos_value_and_gradient():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    y = safe_arccos(x)
    torch.testing.assert_close(y, torch.acos(x.detach()))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[1:4], -1 / torch.sqrt(1 - x.detach()[1:4] ** 2))
    assert abs(float(x.grad[4])) <= 1 / math.sqrt(2e-6 - 1e-12) + 1e-6


def test_euclidean_and_frobenius():
    p = torch.zeros(3, 4, requires_grad=True)
    euclidean_distance(p).sum().backward()
    assert torch.equal(p.grad, torch.zeros(3, 4))  # finite (0) at the zero vector
    v = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    assert float(euclidean_distance(v)) == pytest.approx(5.0)
    m = torch.eye(3) + torch.tensor([[0.0, 0.3, 0.0], [0.0, 0.0, 0.4], [0.0, 0.0, 0.0]])
    assert float(frobenius_distance(m)) == pytest.approx(0.5)
    assert float(frobenius_distance(m, m)) == 0.0


def test_matrix_kind_convention_for_released_outputs():
    assert matrix_kind("released", 4) == "scale_shift"
    assert matrix_kind("released", 2) == "shift"
    assert matrix_kind("affine", 6) == "affine"
    with pytest.raises(ValueError, match="2 or 4"):
        matrix_kind("released", 6)
    with pytest.raises(ValueError, match="8 parameters"):
        matrix_kind("homography", 6)


# Which entries of the row-major 3 x 3 matrix each parameter moves away from the identity (the
# convention of inverseform.warps, written out here).
MATRIX_ENTRIES = {"shift": (2, 5), "scale_shift": (0, 4, 2, 5), "affine": (0, 1, 2, 3, 4, 5),
                  "homography": (0, 1, 2, 3, 4, 5, 6, 7)}


def numpy_geodesic(dev: np.ndarray, kind: str, lam: float = 0.1) -> np.ndarray:
    """The paper's geodesic distance to the identity, from its definition (NOTES.md), per row."""
    out = []
    for row in dev.astype(np.float64):
        m = np.eye(3).reshape(9)
        m[list(MATRIX_ENTRIES[kind])] += row
        m = m.reshape(3, 3)
        u, _, vt = np.linalg.svd(m)
        p = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
        angle = np.arccos(np.clip((np.trace(p) - 1.0) / 2.0, -1.0, 1.0))
        out.append(angle + lam * ((m - p) ** 2).sum())
    return np.array(out)


@pytest.mark.parametrize("parameterisation", ["released", "scale_shift", "affine", "homography", "shift"])
def test_regressor_distance(parameterisation):
    num = 4 if parameterisation == "released" else KIND_NUM_PARAMS[parameterisation]
    kind = matrix_kind(parameterisation, num)
    g = torch.Generator().manual_seed(6)
    params = torch.randn(5, num, generator=g) * 0.3
    std = torch.rand(num, generator=g) + 0.5
    mean = torch.randn(num, generator=g) * 0.05  # de-normalising must add it
    normalised = regressor_distance(params, parameterisation, "normalised", mean, std)
    torch.testing.assert_close(normalised, params.norm(dim=1))
    dev = params * std + mean
    euclid = regressor_distance(params, parameterisation, "euclidean", mean, std)
    if parameterisation == "released":
        torch.testing.assert_close(euclid, params.norm(dim=1))
    else:
        torch.testing.assert_close(euclid, dev.norm(dim=1))
    geo = regressor_distance(params, parameterisation, "geodesic", mean, std)
    np.testing.assert_allclose(geo.numpy(), numpy_geodesic(dev.numpy(), kind), rtol=1e-5, atol=1e-6)
    for distance in ("euclidean", "normalised", "geodesic"):
        # the outputs that mean "identity": 0 for the raw norms, -mean/std once de-normalised
        raw = distance == "normalised" or parameterisation == "released" and distance == "euclidean"
        identity = (torch.zeros(2, num) if raw else (-mean / std).expand(2, num)).clone().requires_grad_(True)
        d = regressor_distance(identity, parameterisation, distance, mean, std)
        assert d.abs().max() < 1e-6
        (grad,) = torch.autograd.grad(d.sum(), identity)
        assert torch.isfinite(grad).all(), distance
    with pytest.raises(ValueError, match="unknown distance"):
        regressor_distance(params, parameterisation, "manhattan")
