"""Wiring datasets/ to the experiment scripts: dataset root, datasets and loaders from a
:class:`~experiment.config.DataConfig`."""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from datasets import (ClassTable, Cityscapes, DistributedEvalSampler, DistributedTrainSampler, FolderSegmentation,
                      NYUDepthV2, ScribbleCityscapes, ScribbleFolderSegmentation, TrainTransform, ValTransform,
                      ensure_synthetic, nyu40_class_table, resolve_root)
from datasets.class_table import CLASS_TABLE_NAME
from datasets.epoch_aware import EpochAwareDataset, EpochIndexSampler
from experiment.config import DataConfig
from experiment.errors import UserError
from experiment.runtime import on_main_first
from experiment.signals import ignore_stop_signals
from utils.errors import MissingInputError

log = logging.getLogger("experiment")

# The synthetic stand-in of each dataset kind, in the layout that kind reads
SYNTHETIC_LAYOUT = {"cityscapes": "cityscapes", "folder": "folder"}

TRAIN_PREFETCH_FACTOR = 4  # batches queued per worker: rides out slow samples (large rescales)
# A training split that fits (the synthetic one: 50 MB) is decoded once instead of at every
# epoch: PNG decoding was 80 % of a sample's time and, in the loader's workers, took a 2-core
# CPU's time from the training step.  Cityscapes' or VOC's train split does not fit.  The
# regressor's tiles keep their label maps under the same budget (experiment/methods/regressor.py).
KEEP_DECODED_BYTES = 512 << 20


def dataset_root(cfg: DataConfig) -> Tuple[str, bool]:
    """(root, is_synthetic): ``data.dataset_dir``; else, for Cityscapes, $CITYSCAPES_DATASET; else
    the synthetic dataset at ``data.synthetic_dir`` in the layout ``data.dataset`` reads (made on
    rank 0 with ``data.synthetic`` if absent).  NYU-Depth-v2 has no synthetic stand-in."""
    if cfg.dataset == "cityscapes" and (cfg.dataset_dir or os.environ.get("CITYSCAPES_DATASET")):
        return resolve_root(cfg.dataset_dir)
    if cfg.dataset_dir:
        if not os.path.isdir(cfg.dataset_dir):
            raise MissingInputError(f"config key 'data.dataset_dir': {cfg.dataset_dir} is not a folder")
        return os.path.abspath(cfg.dataset_dir), False
    if cfg.dataset == "nyu":
        raise UserError("data.dataset nyu reads NYU-Depth-v2 from config key 'data.dataset_dir' (RGB/, Label/, "
                        "train.txt, test.txt; docs/datasets.md), which is not set")
    return _synthetic_root(cfg), True


def _synthetic_root(cfg: DataConfig) -> str:
    # $INVERSEFORM_SYNTHETIC_DIR names the synthetic Cityscapes-layout set only
    env = os.environ.get("INVERSEFORM_SYNTHETIC_DIR") if cfg.dataset == "cityscapes" else None
    root = os.path.abspath(env or cfg.synthetic_dir)
    s, layout = cfg.synthetic, SYNTHETIC_LAYOUT[cfg.dataset]

    def make() -> str:
        if not os.path.exists(root):
            log.info("no dataset root given (data.dataset_dir): using the synthetic dataset (%s layout) at %s",
                     layout, root)
        return ensure_synthetic(root, train=s.train, val=s.val, test=s.test, height=s.height, width=s.width,
                                seed=s.seed, layout=layout)

    return on_main_first(make)


def class_table(cfg: DataConfig, root: str) -> ClassTable:
    """The classes of ``data.dataset``: Cityscapes' 19, NYUv2-40, or the folder dataset's table
    (``data.class_table``, else ``<root>/classes.yaml``)."""
    if cfg.dataset == "cityscapes":
        return ClassTable.cityscapes()
    if cfg.dataset == "nyu":
        return nyu40_class_table()
    path = cfg.class_table or os.path.join(root, CLASS_TABLE_NAME)
    if not os.path.isfile(path):
        raise MissingInputError(f"config key 'data.class_table': {path} does not exist; the folder dataset needs a "
                                f"class table (names, colours, label ids; docs/datasets.md)")
    return ClassTable.from_yaml(path)


def table_of(dataset) -> ClassTable:
    """The class table of a dataset (or of the dataset a Subset takes from); Cityscapes' if it has none."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return getattr(base, "class_table", None) or ClassTable.cityscapes()


def labelled_images(cfg: DataConfig, root: str, split: str, transform=None, *, seed: int = 0,
                    class_uniform_fraction: float = 0.0, progress: bool = True, scribbles: Optional[dict] = None):
    """The dataset of ``split`` as ``data.dataset`` reads it; ``scribbles`` (keywords of
    :class:`datasets.scribbles.ScribbleLabels`) replaces its labels by scribbles."""
    if scribbles and cfg.dataset == "nyu":
        raise UserError("scribbles are drawn on the cityscapes and folder datasets; for NYU-Depth-v2 set "
                        "data.dataset=folder with data.layout=list and data.class_table=configs/classes/nyu40.yaml")
    common = dict(transform=transform, edge_radius=cfg.edge_radius, class_uniform_fraction=class_uniform_fraction,
                  seed=seed, progress=progress)
    if cfg.dataset == "cityscapes":
        kind, extra = (ScribbleCityscapes if scribbles else Cityscapes), {}
    elif cfg.dataset == "nyu":
        kind, extra = NYUDepthV2, {}
    else:
        kind = ScribbleFolderSegmentation if scribbles else FolderSegmentation
        extra = dict(class_table=class_table(cfg, root), layout=cfg.layout, image_dir=cfg.image_folder,
                     label_dir=cfg.label_folder, label_suffix=cfg.label_suffix)
    dataset = kind(root, split, **common, **extra, **(scribbles or {}))
    if len(dataset) == 0:
        raise UserError(f"split {split!r} of {root} holds no images")
    return dataset


def color_jitter(strength: float) -> Optional[dict]:
    if strength <= 0:
        return None
    return {"brightness": strength, "contrast": strength, "saturation": strength, "hue": min(0.5, strength / 4)}


def train_dataset(cfg: DataConfig, root: str, seed: int):
    transform = TrainTransform(crop_size=cfg.crop_size, scale_range=cfg.scale_range, flip=cfg.flip,
                               color_jitter=color_jitter(cfg.color_jitter), blur_prob=cfg.blur_prob,
                               edge_radius=cfg.edge_radius, edge_image_border=cfg.edge_image_border)
    return keep_decoded_if_small(labelled_images(cfg, root, cfg.train_split, transform, seed=seed,
                                                 class_uniform_fraction=cfg.class_uniform_fraction))


def keep_decoded_if_small(dataset):
    """``dataset`` (a training split), its images and labels decoded once and kept in memory if
    they fit in KEEP_DECODED_BYTES."""
    kept = dataset.keep_decoded(KEEP_DECODED_BYTES)
    if kept:
        log.info("keeping the %d decoded training images in memory (%.0f MB)", len(dataset.items), kept / 2 ** 20)
    return dataset


def val_dataset(cfg: DataConfig, root: str, split: Optional[str] = None, max_images: Optional[int] = None):
    """Full-resolution images of ``split`` (default ``data.val_split``), optionally only the first N."""
    split = split or cfg.val_split
    dataset = labelled_images(cfg, root, split, ValTransform(edge_radius=cfg.edge_radius,
                                                             edge_image_border=cfg.edge_image_border))
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
