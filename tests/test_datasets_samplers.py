"""Samplers: exact evaluation shards and resumable shuffled training shards."""

import pytest
import torch
import torch.distributed as dist

from datasets import Cityscapes, TrainTransform
from datasets.samplers import DistributedEvalSampler, DistributedTrainSampler


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (3, 4), (500, 8)])
def test_eval_shards_cover_every_index_exactly_once(n, world):
    data = list(range(n))
    shards = [list(DistributedEvalSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == data
    assert [i for shard in shards for i in shard] == data  # contiguous, in order
    lengths = [len(DistributedEvalSampler(data, world, r)) for r in range(world)]
    assert lengths == [len(s) for s in shards] and max(lengths) - min(lengths) <= 1


def test_two_rank_validation_over_the_dataset_sees_every_image_once(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "val")
    names = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=DistributedEvalSampler(ds, 2, rank))
        names += [n for batch in loader for n in batch["name"]]
    assert sorted(names) == sorted(name for name, _, _ in ds.items) and len(names) == 4


def test_train_shards_partition_a_seeded_permutation():
    data = list(range(23))
    for epoch in range(3):
        shards = []
        for rank in range(3):
            sampler = DistributedTrainSampler(data, num_replicas=3, rank=rank, seed=5)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(sampler) == 7
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat)) == 21  # drop_last: no duplicates
    a, b = DistributedTrainSampler(data, 3, 0, seed=5), DistributedTrainSampler(data, 3, 0, seed=5)
    b.set_epoch(1)
    assert list(a) != list(b)
    ordered = DistributedTrainSampler(data, 2, 1, shuffle=False)
    assert list(ordered) == list(range(1, 22, 2))
    padded = [list(DistributedTrainSampler(data, 2, r, drop_last=False)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 12 and set(padded[0]) | set(padded[1]) == set(data)


def test_set_start_resumes_exactly_and_set_epoch_resets_it(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "train", TrainTransform(crop_size=(32, 48)), seed=2)
    ds.set_epoch(3)
    full_sampler = DistributedTrainSampler(ds, num_replicas=1, rank=0, seed=2)
    full_sampler.set_epoch(3)
    full = [(b["name"], b["image"]) for b in torch.utils.data.DataLoader(ds, batch_size=1, sampler=full_sampler)]

    # a fresh process resuming after 4 samples of epoch 3
    resumed_ds = Cityscapes(tiny_cityscapes, "train", TrainTransform(crop_size=(32, 48)), seed=2)
    resumed_ds.set_epoch(3)
    sampler = DistributedTrainSampler(resumed_ds, num_replicas=1, rank=0, seed=2)
    sampler.set_epoch(3)
    sampler.set_start(4)
    assert len(sampler) == len(ds) - 4
    rest = [(b["name"], b["image"]) for b in torch.utils.data.DataLoader(resumed_ds, batch_size=1, sampler=sampler)]
    assert len(rest) == 2
    for (name_a, img_a), (name_b, img_b) in zip(full[4:], rest):
        assert name_a == name_b and torch.equal(img_a, img_b)
    sampler.set_epoch(4)
    assert len(sampler) == len(ds) and len(list(sampler)) == len(ds)
    with pytest.raises(ValueError, match="set_start"):
        sampler.set_start(len(ds) + 1)


def test_defaults_come_from_torch_distributed(tmp_path):
    data = list(range(10))
    assert (DistributedEvalSampler(data).num_replicas, DistributedEvalSampler(data).rank) == (1, 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sampler = DistributedTrainSampler(data)
        assert (sampler.num_replicas, sampler.rank) == (1, 0) and len(sampler) == 10
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="rank"):
        DistributedEvalSampler(data, num_replicas=2, rank=2)
