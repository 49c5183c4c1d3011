"""The backward of bilinear upsampling on a CPU: ATen's kernel against two matrix products.

    OMP_NUM_THREADS=2 python benchmarks/bench_resize.py

``utils.determinism.interpolate_bilinear`` (every resize of the models) takes the matrix-product
backward (``bilinear_matmul_backward``) on a CPU where its cost per output,
2 * W_in * (1 + H_in / W_out) multiply-adds, is at most ``CPU_MATMUL_BACKWARD_MAX_COST``, and
ATen's scatter kernel elsewhere.  For each case (the resizes of the main job's training step,
then larger ones on both sides of the threshold) this times the backward of both, alternating
step by step so that changes of the machine's speed touch both alike, and prints the median of
each, the speed-up, the cost, which one the dispatch takes, and the largest difference of the
two input gradients relative to the largest gradient (the sums' order only).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.determinism import bilinear_matmul_backward, takes_matmul_backward  # noqa: E402

# (what, input N x C x H x W, output H x W)
CASES = [
    ("main job: logits, stride 8 -> 128 x 256", (8, 19, 16, 32), (128, 256)),
    ("main job: edge logits, stride 8 -> 128 x 256", (8, 1, 16, 32), (128, 256)),
    ("main job: HRNet fuse, stride 16 -> 8", (8, 16, 8, 16), (16, 32)),
    ("main job: HRNet head, stride 32 -> 8", (8, 64, 4, 8), (16, 32)),
    ("stride 4 -> 256 x 512", (2, 19, 64, 128), (256, 512)),
    ("stride 4 -> 512 x 1024", (2, 19, 128, 256), (512, 1024)),
    ("stride 16 -> 512 x 1024", (2, 19, 32, 64), (512, 1024)),
    ("stride 4 -> 1024 x 2048", (1, 19, 256, 512), (1024, 2048)),
    ("same size, 128 x 256", (2, 48, 128, 256), (128, 256)),
]


def backward_time(resize, x, grad):
    leaf = x.clone().requires_grad_()
    out = resize(leaf)
    start = time.perf_counter()
    out.backward(grad)
    return time.perf_counter() - start, leaf.grad


def bench(case, repeats):
    what, shape, size = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    grad = torch.randn(shape[:2] + size, generator=gen)
    aten = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    matmul = lambda t: bilinear_matmul_backward(t, size)
    times = {"aten": [], "matmul": []}
    for i in range(repeats + 1):  # the first of each is a warm-up
        for name, resize in (("aten", aten), ("matmul", matmul)):
            seconds, g = backward_time(resize, x, grad)
            if i:
                times[name].append(seconds)
            if name == "aten":
                ref = g
    diff = ((g - ref).abs().max() / ref.abs().max()).item()
    a, m = (statistics.median(times[k]) * 1e3 for k in ("aten", "matmul"))
    cost = shape[3] * (1 + shape[2] / size[1])
    taken = "matmul" if takes_matmul_backward(x.requires_grad_(), size) else "aten"
    print(f"{what:46s} {a:8.2f} {m:8.2f} {a / m:6.2f}x {cost:6.0f}  {taken:6s} {diff:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed backwards of each (after one warm-up)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, cpu, torch threads: {torch.get_num_threads()}; median of {args.repeats}")
    print(f"{'case':46s} {'aten ms':>8s} {'mm ms':>8s} {'speed':>7s} {'cost':>6s}  {'taken':6s} rel. diff")
    for case in CASES:
        bench(case, args.repeats)


if __name__ == "__main__":
    main()
