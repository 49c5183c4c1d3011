"""DenseCRF loss forward + backward time: rloss (tensor lattice) vs the reference's C++ filter.

    python benchmarks/bench_rloss.py                                   # 8 x 21 x 512 x 512, scale 0.5
    python benchmarks/bench_rloss.py --device cuda --reference-build /tmp/rloss/pytorch/wrapper/bilateralfilter

The reference (meng-tang/rloss, built beside the project as its README says; never a
dependency) is timed when ``--reference-build`` (or $RLOSS_REFERENCE_BUILD) points at the
directory of its built ``bilateralfilter`` module: its forward (downscale, numpy round trip,
``bilateralfilter_batch`` with OpenMP over the batch, float32 dot) and backward (the stored
filtered values back through the bilinear downscaling), as its DenseCRFLoss.py does it, on the CPU.
Published settings: sigma_rgb 15, sigma_xy 100, weight 2e-9.  Both are timed in wall time and in
process CPU time (the work done, which other jobs on a shared machine inflate less).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rloss import DenseCRFLoss  # noqa: E402


def inputs(n, k, h, w, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, h // 32, w // 32, generator=g) * 255
    image = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    image = (image + 10 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).round()
    logits = F.interpolate(torch.randn(n, k, h // 16, w // 16, generator=g) * 3, size=(h, w), mode="bilinear",
                           align_corners=False)
    roi = torch.ones(n, h, w)
    roi[:, :, w - w // 8:] = 0
    return image.to(device), logits.to(device), roi.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(image, logits, roi, args, device):
    """One forward + backward of rloss: (wall seconds, process CPU seconds, loss)."""
    loss_fn = DenseCRFLoss(2e-9, args.sigma_rgb, args.sigma_xy, args.scale)
    seg = torch.softmax(logits, 1).requires_grad_(True)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss = loss_fn(image, seg, roi)
    loss.backward()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, loss.item()


def time_reference(bf, image, logits, roi, args):
    """One forward + backward as the reference's DenseCRFLoss.py does it: (wall s, CPU s, loss)."""
    seg = torch.softmax(logits, 1).requires_grad_(True)
    t0, c0 = time.perf_counter(), time.process_time()
    img_s = F.interpolate(image, scale_factor=args.scale)
    seg_s = F.interpolate(seg, scale_factor=args.scale, mode="bilinear", align_corners=False)
    roi_s = F.interpolate(roi[:, None], scale_factor=args.scale)
    n, k, h, w = seg_s.shape
    masked = (seg_s.detach() * roi_s).numpy().ravel()
    out = np.zeros(masked.shape, dtype=np.float32)
    bf.bilateralfilter_batch(img_s.numpy().ravel(), masked, out, n, k, h, w, float(args.sigma_rgb),
                             float(args.sigma_xy * args.scale))
    loss = -float(np.dot(masked, out)) / n * 2e-9
    grad = -2.0 * torch.from_numpy(out.reshape(n, k, h, w)) / n * roi_s * 2e-9
    seg_s.backward(grad)
    return time.perf_counter() - t0, time.process_time() - c0, loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--sigma_rgb", type=float, default=15.0)
    p.add_argument("--sigma_xy", type=float, default=100.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reference-build", default=os.environ.get("RLOSS_REFERENCE_BUILD"))
    p.add_argument("--threads", type=int, help="CPU threads of both (default: torch's): torch's OpenMP runtime is "
                                               "the one the reference's module loads, so its parallel loop over "
                                               "the batch follows the same setting")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = args.size
    print(f"DenseCRF loss forward + backward, {args.batch} x {args.classes} x {h} x {w}, scale {args.scale}, "
          f"sigma_rgb {args.sigma_rgb}, sigma_xy {args.sigma_xy}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    image, logits, roi = inputs(args.batch, args.classes, h, w, torch.device("cpu"))
    bf = None
    if args.reference_build:
        sys.path.insert(0, os.path.abspath(args.reference_build))
        try:
            import bilateralfilter as bf
        except ImportError as exc:
            print(f"reference not importable from {args.reference_build}: {exc}")
    # alternate the two so that both see the same load on a shared machine
    dev_inputs = (image.to(device), logits.to(device), roi.to(device))
    ours, ours_cpu, ref, ref_cpu = [], [], [], []
    for i in range(args.warmup + args.repeats):
        wall, cpu, value = time_ours(*dev_inputs, args, device)
        if i >= args.warmup:
            ours.append(wall)
            ours_cpu.append(cpu)
        if bf is not None:
            wall, cpu, ref_value = time_reference(bf, image, logits, roi, args)
            if i >= args.warmup:
                ref.append(wall)
                ref_cpu.append(cpu)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    med = statistics.median
    print(f"rloss (tensor lattice) on {name}: {med(ours) * 1000:.1f} ms "
          f"(median of {len(ours)}, min {min(ours) * 1000:.1f}; process CPU time {med(ours_cpu) * 1000:.1f} ms; "
          f"loss {value:.7g})")
    if bf is None:
        print("reference not timed (give --reference-build DIR of its built bilateralfilter module)")
        return
    print(f"reference (C++ lattice, OpenMP over the batch) on the CPU: {med(ref) * 1000:.1f} ms "
          f"(median of {len(ref)}, min {min(ref) * 1000:.1f}; process CPU time {med(ref_cpu) * 1000:.1f} ms; "
          f"loss {ref_value:.7g}, float32 dot)")
    print(f"speed-up (wall, medians): {med(ref) / med(ours):.2f}x; CPU time: {med(ref_cpu) / med(ours_cpu):.2f}x "
          f"(CPU time: the work done, whatever else runs on the machine)")

if __name__ == "__main__":
    main()
