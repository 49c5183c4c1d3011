"""Deterministic synthetic weights and inputs for numerical-faithfulness checks.

Built with NumPy only (PCG64), so the same seed gives the same tensors on any
PyTorch version or device: the committed fixture test and
``tools/check_against_reference.py`` fill our model and the reference model
with identical numbers without shipping a checkpoint.

Each tensor gets its own generator seeded from (seed, CRC32 of its key), so a
model without edge heads receives exactly the same trunk/head values as the
same model with them.

Distributions are chosen so that, in eval mode, activations neither explode
through the deep trunks nor vanish, and the sigmoids (edge, HMS attention) are
not saturated: He-normal convolutions, BN scale in [0.5, 1.5) (x 0.25 for the
BN that closes a residual branch), running variance in [1, 2), small biases and
running means.  With these, trunk features have a standard deviation of about
3 (W18) to 10 (W48) and logits of about 3 to 10.
"""
import zlib
from typing import Dict, Mapping, Sequence

import numpy as np
import torch

# Residual blocks add their branch to the shortcut; with eval-mode BN that does
# not renormalise, activations would grow block after block.  Damping the BN
# that closes each residual branch keeps the trunk output O(1).
_RESIDUAL_DAMPING = 0.25


def _generator(seed: int, key: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(key.encode())])))


def _is_residual_closing_bn(key: str) -> bool:
    parts = key.split(".")
    # e.g. backbone.stage3.1.branches.2.0.bn2.weight (BasicBlock) or
    #      backbone.layer1.0.bn3.weight (Bottleneck)
    if len(parts) < 2 or parts[-1] != "weight":
        return False
    name = parts[-2]
    in_basic = name == "bn2" and "branches" in parts
    in_bottleneck = name == "bn3" and "layer1" in parts
    return in_basic or in_bottleneck


def synthetic_tensor(key: str, shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The synthetic value of one state-dict entry, derived from its name and shape."""
    shape = tuple(int(s) for s in shape)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    g = _generator(seed, key)
    if key.endswith("running_var"):
        values = g.uniform(1.0, 2.0, size=shape)
    elif key.endswith("running_mean") or key.endswith("bias"):
        values = 0.1 * g.standard_normal(size=shape)
    elif len(shape) == 1:  # BatchNorm scale
        values = g.uniform(0.5, 1.5, size=shape)
        if _is_residual_closing_bn(key):
            values = values * _RESIDUAL_DAMPING
    else:  # conv / linear weight: He-normal
        fan_in = int(np.prod(shape[1:]))
        values = g.standard_normal(size=shape) * np.sqrt(2.0 / fan_in)
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)


def synthetic_state_dict(template: Mapping[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
    """A state dict with the template's keys, shapes and dtypes, filled deterministically."""
    return {k: synthetic_tensor(k, v.shape, v.dtype, seed) for k, v in template.items()}


def synthetic_images(shape: Sequence[int], seed: int) -> torch.Tensor:
    """A float32 image batch of roughly ImageNet-normalised statistics (N(0, 1))."""
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x1A6E])))
    return torch.from_numpy(g.standard_normal(size=tuple(shape)).astype(np.float32))


def outputs(net, shape=(1, 3, 64, 128)):
    """``net``'s outputs (no grad) for one seeded random batch of ``shape``."""
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return net(images)


def assert_same_outputs(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
