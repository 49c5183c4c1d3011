"""Run under torchrun by tests/test_models_syncbn.py: each rank normalises its half of a batch
with DistributedBatchNorm2d and saves outputs, gradients and running statistics."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from models import DistributedBatchNorm2d  # noqa: E402
from utils import dist  # noqa: E402


def main(out_dir: str) -> None:
    ctx = dist.init_distributed("cpu")
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, 5, 6, generator=g) * 2 + 1
        w = torch.randn(4, 3, 5, 6, generator=g)
        bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn = DistributedBatchNorm2d.convert(bn)
        half = slice(2 * ctx.rank, 2 * ctx.rank + 2)
        xr = x[half].clone().requires_grad_(True)
        out = bn(xr)
        (out * w[half]).sum().backward()
        torch.save({"out": out.detach(), "grad_x": xr.grad, "grad_weight": bn.weight.grad,
                    "grad_bias": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var},
                   os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
