"""datasets.epoch_aware + experiment.data.train_loader: persistent workers give the exact
(seed, epoch, index) stream of fresh workers and of an in-process loader, epoch after epoch
and after a mid-epoch restart (set_start), as the exact resume needs."""
import shutil

import pytest
import torch

from datasets import Cityscapes, TrainTransform
from datasets.epoch_aware import EpochAwareDataset, EpochIndexSampler
from datasets.samplers import DistributedTrainSampler
from experiment.data import train_loader
from experiment.schedule import batch_stream


@pytest.fixture
def root(tiny_cityscapes, tmp_path):
    """A copy: class-uniform sampling writes its centroid cache into the dataset root."""
    return shutil.copytree(tiny_cityscapes, tmp_path / "cityscapes")


def make_dataset(root):
    transform = TrainTransform(crop_size=(32, 64), scale_range=(0.5, 1.5), flip=True)
    return Cityscapes(root, "train", transform, class_uniform_fraction=0.5, seed=3)


def stream(loader, start, stop):
    return [(epoch, it, batch["name"], batch["image"].sum().item()) for epoch, it, batch in
            batch_stream(loader, start, stop)]


def test_persistent_workers_reproduce_the_in_process_stream(root):
    dataset = make_dataset(root)
    persistent = train_loader(dataset, batch_size=2, num_workers=2, seed=5)
    assert persistent.persistent_workers and persistent.prefetch_factor >= 2
    in_process = train_loader(make_dataset(root), batch_size=2, num_workers=0, seed=5)
    expected = stream(in_process, 0, 9)  # 3 batches per epoch: three epochs, class-uniform lists differ
    assert len({e for e, *_ in expected}) == 3
    assert stream(persistent, 0, 9) == expected
    # a resumed run: same loader object, workers already alive, restarted mid-epoch
    assert stream(persistent, 4, 9) == expected[4:]
    # and a fresh persistent loader resumed mid-epoch
    assert stream(train_loader(make_dataset(root), 2, 2, seed=5), 5, 9) == expected[5:]


def test_wrappers_pass_the_epoch_and_delegate(root):
    dataset = make_dataset(root)
    wrapped = EpochAwareDataset(dataset)
    sampler = EpochIndexSampler(DistributedTrainSampler(dataset, num_replicas=1, rank=0, seed=5))
    sampler.set_epoch(2)
    sampler.set_start(1)
    keys = list(sampler)
    assert all(epoch == 2 for epoch, _ in keys) and len(keys) == len(sampler) == len(dataset) - 1
    assert wrapped.epoch == 0
    sample = wrapped[keys[0]]
    assert wrapped.epoch == 2  # switched to the key's epoch
    reference = make_dataset(root)
    reference.set_epoch(2)
    assert torch.equal(sample["image"], reference[keys[0][1]]["image"])
    assert torch.equal(wrapped[0]["label"], reference[0]["label"])  # a plain index: current epoch
    assert len(wrapped) == len(dataset) and wrapped.split == "train"


def epoch_by_epoch(root, batch_size, start, stop):
    """The batches as each epoch's own shard gives them: epoch e is the first len // batch_size
    batches of the sampler's shard for e, its samples loaded as dataset[(e, index)]."""
    dataset = EpochAwareDataset(make_dataset(root))
    sampler = DistributedTrainSampler(dataset, num_replicas=1, rank=0, seed=5, drop_last=True)
    per_epoch = len(sampler) // batch_size
    batches = []
    for it in range(start, stop):
        epoch, within = divmod(it, per_epoch)
        sampler.set_epoch(epoch)
        indices = sampler.shard()[within * batch_size:(within + 1) * batch_size]
        samples = [dataset[(epoch, i)] for i in indices]
        batches.append((epoch, it, [s["name"] for s in samples], sum(s["image"].sum().item() for s in samples)))
    return batches


def test_one_loader_iterator_spans_the_epochs_with_each_epochs_batches(root, monkeypatch):
    made = []
    spanning = EpochIndexSampler.__iter__
    monkeypatch.setattr(EpochIndexSampler, "__iter__", lambda self: made.append(1) or spanning(self))
    loader = train_loader(make_dataset(root), batch_size=2, num_workers=2, seed=5)
    got = stream(loader, 0, 10)
    assert len(made) == 1  # one iterator for four epochs: the workers never start an epoch empty
    expected = epoch_by_epoch(root, 2, 0, 10)
    assert [e for e, *_ in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert [(e, it, list(names)) for e, it, names, _ in got] == [(e, it, names) for e, it, names, _ in expected]
    assert [total for *_, total in got] == pytest.approx([total for *_, total in expected], rel=1e-6)
    assert stream(loader, 4, 8) == got[4:8]  # resumed mid-epoch on the same workers
    assert len(made) == 2


def test_span_rejects_a_range_it_cannot_serve(root):
    sampler = EpochIndexSampler(DistributedTrainSampler(make_dataset(root), num_replicas=1, rank=0, seed=5))
    with pytest.raises(ValueError, match="start <= stop"):
        sampler.span(5, 4, 2)
    sampler.span(0, 1, len(sampler) + 1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        list(sampler)
