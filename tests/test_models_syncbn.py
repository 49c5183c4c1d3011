"""models.syncbn: two gloo processes normalising halves of a batch equal one BatchNorm over the
whole batch (outputs, input and parameter gradients, running statistics)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from models import DistributedBatchNorm2d, convert_sync_batchnorm, get_net
from utils import dist

SCRIPT = Path(__file__).parent / "scripts" / "syncbn_ranks.py"


def test_two_ranks_equal_one_batchnorm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 6, generator=g) * 2 + 1).requires_grad_(True)
    w = torch.randn(4, 3, 5, 6, generator=g)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    out = bn(x)
    (out * w).sum().backward()

    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["grad_x"], r1["grad_x"]]), x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0["grad_weight"] + r1["grad_weight"], bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0["grad_bias"] + r1["grad_bias"], bn.bias.grad, rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(r0[key], getattr(bn, key), rtol=1e-5, atol=1e-6)
        assert torch.equal(r0[key], r1[key])


def test_single_process_behaves_as_batchnorm():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4)
    synced = DistributedBatchNorm2d.convert(torch.nn.BatchNorm2d(4))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)


def test_conversion_keeps_the_state_dict():
    net = get_net("lighthrnet.HRNet16", has_edge=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    converted = convert_sync_batchnorm(net, "cpu")
    after = converted.state_dict()
    assert list(before) == list(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, DistributedBatchNorm2d) for m in converted.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
