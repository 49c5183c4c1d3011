"""Distances between a predicted transform and the identity (or a given transform).

* Euclidean, as released: the L2 norm of the regressor's (normalised) output vector.
* Euclidean for matrix parameterisations: ||theta_hat - theta||_F, theta = I at inference.
* Geodesic (paper, eq. for SO(3)): arccos[(Tr(P) - 1) / 2] + lambda * Tr(R^T R), where P is
  the projection of theta^-1 theta_hat onto SO(3) and R = theta^-1 theta_hat - P.

The geodesic form is guarded because its textbook derivatives blow up exactly where a
good prediction lives:

* arccos'(1) is infinite and the identity gives (Tr(P) - 1) / 2 = 1. :func:`safe_arccos`
  returns the exact value but evaluates the derivative at the argument clamped to
  [-1 + eps, 1 - eps], so it is bounded (by 1/sqrt(2 eps)).
* An SVD's backward divides by s_i^2 - s_j^2, which is 0/0 = NaN when singular values
  repeat - and the identity has all three equal. The projection itself is smooth there, so
  :func:`so3_projection` uses its own backward, derived for P directly (P^T M symmetric):
  the only denominators are s_i + s_j (pairs with the same sign in P = U diag(1, 1, +-1) V^T)
  and s_j - s_i (pairs of opposite sign, where the projection is genuinely not
  differentiable), the eigenvalues of Tr(P^T M) I - P^T M. Each 1/x is replaced by
  x / (x^2 + eps^2), which is 1/x to relative error eps^2/x^2 and bounded by 1/(2 eps) near
  x = 0 (rank-deficient matrices, or a reflection with repeated singular values).
* The projection itself is computed without an SVD (whose convergence check reads a value
  back on the host, a synchronisation per call on a GPU): Horn's quaternion method, the top
  eigenvector of a 4 x 4 symmetric matrix by a fixed number of squarings. It equals the SVD's
  U diag(1, 1, det(U V^T)) V^T to ~1e-12 (tests/test_inverseform_distances.py) and is exact
  for diagonal matrices with a unique projection (the zero matrix included). Everything runs
  in float64 (float32 on MPS, which has none; there the damped gradient of a nearly rank-1
  matrix keeps few digits). A given ``theta`` is inverted with ``torch.linalg.solve``, which
  checks for singularity on the host; the loss never passes one.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .warps import KIND_NUM_PARAMS, params_to_matrix

__all__ = [
    "DISTANCES",
    "PARAMETERISATIONS",
    "matrix_kind",
    "euclidean_distance",
    "frobenius_distance",
    "safe_arccos",
    "so3_projection",
    "geodesic_distance",
    "regressor_distance",
]

DISTANCES = ("euclidean", "normalised", "geodesic")
PARAMETERISATIONS = ("released",) + tuple(KIND_NUM_PARAMS)


def matrix_kind(parameterisation: str, num_params: int) -> str:
    """The warps kind used to build a 3x3 matrix from a regressor's parameters.

    'released' has no published matrix convention. We ASSUME its outputs are deviations
    from identity ordered (sx, sy, tx, ty) for 4 outputs, i.e. the ``scale_shift`` kind
    (the maintainers describe them as normalised shifts and scales; the order and the
    unknown normalisation are our assumption), and (tx, ty), the ``shift`` kind, for the
    2-output 112 net.
    """
    if parameterisation == "released":
        if num_params == 4:
            return "scale_shift"
        if num_params == 2:
            return "shift"
        raise ValueError(f"the 'released' parameterisation has 2 or 4 outputs, got {num_params}")
    if parameterisation not in KIND_NUM_PARAMS:
        raise ValueError(
            f"unknown parameterisation {parameterisation!r}; expected one of {PARAMETERISATIONS}")
    if KIND_NUM_PARAMS[parameterisation] != num_params:
        raise ValueError(
            f"parameterisation {parameterisation!r} has {KIND_NUM_PARAMS[parameterisation]} "
            f"parameters, got {num_params}")
    return parameterisation


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def euclidean_distance(params: torch.Tensor) -> torch.Tensor:
    """L2 norm over the last dimension; its gradient at the zero vector is 0, not NaN."""
    return torch.linalg.vector_norm(params, dim=-1)


def frobenius_distance(theta_hat: torch.Tensor, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """||theta_hat - theta||_F over the last two dimensions; theta defaults to I."""
    if theta is None:
        theta = torch.eye(theta_hat.shape[-1], dtype=theta_hat.dtype, device=theta_hat.device)
    return torch.linalg.matrix_norm(theta_hat - theta, ord="fro")


class _SafeArccos(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        ctx.save_for_backward(x)
        ctx.eps = eps
        return torch.acos(x.clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xc = x.clamp(-1.0 + ctx.eps, 1.0 - ctx.eps)
        return -grad * torch.rsqrt(1.0 - xc * xc), None


def safe_arccos(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """arccos(clamp(x, -1, 1)) whose derivative is taken at clamp(x, -1+eps, 1-eps)."""
    return _SafeArccos.apply(x, eps)


# Rotations as unit quaternions q = (w, x, y, z): R(q)_ij = q^T B_ij q for symmetric 4 x 4 B_ij,
# given below, row-major in ij, as the coefficients of q_a q_b in R(q)_ij.  Both R(q) and Horn's
# matrix K(M) = sum_ij M_ij B_ij, with q^T K q = Tr(R(q)^T M), are one product with their table.
_ROTATION_TERMS = (
    {(0, 0): 1, (1, 1): 1, (2, 2): -1, (3, 3): -1}, {(1, 2): 2, (0, 3): -2}, {(1, 3): 2, (0, 2): 2},
    {(1, 2): 2, (0, 3): 2}, {(0, 0): 1, (1, 1): -1, (2, 2): 1, (3, 3): -1}, {(2, 3): 2, (0, 1): -2},
    {(1, 3): 2, (0, 2): -2}, {(2, 3): 2, (0, 1): 2}, {(0, 0): 1, (1, 1): -1, (2, 2): -1, (3, 3): 1},
)
# Squarings of the shifted K: the other eigenvectors fade as (1 - g)^(2^48) for a relative
# eigengap g, converged for g > 1e-13, where an SVD's own error (~1e-16 / g) is already 1e-3.
_SQUARINGS = 48


@functools.lru_cache(maxsize=None)
def _rotation_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """9 x 16: row 3 i + j holds B_ij flattened; one per dtype and device (copied there once:
    a copy of host data to a GPU waits for it)."""
    with torch.inference_mode(False):  # a normal tensor even when first made under inference mode
        table = torch.zeros(9, 4, 4, dtype=torch.float64)
        for row, terms in enumerate(_ROTATION_TERMS):
            for (a, b), coefficient in terms.items():  # coefficient of q_a q_b, split over both halves
                table[row, a, b] += coefficient / 2
                table[row, b, a] += coefficient / 2
        return table.reshape(9, 16).to(dtype=dtype, device=device)


def _top_eigenvector(k: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue l1 of symmetric ... x 4 x 4 ``k``, given a
    ``shift`` with |l + shift| < l1 + shift for its other eigenvalues l: repeated squaring of
    k + shift I (a fixed count: no data-dependent branch), renormalised every 4 squarings (no
    under- or overflow), then its column with the largest diagonal entry."""
    a = k + shift[..., None, None] * torch.eye(4, dtype=k.dtype, device=k.device)
    tiny = torch.finfo(k.dtype).tiny
    for step in range(_SQUARINGS):
        if step % 4 == 0:
            a = a / a.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny)[..., None, None]
        a = a @ a
    column = a.diagonal(dim1=-2, dim2=-1).argmax(-1)
    q = a.gather(-1, column[..., None, None].expand(*a.shape[:-1], 1)).squeeze(-1)
    return q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)


