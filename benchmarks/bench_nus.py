"""Un-sampling speed: 192 x 192 x 19 logits back to 1024 x 1024, ``models.nus.unsample`` on the
chosen device vs scipy's ``griddata(method="linear")`` (the reference's un-sampler) on the same
points and values, with the share of pixels whose argmax agrees.

    OMP_NUM_THREADS=1 python benchmarks/bench_nus.py [--device cuda] [--repeats 5] [--griddata-repeats 5]
                                                     [--profile]

The sample grid is a learned-looking one: the regularised targets of a synthetic Cityscapes
label map (datasets.nus_targets), resized to 192 x 192; logits are a noisy one-hot of the
label sampled there (so the argmax comparison looks at real class boundaries).

Memory pages matter on a CPU: the 80 MB float32 output is fresh memory every call, and on a
virtual machine touching it page by page (4 KiB) can cost more than computing it.  numpy (hence
griddata) asks the kernel for transparent huge pages by default; PyTorch does only when
``THP_MEM_ALLOC_ENABLE=1`` is set before it starts, which is why ``unsample`` takes its large
CPU buffers from numpy.  The un-sampler is timed twice, in two child processes, with
PyTorch's default pages and with ``THP_MEM_ALLOC_ENABLE=1`` (they should now agree).  Both
sides drop the previous result before the next call, as a validation loop does (griddata
took 1.3-1.9x longer with its previous 160 MB result still alive), and both get one warm-up
call.  Threads: both sides use what ``OMP_NUM_THREADS`` allows (scipy's griddata is
single-threaded anyway).
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
    """Median seconds of ``unsample`` over ``args.repeats`` calls after one warm-up, and the
    output of the last call; with ``profile``, the split of one more call (ms per step)."""
    device = torch.device(args.device)
    _, locations, logits = make_case(args.size, args.grid, args.classes)
    loc_d, logits_d = locations.to(device), logits.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = unsample(logits_d, loc_d, (args.size, args.size))  # warm-up
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


def child_times(args, huge_pages: bool):
    """``time_unsample`` in a fresh process with ``THP_MEM_ALLOC_ENABLE`` set or cleared."""
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if huge_pages else "0")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--device", args.device, "--size", str(args.size),
           "--grid", str(args.grid), "--classes", str(args.classes), "--repeats", str(args.repeats)]
    if args.profile:
        cmd.append("--profile")
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--grid", type=int, default=192)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=5)
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
        runs = {"PyTorch's default pages": child_times(args, False), "huge pages": child_times(args, True)}
        out = unsample(logits, locations, (args.size, args.size))
    else:
        seconds, out, split = time_unsample(args, args.profile)
        runs = {args.device: {"seconds": seconds, "threads": torch.get_num_threads(), "split": split}}
    points = locations[0].double().numpy().reshape(-1, 2) * (args.size - 1)
    values = logits[0].permute(1, 2, 0).reshape(-1, args.classes).numpy()
    pixels = np.stack(np.mgrid[:args.size, :args.size], -1).reshape(-1, 2)
    ref_times, ref = [], griddata(points, values, pixels, method="linear")  # warm-up, as for unsample
    for _ in range(args.griddata_repeats):
        ref = None  # as above: with the previous 160 MB result still alive, griddata took 1.3-1.9x longer
        t0 = time.perf_counter()
        ref = griddata(points, values, pixels, method="linear")
        ref_times.append(time.perf_counter() - t0)
    theirs = float(np.median(ref_times))
    ref = ref.reshape(args.size, args.size, args.classes)
    valid = ~np.isnan(ref).any(-1)
    agree = (out[0].argmax(0).cpu().numpy() == ref.argmax(-1))[valid].mean()
    threads = next(iter(runs.values()))["threads"]
    print(f"un-sampling {args.grid} x {args.grid} x {args.classes} logits to {args.size} x {args.size} "
          f"(torch {torch.__version__} on {args.device} with {threads} thread{'s' if threads > 1 else ''}; "
          f"scipy griddata single-threaded)")
    for name, run in runs.items():
        print(f"  models.nus.unsample, {name:<24} {run['seconds'] * 1e3:8.1f} ms per image (median of "
              f"{args.repeats})   {theirs / run['seconds']:5.1f} x faster than griddata")
        if run["split"]:
            print("      " + ", ".join(f"{k.split('/')[1]} {v:.1f} ms" for k, v in run["split"].items()))
    print(f"  scipy griddata (linear, CPU){'':<19} {theirs * 1e3:8.1f} ms per image (median of "
          f"{args.griddata_repeats})")
    print(f"  argmax agreement {100 * agree:.3f} % of {int(valid.sum())} pixels "
          f"({int((~valid).sum())} outside griddata's hull)")


if __name__ == "__main__":
    main()
