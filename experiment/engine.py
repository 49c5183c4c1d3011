"""Training plumbing shared by train.py and train_inverseform.py: the learning-rate schedule,
RNG state capture, checkpoints written atomically and read back safely, and the batch
stream that resumes exactly where a run stopped."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch

from experiment.common import StopRequested, UserError  # noqa: F401  (StopRequested: re-exported)
from utils import dist
from utils.io import atomic_torch_save, atomic_write_text

log = logging.getLogger("experiment")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite: training stops before the weights are touched."""


class NonFiniteWeightsError(UserError, RuntimeError):
    """Weights (or a checkpoint's tensors) hold NaN or Inf: never saved, never evaluated."""


def checkpoint_status(path: str) -> str:
    """What is on disk at ``path``, for messages that must be true ("... is intact")."""
    if not os.path.isfile(path):
        return f"no checkpoint was written yet ({path} does not exist)"
    return f"the last checkpoint {path} is intact"


def check_finite(losses: Mapping[str, torch.Tensor], iteration: int, epoch: int, checkpoint_path: str,
                 stop_requested: bool = False) -> bool:
    """Raise NonFiniteLossError, on every rank at once, if any loss component of any rank is
    NaN or infinite.  One small all-reduce and one host sync per iteration: the price of never
    letting a NaN reach the weights (the optimizer step comes after this check).  The same
    all-reduce carries ``stop_requested`` (e.g. a SIGTERM on this rank): returns True on every
    rank when any rank asked to stop, so that all of them stop at the same iteration."""
    names = list(losses)
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    flags = torch.stack([torch.isfinite(values).all().float(),
                         torch.tensor(-1.0 if stop_requested else 0.0, device=values.device)])
    dist.all_reduce(flags, op="min")
    finite, stop = flags.tolist()
    if finite >= 1:
        return stop < 0
    bad = {n: v for n, v in zip(names, values.tolist()) if not math.isfinite(v)}
    where = ", ".join(f"{n} = {v}" for n, v in bad.items()) if bad else "on another rank"
    raise NonFiniteLossError(f"non-finite loss at iteration {iteration} (epoch {epoch}): {where}; "
                             f"training stopped before the optimizer step, {checkpoint_status(checkpoint_path)}")


def first_non_finite(tensors: Mapping[str, Any]) -> Optional[str]:
    """Name of the first floating-point tensor of ``tensors`` holding NaN or Inf (None if all
    are finite); one reduction per tensor, one host sync in all."""
    names = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return None
    sums = torch.stack([tensors[k].detach().float().sum() for k in names])
    finite = torch.isfinite(sums)
    if bool(finite.all()):
        return None
    for name, ok in zip(names, finite.tolist()):
        if not ok and not bool(torch.isfinite(tensors[name]).all()):
            return name
    return None  # only a sum overflowed: the values themselves are finite


class History:
    """``train_log.jsonl``: one JSON line per logged interval (rank 0 only), appended across
    resumes.  A run resumed at iteration ``start`` first drops the lines after ``start`` that an
    interrupted run wrote past its last checkpoint, so each iteration appears once, and a last
    line that a kill cut in half (said in the log); a damaged line elsewhere is an error."""

    def __init__(self, path: str, enabled: bool, start: Optional[int] = None):
        self.path, self.enabled = path, enabled
        if enabled and start is not None and os.path.exists(path):  # start None: append as it is
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = [line for line in f if line.strip()]
            records, torn = [], False
            for number, line in enumerate(lines, 1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    if number < len(lines):
                        raise UserError(f"{path}, line {number}: not a JSON record ({exc}); repair or remove "
                                        "the line, or start a new run in another --output_dir") from exc
                    log.warning("%s: dropping its torn last line (cut by an interrupted write): %r",
                                path, line.rstrip("\n")[:80])
                    torn = True
            kept = [line if line.endswith("\n") else line + "\n"
                    for line, record in zip(lines, records) if record.get("iteration", 0) <= start]
            if torn or len(kept) != len(records):
                atomic_write_text(path, "".join(kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record)) + "\n")


# ----------------------------------------------------------------------------- schedule
def poly_with_warmup(total_iters: int, power: float, warmup_iters: int = 0,
                     warmup_factor: float = 0.1) -> Callable[[int], float]:
    """Multiplier of the base learning rate at iteration ``it`` (for LambdaLR):
    (1 - it / total) ** power, ramped linearly from ``warmup_factor`` during warm-up."""
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")

    def factor(it: int) -> float:
        poly = max(0.0, 1.0 - it / total_iters) ** power
        if it < warmup_iters:
            alpha = it / warmup_iters
            poly *= warmup_factor * (1.0 - alpha) + alpha
        return poly

    return factor


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in a form that
    ``torch.load(weights_only=True)`` accepts (tensors, ints, tuples)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def save_training_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    atomic_torch_save(state, path)


def unreadable_reason(path: str, exc: BaseException) -> str:
    """A one-line reason why ``torch.load`` failed on ``path`` (never blank)."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else f"{type(exc).__name__} (truncated or not a PyTorch file?)"


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"cannot resume: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {unreadable_reason(path, exc)}") from exc
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} is not a training checkpoint of this project "
                        f"(holds a {type(state).__name__})")
    for key in ("state_dict", "optimizer", "iteration"):
        if key not in state:
            raise UserError(f"checkpoint {path} is not a training checkpoint of this project (no {key!r} key)")
    bad = first_non_finite(state["state_dict"])
    if bad is not None:
        raise NonFiniteWeightsError(f"checkpoint {path}: tensor {bad!r} holds NaN or Inf; "
                                    "it cannot be resumed from")
    return state


# ----------------------------------------------------------------------------- batch stream
def batch_stream(loader, start_iter: int, max_iters: int) -> Iterator[Tuple[int, int, Any]]:
    """Yield (epoch, iteration, batch) from ``start_iter`` up to ``max_iters``.

    Epoch ``e`` covers iterations [e * L, (e + 1) * L) with L = batches per epoch; a resumed
    run skips the first (start_iter mod L) batches of its epoch through the sampler (so no
    data is loaded for them), and since every sample is seeded by (seed, epoch, index) the
    stream is the same as an uninterrupted run's.
    """
    sampler, dataset = loader.sampler, loader.dataset
    per_epoch = len(sampler) // loader.batch_size
    if per_epoch < 1:
        raise UserError("fewer samples per process than one batch")
    iteration = start_iter
    epoch, within = divmod(start_iter, per_epoch)
    while iteration < max_iters:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(within * loader.batch_size)
        for batch in loader:
            yield epoch, iteration, batch
            iteration += 1
            if iteration >= max_iters:
                return
        epoch, within = epoch + 1, 0


def iterations_per_epoch(loader) -> int:
    return len(loader.sampler) // loader.batch_size


def total_iterations(loader, epochs: int, max_iters: Optional[int]) -> int:
    total = epochs * iterations_per_epoch(loader)
    return min(total, max_iters) if max_iters else total


def is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def human_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