def _nearest_rotation(m: torch.Tensor) -> torch.Tensor:
    """argmax over SO(3) of Tr(R^T M) = U diag(1, 1, det(U V^T)) V^T, by Horn's quaternion method:
    R(q) for q the top eigenvector of K(M), whose eigenvalues are +-s1 +-s2 +-s3 (s the singular
    values, signed by det M) so that s1 + s2 + s3 wins by 2 (s2 + s3): unique wherever the
    projection is.  Device-side arithmetic only (an SVD checks its convergence on the host)."""
    table = _rotation_table(m.dtype, m.device)
    k = (m.flatten(-2) @ table).unflatten(-1, (4, 4))
    # l1 dominates when shift > -(l1 + l4) / 2 = -s3 sign(det M), l4 = -s1 - s2 + s3 sign(det M) the
    # smallest eigenvalue: ||M||_F >= s3 (the clamp keeps the zero matrix's K + shift I = shift I)
    shift = torch.linalg.matrix_norm(m).clamp_min(torch.finfo(m.dtype).tiny)
    q = _top_eigenvector(k, shift)
    return ((q.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2) @ table.mT).unflatten(-1, (3, 3))


def _axial(x: torch.Tensor) -> torch.Tensor:
    """(X_21 - X_12, X_02 - X_20, X_10 - X_01): <X, [w]_x> = w . axial(X)."""
    return torch.stack([x[..., 2, 1] - x[..., 1, 2], x[..., 0, 2] - x[..., 2, 0], x[..., 1, 0] - x[..., 0, 1]], -1)


