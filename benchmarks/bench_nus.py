"""Un-sampling speed: 192 x 192 x 19 logits back to 1024 x 1024, ``models.nus.unsample`` on the
chosen device vs scipy's ``griddata(method="linear")`` (the reference's un-sampler) on the same
points and values, with the share of pixels whose argmax agrees.

    python benchmarks/bench_nus.py [--device cuda] [--threads 1,2] [--repeats 7] [--griddata-repeats 5]
                                   [--warmup 10] [--profile]

The sample grid is a learned-looking one: the regularised targets of a synthetic Cityscapes
label map (datasets.nus_targets), resized to 192 x 192; logits are a noisy one-hot of the
label sampled there (so the argmax comparison looks at real class boundaries).

On a CPU the un-sampler is timed in one child process per thread count (``--threads``, by
default 1 and every core), so each runs with its own ``OMP_NUM_THREADS``; scipy's griddata is
single-threaded whatever the count.  Both sides get ``--warmup`` untimed calls first (10 by
default: with two threads the first 3-7 calls of a fresh process took 40-70 ms against 25-28 ms
after, most of it in writing the fresh output pages, which the virtual machine serves slowly until
it has reused them a few times) and drop the previous result before the next call, as a
validation loop does (griddata took 1.3-1.9x longer with its previous 160 MB result still alive).
Memory pages matter too: the 80 MB float32 output is fresh memory every call, and on a virtual
machine touching it in 4 KiB pages can cost more than computing it; ``unsample`` takes its large
CPU buffers from numpy, which asks Linux for transparent huge pages (PyTorch's allocator does only
with ``THP_MEM_ALLOC_ENABLE=1``, which this benchmark leaves as it finds it).
``--profile`` adds the split of one call (triangulate, rasterise, planes, interpolate).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

from datasets.labels import labelid_to_trainid
from datasets.nus_targets import target_locations
from datasets.synthetic import render_scene
from models.nus import normalize_locations, resize_locations, sample, unsample


def make_case(size: int, grid: int, classes: int, seed: int = 0):
    _, ids = render_scene(np.random.default_rng(seed), size, size * 2)
    label = labelid_to_trainid(ids)[:, size // 2: size // 2 + size].astype(np.int64)  # a square crop
    coarse = torch.from_numpy(target_locations(label))[None]
    locations = normalize_locations(resize_locations(coarse, (grid, grid)))
    sampled = sample(torch.from_numpy(label)[None], locations).clamp(max=classes - 1)
    gen = torch.Generator().manual_seed(seed)
    logits = 4 * F.one_hot(sampled, classes).permute(0, 3, 1, 2).float() + torch.randn(
        1, classes, grid, grid, generator=gen)
    return label, locations, logits


def time_unsample(args, profile: bool = False):
    """Median seconds of ``unsample`` over ``args.repeats`` calls after ``args.warmup`` more, and the
    output of the last call; with ``profile``, the split of one more call (ms per step)."""
    device = torch.device(args.device)
    _, locations, logits = make_case(args.size, args.grid, args.classes)
    loc_d, logits_d = locations.to(device), logits.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(max(args.warmup, 1)):
        out = None
        out = unsample(logits_d, loc_d, (args.size, args.size))
    sync()
    times = []
    for _ in range(args.repeats):
        out = None  # the previous result is dropped first, as by a loop that consumes each one
        t0 = time.perf_counter()
        out = unsample(logits_d, loc_d, (args.size, args.size))
        sync()
        times.append(time.perf_counter() - t0)
    split = {}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            unsample(logits_d, loc_d, (args.size, args.size))
            sync()
        for event in prof.key_averages():
            if event.key.startswith("unsample/"):
                total = event.device_time_total if device.type == "cuda" else event.cpu_time_total
                split[event.key] = total / 1e3
    return float(np.median(times)), out, split


def child_times(args, threads: int):
    """``time_unsample`` in a fresh process with ``OMP_NUM_THREADS=threads``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--device", args.device, "--size", str(args.size),
           "--grid", str(args.grid), "--classes", str(args.classes), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup)]
    if args.profile:
        cmd.append("--profile")
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def thread_counts(text: str):
    """``--threads``: comma-separated positive integers."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--threads expects comma-separated positive integers, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--grid", type=int, default=192)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--threads", type=thread_counts, default=sorted({1, os.cpu_count() or 1}),
                        help="CPU thread counts to time the un-sampler with, e.g. 1,2 (default: 1 and every core)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first, on both sides")
    parser.add_argument("--griddata-repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also print the split of one call")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seconds, _, split = time_unsample(args, args.profile)
        print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "split": split}))
        return

    from scipy.interpolate import griddata

    label, locations, logits = make_case(args.size, args.grid, args.classes)
    if args.device == "cpu":
        runs = {f"{k} thread{'s' if k > 1 else ''}": child_times(args, k) for k in args.threads}
        out = unsample(logits, locations, (args.size, args.size))
    else:
        seconds, out, split = time_unsample(args, args.profile)
        runs = {args.device: {"seconds": seconds, "threads": torch.get_num_threads(), "split": split}}
    points = locations[0].double().numpy().reshape(-1, 2) * (args.size - 1)
    values = logits[0].permute(1, 2, 0).reshape(-1, args.classes).numpy()
    pixels = np.stack(np.mgrid[:args.size, :args.size], -1).reshape(-1, 2)
    for _ in range(max(args.warmup, 1)):  # as for unsample
        ref = None
        ref = griddata(points, values, pixels, method="linear")
    ref_times = []
    for _ in range(args.griddata_repeats):
        ref = None  # as above: with the previous 160 MB result still alive, griddata took 1.3-1.9x longer
        t0 = time.perf_counter()
        ref = griddata(points, values, pixels, method="linear")
        ref_times.append(time.perf_counter() - t0)
    theirs = float(np.median(ref_times))
    ref = ref.reshape(args.size, args.size, args.classes)
    valid = ~np.isnan(ref).any(-1)
    agree = (out[0].argmax(0).cpu().numpy() == ref.argmax(-1))[valid].mean()
    print(f"un-sampling {args.grid} x {args.grid} x {args.classes} logits to {args.size} x {args.size} "
          f"(torch {torch.__version__} on {args.device}; scipy griddata single-threaded; "
          f"{max(args.warmup, 1)} warm-up calls each)")
    for name, run in runs.items():
        print(f"  models.nus.unsample, {name:<12} {run['seconds'] * 1e3:8.1f} ms per image (median of "
              f"{args.repeats})   {theirs / run['seconds']:5.1f} x faster than griddata")
        if run["split"]:
            print("      " + ", ".join(f"{k.split('/')[1]} {v:.1f} ms" for k, v in run["split"].items()))
    print(f"  scipy griddata (linear, CPU){'':<7} {theirs * 1e3:8.1f} ms per image (median of "
          f"{args.griddata_repeats})")
    print(f"  argmax agreement {100 * agree:.3f} % of {int(valid.sum())} pixels "
          f"({int((~valid).sum())} outside griddata's hull)")


if __name__ == "__main__":
    main()
