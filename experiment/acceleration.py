"""Precision, memory layout and compilation of the models, chosen per device.

* channels_last on CUDA: cuDNN's convolutions (and bf16 tensor cores) run NHWC natively;
  with NCHW every convolution pays layout transposes.  The CPU keeps NCHW: channels_last trains
  faster there, but its BatchNorm computes the batch statistics far less accurately, the
  gradients of a training step are several times further from float64, and the main job's
  runs ended lower with it (benchmarks/bench_layout.py, docs/benchmarks.md).
* ``compile`` (``train.compile`` / ``val.compile``, ``--compile``): ``torch.compile`` of the
  model; for evaluation the fixed-size batches are padded to the loader's batch size, so the
  last, shorter batch does not trigger a recompile.  Checkpoints are always written from the
  plain module (``unwrap``), never with ``_orig_mod.`` keys.
* one precision for every evaluation (:func:`evaluation_amp`): validation during training (which
  chooses ``best.pth``), ``experiment.validation``, ``experiment.infer`` and the NUS validation
  all autocast by ``val.amp``, never by ``train.amp``; ``auto`` is fp32 (TF32 convolutions) on
  CUDA except for the archs where bf16 was measured at least as fast (``EVAL_BF16_AUTO``), off on
  the CPU.  Training keeps ``train.amp`` (auto: bf16 on CUDA).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from experiment.config import normalise_compile_mode
from experiment.runtime import resolve_amp

log = logging.getLogger("experiment")


# Eval forward on one H100 (1024 x 2048, batch 1, eager): bf16 autocast was slower than
# fp32 (TF32 convolutions) for every arch measured - HRNet-18 29.5 vs 21.1 ms, OCRNet-48 68.8 vs
# 48.2 ms - so `val.amp=auto` evaluates in fp32 on CUDA unless an arch is listed here.  Re-measure
# with `python benchmarks/bench_validation.py --device cuda --amp both` and list the archs
# where bf16 (with channels_last) wins.
EVAL_BF16_AUTO: Dict[str, bool] = {}


def compile_mode(value) -> str:
    """Normalise a ``compile`` setting (YAML turns a bare `on`/`off` into a boolean)."""
    return normalise_compile_mode(value, "compile")


def use_channels_last(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if use_channels_last(device) else torch.contiguous_format


def place_model(net: torch.nn.Module, device: torch.device, channels_last: Optional[bool] = None) -> torch.nn.Module:
    """Move ``net`` to ``device``, in channels_last on CUDA (``channels_last``: force either way).
    Returns ``net`` (changed in place)."""
    net.to(device)
    if use_channels_last(device) if channels_last is None else channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def to_device_images(images: torch.Tensor, device: torch.device, channels_last: Optional[bool] = None) -> torch.Tensor:
    """A batch of N x C x H x W images on ``device`` in the layout the model expects there."""
    fmt = memory_format(device) if channels_last is None else \
        (torch.channels_last if channels_last else torch.contiguous_format)
    return images.to(device, non_blocking=True).contiguous(memory_format=fmt)


def compile_model(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``torch.compile(module)`` for ``mode`` (see COMPILE_MODES; 'on' is inductor's default
    mode, 'eager'/'aot_eager' are debugging backends); ``module`` itself when 'off'.  Shapes
    stay static (``dynamic=False``): the eval size is fixed and each training crop size
    compiles once."""
    mode = compile_mode(mode)
    if mode == "off":
        return module
    if mode in ("eager", "aot_eager"):
        return torch.compile(module, backend=mode, dynamic=False)
    return torch.compile(module, mode=None if mode in ("on", "default") else mode, dynamic=False)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def is_compiled(module: torch.nn.Module) -> bool:
    return hasattr(module, "_orig_mod")


def plain_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict without ``_orig_mod.`` (compile) or ``module.`` (DDP) prefixes."""
    return unwrap(module).state_dict()


def resolve_eval_amp(mode: str, device: torch.device, arch: str) -> Optional[torch.dtype]:
    """Evaluation autocast: as ``resolve_amp`` except that ``auto`` on CUDA gives bf16 only for
    the archs where it was measured to be at least as fast as fp32 (``EVAL_BF16_AUTO``)."""
    if mode == "auto" and torch.device(device).type == "cuda":
        return torch.bfloat16 if EVAL_BF16_AUTO.get(arch, False) else None
    return resolve_amp(mode, torch.device(device))


def evaluation_amp(cfg, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None: fp32) of every evaluation of ``cfg``'s model on ``device``:
    ``val.amp`` for ``model.arch`` (:func:`resolve_eval_amp`)."""
    return resolve_eval_amp(cfg.val.amp, torch.device(device), cfg.model.arch)


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last image until the batch holds ``size`` (a compiled model then sees one
    shape for the whole evaluation); the caller keeps the first ``len(images)`` outputs."""
    missing = size - images.shape[0]
    if missing <= 0:
        return images
    padded = torch.cat([images, images[-1:].expand(missing, *images.shape[1:])])
    return padded.contiguous(memory_format=memory_format(images.device))