def _cross_matrix(w: torch.Tensor) -> torch.Tensor:
    """[w]_x, the skew matrix with [w]_x v = w x v."""
    zero = torch.zeros_like(w[..., 0])
    return torch.stack([torch.stack([zero, -w[..., 2], w[..., 1]], -1),
                        torch.stack([w[..., 2], zero, -w[..., 0]], -1),
                        torch.stack([-w[..., 1], w[..., 0], zero], -1)], -2)


def _damped_solve(a: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """f(A) v for symmetric positive semi-definite ... x 3 x 3 ``a``, f(x) = x / (x^2 + eps^2) on
    its eigenvalues: the real part of (A - i eps I)^-1 v, from the adjugate and the determinant of
    A - t I at t = i eps (adj = adj A + t (A - Tr A I) + t^2 I, det = det A - t c2 + t^2 Tr A - t^3,
    c2 = Tr adj A).  Closed form (no pivot checked on the host), and better conditioned than a
    solve with A^2 + eps^2 I.  Computed for A / Tr A (and eps / Tr A): no under- or overflow."""
    scale = a.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(eps)[..., None, None]
    a, eps = a / scale, eps / scale[..., 0]
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    adj = torch.stack([torch.linalg.cross(a[..., 1, :], a[..., 2, :]), torch.linalg.cross(a[..., 2, :], a[..., 0, :]),
                       torch.linalg.cross(a[..., 0, :], a[..., 1, :])], -1)   # columns: cofactors of the rows
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    det = (a[..., 0, :] * adj[..., :, 0]).sum(-1, keepdim=True)
    c2 = adj.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    column = v.unsqueeze(-1)
    real = ((adj - eps[..., None] ** 2 * eye) @ column).squeeze(-1)         # adj(A - i eps I) v = real + i imag
    imag = eps * ((a - trace[..., None] * eye) @ column).squeeze(-1)
    det_re, det_im = det - eps ** 2 * trace, eps * (eps ** 2 - c2)
    return (real * det_re + imag * det_im) / ((det_re ** 2 + det_im ** 2) * scale[..., 0])


class _SO3Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, eps):
        p = _nearest_rotation(m)
        ctx.save_for_backward(m, p)
        ctx.eps = eps
        return p

    @staticmethod
    def backward(ctx, grad_p):
        # P^T M = H is symmetric at the optimum.  With dP = P [w]_x, differentiating H = H^T gives
        # H [w]_x + [w]_x H = [A w]_x = [axial(P^T dM)]_x, A = Tr(H) I - H, whose eigenvalues are
        # the sums of pairs of the signed singular values (s_i + s_j, or s_i - s_3 when P reflects
        # the smallest axis).  Pulling back <G, dP> = w . axial(P^T G): dL/dM = P [A^-1 axial(P^T G)]_x,
        # with A^-1 replaced by f(A), f(x) = x / (x^2 + eps^2) (A is positive semi-definite).
        m, p = ctx.saved_tensors
        h = p.mT @ m
        h = (h + h.mT) / 2
        eye = torch.eye(3, dtype=m.dtype, device=m.device)
        a = h.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * eye - h
        w = _damped_solve(a, _axial(p.mT @ grad_p), ctx.eps)
        return p @ _cross_matrix(w), None


