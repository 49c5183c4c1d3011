"""Time and accuracy of the models in NCHW and in channels_last (NHWC).

    python benchmarks/bench_layout.py                     # CPU, the synthetic recipes' models
    python benchmarks/bench_layout.py --device cuda --repeats 20

``experiment.acceleration.place_model`` puts the models in channels_last on CUDA and keeps NCHW
on the CPU.  For each case (the main job's and the NUS demo's training steps at their crop and
batch sizes, the main job's validation forward, HRNet-18's eval forward at half the Cityscapes
size) this times one step with the model and its input placed as NCHW and as NHWC
(``place_model`` / ``to_device_images`` with the layout forced), the two alternating step by step
so that changes of the machine's speed touch both alike, and prints the median time of each and
the speed-up.  Accuracy: for a training step, the parameter gradients' relative error against
the same step in float64 (median and maximum over the parameters), for an eval forward the
outputs' largest difference from float64; and BatchNorm alone in training mode on activations
whose mean is 10x their spread, where the layouts' batch statistics differ most.
"""
import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from experiment.acceleration import place_model, to_device_images  # noqa: E402
from models import get_net  # noqa: E402

# (name, arch, has_edge, train, batch, height, width)
CASES = [
    ("main job training step", "lighthrnet.HRNet16", True, True, 8, 128, 256),
    ("main job validation forward", "lighthrnet.HRNet16", True, False, 4, 256, 512),
    ("NUS demo training step", "deeplabv3.MobileNetV2", False, True, 8, 128, 128),
    ("HRNet-18-IF eval forward", "ocrnet.HRNet", True, False, 1, 512, 1024),
]


def rel_error(a, ref):
    """||a - ref|| / ||ref||, with ``ref`` the float64 result."""
    return ((a.double() - ref).norm() / ref.norm()).item()


def outputs(out):
    return list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]


def step(net, images, train, device):
    """One timed step; returns the seconds and the outputs (after backward: the gradients are in net)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if train:
        out = outputs(net(images))
        sum(o.float().mean() for o in out).backward()
    else:
        with torch.no_grad():
            out = outputs(net(images))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, [o.detach() for o in out]


def accuracy(net, x, train, channels_last, device):
    """Relative error against float64: of the gradients (train) or of the outputs (eval)."""
    exact = copy.deepcopy(net).to(device, torch.float64)
    model = place_model(copy.deepcopy(net), device, channels_last)
    for m in list(exact.modules()) + list(model.modules()):
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()                       # no random masks: both compute the same function
    _, ref = step(exact, x.to(device, torch.float64), train, device)
    _, out = step(model, to_device_images(x, device, channels_last), train, device)
    if not train:
        return [rel_error(a, b) for a, b in zip(out, ref)]
    exact_grads = dict(exact.named_parameters())
    return [rel_error(p.grad, exact_grads[n].grad) for n, p in model.named_parameters()
            if p.grad is not None and exact_grads[n].grad.norm() > 1e-6]  # conv biases before BN: ~0


def bench(case, repeats, device):
    name, arch, has_edge, train, batch, height, width = case
    torch.manual_seed(0)
    net = get_net(arch, num_classes=19, has_edge=has_edge).train(train)
    x = torch.randn(batch, 3, height, width)
    nets = {cl: place_model(copy.deepcopy(net), device, channels_last=cl) for cl in (False, True)}
    inputs = {cl: to_device_images(x, device, channels_last=cl) for cl in (False, True)}
    times = {False: [], True: []}
    for i in range(repeats + 1):           # the first step of each warms up and is not counted
        for layout in (False, True):
            seconds, _ = step(nets[layout], inputs[layout], train, device)
            if i:
                times[layout].append(seconds)
    a, b = statistics.median(times[False]), statistics.median(times[True])
    errors = {cl: accuracy(net, x, train, cl, device) for cl in (False, True)}
    what = "gradients" if train else "outputs"
    print(f"{name} ({arch}, {batch} x {height} x {width}): NCHW {a * 1e3:.1f} ms, channels_last "
          f"{b * 1e3:.1f} ms ({100 * (a - b) / a:+.1f} %); {what}' relative error vs float64, median / max: "
          + ", ".join(f"{label} {statistics.median(errors[cl]):.1e} / {max(errors[cl]):.1e}"
                      for label, cl in (("NCHW", False), ("channels_last", True))))


def batchnorm_error(device):
    torch.manual_seed(0)
    x = torch.randn(8, 32, 64, 128) + 10.0
    grad = torch.randn_like(x)
    exact = torch.nn.BatchNorm2d(32).to(device, torch.float64)
    xd = x.to(device, torch.float64).requires_grad_(True)
    yd = exact(xd)
    yd.backward(grad.to(device, torch.float64))
    parts = []
    for label, cl in (("NCHW", False), ("channels_last", True)):
        bn = torch.nn.BatchNorm2d(32).to(device)
        xi = to_device_images(x, device, cl).detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        y = bn(xi)
        y.backward(to_device_images(grad, device, cl))
        parts.append(f"{label}: output {rel_error(y, yd):.1e}, input gradient {rel_error(xi.grad, xd.grad):.1e}")
    print("BatchNorm2d, training mode, 8 x 32 x 64 x 128, mean 10 x the spread; relative error vs float64: "
          + "; ".join(parts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per layout (after one warm-up)")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES],
                        metavar="CASE", help="which of: " + "; ".join(c[0] for c in CASES))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, torch threads: {torch.get_num_threads()}; median of {args.repeats} steps")
    for case in CASES:
        if case[0] in args.cases:
            bench(case, args.repeats, device)
    batchnorm_error(device)


if __name__ == "__main__":
    main()
