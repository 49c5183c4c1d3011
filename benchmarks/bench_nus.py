"""Un-sampling speed: 192 x 192 x 19 logits back to 1024 x 1024, ``models.nus.unsample`` on the
chosen device vs scipy's ``griddata(method="linear")`` (the reference's un-sampler) on the same
points and values, with the share of pixels whose argmax agrees.

    python benchmarks/bench_nus.py [--device cuda] [--repeats 5] [--griddata-repeats 1]

The sample grid is a learned-looking one: the regularised targets of a synthetic Cityscapes
label map (datasets.nus_targets), resized to 192 x 192; logits are a noisy one-hot of the
label sampled there (so the argmax comparison looks at real class boundaries).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from scipy.interpolate import griddata

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--grid", type=int, default=192)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--griddata-repeats", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    label, locations, logits = make_case(args.size, args.grid, args.classes)
    loc_d, logits_d = locations.to(device), logits.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    out = unsample(logits_d, loc_d, (args.size, args.size))  # warm-up
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = unsample(logits_d, loc_d, (args.size, args.size))
        sync()
        times.append(time.perf_counter() - t0)
    ours = float(np.median(times))

    points = locations[0].double().numpy().reshape(-1, 2) * (args.size - 1)
    values = logits[0].permute(1, 2, 0).reshape(-1, args.classes).numpy()
    pixels = np.stack(np.mgrid[:args.size, :args.size], -1).reshape(-1, 2)
    ref_times = []
    for _ in range(args.griddata_repeats):
        t0 = time.perf_counter()
        ref = griddata(points, values, pixels, method="linear")
        ref_times.append(time.perf_counter() - t0)
    theirs = float(np.median(ref_times))
    ref = ref.reshape(args.size, args.size, args.classes)
    valid = ~np.isnan(ref).any(-1)
    agree = (out[0].argmax(0).cpu().numpy() == ref.argmax(-1))[valid].mean()
    print(f"un-sampling {args.grid} x {args.grid} x {args.classes} logits to {args.size} x {args.size} "
          f"(torch {torch.__version__}, {device}, {torch.get_num_threads()} threads)")
    print(f"  models.nus.unsample          {ours * 1e3:9.1f} ms per image (median of {args.repeats})")
    print(f"  scipy griddata (linear)      {theirs * 1e3:9.1f} ms per image (median of {args.griddata_repeats}, CPU)")
    print(f"  speed-up                     {theirs / ours:9.1f} x")
    print(f"  argmax agreement             {100 * agree:9.3f} % of {int(valid.sum())} pixels "
          f"({int((~valid).sum())} outside griddata's hull)")


if __name__ == "__main__":
    main()
