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
    everything else (``set_epoch``, ``set_start``, ``epoch``, ``shard``...) is the sampler's."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)

    def __getattr__(self, name):
        if name == "sampler":  # not yet set (unpickling)
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
