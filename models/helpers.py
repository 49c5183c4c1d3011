"""Model-size helpers: parameter count, FLOPs, SyncBatchNorm conversion."""
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def count_flops(net: nn.Module, input_size: Sequence[int] = (1, 3, 1024, 2048)) -> int:
    """FLOPs of one evaluation-mode forward pass on a zero input of ``input_size``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: convolutions and
    matrix products, one multiply-add = 2 FLOPs; element-wise ops, norms and
    interpolations are not counted.  For HMS this is the full multi-scale
    evaluation over ``net.scales``.  The module's train/eval mode is restored.
    """
    if len(input_size) != 4:
        raise ValueError(f"input_size must be (N, C, H, W), got {tuple(input_size)}")
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = net.training
    net.eval()
    try:
        x = torch.zeros(tuple(input_size), device=device, dtype=dtype)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(x)
    finally:
        net.train(was_training)
    return counter.get_total_flops()


def convert_sync_batchnorm(net: nn.Module, device_type: str = "cuda") -> nn.Module:
    """Replace every BatchNorm by a synchronised one for multi-process training (the
    reference trained with synchronised BN): PyTorch's SyncBatchNorm on GPUs, our
    backend-agnostic :class:`~models.syncbn.DistributedBatchNorm2d` elsewhere (PyTorch's
    runs on GPUs only).  State-dict keys are unchanged."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    from .syncbn import DistributedBatchNorm2d

    return DistributedBatchNorm2d.convert(net)
