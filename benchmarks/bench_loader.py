"""Loader throughput: full-resolution (1024 x 2048) training samples through a DataLoader.

    python benchmarks/bench_loader.py [--workers 2 --crop 1024x1024 --batches 30]

Each sample: PNG decode of a 1024 x 2048 image and its label, label ids -> train ids,
random scale 0.5-2.0 + pad + crop (HMS's 1024 x 1024 recipe by default; ``--crop full``
keeps 1024 x 2048), flip, normalisation, edge target, collation.  The images are a
synthetic Cityscapes generated once under data/ (reused).  Prints images per second.
CPU timings are noisy when other jobs share the machine.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import Cityscapes, TrainTransform  # noqa: E402
from datasets.samplers import DistributedTrainSampler  # noqa: E402
from datasets.synthetic import ensure_synthetic  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="dataset root (default: a 1024x2048 synthetic one)")
    parser.add_argument("--images", type=int, default=24, help="train images of the generated dataset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--crop", default="1024x1024", help="HxW, or 'full' for the input size")
    parser.add_argument("--class-uniform", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    args = parser.parse_args(argv)

    root = args.root or ensure_synthetic(os.path.join("data", "bench_synthetic_1024x2048"), train=args.images,
                                         val=0, test=0, height=1024, width=2048, seed=0)
    crop = None if args.crop == "full" else tuple(int(v) for v in args.crop.split("x"))
    transform = TrainTransform(crop_size=crop, scale_range=(0.5, 2.0), flip=True)
    dataset = Cityscapes(root, "train", transform, class_uniform_fraction=args.class_uniform)
    sampler = DistributedTrainSampler(dataset, num_replicas=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers,
                                         drop_last=True)
    def run_epoch(epoch):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        shape = None
        for batch in loader:
            shape = tuple(batch["image"].shape)
        return shape

    run_epoch(0)  # warm-up (page cache, first worker start)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        shape = run_epoch(epoch)
    elapsed = time.perf_counter() - start
    images = args.epochs * len(loader) * args.batch_size
    print(f"dataset {root}: {len(dataset)} images of 1024x2048, class-uniform fraction {args.class_uniform}")
    print(f"crop {args.crop}, batch {args.batch_size} -> image batch {shape}, {args.workers} workers, "
          f"{os.cpu_count()} CPUs")
    print(f"{images / elapsed:.2f} images/s ({elapsed / images * 1e3:.0f} ms per image; {images} images in "
          f"{args.epochs} epochs, worker start-up included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
