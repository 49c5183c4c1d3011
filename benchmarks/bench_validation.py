#!/usr/bin/env python
"""Steady-state throughput of ``experiment.validation.evaluate()`` at 1024 x 2048.

    python benchmarks/bench_validation.py [--arch ocrnet.AuxHRNet] [--device cpu|cuda] [--batch-size 1]
                                          [--images 8] [--workers 2] [--amp auto|off|bf16|both]
                                          [--compile off|on|max-autotune] [--dump] [--tensorboard]

Runs the whole validation pipeline - loader (PNG decode, train ids, edge target), forward,
the joint validation loss (with an InverseForm term: a randomly initialised regressor of the
released shape, which costs what a trained one costs), confusion matrix, mBA, boundary F,
and optionally prediction dumps / TensorBoard images - twice over a synthetic 1024 x 2048
val split (made once under data/): the first pass warms up (workers, cuDNN autotuning,
compilation), the second is timed.  It does so for ``--arch`` and for a trivial model (one
1x1 convolution for the 19 classes and one for the edge map: the pipeline's own overhead),
and times the arch's bare eval forward on the same batches.  Prints images/s for both and
the overhead per image as a fraction of the arch's forward time, in wall time and in this
process's CPU time (with ``--workers 0 --threads 1`` all work is in one thread, and CPU time is
what the work costs even when other jobs load the machine).  ``--amp both`` repeats
everything in fp32 and bf16.  Timings on a shared CPU vary with its load (printed).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from datasets import Cityscapes, ValTransform  # noqa: E402
from datasets.synthetic import ensure_synthetic  # noqa: E402
from experiment.acceleration import compile_model, place_model, to_device_images  # noqa: E402
from experiment.runtime import Rank0Writer, autocast, resolve_amp  # noqa: E402
from experiment.config import LossConfig  # noqa: E402
from experiment.data import eval_loader  # noqa: E402
from experiment.joint_loss import joint_loss  # noqa: E402
from experiment.evaluation import evaluate
from experiment.pictures import PredictionDumper  # noqa: E402
from inverseform import InverseFormLoss, InverseNet  # noqa: E402
from utils.metrics import (boundary_accuracy, boundary_accuracy_batch, boundary_f_counts,  # noqa: E402
                           boundary_f_counts_batch, confusion_matrix)


class TrivialSegmenter(nn.Module):
    """The cheapest model with the outputs of ours: 19 logits and an edge probability."""

    def __init__(self, num_classes: int = 19):
        super().__init__()
        self.seg = nn.Conv2d(3, num_classes, 1)
        self.edge = nn.Conv2d(3, 1, 1)
        self.hrnet_base = 0

    def forward(self, images):
        return {"pred": self.seg(images), "edge_prob": torch.sigmoid(self.edge(images))}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(net, loader, device, amp_dtype, criterion, args, out_dir):
    dumper = PredictionDumper(os.path.join(out_dir, "predictions"), True) if args.dump else None
    writer = Rank0Writer(os.path.join(out_dir, "tensorboard"), args.tensorboard)
    seconds = []
    for _ in range(2):  # warm-up pass, timed pass
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = evaluate(net, loader, device, num_classes=19, criterion=criterion, amp_dtype=amp_dtype,
                           dumper=dumper, writer=writer if args.tensorboard else None, progress=False)
        sync(device)
        seconds.append((time.perf_counter() - start, time.process_time() - cpu_start))
    writer.close()
    n = metrics["num_images"]
    return n / seconds[-1][0], seconds[-1][1] / n, metrics


def time_metrics(loader, device, repeats=3):
    """CPU/wall ms per image of the batched metrics (this device's path) against the per-image
    numpy/OpenCV oracle the loop used before, on a label map and a prediction shifted by 3 px."""
    label = next(iter(loader))["label"].to(device)
    pred = torch.roll(torch.where(label == 255, 0, label), 3, dims=-1)
    n = label.shape[0]

    def batched():
        boundary_accuracy_batch(pred, label)
        boundary_f_counts_batch(pred, label, 19, 2)
        confusion_matrix(pred, label, 19)
        sync(device)

    def oracle():
        p, t = pred.cpu().numpy().astype("uint8"), label.cpu().numpy().astype("uint8")
        for i in range(n):
            boundary_accuracy(p[i], t[i])
            boundary_f_counts(p[i], t[i], 19, 2)
        confusion_matrix(pred, label, 19)
        sync(device)

    out = {}
    for name, fn in (("batched", batched), ("oracle", oracle)):
        fn()
        wall, cpu = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        out[name] = (1000 * statistics.median(wall) / n, 1000 * statistics.median(cpu) / n)
    return out


def time_forward(net, loader, device, amp_dtype, repeats):
    batch = next(iter(loader))
    images = to_device_images(batch["image"], device)
    times, cpu = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            with autocast(device, amp_dtype):
                net(images)
            sync(device)
            if i:
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu_start)
    return statistics.median(times) / images.shape[0], statistics.median(cpu) / images.shape[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ocrnet.AuxHRNet", choices=list(models.ARCHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--root", default=None, help="dataset root (default: a synthetic 1024x2048 val split)")
    parser.add_argument("--images", type=int, default=8, help="val images timed per pass")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16", "both"))
    parser.add_argument("--compile", default="off", help="off, on, max-autotune, ... (experiment.acceleration)")
    parser.add_argument("--no-loss", action="store_true", help="leave the validation loss out")
    parser.add_argument("--dump", action="store_true", help="also write prediction PNGs (background writer)")
    parser.add_argument("--tensorboard", action="store_true", help="also log 4 TensorBoard images")
    parser.add_argument("--forward-repeats", type=int, default=3)
    parser.add_argument("--skip-arch", action="store_true", help="time the trivial model only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    root = args.root or ensure_synthetic(os.path.join("data", f"bench_synthetic_val{args.images}_1024x2048"),
                                         train=1, val=args.images, test=0, height=1024, width=2048, seed=0)
    dataset = Cityscapes(root, "val", transform=ValTransform())
    if len(dataset) > args.images:
        dataset = torch.utils.data.Subset(dataset, range(args.images))
    loader = eval_loader(dataset, args.batch_size, args.workers)
    criterion = None
    if not args.no_loss:
        inverseform = InverseFormLoss(InverseNet(), check_inputs=False)  # released shape: 224 tiles, 4 params
        criterion = joint_loss(LossConfig(), 19, inverseform).to(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, {len(dataset)} images of 1024x2048, batch {args.batch_size}, {args.workers} workers, "
          f"torch threads {torch.get_num_threads()}, load average {load:.2f}, compile {args.compile}, "
          f"loss {'off' if args.no_loss else 'on'}, dumps {'on' if args.dump else 'off'}")
    m = time_metrics(loader, device)
    print(f"boundary metrics + confusion matrix per image: {m['batched'][0]:.1f} ms ({m['batched'][1]:.1f} ms CPU) "
          f"batched on {device} vs {m['oracle'][0]:.1f} ms ({m['oracle'][1]:.1f} ms CPU) for the per-image "
          f"numpy/OpenCV oracle")
    amps = ("off", "bf16") if args.amp == "both" else (args.amp,)
    torch.manual_seed(0)
    arch_net = None if args.skip_arch else place_model(models.get_net(args.arch, has_edge=True).eval(), device)
    trivial = place_model(TrivialSegmenter().eval(), device)
    for amp in amps:
        amp_dtype = resolve_amp(amp, device)
        label = {None: "fp32"}.get(amp_dtype, str(amp_dtype).replace("torch.", ""))
        with tempfile.TemporaryDirectory() as out_dir:
            trivial_rate, trivial_cpu, _ = time_pipeline(compile_model(trivial, args.compile), loader, device,
                                                         amp_dtype, criterion, args, out_dir)
            print(f"[{label}] trivial model: {trivial_rate:.2f} images/s ({1000 / trivial_rate:.0f} ms per image, "
                  f"{1000 * trivial_cpu:.0f} ms CPU time of this process: the pipeline's own overhead)")
            if arch_net is None:
                continue
            net = compile_model(arch_net, args.compile)
            forward, forward_cpu = time_forward(net, loader, device, amp_dtype, args.forward_repeats)
            rate, cpu, _ = time_pipeline(net, loader, device, amp_dtype, criterion, args, out_dir)
        print(f"[{label}] {args.arch}: {rate:.2f} images/s with all metrics{'' if args.no_loss else ' and the loss'} "
              f"({1000 * cpu:.0f} ms CPU time per image); bare eval forward {1000 * forward:.0f} ms per image "
              f"({1 / forward:.2f} images/s, {1000 * forward_cpu:.0f} ms CPU time)")
        print(f"[{label}] pipeline overhead per image = {1 / trivial_rate / forward:.3f} x the {args.arch} forward "
              f"(wall time); {trivial_cpu / forward_cpu:.3f} x in CPU time; {args.arch} pipeline time per image = "
              f"{1 / rate / forward:.2f} x its forward")


if __name__ == "__main__":
    main()
