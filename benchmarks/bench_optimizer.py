"""Optimizer-step time of torch's three implementations, for the parameters this project trains.

    python benchmarks/bench_optimizer.py                  # CPU, the synthetic recipes' two models
    python benchmarks/bench_optimizer.py --device cuda --steps 200

For each parameter set (the synthetic regressor's shape when the docs' figures were measured:
InverseNet on 64 x 64 tiles, hidden 512 / 32, 4.2 M parameters in 6 tensors - its second layer is
512 wide now, 4.5 M parameters, still dominated by the first; HRNet-16-Slim with its edge head:
3.3 M parameters in 451 tensors) and each optimizer (SGD with momentum, AdamW), times
``optimizer.step()`` with ``foreach=False`` (a loop over tensors), ``foreach=True`` and ``fused=True``, the three
alternating step by step so that changes of the machine's speed touch all alike; prints the
median step time, and how far each implementation's parameters are from the loop's after the
timed steps (the same random gradients for all).  ``engine`` names what
``experiment.engine.OptimizerSpec`` builds.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from experiment.engine import OptimizerSpec  # noqa: E402
from inverseform import InverseNet  # noqa: E402
from models import get_net  # noqa: E402

VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
OPTIMIZERS = {"sgd": lambda ps, kw: torch.optim.SGD(ps, lr=0.03, momentum=0.9, weight_decay=5e-4, **kw),
              "adamw": lambda ps, kw: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, **kw)}


def parameter_sets(device):
    regressor = InverseNet(64, 4, (512, 32), parameterisation="scale_shift")
    hrnet = get_net("lighthrnet.HRNet16", num_classes=19, has_edge=True)
    return {"regressor (InverseNet 64, 512/32)": [p.detach().to(device) for p in regressor.parameters()],
            "HRNet-16-Slim + edge head": [p.detach().to(device) for p in hrnet.parameters()]}


def engine_choice(kind, device):
    built = OptimizerSpec(kind=kind, lr=1e-3).build([torch.nn.Parameter(torch.zeros(1, device=device))])
    return "fused" if built.defaults.get("fused") else "foreach" if built.defaults.get("foreach") else "default"


def measure(params, kind, steps, device):
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [[torch.randn(p.shape, generator=gen, device=device) for p in params] for _ in range(4)]
    runs = {}
    for name, kw in VARIANTS.items():
        copies = [torch.nn.Parameter(p.clone()) for p in params]
        runs[name] = (copies, OPTIMIZERS[kind](copies, kw), [])
    for i in range(steps + 3):   # three warm-up steps
        for copies, opt, times in runs.values():
            for p, g in zip(copies, grads[i % len(grads)]):
                p.grad = g
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
    reference = runs["loop"][0]
    out = {}
    for name, (copies, _, times) in runs.items():
        diff = max(float((a - b).detach().abs().max()) for a, b in zip(copies, reference))
        out[name] = (statistics.median(times) * 1e3, diff)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per implementation")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    for label, params in parameter_sets(device).items():
        print(f"\n{label}: {sum(p.numel() for p in params) / 1e6:.2f} M parameters in {len(params)} tensors")
        for kind in OPTIMIZERS:
            result = measure(params, kind, args.steps, device)
            cells = ", ".join(f"{name} {ms:.1f} ms (max |diff| {diff:.1e})" for name, (ms, diff) in result.items())
            print(f"  {kind:5s} {cells}; engine uses {engine_choice(kind, device)}")


if __name__ == "__main__":
    main()
