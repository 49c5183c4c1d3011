"""Compare rloss.DenseCRFLoss with the reference's C++ filter (meng-tang/rloss), loss and gradient.

Build the reference beside the project (never a dependency of it), e.g.::

    git clone https://github.com/meng-tang/rloss /tmp/rloss && cd /tmp/rloss/pytorch/wrapper/bilateralfilter
    swig -python -c++ bilateralfilter.i && python setup.py build_ext --inplace   # needs swig, g++, numpy

then ``python tools/check_rloss_against_reference.py --reference-build /tmp/rloss/pytorch/wrapper/bilateralfilter``.
(On Python >= 3.12, where distutils is gone, replace its ``from distutils.core import`` by
``from setuptools import``.)  The reference's loss is evaluated as its DenseCRFLoss.py defines
it: nearest/bilinear downscaling, seg * roi, ``bilateralfilter_batch``, -(1/N) <S~, AS>, and
the gradient -2 AS / N * roi pulled back through the bilinear downscaling.
Prints the relative differences per case (the loss against the reference's float32 dot
product and against the same dot product in float64 on the reference's filtered values) and exits non-zero above the tolerances
(1e-5; 1e-3 at small bandwidths).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rloss import DenseCRFLoss  # noqa: E402


def reference_loss_and_grad(bf, image, seg, roi, weight, sigma_rgb, sigma_xy, scale):
    """Loss and d loss / d seg as the reference computes them (its filter, its formulas)."""
    seg = seg.detach().clone().requires_grad_(True)
    img_s = F.interpolate(image, scale_factor=scale)
    seg_s = F.interpolate(seg, scale_factor=scale, mode="bilinear", align_corners=False)
    roi_s = F.interpolate(roi[:, None], scale_factor=scale)[:, 0]
    n, k, h, w = seg_s.shape
    masked = (seg_s.detach() * roi_s[:, None]).numpy().astype(np.float32).ravel()
    filtered = np.zeros(masked.shape, dtype=np.float32)
    bf.bilateralfilter_batch(img_s.numpy().astype(np.float32).ravel(), masked, filtered, n, k, h, w,
                             float(sigma_rgb), float(sigma_xy * scale))
    loss = -float(np.dot(masked, filtered)) / n              # float32 dot, as the reference
    loss64 = -float(np.dot(masked.astype(np.float64), filtered.astype(np.float64))) / n
    grad_s = -2.0 * torch.from_numpy(filtered.reshape(n, k, h, w)) / n * roi_s[:, None] * weight
    seg_s.backward(grad_s)
    return weight * loss, weight * loss64, seg.grad


def make_inputs(n, k, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    # piecewise-smooth colours with noise, like a natural image at this scale
    base = torch.rand(n, 3, max(2, h // 16), max(2, w // 16), generator=g) * 255
    image = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    image = (image + 12 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).round()
    seg = torch.softmax(F.interpolate(torch.randn(n, k, h // 8, w // 8, generator=g) * 3, size=(h, w),
                                      mode="bilinear", align_corners=False), 1)
    roi = torch.ones(n, h, w)
    roi[0, :, w - w // 5:] = 0        # padded right border
    roi[-1, h - h // 4:, :] = 0       # padded bottom border
    return image, seg, roi


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-build", required=True, help="directory holding the built bilateralfilter module")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.reference_build))
    try:
        import bilateralfilter as bf
    except ImportError as exc:
        raise SystemExit(f"cannot import the reference's bilateralfilter from {args.reference_build}: {exc}")
    torch.set_grad_enabled(True)
    worst_ok = True
    cases = []
    for (h, w) in ((64, 64), (96, 128)):
        for scale in (1.0, 0.5):
            cases.append((h, w, scale, 15.0, 100.0, 1e-5))
            cases.append((h, w, scale, 15.0, 80.0, 1e-5))
            cases.append((h, w, scale, 5.0, 10.0, 1e-3))
    print(f"{'size':>9} {'scale':>5} {'s_rgb':>5} {'s_xy':>5} {'loss rel diff':>14} {'(f64 dot)':>10} "
          f"{'grad max rel diff':>18}  tol")
    for i, (h, w, scale, s_rgb, s_xy, tol) in enumerate(cases):
        image, seg, roi = make_inputs(2, 21, h, w, seed=i)
        ref_loss, ref_loss64, ref_grad = reference_loss_and_grad(bf, image, seg, roi, 2e-9, s_rgb, s_xy, scale)
        seg_ours = seg.clone().requires_grad_(True)
        loss = DenseCRFLoss(2e-9, s_rgb, s_xy, scale)(image, seg_ours, roi)
        loss.backward()
        loss_rel = abs(loss.item() - ref_loss) / abs(ref_loss)
        loss64_rel = abs(loss.item() - ref_loss64) / abs(ref_loss64)
        grad_rel = ((seg_ours.grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        ok = loss_rel <= tol and grad_rel <= tol
        worst_ok &= ok
        print(f"{h:>4}x{w:<4} {scale:>5} {s_rgb:>5} {s_xy:>5} {loss_rel:>14.2e} {loss64_rel:>10.2e} {grad_rel:>18.2e}  {tol:g}"
              f"{'' if ok else '  FAIL'}")
    sys.exit(0 if worst_ok else 1)


if __name__ == "__main__":
    main()
