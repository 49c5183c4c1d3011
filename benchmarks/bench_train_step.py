"""Training-step time with and without the InverseForm term.

    python benchmarks/bench_train_step.py                       # HRNet-18-IF, batch 2, 512x1024, CPU
    python benchmarks/bench_train_step.py --device cuda --amp both --archs ocrnet.AuxHRNet ocrnet.HRNet

One step = forward in train mode, the full objective of experiment/train.py (joint loss on the
main and auxiliary outputs), backward and an SGD step.  The InverseForm term uses a randomly
initialised regressor of the released layout (224 x 224 tiles, 100M parameters): its cost does
not depend on the weights.  Prints the median step time of each variant (after warm-up), the
relative overhead of the term, images/s, and on CUDA the peak memory.  The two variants are
timed step by step in alternation, so that changes of the machine's speed affect both alike.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from experiment.runtime import autocast  # noqa: E402
from experiment.config import LossConfig  # noqa: E402
from experiment.methods.segmentation import SegmentationObjective  # noqa: E402
from inverseform import InverseFormLoss, InverseNet  # noqa: E402
from models import get_net  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """One model, objective and optimizer; ``step()`` runs and times one training step."""

    def __init__(self, arch, inverseform, args, device, amp_dtype):
        torch.manual_seed(0)
        self.device, self.amp_dtype = device, amp_dtype
        self.net = get_net(arch, has_edge=True).to(device).train()
        self.objective = SegmentationObjective(LossConfig(), 19, inverseform).to(device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=1e-3, momentum=0.9)
        self.images = torch.randn(args.batch, 3, args.height, args.width, device=device)
        self.labels = torch.randint(0, 19, (args.batch, args.height, args.width), device=device)
        self.edges = (torch.rand(args.batch, 1, args.height, args.width, device=device) < 0.1).float()
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.times = []

    def step(self, record):
        sync(self.device)
        start = time.perf_counter()
        with autocast(self.device, self.amp_dtype):
            out = self.net(self.images)
        loss, _ = self.objective(out, self.labels, self.edges)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - start)


def measure(arch, inverseform, args, device, amp_dtype):
    """Median step times without and with the term, the two interleaved step by step (in
    alternating order) so that drifts of the machine's speed affect both alike."""
    setups = [Setup(arch, None, args, device, amp_dtype), Setup(arch, inverseform, args, device, amp_dtype)]
    for i in range(args.warmup + args.repeats):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            setups[k].step(record=i >= args.warmup)
    times = [statistics.median(s.times) for s in setups]
    del setups
    return times, [peak_memory(arch, term, args, device, amp_dtype) for term in (None, inverseform)]


def peak_memory(arch, inverseform, args, device, amp_dtype):
    """GiB of CUDA memory at the peak of a training step, one setup alone on the device."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    setup = Setup(arch, inverseform, args, device, amp_dtype)
    setup.step(record=False)
    torch.cuda.reset_peak_memory_stats(device)
    setup.step(record=False)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del setup
    return peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["ocrnet.AuxHRNet"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("off", "bf16", "fp16", "both"), default="off",
                   help="autocast dtype; 'both' measures off and bf16")
    args = p.parse_args()
    device = torch.device(args.device)
    amps = {"off": [None], "bf16": [torch.bfloat16], "fp16": [torch.float16], "both": [None, torch.bfloat16]}[args.amp]
    regressor = InverseNet(224, 4)  # the released layout, random weights
    inverseform = InverseFormLoss(regressor, check_inputs=False).to(device)
    print(f"device {device} ({torch.get_num_threads()} threads), batch {args.batch}, {args.height}x{args.width}, "
          f"median of {args.repeats} after {args.warmup} warm-up step(s)")
    for arch in args.archs:
        for amp_dtype in amps:
            (without, with_if), (peak0, peak1) = measure(arch, inverseform, args, device, amp_dtype)
            amp_name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
            line = (f"{arch:<20} {amp_name}: without InverseForm {without:.3f} s/step "
                    f"({args.batch / without:.2f} img/s), with {with_if:.3f} s/step ({args.batch / with_if:.2f} img/s), "
                    f"overhead {100 * (with_if / without - 1):+.1f}%")
            if peak0 is not None:
                line += f", peak memory {peak0:.2f} / {peak1:.2f} GiB"
            print(line, flush=True)


if __name__ == "__main__":
    main()
