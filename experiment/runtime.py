"""Process-level pieces every run uses: autocast choice, seeding, CPU threads and the CPU's
allocator, rank-0 TensorBoard, and running a step on rank 0 first with its error shared by every
rank."""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
from typing import Any, Callable, Optional

import numpy as np
import torch

from experiment.errors import UserError, is_user_error, one_line
from utils import dist
from utils.config import ConfigError


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto': bf16 on CUDA, off on CPU; 'off'; 'fp16'; 'bf16'.  Returns the autocast dtype or None."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mode in ("off", "false", "none"):
        return None
    if mode in ("bf16", "on", "true"):
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    raise ConfigError(f"amp must be one of auto, off, fp16, bf16; got {mode!r}")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def set_threads_for_cpu(world_size: int) -> None:
    """Share the machine's cores between local CPU processes (torchrun sets OMP_NUM_THREADS=1
    only when it is unset, and a single process keeps torch's default)."""
    if "OMP_NUM_THREADS" in os.environ or world_size <= 1:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HEAP_BLOCKS_UP_TO = 32 << 20    # glibc's largest mmap threshold on 64-bit systems
KEEP_FREED_AT_TOP = 1 << 30
TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MB from its heap and keep up to 1 GB of freed
    memory instead of returning it to the kernel.  By default a training step's large tensors
    are mapped and unmapped again, so every step faults in fresh pages that the kernel zeroes:
    7-13 % of a single-thread training step of the synthetic demos, up to a fifth with three
    processes sharing two cores (benchmarks/bench_allocator.py, docs/benchmarks.md).  Only where
    memory is placed changes, never a value.  The process keeps its peak heap; forked loader
    workers inherit the setting.  Returns whether every setting was applied (False without
    glibc, e.g. on macOS or musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO), (M_TRIM_THRESHOLD, KEEP_FREED_AT_TOP), (M_TOP_PAD, TOP_PAD))
    return all([mallopt(param, value) == 1 for param, value in settings])  # a list: every one is tried


class Rank0Writer:
    """TensorBoard on rank 0, silent elsewhere; also a no-op after ``close``.  ``purge_step``: a
    resumed run hides the events an interrupted run wrote at or after that step."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: Optional[int] = None):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        writer = self.__dict__.get("_writer")
        if writer is None:
            return lambda *args, **kwargs: None
        return getattr(writer, name)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def on_main_first(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only (e.g. make a dataset), then share its result or its error
    with every rank, so that all of them fail together instead of waiting forever."""
    result, error, caught = None, None, None
    if dist.is_main_process():
        try:
            result = fn()
        except Exception as exc:
            if not is_user_error(exc):
                raise
            caught = exc
            error = one_line(exc)
    result, error = dist.broadcast_object((result, error))
    if caught is not None:  # rank 0 reports its own error as it is
        raise caught
    if error is not None:
        raise UserError(f"on rank 0: {error}")
    return result


def human_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