def so3_projection(m: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Nearest rotation U diag(1, 1, det(U V^T)) V^T to ... x 3 x 3 matrices, safe backward."""
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"so3_projection needs ... x 3 x 3 matrices, got {tuple(m.shape)}")
    dtype = m.dtype
    p = _SO3Projection.apply(m.to(_compute_dtype(m.device)), eps)
    return p.to(dtype)


def geodesic_distance(theta_hat: torch.Tensor, theta: Optional[torch.Tensor] = None,
                      lam: float = 0.1, eps: float = 1e-6, svd_eps: float = 1e-4) -> torch.Tensor:
    """arccos[(Tr(P) - 1)/2] + lam * Tr(R^T R) for ... x 3 x 3 ``theta_hat``.

    M = theta^-1 theta_hat (theta = I when None, as at inference), P = so3_projection(M),
    R = M - P. It is 0 at the identity and positive elsewhere; gradients stay finite at the
    identity and for singular or reflected matrices (see the module docstring): ``eps``
    guards the arccos, ``svd_eps`` the projection's backward.
    Computed in float64, returned in ``theta_hat``'s dtype.
    """
    if theta_hat.shape[-2:] != (3, 3):
        raise ValueError(f"geodesic_distance needs ... x 3 x 3 matrices, got {tuple(theta_hat.shape)}")
    dtype = theta_hat.dtype
    work = _compute_dtype(theta_hat.device)
    m = theta_hat.to(work)
    if theta is not None:
        m = torch.linalg.solve(theta.to(work), m)
    p = _SO3Projection.apply(m, svd_eps)
    trace = p.diagonal(dim1=-2, dim2=-1).sum(-1)
    angle = safe_arccos((trace - 1.0) / 2.0, eps)
    r = m - p
    return (angle + lam * (r * r).sum((-2, -1))).to(dtype)


def regressor_distance(params: torch.Tensor, parameterisation: str, distance: str = "euclidean",
                       mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None,
                       geodesic_lambda: float = 0.1) -> torch.Tensor:
    """Per-row distance to the identity of a regressor's N x P (normalised) outputs.

    * ``euclidean``: as released for 'released' (norm of the raw output); for the matrix
      parameterisations ||theta_hat - I||_F with theta_hat built from the de-normalised
      parameters (``params * std + mean``).
    * ``normalised``: the norm of the raw (normalised) output for every parameterisation,
      the quantity a regressor trained with ||theta_hat - theta|| on normalised targets
      weighs evenly.
    * ``geodesic``: :func:`geodesic_distance` of the de-normalised matrix.
    For 'released' no normalisation statistics are published: mean/std default to 0/1 and
    the matrix convention is the assumption documented in :func:`matrix_kind`.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")
    if params.dim() != 2:
        raise ValueError(f"params must be N x P, got shape {tuple(params.shape)}")
    kind = matrix_kind(parameterisation, params.shape[1])
    if distance == "normalised" or (distance == "euclidean" and parameterisation == "released"):
        return euclidean_distance(params)
    dev = params
    if std is not None:
        dev = dev * std.to(params)
    if mean is not None:
        dev = dev + mean.to(params)
    matrices = params_to_matrix(dev, kind)
    if distance == "euclidean":
        return frobenius_distance(matrices)
    return geodesic_distance(matrices, lam=geodesic_lambda)
