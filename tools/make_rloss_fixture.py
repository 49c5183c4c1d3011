"""Write tests/fixtures/rloss_reference.npz: outputs of the reference's C++ filter (meng-tang/rloss).

    python tools/make_rloss_fixture.py /path/to/rloss/pytorch/wrapper/bilateralfilter   # its built module

The "odd" case (13 x 15 pixels, not a multiple of four) has a dark top-left corner, near feature 0,
where the reference's SSE build inserts the vertices of its padding points.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rloss_ref"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bilateralfilter as bf
from tools.check_rloss_against_reference import reference_loss_and_grad
out = {}
g = torch.Generator().manual_seed(12)
for name, (n, k, h, w, srgb, sxy) in {"even": (2, 3, 16, 20, 15.0, 10.0), "odd": (2, 3, 13, 15, 8.0, 2.0)}.items():
    base = torch.rand(n, 3, 4, 5, generator=g) * 255
    image = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    image = (image + 10 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).round()
    if name == "odd":
        image[:, :, :4, :4] = torch.randint(0, 6, (n, 3, 4, 4), generator=g).float()
    values = torch.softmax(torch.randn(n, k, h, w, generator=g) * 2, 1)
    filtered = np.zeros(n * k * h * w, np.float32)
    bf.bilateralfilter_batch(image.numpy().ravel(), values.numpy().ravel(), filtered, n, k, h, w, srgb, sxy)
    out[f"{name}_image"] = image.numpy(); out[f"{name}_values"] = values.numpy()
    out[f"{name}_filtered"] = filtered.reshape(n, k, h, w); out[f"{name}_sigmas"] = np.array([srgb, sxy], np.float32)
# one loss case with scale 0.5 and a padded roi
n, k, h, w = 2, 4, 24, 32
base = torch.rand(n, 3, 4, 4, generator=g) * 255
image = (F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False) + 8 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).round()
seg = torch.softmax(torch.randn(n, k, h, w, generator=g) * 2, 1)
roi = torch.ones(n, h, w); roi[0, :, 26:] = 0; roi[1, 20:] = 0
loss, loss64, grad = reference_loss_and_grad(bf, image, seg, roi, 1e-3, 15.0, 40.0, 0.5)
out.update(loss_image=image.numpy(), loss_seg=seg.numpy(), loss_roi=roi.numpy(), loss_value=np.float64(loss),
           loss_value64=np.float64(loss64), loss_grad=grad.numpy(), loss_params=np.array([1e-3, 15.0, 40.0, 0.5]))
np.savez_compressed(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                                 "rloss_reference.npz"), **out)
print({k: v.shape for k, v in out.items()})
