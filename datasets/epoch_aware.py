"""Exact, epoch-seeded sampling with persistent DataLoader workers.

Why: a sample is a pure function of (seed, epoch, index) (see ``datasets/cityscapes.py``),
but the epoch lives in the dataset object, and persistent workers keep the copy they were
started with - so ``dataset.set_epoch(e)`` in the main process never reaches them, and
re-creating the workers every epoch stalls each epoch's start.  Here the
sampler's indices carry their epoch, ``(epoch, index)``, and the dataset wrapper switches its
worker-local copy to that epoch before loading: the stream is the same whatever the workers
are, so exact resume (``DistributedTrainSampler.set_start``) keeps working.
"""
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochIndexSampler", "EpochAwareDataset"]


class EpochIndexSampler(Sampler):
    """Yields ``(epoch, index)`` for each index of ``sampler`` (a DistributedTrainSampler);
    everything else (``set_epoch``, ``set_start``, ``epoch``, ``shard``...) is the sampler's.

    After ``span(start, stop, batch_size)`` the next iterator runs over batches ``start`` ..
    ``stop`` of the whole schedule, across epoch ends: epoch ``e`` contributes the first
    ``len // batch_size`` batches of its shard (as ``drop_last`` would), so one DataLoader
    iterator serves every epoch and its workers load the next epoch's first batches while the
    last ones of this epoch are trained on, instead of starting empty at each epoch."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._span = None

    def span(self, start: int, stop: int, batch_size: int) -> None:
        if not 0 <= start <= stop or batch_size < 1:
            raise ValueError(f"span: need 0 <= start <= stop and batch_size >= 1, got {start}, {stop}, {batch_size}")
        self._span = (start, stop, batch_size)

    def __iter__(self):
        if self._span is None:
            epoch = self.sampler.epoch
            return ((epoch, index) for index in self.sampler)
        span, self._span = self._span, None
        return self._spanning(*span)

    def _spanning(self, start, stop, batch_size):
        per_epoch = self.sampler.num_samples // batch_size
        if per_epoch < 1:
            raise ValueError(f"span: {self.sampler.num_samples} samples per epoch, fewer than one batch of {batch_size}")
        iteration = start
        while iteration < stop:
            epoch, within = divmod(iteration, per_epoch)
            batches = min(per_epoch - within, stop - iteration)
            self.sampler.set_epoch(epoch)
            for index in self.sampler.shard()[within * batch_size:(within + batches) * batch_size]:
                yield epoch, index
            iteration += batches

    def __len__(self):
        return len(self.sampler)

    def __getattr__(self, name):
        if name in ("sampler", "_span"):  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.sampler, name)


class EpochAwareDataset(Dataset):
    """``dataset[(epoch, index)]`` = ``dataset[index]`` after ``dataset.set_epoch(epoch)`` (only
    when the epoch changes); a plain index is passed through.  Other attributes are the
    dataset's (``set_epoch`` in the main process changes the main process's copy only)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
            if hasattr(self.dataset, "set_epoch") and getattr(self.dataset, "epoch", None) != epoch:
                self.dataset.set_epoch(epoch)
            key = index
        return self.dataset[key]

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
