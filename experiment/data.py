"""Wiring datasets/ to the experiment scripts: dataset root, datasets and loaders from a
:class:`~experiment.config.DataConfig`."""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from datasets import Cityscapes, DistributedEvalSampler, DistributedTrainSampler, TrainTransform, ValTransform
from datasets import ensure_synthetic, resolve_root
from datasets.epoch_aware import EpochAwareDataset, EpochIndexSampler
from experiment.config import DataConfig
from experiment.errors import UserError
from experiment.runtime import on_main_first
from experiment.signals import ignore_stop_signals

log = logging.getLogger("experiment")

TRAIN_PREFETCH_FACTOR = 4  # batches queued per worker: rides out slow samples (large rescales)


def dataset_root(cfg: DataConfig) -> Tuple[str, bool]:
    """(root, is_synthetic): ``data.dataset_dir``, else $CITYSCAPES_DATASET, else the synthetic
    dataset at ``data.synthetic_dir`` (made on rank 0 with ``data.synthetic`` if absent)."""
    if cfg.dataset_dir or os.environ.get("CITYSCAPES_DATASET"):
        return resolve_root(cfg.dataset_dir)
    root = os.path.abspath(os.environ.get("INVERSEFORM_SYNTHETIC_DIR") or cfg.synthetic_dir)
    s = cfg.synthetic

    def make() -> str:
        if not os.path.exists(root):
            log.info("no dataset root given (--dataset_dir / CITYSCAPES_DATASET): using the synthetic "
                     "Cityscapes at %s", root)
        return ensure_synthetic(root, train=s.train, val=s.val, test=s.test, height=s.height, width=s.width,
                                seed=s.seed)

    return on_main_first(make), True


def color_jitter(strength: float) -> Optional[dict]:
    if strength <= 0:
        return None
    return {"brightness": strength, "contrast": strength, "saturation": strength, "hue": min(0.5, strength / 4)}


def train_dataset(cfg: DataConfig, root: str, seed: int) -> Cityscapes:
    transform = TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, flip=cfg.flip,
                               color_jitter=color_jitter(cfg.color_jitter), blur_prob=cfg.blur_prob,
                               edge_radius=cfg.edge_radius, edge_image_border=cfg.edge_image_border)
    return _build(root, cfg.train_split, transform, cfg, seed)


def _build(root: str, split: str, transform, cfg: DataConfig, seed: int) -> Cityscapes:
    dataset = Cityscapes(root, split, transform=transform, edge_radius=cfg.edge_radius,
                         class_uniform_fraction=cfg.class_uniform_fraction if split != "test" else 0.0,
                         seed=seed)
    if len(dataset) == 0:
        raise UserError(f"split {split!r} of {root} holds no images")
    return dataset


def val_dataset(cfg: DataConfig, root: str, split: Optional[str] = None, max_images: Optional[int] = None):
    """Full-resolution images of ``split`` (default ``data.val_split``), optionally only the first N."""
    split = split or cfg.val_split
    dataset = Cityscapes(root, split, transform=ValTransform(edge_radius=cfg.edge_radius,
                                                             edge_image_border=cfg.edge_image_border),
                         edge_radius=cfg.edge_radius)
    if len(dataset) == 0:
        raise UserError(f"split {split!r} of {root} holds no images")
    if max_images is not None:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    return dataset


def train_loader(dataset, batch_size: int, num_workers: int, seed: int, collate_fn=None) -> DataLoader:
    """Shuffled shards per rank, drop_last; samples are seeded by (seed, epoch, index), so the
    stream does not depend on workers and resumes exactly with ``sampler.set_start``."""
    sampler = DistributedTrainSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise UserError(f"the training split has {len(dataset)} samples, {len(sampler)} per process: "
                        f"fewer than one batch of {batch_size}")
    # Its own generator: creating an iterator each epoch then draws nothing from the global RNG,
    # whose state (dropout) the checkpoints carry.  Persistent workers (no re-fork stall at each
    # epoch start) stay exact because every index carries its epoch (datasets/epoch_aware.py).
    persistent = num_workers > 0
    return DataLoader(EpochAwareDataset(dataset), batch_size=batch_size, sampler=EpochIndexSampler(sampler),
                      num_workers=num_workers, drop_last=True, pin_memory=torch.cuda.is_available(),
                      collate_fn=collate_fn, persistent_workers=persistent,
                      prefetch_factor=TRAIN_PREFETCH_FACTOR if persistent else None,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals)


def eval_loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Contiguous shards, no padding: every image is evaluated exactly once across ranks.
    Persistent workers: a training run's periodic validations reuse them instead of re-forking."""
    sampler = DistributedEvalSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      worker_init_fn=ignore_stop_signals,
                      shuffle=False, drop_last=False, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)
