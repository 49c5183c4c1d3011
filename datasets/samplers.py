"""Samplers for torchrun: shuffled training shards and exact evaluation shards.

Both default ``num_replicas``/``rank`` to the initialised ``torch.distributed`` world
(else a world of one), so the same code runs under ``python`` and ``torchrun``.
"""
import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistributedTrainSampler", "DistributedEvalSampler"]


def _world(num_replicas, rank):
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
    return int(num_replicas), int(rank)


class DistributedTrainSampler(Sampler):
    """Each epoch, a permutation seeded by (seed, epoch) - the same on every rank - cut
    into ``num_replicas`` interleaved shards of equal length.

    ``drop_last=True`` drops the tail that does not divide evenly (so no sample is seen
    twice in an epoch); ``drop_last=False`` pads by repeating the first indices instead.
    ``set_start(n)`` skips the first ``n`` indices of this rank's shard for the current
    epoch, for an exact resume in the middle of an epoch; the next ``set_epoch`` resets it.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0, drop_last=True):
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.dataset_len = len(dataset)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        if drop_last:
            self.num_samples = self.dataset_len // self.num_replicas
        else:
            self.num_samples = -(-self.dataset_len // self.num_replicas)
        if self.num_samples == 0:
            raise ValueError(f"DistributedTrainSampler: {self.dataset_len} samples cannot feed "
                             f"{self.num_replicas} replicas with drop_last={drop_last}")

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, n):
        if not 0 <= n <= self.num_samples:
            raise ValueError(f"set_start: n must be in [0, {self.num_samples}], got {n}")
        self.start = int(n)

    def shard(self):
        """This rank's full index list for the current epoch (ignoring set_start)."""
        n = self.dataset_len
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        total = self.num_samples * self.num_replicas
        if total > n:
            order = np.concatenate([order, np.resize(order, total - n)])
        order = order[:total]
        return order[self.rank:total:self.num_replicas].tolist()

    def __iter__(self):
        return iter(self.shard()[self.start:])

    def __len__(self):
        return self.num_samples - self.start


class DistributedEvalSampler(Sampler):
    """Contiguous, unpadded shards: every index exactly once over all ranks, in order.

    Rank r gets ``range(N * r // R, N * (r + 1) // R)``; shard lengths differ by at most
    one, so evaluation must sum per-rank statistics (e.g. confusion matrices), never
    average per-rank results.
    """

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.num_replicas, self.rank = _world(num_replicas, rank)
        n = len(dataset)
        self.begin = n * self.rank // self.num_replicas
        self.end = n * (self.rank + 1) // self.num_replicas

    def __iter__(self):
        return iter(range(self.begin, self.end))

    def __len__(self):
        return self.end - self.begin
