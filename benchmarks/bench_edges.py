"""Edge targets: ours vs the per-class distance-transform oracle on a 1024 x 2048 map.

    python benchmarks/bench_edges.py [--height 1024 --width 2048 --radius 2 --repeat 20]

Prints both times (same run), the speed-up and whether the outputs are identical; exits
non-zero if they differ.  CPU timings are noisy when other jobs share the machine.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.edges import edge_target, edge_target_reference  # noqa: E402
from datasets.labels import labelid_to_trainid  # noqa: E402
from datasets.synthetic import render_scene  # noqa: E402


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times)), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--radius", type=float, default=2)
    parser.add_argument("--repeat", type=int, default=20, help="runs of ours (the oracle runs 3 times)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    _, label_ids = render_scene(np.random.default_rng(args.seed), args.height, args.width)
    label = labelid_to_trainid(label_ids)
    classes = np.unique(label)
    print(f"label map {args.height}x{args.width} (synthetic Cityscapes scene), {len(classes) - (255 in classes)} "
          f"classes + ignore, radius {args.radius:g}, {os.cpu_count()} CPUs")
    ref_best, ref_median, expected = best_of(lambda: edge_target_reference(label, args.radius), 3)
    ours_best, ours_median, ours = best_of(lambda: edge_target(label, args.radius), args.repeat)
    equal = np.array_equal(ours, expected)
    print(f"oracle (19 classes x 2 scipy EDTs): best {ref_best * 1e3:9.1f} ms   median {ref_median * 1e3:9.1f} ms")
    print(f"ours   (disk dilate/erode)        : best {ours_best * 1e3:9.2f} ms   median {ours_median * 1e3:9.2f} ms")
    print(f"speed-up: {ref_best / ours_best:.0f}x (best vs best), {ref_median / ours_median:.0f}x (median vs median)")
    print(f"identical: {equal} ({int(expected.sum())} edge pixels)")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
