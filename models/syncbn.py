"""Synchronised BatchNorm for any torch.distributed backend (gloo on CPUs included).

PyTorch's ``nn.SyncBatchNorm`` runs on GPUs only, so a CPU job under torchrun/gloo would
otherwise normalise each process's batch on its own and let the running statistics of the
ranks drift apart.  This module computes the batch statistics over every process with
all-reduces, in forward and backward, like ``nn.SyncBatchNorm``; on CUDA prefer the latter
(fused kernels).  It subclasses ``nn.BatchNorm2d``: the state dict is unchanged.
"""
import torch
import torch.distributed as dist
from torch import nn


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.tensor([x.numel() // c], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        dist.all_reduce(stats, group=group)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        x_hat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, total)
        ctx.group, ctx.shape, ctx.dims = group, shape, dims
        out = x_hat * weight.float().view(shape) + bias.float().view(shape)
        return out.to(x.dtype), mean, var, total

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_total):
        x_hat, weight, invstd, total = ctx.saved_tensors
        shape, dims = ctx.shape, ctx.dims
        g = grad_out.float()
        grad_bias = g.sum(dims)
        grad_weight = (g * x_hat).sum(dims)
        sums = torch.cat([grad_bias, grad_weight])
        dist.all_reduce(sums, group=ctx.group)  # gradients of the loss summed over every rank
        c = grad_bias.numel()
        mean_dy, mean_dy_xhat = sums[:c] / total, sums[c:] / total
        grad_x = (g - mean_dy.view(shape) - x_hat * mean_dy_xhat.view(shape)) \
            * (invstd * weight.float()).view(shape)
        return grad_x.to(grad_out.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all processes of ``process_group``."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = (self.training and dist.is_available() and dist.is_initialized()
                  and dist.get_world_size(self.process_group) > 1)
        if not synced:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"DistributedBatchNorm2d expects N x C x H x W input, got {tuple(x.shape)}")
        group = self.process_group or dist.group.WORLD
        out, mean, var, total = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        return out

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every ``nn.BatchNorm2d`` (not its subclasses) in ``module``, keeping its state."""
        if type(module) is nn.BatchNorm2d:
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group=process_group)
            new.load_state_dict(module.state_dict())
            new.to(module.weight.device if module.affine else module.running_mean.device)
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child, process_group))
        return module
