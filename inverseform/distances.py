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
* ``torch.linalg.svd``'s backward divides by s_i^2 - s_j^2, which is 0/0 = NaN when
  singular values repeat - and the identity has all three equal. The projection itself is
  smooth there, so :func:`so3_projection` uses its own backward, derived for
  P = U D V^T directly: the only denominators are s_i + s_j (pairs with the same sign in
  D) and s_j - s_i (pairs of opposite sign, where the projection is genuinely not
  differentiable). Each 1/x is replaced by x / (x^2 + eps^2), which is 1/x to relative
  error eps^2/x^2 and bounded by 1/(2 eps) near x = 0 (rank-deficient matrices, or a
  reflection with repeated singular values).
* The SVD runs in float64 (float32 on MPS, which has none).
"""
from __future__ import annotations

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


def _det3(m: torch.Tensor) -> torch.Tensor:
    """Determinant of ... x 3 x 3 matrices by cofactors (no LU, no host sync)."""
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


class _SO3Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, eps):
        u, s, vh = torch.linalg.svd(m)
        # det(U V^T) = det(U) det(V); flip the axis of the smallest singular value if < 0.
        det_sign = torch.where(_det3(u) * _det3(vh) < 0, -1.0, 1.0).to(m.dtype)
        d = torch.cat([torch.ones_like(s[..., :2]), det_sign.unsqueeze(-1)], dim=-1)
        p = u @ (d.unsqueeze(-1) * vh)
        ctx.save_for_backward(u, s, vh, d)
        ctx.eps = eps
        return p

    @staticmethod
    def backward(ctx, grad_p):
        # With U^T dM V = K, dP = U X V^T where, for i != j and sigma = d_i d_j,
        #   X_ij = d_j (K_ij - sigma K_ji) / (s_j + sigma s_i),  X_ii = 0.
        # Pulling back <G, dP>: W_ij = (U^T G V)_ij d_j / (s_j + sigma s_i),
        #   dL/dK = W - sigma * W^T,  dL/dM = U (dL/dK) V^T.
        u, s, vh, d = ctx.saved_tensors
        g_hat = u.mT @ grad_p @ vh.mT
        sigma = d.unsqueeze(-1) * d.unsqueeze(-2)
        denom = s.unsqueeze(-2) + sigma * s.unsqueeze(-1)
        inv = denom / (denom * denom + ctx.eps ** 2)
        off_diagonal = 1.0 - torch.eye(3, dtype=s.dtype, device=s.device)
        w = g_hat * d.unsqueeze(-2) * inv * off_diagonal
        dk = w - sigma * w.mT
        return u @ dk @ vh, None


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
