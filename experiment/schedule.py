"""The schedule of a training run: iterations per epoch, the learning-rate multiplier, and the
batch stream that resumes exactly where a run stopped."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

from experiment.errors import UserError


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


def iterations_per_epoch(loader) -> int:
    return len(loader.sampler) // loader.batch_size


def total_iterations(loader, epochs: int, max_iters: Optional[int]) -> int:
    total = epochs * iterations_per_epoch(loader)
    return min(total, max_iters) if max_iters else total


def batch_stream(loader, start_iter: int, max_iters: int) -> Iterator[Tuple[int, int, Any]]:
    """Yield (epoch, iteration, batch) from ``start_iter`` up to ``max_iters``.

    Epoch ``e`` covers iterations [e * L, (e + 1) * L) with L = batches per epoch; a resumed
    run skips the first (start_iter mod L) batches of its epoch through the sampler (so no
    data is loaded for them), and since every sample is seeded by (seed, epoch, index) the
    stream is the same as an uninterrupted run's.  A sampler that can span epochs
    (``datasets.epoch_aware.EpochIndexSampler``) gets one loader iterator for the whole range,
    so a step never waits for the workers to start an epoch; the batches are the same.
    """
    sampler, dataset = loader.sampler, loader.dataset
    per_epoch = iterations_per_epoch(loader)
    if per_epoch < 1:
        raise UserError("fewer samples per process than one batch")
    if hasattr(sampler, "span") and loader.drop_last:
        sampler.span(start_iter, max_iters, loader.batch_size)
        for iteration, batch in enumerate(loader, start_iter):
            yield iteration // per_epoch, iteration, batch
        return
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
