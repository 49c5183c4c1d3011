"""Boundary IoU counts of one 1024 x 2048 map with 19 classes: cost per image, 1 and 2 threads.

    python benchmarks/bench_boundary_iou.py [--height 1024 --width 2048 --repeat 7 --threads 1 2]

The ground truth is a synthetic Cityscapes scene, the prediction the same map shifted by 4 pixels
with 2 % of its pixels changed.  For each thread count (``torch.set_num_threads`` and
``cv2.setNumThreads`` together) prints the median and best of ``--repeat`` runs of
``boundary_iou_counts_batch`` on the host path (OpenCV, what CPU tensors use) and on the torch
path run on the CPU (what CUDA tensors use, here only for reference), and checks both against
the per-class reference (mask_to_boundary of each class, run once); exits non-zero if they differ.
CPU timings are noisy when other jobs share the machine.
"""
import argparse
import os
import sys
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.labels import labelid_to_trainid  # noqa: E402
from datasets.synthetic import render_scene  # noqa: E402
from utils.metrics import boundary_iou_counts_batch, boundary_iou_dilation  # noqa: E402


def reference_counts(pred, gt, num_classes, d):
    """Per class: the reference API's mask_to_boundary (pad, erode d times), void masked out."""
    h, w = gt.shape
    valid = gt != 255
    counts = np.zeros((num_classes, 2), np.int64)

    def band(mask):
        eroded = cv2.erode(cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0),
                           np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1]
        return (mask - eroded).astype(bool) & valid

    for c in range(num_classes):
        g, p = band((gt == c).astype(np.uint8)), band((pred == c).astype(np.uint8))
        counts[c] = (np.count_nonzero(g & p), np.count_nonzero(g | p))
    return counts


def timed(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), min(times), result


def make_maps(height, width, seed):
    rng = np.random.default_rng(seed)
    _, label_ids = render_scene(rng, height, width)
    gt = labelid_to_trainid(label_ids)
    pred = np.roll(np.where(gt == 255, 0, gt), 4, axis=1).astype(np.uint8)
    noise = rng.random(gt.shape) < 0.02
    pred[noise] = rng.integers(0, 19, int(noise.sum()))
    return pred, gt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pred, gt = make_maps(args.height, args.width, args.seed)
    d = boundary_iou_dilation(args.height, args.width)
    pred_t, gt_t = torch.from_numpy(pred)[None].long(), torch.from_numpy(gt)[None].long()
    print(f"maps {args.height}x{args.width}, 19 classes + void, d = {d} px, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, OpenCV {cv2.__version__}")
    expected = reference_counts(pred, gt, 19, d)
    same = True
    for threads in args.threads:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        for name, host in (("host (OpenCV)", True), ("torch on CPU", False)):
            runs = args.repeat if host else max(1, args.repeat // 2)
            median, best, counts = timed(lambda: boundary_iou_counts_batch(pred_t, gt_t, 19, host=host), runs)
            equal = counts.tolist() == expected.tolist()
            same &= equal
            print(f"{threads} thread(s)  {name:14s}: median {median * 1e3:8.1f} ms   best {best * 1e3:8.1f} ms"
                  f"   ({runs} runs, equal to the reference: {equal})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
