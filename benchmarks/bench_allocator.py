"""CPU training steps with glibc's default malloc settings and with ``keep_freed_memory``.

    OMP_NUM_THREADS=1 python benchmarks/bench_allocator.py                 # one process per variant
    OMP_NUM_THREADS=1 python benchmarks/bench_allocator.py --concurrent 3  # three at once, as the demos run theirs

``experiment.runtime.keep_freed_memory`` (applied by every experiment script on the CPU) makes
malloc serve blocks up to 32 MB from its heap and keep freed memory.  This measures what that
buys on the synthetic demos' training steps: HRNet-16-Slim, 8 crops of 128 x 256, one SGD step
with (a) the scribble demo's pCE + DenseCRF objective, (b) pCE alone, (c) the main job's joint
loss with its edge head (no InverseForm term).  Each variant runs in fresh child processes (the
setting is process-wide), ``--concurrent`` of them at once, default and kept settings one after
the other, ``--repeats`` times.  Per step: wall seconds, CPU seconds in user and system mode
(getrusage) and minor page faults, as the median over the child processes.  The losses of the
two settings must be equal to the bit (the allocator only places memory): the script says so.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = ("densecrf", "pce", "joint")


def child(case: str, keep: bool, steps: int) -> dict:
    import torch

    from experiment.config import LossConfig
    from experiment.methods.segmentation import SegmentationObjective
    from experiment.methods.weak import DenseCRFConfig, WeakConfig, WeakObjective
    from experiment.runtime import keep_freed_memory
    from models import get_net

    applied = keep_freed_memory() if keep else False
    torch.manual_seed(0)
    net = get_net("lighthrnet.HRNet16", num_classes=19, has_edge=case == "joint").train()
    # smooth colour fields (a crop's regions), not noise: the DenseCRF lattice's size depends on the colours
    images = torch.nn.functional.interpolate(torch.randn(8, 3, 8, 16), size=(128, 256), mode="bilinear")
    label = torch.randint(0, 19, (8, 128, 256))
    roi = torch.ones(8, 128, 256)
    if case == "joint":
        objective = SegmentationObjective(LossConfig(inv_weight=0.0), 19, None)
        edge = (torch.rand(8, 1, 128, 256) > 0.9).float()
        loss_of = lambda out: objective(out, label, edge)[0]  # noqa: E731
    else:
        label[torch.rand(8, 128, 256) > 0.03] = 255  # scribbles label about 3 % of the pixels
        crf = DenseCRFConfig(weight=1e-5 if case == "densecrf" else 0.0, sigma_rgb=15, sigma_xy=10, scale=0.5)
        objective = WeakObjective(LossConfig(), WeakConfig(densecrf=crf), 19)
        loss_of = lambda out: objective(out, label, image=images, roi=roi)[0]  # noqa: E731
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    losses = []

    def step():
        loss = loss_of(net(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    for _ in range(2):  # warm-up
        step()
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"applied": applied, "wall": wall / steps, "user": (after.ru_utime - usage.ru_utime) / steps,
            "sys": (after.ru_stime - usage.ru_stime) / steps, "faults": (after.ru_minflt - usage.ru_minflt) / steps,
            "losses": [float.hex(v) for v in losses]}


def run_variant(case: str, keep: bool, steps: int, concurrent: int) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--keep", str(int(keep)), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(concurrent)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"child {' '.join(cmd)} failed with exit code {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--steps", type=int, default=20, help="timed steps per child (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (default, kept) child processes")
    p.add_argument("--concurrent", type=int, default=1, help="child processes of one variant at once")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--keep", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, bool(args.keep), args.steps)))
        return
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {args.concurrent} process(es) at once, "
          f"{args.steps} steps each, {args.repeats} rounds; medians per step")
    print(f"{'case':<9} {'malloc':<8} {'wall s':>7} {'user s':>7} {'sys s':>7} {'faults':>9}")
    for case in args.cases:
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for keep in (False, True):
                runs[keep] += run_variant(case, keep, args.steps, args.concurrent)
        for keep, name in ((False, "default"), (True, "kept")):
            med = {k: statistics.median(r[k] for r in runs[keep]) for k in ("wall", "user", "sys", "faults")}
            print(f"{case:<9} {name:<8} {med['wall']:>7.3f} {med['user']:>7.3f} {med['sys']:>7.3f} {med['faults']:>9.0f}")
        if not all(r["applied"] for r in runs[True]):
            print(f"{case}: keep_freed_memory was not applied (no glibc?)")
        same = len({tuple(r["losses"]) for r in runs[False] + runs[True]}) == 1
        print(f"{case}: losses of every step {'equal to the bit' if same else 'DIFFER'} under both settings")


if __name__ == "__main__":
    main()
