#!/usr/bin/env python
"""Size, FLOPs and forward time of the segmentation models.

    python benchmarks/bench_models.py [--archs ocrnet.AuxHRNet ...] [--height 1024 --width 2048]
                                      [--repeats 3] [--device cpu] [--threads N] [--scales 1.0]

For each arch: parameter count (with edge head and without), GFLOPs of one
eval-mode forward at 1 x 3 x H x W (FlopCounterMode: convolutions and matrix
products, 2 FLOPs per multiply-add; HMS: all of its eval scales, listed) and the
eval-mode forward time (no_grad, random weights, one warm-up run, then the
median of ``--repeats``).  Timings on a shared machine vary with its load.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(arch, height, width, repeats, device, has_edge, hms_scales):
    options = {"scales": hms_scales} if hms_scales and arch == "ocrnet.HRNet_Mscale" else {}
    net = models.get_net(arch, has_edge=has_edge, **options).to(device).eval()
    params = models.count_parameters(net)
    params_noedge = models.count_parameters(models.get_net(arch, has_edge=False))
    flops = models.count_flops(net, (1, 3, height, width))
    x = torch.randn(1, 3, height, width, device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):  # first run is warm-up
            _sync(device)
            start = time.perf_counter()
            net(x)
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
    scales = getattr(net, "scales", None)
    return params, params_noedge, flops, times, scales


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(models.ARCHS), choices=list(models.ARCHS))
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-edge", action="store_true", help="time the models without edge heads")
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="HMS evaluation scales (default: the model's, 0.25 0.5 1 2)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"input 1x3x{args.height}x{args.width}, eval, no_grad, {where}, torch {torch.__version__}, "
          f"{'without' if args.no_edge else 'with'} edge heads, warm-up + median of {args.repeats}")
    header = f"{'arch':22s} {'params':>11s} {'(no edge)':>11s} {'GFLOPs':>9s} {'forward s':>10s}  note"
    print(header)
    print("-" * len(header))
    for arch in args.archs:
        params, params_noedge, flops, times, scales = bench(
            arch, args.height, args.width, args.repeats, device, not args.no_edge, args.scales)
        note = f"eval scales {', '.join(f'{s:g}' for s in scales)}" if scales else ""
        spread = f" (min {min(times):.2f}, max {max(times):.2f})" if len(times) > 1 else ""
        print(f"{arch:22s} {params:11,d} {params_noedge:11,d} {flops / 1e9:9.1f} "
              f"{statistics.median(times):10.2f}  {note}{spread}", flush=True)


if __name__ == "__main__":
    main()
