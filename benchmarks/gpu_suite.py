#!/usr/bin/env python
"""Every GPU figure this project promises, measured by one command on one CUDA GPU.

    python benchmarks/gpu_suite.py --out gpu_suite.json                  # on the GPU: about 8 minutes
    python benchmarks/gpu_suite.py --out r.json --only forward,rloss     # chosen steps (names or numbers)
    python benchmarks/gpu_suite.py --smoke --out r.json                  # the same steps on the CPU, tiny sizes

Seven steps, each in its own child process with its own time limit: a failure or a hang costs
only that step (it is killed; the figures it had not measured say ERROR or TIMEOUT with the
error's last line), and a step's figures are written as they are measured, so one stopped at its
limit keeps what it finished.

1. ``forward``: eval forward at 1 x 3 x 1024 x 2048 of HRNet-16-Slim, HRNet-18-IF, OCRNet-48 and
   HMS-OCRNet-48 (at its validation scales 0.25/0.5/1/2) in fp32 (TF32) and bf16 autocast, each
   in NCHW and channels_last (ms, images/s, TFLOP/s; FLOPs counted by FlopCounterMode on the
   first pass), then each compiled (torch.compile, inductor's default mode, bf16 +
   channels_last).  Targets: bf16 + channels_last never slower than fp32 (the faster layout);
   compile >= 1.5x; HMS >= 25 % of the bf16 peak (the datasheet's, by device name; else a large
   bf16 matmul measured here).
2. ``evaluate``: ``experiment.evaluation.evaluate()`` with every metric and the loss (an
   InverseForm term of the released shape) at batch 4 over a synthetic 1024 x 2048 val split (16
   images, each read and decoded 6 times per pass), in validation's precision: HRNet-18-IF >= 60
   images/s, a trivial model (two 1x1 convolutions) >= 150 images/s, HMS-OCRNet-48's evaluation
   within 20 % of its bare forward.
3. ``train``: the engine's training step (experiment/engine.py ``Trainer._step`` on the
   segmentation method's task: forward, objective, finite check, backward, optimizer) per arch,
   bf16, batch 2 of 512 x 1024 crops, under DDP on a one-process NCCL group with SyncBatchNorm:
   eager for every arch, then compiled (inductor's default mode and ``reduce-overhead``).  Host
   syncs per step counted with ``torch.cuda.set_sync_debug_mode("warn")``; target: the finite
   check's one and no other.
4. ``rloss``: the DenseCRF loss forward + backward, 8 x 21 x 512 x 512 at scale 0.5, on the GPU
   against this process's CPU path: >= 20x.
5. ``nus``: ``models.nus.unsample`` of 8 x 19 x 192 x 192 logits to 1024 x 1024: < 5 ms per image.
6. ``main_job``: the README's main job (``python -m experiment.train --config
   configs/synthetic.yaml``, the CUDA recipe on a GPU) end to end: wall <= 90 s, mIoU >= the CPU
   recipe's; then folder inference and an ONNX export of the trained model.  It writes what the
   README's command writes (data/synthetic_cityscapes, checkpoints/synthetic_regressor.pth and
   runs/synthetic_regressor, made on first use); the figure says whether it made them.
7. ``deterministic``: two ``--deterministic`` runs of the main job's config for a few
   iterations (run side by side): their ``last.pth`` weights must be equal.

On the GPU the steps run one at a time in the order 4, 5, 2, 6, 7, 1, 3: compiling is the part
likeliest to overrun, and each step inherits the time the earlier ones left of their shares of
``--budget`` (440 s by default, so that the whole suite stays under 8 minutes).  The evaluation
split is kept under data/ (made once); everything else goes to a temporary ``--workdir``.

``--smoke`` runs the same steps and figures on the CPU at tiny sizes (W16 trunks for the W48
archs, HMS at scales 0.5 and 1, gloo for NCCL, training steps in fp32, two steps at a time) and
judges no target.  torch.compile runs there with
TorchDynamo disabled (``TORCH_COMPILE_DISABLE=1``: the compiled wrappers are built and called but
run eagerly), because tracing the HRNets takes minutes on a small CPU (about 30 s per arch for
the eval forward and over a minute per arch for a training step, with the cheapest backend);
``--smoke-compile eager`` or ``aot_eager`` traces them for real.  Host syncs are counted on CUDA
only (n/a in smoke).

Prints one table (figure, target, measured, status: PASS, FAIL, ERROR or TIMEOUT with the
error's last line, ``-`` for a figure without a target, ``smoke``) and writes it, with each step's
status and the tail of its log, to ``--out`` (an existing file is replaced only with
``--overwrite``).  Exit status 1 when a figure could not be measured (ERROR, TIMEOUT), else 0.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.errors import ExistingOutputError, InputError, InvalidInputError, MissingInputError  # noqa: E402
from utils.io import atomic_write_json  # noqa: E402

# The CPU recipe's mean mIoU (%) on the 20 synthetic val images over the runs of README.md
# "Results" (2-core Intel Xeon; 1440 iterations, seeds 0-2 x 1-2 threads: 74.21-75.64).
CPU_RECIPE_MIOU = 74.77

# Dense bf16 tensor-core peaks, TFLOP/s (NVIDIA datasheets: half the "with sparsity" figure),
# matched by substring of torch.cuda.get_device_name(), the most specific first.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                    ("H200", 989.0))

# (name in the table, arch flag), the cheapest first: a step stopped at its limit has measured
# the most archs.
ARCHS = (("HRNet-16-Slim", "lighthrnet.HRNet16"), ("HRNet-18-IF", "ocrnet.AuxHRNet"),
         ("OCRNet-48", "ocrnet.HRNet"), ("HMS-OCRNet-48", "ocrnet.HRNet_Mscale"))
HMS = "ocrnet.HRNet_Mscale"
SMOKE_BASES = {"ocrnet.HRNet": 16, "ocrnet.HRNet_Mscale": 16}  # --smoke: the W48 archs on W16 trunks,
SMOKE_HMS_SCALES = (0.5, 1.0)                                   # HMS at two eval scales

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    number: int     # the item of the module docstring's list
    share: float    # seconds of the default budget
    smoke: float    # seconds it took in smoke on a 2-core CPU: --smoke starts the longest first
    summary: str


STEPS = (  # in the order they run on the GPU (see the module docstring)
    Step("rloss", 4, 15, 3, "DenseCRF loss forward + backward, GPU vs CPU"),
    Step("nus", 5, 10, 4, "NUS unsample to 1024 x 1024"),
    Step("evaluate", 2, 45, 7, "evaluate() images/s with every metric and the loss"),
    Step("main_job", 6, 150, 26, "the README main job (CUDA recipe), folder inference, ONNX export"),
    Step("deterministic", 7, 35, 22, "--deterministic twice: equal weights"),
    Step("forward", 1, 100, 16, "eval forward per arch: fp32, bf16, NCHW and channels_last, compiled"),
    Step("train", 3, 85, 17, "the engine's training step per arch: eager, compiled, reduce-overhead; host syncs"),
)
DEFAULT_BUDGET = sum(step.share for step in STEPS)
SMOKE_STEP_LIMIT = 300.0   # seconds; in smoke a limit only catches a hang
KILL_WAIT = 5.0


# ============================================================================= the parent
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_suite.json", help="the results as JSON (default gpu_suite.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--only", help="comma-separated steps to run, by name (forward, evaluate, train, rloss, nus, "
                                  "main_job, deterministic) or number (1-7)")
    p.add_argument("--smoke", action="store_true", help="the same steps on the CPU at tiny sizes; no target judged")
    p.add_argument("--smoke-compile", default="off", choices=("off", "eager", "aot_eager"),
                   help="--smoke: torch.compile with TorchDynamo disabled (off, the default), or traced with this "
                        "debugging backend (minutes)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for all chosen steps on the GPU (default {DEFAULT_BUDGET:g}), shared in "
                        "proportion to their shares; time a step leaves goes to the next ones")
    p.add_argument("--step-limit", type=float, help="cap on every step's time limit, seconds")
    p.add_argument("--jobs", type=int, help="steps run at once, --smoke only (default 2; on the GPU always 1)")
    p.add_argument("--workdir", help="where the suite's runs go (default: a temporary folder, removed at the end)")
    p.add_argument("--list", action="store_true", help="list the steps and exit")
    p.add_argument("--step", help=argparse.SUPPRESS)        # the child side: one step
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_steps(only: Optional[str]) -> List[Step]:
    """The steps ``--only`` names (names, numbers, or stepN), in the suite's order; all without it."""
    if not only:
        return list(STEPS)
    wanted = set()
    for item in (part.strip() for part in only.split(",")):
        key = item[4:] if item.startswith("step") and item[4:].isdigit() else item
        matched = {s.name for s in STEPS if key in (s.name, str(s.number))}
        if not matched:
            names = ", ".join(s.name for s in sorted(STEPS, key=lambda s: s.number))
            raise InvalidInputError(f"--only: unknown step {item!r}; the steps: {names} (or their numbers 1-7)")
        wanted |= matched
    return [s for s in STEPS if s.name in wanted]


def check_args(args: argparse.Namespace) -> str:
    """The --out path, after every check that needs no child process."""
    if args.jobs is not None and (args.jobs < 1 or not args.smoke):
        raise InvalidInputError("--jobs N (N >= 1) applies to --smoke only: on the GPU the steps run one at a time")
    for flag, value in (("--budget", args.budget), ("--step-limit", args.step_limit)):
        if value is not None and value <= 0:
            raise InvalidInputError(f"{flag} must be > 0 seconds, got {value:g}")
    path = os.path.abspath(args.out)
    if os.path.isdir(path):
        raise ExistingOutputError(f"--out {path} is a folder; name a .json file")
    if os.path.exists(path) and not args.overwrite:
        raise ExistingOutputError(f"--out {path} exists; pass --overwrite to replace it, or choose another --out")
    if not os.path.isdir(os.path.dirname(path)):
        raise MissingInputError(f"--out {path}: folder {os.path.dirname(path)} does not exist")
    return path


def child_command(args: argparse.Namespace, workdir: str, json_out: str, step: Optional[str]) -> List[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--json-out", json_out, "--workdir", workdir]
    cmd += ["--step", step] if step else ["--probe"]
    if args.smoke:
        cmd += ["--smoke", "--smoke-compile", args.smoke_compile]
    return cmd


def child_env(args: argparse.Namespace) -> Dict[str, str]:
    env = dict(os.environ)
    if args.smoke and args.smoke_compile == "off":
        env["TORCH_COMPILE_DISABLE"] = "1"
    return env


def probe(args: argparse.Namespace, workdir: str) -> Dict[str, Any]:
    """The machine as a child process sees it (the parent never imports torch): a machine
    without CUDA is refused before any step."""
    path = os.path.join(workdir, "probe.json")
    done = subprocess.run(child_command(args, workdir, path, None), cwd=ROOT, env=child_env(args),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise InputError(f"the environment probe failed: {last_line(done.stdout + done.stderr)}")
    with open(path) as f:
        env = json.load(f)
    if not env["cuda"]:
        raise InputError(f"no CUDA device (torch {env['torch']}): this suite measures a GPU; --smoke runs its "
                         "steps on the CPU")
    return env


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def tail(path: str, lines: int = 30) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    return [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:]


class Child:
    """One step's process: its own session (killed as a group), its output in a log file."""

    def __init__(self, step: Step, args: argparse.Namespace, workdir: str, limit: float):
        self.step, self.limit, self.status, self.seconds = step, limit, None, 0.0
        self.json_out = os.path.join(workdir, f"{step.name}.jsonl")
        self.log_path = os.path.join(workdir, f"{step.name}.log")
        with contextlib.suppress(FileNotFoundError):  # an earlier run's, in a --workdir given again
            os.remove(self.json_out)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(child_command(args, workdir, self.json_out, step.name), cwd=ROOT,
                                         env=child_env(args), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.started = time.monotonic()

    def poll(self) -> bool:
        """True once the step is over: finished, or killed at its limit."""
        if self.proc.poll() is not None:
            self.status = "ok" if self.proc.returncode == 0 else "ERROR"
        elif time.monotonic() - self.started > self.limit:
            self.kill()
            self.status = "TIMEOUT"
        if self.status is not None:
            self.seconds = time.monotonic() - self.started
        return self.status is not None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(KILL_WAIT)

    def result(self) -> Dict[str, Any]:
        lines = tail(self.log_path)
        last = lines[-1] if lines else "(no output)"
        error = {"TIMEOUT": f"stopped at the step's limit, {self.limit:.0f} s; its last output: {last}",
                 "ERROR": f"exit status {self.proc.returncode}: {last}"}.get(self.status)
        return {"number": self.step.number, "summary": self.step.summary, "status": self.status,
                "seconds": round(self.seconds, 1), "limit_seconds": round(self.limit, 1), "error": error,
                "records": read_records(self.json_out), "log_tail": lines}


def read_records(path: str) -> List[Dict[str, Any]]:
    records = []
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a kill
                    records.append(json.loads(line))
    return records


class Schedule:
    """Time limits: on the GPU each step's share of the budget plus what the steps before it
    left of theirs (the suite stays within the budget); in smoke a fixed one (a hang only)."""

    def __init__(self, steps: Sequence[Step], args: argparse.Namespace):
        self.smoke, self.cap = args.smoke, args.step_limit
        self.scale = args.budget / sum(s.share for s in steps)
        self.saved = 0.0

    def limit(self, step: Step) -> float:
        limit = SMOKE_STEP_LIMIT if self.smoke else step.share * self.scale + self.saved
        return min(limit, self.cap) if self.cap else limit

    def finished(self, limit: float, seconds: float) -> None:
        if not self.smoke:
            self.saved = max(0.0, limit - seconds)


def run_steps(steps: Sequence[Step], args: argparse.Namespace, workdir: str) -> Dict[str, Dict[str, Any]]:
    jobs = (args.jobs or 2) if args.smoke else 1
    schedule, pending = Schedule(steps, args), list(steps)
    if jobs > 1:  # the longest first, so that the last to finish are short
        pending.sort(key=lambda s: -s.smoke)
    running: List[Child] = []
    results: Dict[str, Dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                step = pending.pop(0)
                running.append(Child(step, args, workdir, schedule.limit(step)))
                print(f"[{step.number}] {step.name} started (limit {running[-1].limit:.0f} s): {step.summary}",
                      flush=True)
            time.sleep(0.1)
            for child in [c for c in running if c.poll()]:
                running.remove(child)
                schedule.finished(child.limit, child.seconds)
                results[child.step.name] = child.result()
                print(f"[{child.step.number}] {child.step.name}: {child.status} in {child.seconds:.1f} s", flush=True)
    finally:
        for child in running:  # interrupted (Ctrl-C): no step outlives the suite
            child.kill()
    return {s.name: results[s.name] for s in sorted(steps, key=lambda s: s.number)}


def figure_rows(step: str, result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The step's figures: each planned one as measured, or with the step's ERROR/TIMEOUT; one
    row for the step itself when its failure shows in no figure (before planning, or after the
    last figure)."""
    planned = [r for r in result["records"] if r.get("kind") == "plan"]
    measured = {r["figure"]: r for r in result["records"] if r.get("kind") == "figure"}
    rows = []
    for plan in planned:
        row = measured.pop(plan["figure"], None)
        if row is None:
            status = "TIMEOUT" if result["status"] == "TIMEOUT" else "ERROR"
            row = dict(plan, kind="figure", measured="-", status=status,
                       error=result["error"] or "not measured: the step ended without it")
        rows.append(row)
    rows += list(measured.values())
    if result["status"] != "ok" and not any(row.get("error") == result["error"] for row in rows):
        rows.append({"kind": "figure", "figure": f"[{result['number']}] step {step}", "target": "-",
                     "measured": "-", "status": result["status"], "error": result["error"]})
    return [dict(row, step=step) for row in rows]


def status_text(row: Dict[str, Any]) -> str:
    if row["status"] in ("ERROR", "TIMEOUT") and row.get("error"):
        return f"{row['status']}: {row['error']}"
    return row["status"]


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    cells = [("figure", "target", "measured", "status")]
    cells += [(r["figure"], r["target"], str(r["measured"]), status_text(r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> int:
    steps = select_steps(args.only)
    out = check_args(args)
    started, clock = datetime.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    with workdir_for(args) as workdir:
        environment = None if args.smoke else probe(args, workdir)
        where = "--smoke, on the CPU" if args.smoke else f"on {environment['device_name']}"
        print(f"gpu_suite {where}; steps: {', '.join(s.name for s in steps)}; workdir {workdir}", flush=True)
        results = run_steps(steps, args, workdir)
    environment = environment or next(({k: v for k, v in r.items() if k != "kind"} for result in results.values()
                                       for r in result["records"] if r.get("kind") == "environment"), {})
    rows = [row for name, result in results.items() for row in figure_rows(name, result)]
    print("\n" + format_table(rows))
    for result in results.values():
        del result["records"]
    atomic_write_json(out, {"suite": "benchmarks/gpu_suite.py", "smoke": args.smoke, "started": started,
                            "wall_seconds": round(time.monotonic() - clock, 1), "environment": environment,
                            "steps": results, "figures": rows})
    print(f"\nwritten: {out}")
    return 1 if any(row["status"] in ("ERROR", "TIMEOUT") for row in rows) else 0


@contextlib.contextmanager
def workdir_for(args: argparse.Namespace) -> Iterator[str]:
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        yield os.path.abspath(args.workdir)
        return
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as path:
        yield path


def list_steps() -> None:
    for step in sorted(STEPS, key=lambda s: s.number):
        print(f"{step.number}  {step.name:<14} {step.share:4.0f} s  {step.summary}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            list_steps()
            return 0
        if args.probe or args.step:
            return child_main(args)
        return run_suite(args)
    except InputError as exc:
        print(f"gpu_suite: error: {exc}", file=sys.stderr)
        return 2


# ============================================================================= the child side
def error_line(exc: BaseException) -> str:
    """``Type: message`` on one line (a long message's last line, as a traceback ends)."""
    return f"{type(exc).__name__}: {last_line(str(exc))}" if str(exc).strip() else type(exc).__name__


class Recorder:
    """A step's figures, one JSON line each, written as soon as known (a step killed at its
    limit keeps them).  ``plan`` lists every figure first, so the table shows the ones a
    failure or the limit prevented."""

    def __init__(self, path: str, smoke: bool):
        self.path, self.smoke = path, smoke

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plan(self, figure: str, target: str = "-") -> None:
        self.write({"kind": "plan", "figure": figure, "target": target})

    def info(self, figure: str, measured: str, value: Any = None) -> None:
        self.write({"kind": "figure", "figure": figure, "target": "-", "measured": measured, "status": "-",
                    "value": value})

    def judge(self, figure: str, target: str, measured: str, passed: bool, value: Any = None) -> None:
        status = "smoke" if self.smoke else ("PASS" if passed else "FAIL")
        self.write({"kind": "figure", "figure": figure, "target": target, "measured": measured, "status": status,
                    "value": value})

    def error(self, figure: str, target: str, exc: BaseException) -> None:
        self.write({"kind": "figure", "figure": figure, "target": target, "measured": "-", "status": "ERROR",
                    "error": error_line(exc)})

    @contextlib.contextmanager
    def guard(self, figures: Sequence[Tuple[str, str]]) -> Iterator[None]:
        """Run a block that records ``figures`` ((figure, target) pairs); an exception inside
        marks those not yet recorded ERROR, with its last line, and the step goes on."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001  (one figure's failure must not cost the others)
            traceback.print_exc()
            done = {r["figure"] for r in read_records(self.path) if r.get("kind") == "figure"}
            for figure, target in figures:
                if figure not in done:
                    self.error(figure, target, exc)
            release_device_memory()


def release_device_memory() -> None:
    """What the last figure's models held on the GPU, back to the allocator's pool."""
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each step measures on: the GPU's real sizes, or --smoke's tiny ones."""
    forward: Tuple[int, int, int]        # batch, height, width
    forward_repeats: Tuple[int, int]     # warm-up, timed
    matmul: int                          # side of the bf16 matmul that measures a peak not in the table
    eval_images: int                     # the synthetic val split ...
    eval_repeats: int                    # ... read this many times per pass (decoded every time)
    eval_hms_images: int
    eval_size: Tuple[int, int]
    eval_batch: int
    eval_passes: int                     # timed passes over the split (after a warm-up pass)
    train: Tuple[int, int, int]
    train_repeats: Tuple[int, int]
    train_amp: str                       # fp32 in smoke: bf16 convolutions are slow on CPUs
    compiled_warmup: int
    rloss: Tuple[int, int, int, int]
    rloss_repeats: Tuple[int, int]
    cpu_rloss_repeats: Tuple[int, int]
    nus: Tuple[int, int, int, int]       # batch, classes, grid, output side
    nus_repeats: Tuple[int, int]
    deterministic_iters: int


GPU_SIZES = Sizes(forward=(1, 1024, 2048), forward_repeats=(3, 10), matmul=8192,
                  eval_images=16, eval_repeats=6, eval_hms_images=8, eval_size=(1024, 2048),
                  eval_batch=4, eval_passes=2,
                  train=(2, 512, 1024), train_repeats=(3, 5), train_amp="bf16", compiled_warmup=4,
                  rloss=(8, 21, 512, 512), rloss_repeats=(2, 5), cpu_rloss_repeats=(1, 2),
                  nus=(8, 19, 192, 1024), nus_repeats=(3, 10), deterministic_iters=30)
SMOKE_SIZES = Sizes(forward=(1, 32, 64), forward_repeats=(0, 1), matmul=128,
                    eval_images=4, eval_repeats=1, eval_hms_images=2, eval_size=(64, 128),
                    eval_batch=2, eval_passes=1,
                    train=(2, 32, 64), train_repeats=(1, 1), train_amp="off", compiled_warmup=1,
                    rloss=(2, 3, 32, 32), rloss_repeats=(0, 1), cpu_rloss_repeats=(0, 1),
                    nus=(2, 19, 24, 128), nus_repeats=(1, 1), deterministic_iters=2)


class Setup:
    """What every step's child shares: the device, the sizes, the workdir, the recorder."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.smoke, self.workdir = args.smoke, args.workdir
        on_gpu = not args.smoke and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        self.sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
        self.smoke_compile = args.smoke_compile
        self.rec = Recorder(args.json_out, args.smoke)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores too

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def base(self, arch: str) -> Optional[int]:
        return SMOKE_BASES.get(arch) if self.smoke else None

    def compile_mode(self, mode: str) -> str:
        """``mode`` on the GPU; in smoke the debugging backend asked for (with 'off', TorchDynamo
        is disabled by the parent and ``mode`` is kept: the wrappers run eagerly)."""
        return mode if not self.smoke or self.smoke_compile == "off" else self.smoke_compile

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)


def child_main(args: argparse.Namespace) -> int:
    if not args.json_out or not args.workdir:
        raise InvalidInputError("--step and --probe are the suite's child side: they need --json-out and --workdir")
    if args.probe:
        atomic_write_json(args.json_out, environment(not args.smoke))
        return 0
    if args.step not in STEP_FUNCTIONS:
        raise InvalidInputError(f"--step: unknown step {args.step!r}")
    setup = Setup(args)
    setup.rec.write(dict(environment(setup.cuda), kind="environment"))
    STEP_FUNCTIONS[args.step](setup)
    return 0


def environment(use_cuda: bool) -> Dict[str, Any]:
    """The machine; ``device_name`` of the device the steps use (the CPU in smoke)."""
    import torch

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": cuda, "cuda_version": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if cuda and use_cuda else "CPU",
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- measuring helpers
def median_seconds(fn: Callable[[], Any], setup: Setup, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn`` (synchronised) over ``repeats`` calls after ``warmup`` more."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        setup.sync()
        start = time.perf_counter()
        fn()
        setup.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rate_text(seconds: float, batch: int, flops: Optional[float] = None) -> str:
    text = f"{1000 * seconds:.2f} ms, {batch / seconds:.1f} img/s"
    return text + (f", {flops / seconds / 1e12:.3g} TFLOP/s" if flops else "")


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (convolutions and matrix products, FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bf16_peak(setup: Setup) -> Tuple[float, str]:
    """(TFLOP/s, source): the datasheet's dense bf16 peak of this GPU, else a measured bf16 matmul."""
    import torch

    name = torch.cuda.get_device_name(setup.device) if setup.cuda else "CPU"
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops, f"{name}: datasheet"
    n = setup.sizes.matmul
    a = torch.randn(n, n, device=setup.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=setup.device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: a @ b, setup, 3, 10)
    return 2 * n ** 3 / seconds / 1e12, f"{name}: measured, {n} x {n} bf16 matmul"


# ----------------------------------------------------------------------------- 1. eval forward
# (name, channels_last, bf16 autocast), in the order they are timed
VARIANTS = (("fp32 (TF32)", False, False), ("bf16", False, True), ("fp32 + channels_last", True, False),
            ("bf16 + channels_last", True, True))
FP32 = ("fp32 (TF32)", "fp32 + channels_last")
PEAK_FIGURE = ("[1] bf16 peak", "-")


def eval_net(setup: Setup, arch: str):
    """``arch`` in eval mode on the device (HMS at its validation scales, but in smoke)."""
    import models

    options = {"scales": SMOKE_HMS_SCALES} if setup.smoke and arch == HMS else {}
    net = models.get_net(arch, has_edge=True, hrnet_base=setup.base(arch), **options).eval()
    return net.to(setup.device)


def forward_fn(net, images, amp: bool) -> Callable[[], Any]:
    import torch

    def run():
        with torch.no_grad(), torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            return net(images)
    return run


def eager_figures(name: str, arch: str) -> List[Tuple[str, str]]:
    figures = [(f"[1] {name} eval forward, {variant}", "-") for variant, _, _ in VARIANTS]
    figures.append((f"[1] {name}: bf16 + channels_last vs fp32", ">= 1.00x"))
    if arch == HMS:
        figures.append((f"[1] {name} eager bf16: share of the bf16 peak", ">= 25 %"))
    return figures


def compiled_figures(name: str, arch: str) -> List[Tuple[str, str]]:
    figures = [(f"[1] {name} eval forward, compiled bf16 + channels_last", "-"),
               (f"[1] {name}: compiled vs eager bf16 + channels_last", ">= 1.5x")]
    if arch == HMS:
        figures.append((f"[1] {name} compiled bf16: share of the bf16 peak", ">= 25 %"))
    return figures


@dataclasses.dataclass
class Eager:
    """An arch after its eager variants: the net and input in channels_last, for the compiled one."""
    net: Any
    images: Any
    flops: int
    seconds: float   # bf16 + channels_last


def step_forward(setup: Setup) -> None:
    """Every arch in eager mode first, then compiled (the likelier to overrun the limit)."""
    rec = setup.rec
    rec.plan(*PEAK_FIGURE)
    for kind in (eager_figures, compiled_figures):
        for name, arch in ARCHS:
            for figure in kind(name, arch):
                rec.plan(*figure)
    peak = 0.0
    with rec.guard([PEAK_FIGURE]):
        peak, source = bf16_peak(setup)
        rec.info(PEAK_FIGURE[0], f"{peak:.4g} TFLOP/s ({source})", peak)
    eager: Dict[str, Eager] = {}
    for name, arch in ARCHS:
        with rec.guard(eager_figures(name, arch)):
            eager[arch] = forward_variants(setup, name, arch, peak)
    for name, arch in ARCHS:
        with rec.guard(compiled_figures(name, arch)):
            compiled_forward(setup, name, arch, eager.pop(arch, None) or forward_input(setup, arch), peak)
        release_device_memory()


def forward_input(setup: Setup, arch: str) -> Eager:
    """The arch's net, a random input and the FLOPs of a forward (not timed yet)."""
    import torch

    batch, height, width = setup.sizes.forward
    net = eval_net(setup, arch)
    images = torch.randn(batch, 3, height, width, device=setup.device)
    return Eager(net, images, count_flops(forward_fn(net, images, False)), 0.0)  # also a first warm-up pass


def forward_variants(setup: Setup, name: str, arch: str, peak: float) -> Eager:
    """Time the eager variants; bf16 + channels_last is judged against the faster fp32 layout."""
    import torch

    run = forward_input(setup, arch)
    batch = run.images.shape[0]
    seconds = {}
    for variant, channels_last, amp in VARIANTS:
        if channels_last:
            run.net.to(memory_format=torch.channels_last)
            run.images = run.images.contiguous(memory_format=torch.channels_last)
        seconds[variant] = median_seconds(forward_fn(run.net, run.images, amp), setup, *setup.sizes.forward_repeats)
        setup.rec.info(f"[1] {name} eval forward, {variant}", rate_text(seconds[variant], batch, run.flops),
                       1000 * seconds[variant])
    fp32 = min(FP32, key=seconds.get)
    run.seconds = seconds["bf16 + channels_last"]
    ratio = seconds[fp32] / run.seconds
    setup.rec.judge(f"[1] {name}: bf16 + channels_last vs fp32", ">= 1.00x",
                    f"{ratio:.2f}x as fast as {fp32} (the faster fp32)", ratio >= 1.0, ratio)
    if arch == HMS:
        record_peak_share(setup, f"[1] {name} eager bf16: share of the bf16 peak", run.flops,
                          min(seconds["bf16"], run.seconds), peak)
    return run


def record_peak_share(setup: Setup, figure: str, flops: float, seconds: float, peak: float) -> None:
    tflops = flops / seconds / 1e12
    share = tflops / peak if peak > 0 else 0.0
    setup.rec.judge(figure, ">= 25 %", f"{100 * share:.1f} % ({tflops:.4g} of {peak:.4g} TFLOP/s)", share >= 0.25,
                    share)


def compiled_forward(setup: Setup, name: str, arch: str, run: Eager, peak: float) -> None:
    """torch.compile (inductor's default mode) of the bf16 + channels_last forward, against its
    eager time in this process (measured here if the eager variants failed)."""
    import torch
    import torch._dynamo

    from experiment.acceleration import compile_model

    torch._dynamo.reset()  # a fresh cache: earlier models never count against the recompile limit
    run.net.to(memory_format=torch.channels_last)
    run.images = run.images.contiguous(memory_format=torch.channels_last)
    eager = run.seconds or median_seconds(forward_fn(run.net, run.images, True), setup, *setup.sizes.forward_repeats)
    compiled = forward_fn(compile_model(run.net, setup.compile_mode("on")), run.images, True)
    first = median_seconds(compiled, setup, 0, 1)  # the compilation
    seconds = median_seconds(compiled, setup, *setup.sizes.forward_repeats)
    figures = compiled_figures(name, arch)
    setup.rec.info(figures[0][0], f"{rate_text(seconds, run.images.shape[0], run.flops)} (first call {first:.1f} s)",
                   1000 * seconds)
    ratio = eager / seconds
    setup.rec.judge(*figures[1], f"{ratio:.2f}x ({1000 * eager:.2f} -> {1000 * seconds:.2f} ms)", ratio >= 1.5,
                    ratio)
    if arch == HMS:
        record_peak_share(setup, figures[2][0], run.flops, seconds, peak)


# ----------------------------------------------------------------------------- 2. evaluate()
def trivial_segmenter():
    """The cheapest model with the outputs of ours: 19 logits and an edge probability."""
    import torch
    from torch import nn

    class TrivialSegmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.seg, self.edge = nn.Conv2d(3, 19, 1), nn.Conv2d(3, 1, 1)
            self.hrnet_base = 0

        def forward(self, images):
            return {"pred": self.seg(images), "edge_prob": torch.sigmoid(self.edge(images))}

    return TrivialSegmenter()


def eval_split(setup: Setup) -> str:
    """A synthetic val split at the eval size: kept under data/ on the GPU (made once), in the
    workdir in smoke."""
    from datasets.synthetic import ensure_synthetic

    n, (height, width) = setup.sizes.eval_images, setup.sizes.eval_size
    folder = f"gpu_suite_val{n}_{height}x{width}"
    root = setup.path(folder) if setup.smoke else os.path.join(ROOT, "data", folder)
    return ensure_synthetic(root, train=1, val=n, test=0, height=height, width=width, seed=0, progress=False)


def eval_criterion(setup: Setup):
    """The validation loss with an InverseForm term: the released regressor shape on the GPU
    (random weights cost what trained ones cost), a small one in smoke."""
    from experiment.config import LossConfig
    from experiment.joint_loss import joint_loss
    from inverseform import InverseFormLoss, InverseNet

    if setup.smoke:
        term = InverseFormLoss(InverseNet(tile_size=32, num_params=4, hidden=(64, 16)), tile_factor=1,
                               check_inputs=False)
    else:
        term = InverseFormLoss(InverseNet(), check_inputs=False)
    return joint_loss(LossConfig(), 19, term).to(setup.device)


def images_per_second(setup: Setup, net, loader, criterion, amp_dtype) -> float:
    """Steady-state images/s of evaluate(): a warm-up pass (workers, cuDNN), then the best of
    the timed ones."""
    from experiment.evaluation import evaluate

    rates = []
    for i in range(setup.sizes.eval_passes + 1):
        setup.sync()
        start = time.perf_counter()
        metrics = evaluate(net, loader, setup.device, num_classes=19, criterion=criterion, amp_dtype=amp_dtype,
                           progress=False)
        setup.sync()
        if i:
            rates.append(metrics["num_images"] / (time.perf_counter() - start))
    return max(rates)


def step_evaluate(setup: Setup) -> None:
    import torch

    from experiment.config import DataConfig
    from experiment.data import eval_loader, val_dataset

    rec, batch = setup.rec, setup.sizes.eval_batch
    figures = [("[2] evaluate(), HRNet-18-IF", ">= 60 img/s"), ("[2] evaluate(), trivial model", ">= 150 img/s"),
               ("[2] evaluate(), HMS-OCRNet-48 vs its forward", "<= 1.20x")]
    for figure, target in figures:
        rec.plan(figure, target)
    root = eval_split(setup)
    dataset = val_dataset(DataConfig(dataset_dir=root), root)
    workers = 0 if setup.smoke else max(2, min(12, (os.cpu_count() or 4) - 2))
    loader = eval_loader(torch.utils.data.ConcatDataset([dataset] * setup.sizes.eval_repeats), batch, workers)
    criterion = eval_criterion(setup)
    print(f"{len(loader.dataset)} val images of {setup.sizes.eval_size} per pass, batch {batch}, {workers} workers",
          flush=True)
    with rec.guard(figures[:1]):
        eval_rate(setup, "ocrnet.AuxHRNet", loader, criterion, figures[0], 60.0)
    with rec.guard(figures[1:2]):
        eval_rate(setup, None, loader, criterion, figures[1], 150.0)
    with rec.guard(figures[2:]):
        hms_overhead(setup, dataset, criterion, figures[2], workers)


def eval_rate(setup: Setup, arch: Optional[str], loader, criterion, figure: Tuple[str, str], target: float) -> None:
    from experiment.acceleration import place_model, resolve_eval_amp

    net = place_model((eval_net(setup, arch) if arch else trivial_segmenter()).eval(), setup.device)
    amp = resolve_eval_amp("auto", setup.device, arch or "")  # what validation uses
    rate = images_per_second(setup, net, loader, criterion, amp)
    setup.rec.judge(*figure, f"{rate:.1f} img/s (batch {loader.batch_size}, {amp or 'fp32'})", rate >= target, rate)
    release_device_memory()


def hms_overhead(setup: Setup, dataset, criterion, figure: Tuple[str, str], workers: int) -> None:
    """HMS's evaluate() time per image over its bare eval forward's, on the same batches."""
    import torch

    from experiment.acceleration import place_model, resolve_eval_amp, to_device_images
    from experiment.data import eval_loader
    from experiment.runtime import autocast

    subset = torch.utils.data.Subset(dataset, range(min(len(dataset), setup.sizes.eval_hms_images)))
    loader = eval_loader(subset, setup.sizes.eval_batch, workers)
    net = place_model(eval_net(setup, HMS), setup.device)
    amp = resolve_eval_amp("auto", setup.device, HMS)
    images = to_device_images(next(iter(loader))["image"], setup.device)

    def forward():
        with torch.no_grad(), autocast(setup.device, amp):
            net(images)

    per_image = median_seconds(forward, setup, *setup.sizes.forward_repeats) / images.shape[0]
    rate = images_per_second(setup, net, loader, criterion, amp)
    ratio = 1 / rate / per_image
    setup.rec.judge(*figure, f"{ratio:.2f}x ({1000 / rate:.0f} vs {1000 * per_image:.0f} ms per image)",
                    ratio <= 1.2, ratio)


# ----------------------------------------------------------------------------- 3. training step
TRAIN_MODES = ("eager", "compiled", "reduce-overhead")
COMPILE_OF_MODE = {"eager": "off", "compiled": "on", "reduce-overhead": "reduce-overhead"}


def train_figure(name: str, mode: str) -> Tuple[str, str]:
    return f"[3] {name} training step, {mode}", "1 host sync per step (the finite check)"


def train_order() -> List[Tuple[str, str, str]]:
    """(name, arch, mode): every arch eager first, then each arch compiled both ways (the
    second mode reuses the first's compiled kernels)."""
    eager = [(name, arch, "eager") for name, arch in ARCHS]
    return eager + [(name, arch, mode) for name, arch in ARCHS for mode in TRAIN_MODES[1:]]


def step_train(setup: Setup) -> None:
    for name, _, mode in train_order():
        setup.rec.plan(*train_figure(name, mode))
    data_root, regressor = train_inputs(setup)
    ctx = one_process_group(setup)
    try:
        for name, arch, mode in train_order():
            with setup.rec.guard([train_figure(name, mode)]):
                time_train_step(setup, ctx, name, arch, mode, data_root, regressor)
            release_device_memory()
    finally:
        import torch.distributed

        torch.distributed.destroy_process_group()


def train_inputs(setup: Setup) -> Tuple[str, str]:
    """A synthetic dataset of crop-sized images (one batch of them) and an InverseForm regressor:
    the released shape with random weights on the GPU; in smoke the shared tiny dataset (crops
    smaller than its images) and a small regressor."""
    from datasets.synthetic import ensure_synthetic

    if setup.smoke:
        return smoke_data(setup, "train_regressor")
    batch, height, width = setup.sizes.train
    root = ensure_synthetic(setup.path(f"train_{height}x{width}"), train=batch, val=1, test=0, height=height,
                            width=width, seed=0, progress=False)
    return root, save_random_regressor(setup, "train_regressor.pth", released=True)


def save_random_regressor(setup: Setup, filename: str, released: bool = False) -> str:
    import torch

    from inverseform import InverseNet, save_regressor

    torch.manual_seed(0)
    if released:
        net = InverseNet()  # 224 x 224 tiles, 4 parameters
    elif setup.smoke:
        net = InverseNet(tile_size=32, num_params=4, hidden=(64, 16))
    else:  # configs/synthetic_regressor.yaml's shape
        net = InverseNet(tile_size=64, num_params=4, hidden=(512, 32), parameterisation="scale_shift")
    path = setup.path(filename)
    save_regressor(net, path, {"dataset": "gpu_suite (random weights)"})
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_group(setup: Setup):
    """A world of one with a real process group (NCCL on CUDA, gloo on the CPU), so the engine
    wraps the model in DDP as under torchrun."""
    import torch.distributed

    from utils.dist import DistContext

    backend = "nccl" if setup.cuda else "gloo"
    extra = {"device_id": setup.device} if setup.cuda else {}
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                         world_size=1, **extra)
    return DistContext(rank=0, world_size=1, local_rank=0, device=setup.device, backend=backend)


def train_config(setup: Setup, arch: str, mode: str, data_root: str, regressor: str):
    from experiment.config import ExperimentConfig
    from utils.config import load_config

    batch, height, width = setup.sizes.train
    overrides = {"output_dir": setup.path(f"train_run_{arch}"), "data.dataset_dir": data_root,
                 "data.crop_size": f"[{height}, {width}]", "data.scale_range": "[1.0, 1.0]",
                 "data.class_uniform_fraction": 0.0, "data.num_workers": 0, "model.arch": arch,
                 "model.has_edge": "true", "loss.inverseform_path": regressor, "train.batch_size": batch,
                 "train.amp": setup.sizes.train_amp, "train.device": setup.device.type, "train.compile":
                 setup.compile_mode(COMPILE_OF_MODE[mode]), "val.num_workers": 0}
    if setup.base(arch):
        overrides["model.hrnet_base"] = setup.base(arch)
    if setup.smoke:
        overrides["loss.inverseform_tile_factor"] = 1
    return load_config(ExperimentConfig, [], [f"{k}={v}" for k, v in overrides.items()])


@contextlib.contextmanager
def counting_syncs(setup: Setup) -> Iterator[List[Any]]:
    """The host syncs torch reports inside the block (CUDA: set_sync_debug_mode("warn")); the
    list of caught warnings is filled when the block ends."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if setup.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            if setup.cuda:
                torch.cuda.set_sync_debug_mode("default")


def syncs_in(caught: Sequence[Any]) -> int:
    return sum(SYNC_MESSAGE in str(w.message) for w in caught)


def time_train_step(setup: Setup, ctx, name: str, arch: str, mode: str, data_root: str, regressor: str) -> None:
    """Median time and host syncs of the engine's own step (Trainer._step: forward, objective,
    finite check, backward, optimizer and schedule) on one batch of the task's loader."""
    from experiment.engine import Trainer
    from experiment.methods.segmentation import build_task
    from experiment.signals import StopSignal
    from models import convert_sync_batchnorm

    if mode != "eager":
        import torch._dynamo

        torch._dynamo.reset()  # a fresh cache: earlier models never count against the recompile limit
    cfg = train_config(setup, arch, mode, data_root, regressor)
    task = build_task(cfg, ctx)
    task.model = convert_sync_batchnorm(task.model, setup.device.type)
    trainer = Trainer(cfg, ctx, task, StopSignal())
    ready_for_steps(trainer)
    batch = next(iter(task.loader))
    warmup, repeats = setup.sizes.train_repeats
    if mode != "eager":
        warmup = setup.sizes.compiled_warmup
    start = time.perf_counter()
    for i in range(warmup):
        trainer._step(batch, i, 0)
    setup.sync()
    warm = time.perf_counter() - start
    times, syncs = [], []
    for i in range(warmup, warmup + max(1, repeats)):
        setup.sync()
        start = time.perf_counter()
        with counting_syncs(setup) as caught:
            trainer._step(batch, i, 0)
        setup.sync()
        times.append(time.perf_counter() - start)
        syncs.append(syncs_in(caught))
    record_train_step(setup, name, mode, statistics.median(times), syncs, warm)


def ready_for_steps(trainer) -> None:
    """What ``Trainer._loop`` sets up before its first ``_step``: train mode and the sums of the
    logged loss components."""
    trainer.model.train()
    trainer._sums, trainer._seen, trainer._t0 = {}, 0, time.time()


def record_train_step(setup: Setup, name: str, mode: str, seconds: float, syncs: List[int], warm: float) -> None:
    """Time and the most host syncs of a timed step: exactly one, the finite check's (none seen
    means the count missed it, and is no evidence)."""
    batch, height, width = setup.sizes.train
    precision = "bf16" if setup.sizes.train_amp == "bf16" else "fp32"
    text = f"{1000 * seconds:.1f} ms, {batch / seconds:.1f} img/s ({batch} x {height} x {width}, {precision}); "
    most = max(syncs)
    if not setup.cuda:
        text += "syncs n/a (CPU)"
    else:
        text += f"{most} host sync{'' if most == 1 else 's'} per step"
        text += " (not even the finite check's: the count missed it)" if most == 0 else ""
    text += f"; warm-up {warm:.1f} s"
    setup.rec.judge(*train_figure(name, mode), text, most == 1,
                    {"ms": 1000 * seconds, "syncs_per_step": syncs if setup.cuda else None})


# ----------------------------------------------------------------------------- 4. rloss
def rloss_inputs(setup: Setup, device):
    """Image, logits and a region of interest as benchmarks/bench_rloss.py makes them."""
    import torch
    import torch.nn.functional as F

    n, k, h, w = setup.sizes.rloss
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, 3, max(1, h // 32), max(1, w // 32), generator=g) * 255
    image = F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    image = (image + 10 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).round()
    logits = F.interpolate(torch.randn(n, k, max(1, h // 16), max(1, w // 16), generator=g) * 3, size=(h, w),
                           mode="bilinear", align_corners=False)
    roi = torch.ones(n, h, w)
    roi[:, :, w - w // 8:] = 0
    return image.to(device), logits.to(device), roi.to(device)


def rloss_seconds(setup: Setup, device, repeats: Tuple[int, int]) -> float:
    import torch

    from rloss import DenseCRFLoss

    loss_fn = DenseCRFLoss(2e-9, 15.0, 100.0, 0.5)  # the published settings, scale 0.5
    image, logits, roi = rloss_inputs(setup, device)

    def once():
        seg = torch.softmax(logits, 1).requires_grad_(True)
        loss_fn(image, seg, roi).backward()

    return median_seconds(once, setup, *repeats)


def step_rloss(setup: Setup) -> None:
    import torch

    n, k, h, w = setup.sizes.rloss
    figure = (f"[4] rloss forward + backward {n} x {k} x {h} x {w}, scale 0.5: device vs CPU", ">= 20x")
    setup.rec.plan(*figure)
    with setup.rec.guard([figure]):
        device = rloss_seconds(setup, setup.device, setup.sizes.rloss_repeats)
        cpu = rloss_seconds(setup, torch.device("cpu"), setup.sizes.cpu_rloss_repeats)
        ratio = cpu / device
        setup.rec.judge(*figure, f"{ratio:.1f}x ({1000 * device:.1f} ms on {setup.device.type} vs {1000 * cpu:.0f} "
                                 f"ms on the CPU, {torch.get_num_threads()} threads)", ratio >= 20, ratio)


# ----------------------------------------------------------------------------- 5. NUS
def nus_case(setup: Setup):
    """Logits on learned-looking sample grids (the regularised targets of synthetic label maps,
    as benchmarks/bench_nus.py makes one), one seed per image."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from datasets.labels import labelid_to_trainid
    from datasets.nus_targets import target_locations
    from datasets.synthetic import render_scene
    from models.nus import normalize_locations, resize_locations, sample

    n, classes, grid, size = setup.sizes.nus
    locations, logits = [], []
    for seed in range(n):
        _, ids = render_scene(np.random.default_rng(seed), size, size * 2)
        label = labelid_to_trainid(ids)[:, size // 2: size // 2 + size].astype(np.int64)
        loc = normalize_locations(resize_locations(torch.from_numpy(target_locations(label))[None], (grid, grid)))
        sampled = sample(torch.from_numpy(label)[None], loc).clamp(max=classes - 1)
        noise = torch.randn(1, classes, grid, grid, generator=torch.Generator().manual_seed(seed))
        logits.append(4 * F.one_hot(sampled, classes).permute(0, 3, 1, 2).float() + noise)
        locations.append(loc)
    return torch.cat(logits).to(setup.device), torch.cat(locations).to(setup.device)


def step_nus(setup: Setup) -> None:
    from models.nus import unsample

    n, classes, grid, size = setup.sizes.nus
    figure = (f"[5] NUS unsample {n} x {classes} x {grid} x {grid} -> {size} x {size}", "< 5 ms per image")
    setup.rec.plan(*figure)
    with setup.rec.guard([figure]):
        logits, locations = nus_case(setup)
        seconds = median_seconds(lambda: unsample(logits, locations, (size, size)), setup, *setup.sizes.nus_repeats)
        per_image = 1000 * seconds / n
        setup.rec.judge(*figure, f"{per_image:.2f} ms per image ({1000 * seconds:.1f} ms per batch)", per_image < 5,
                        per_image)


# ----------------------------------------------------------------------------- 6. the main job
def run_command(setup: Setup, cmd: List[str], name: str) -> float:
    """Run ``cmd`` from the repository root (its output in the workdir's ``name``.log, its tail
    echoed to this step's log); its wall seconds.  A failure raises with its last line."""
    return run_commands(setup, [(cmd, name)])[0]


def run_commands(setup: Setup, commands: Sequence[Tuple[List[str], str]]) -> List[float]:
    """``run_command`` for several commands at once, side by side."""
    procs = []
    for cmd, name in commands:
        print("$ " + " ".join(cmd), flush=True)
        with open(setup.path(f"{name}.log"), "w") as log:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), name,
                          time.perf_counter()))
    seconds = []
    for proc, name, start in procs:
        proc.wait()
        seconds.append(time.perf_counter() - start)
    for proc, name, _ in procs:
        lines = tail(setup.path(f"{name}.log"), 15)
        print(f"--- {name}:\n" + "\n".join(lines), flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited with status {proc.returncode}: {lines[-1] if lines else '(no output)'}")
    return seconds


def fresh(path: str) -> List[str]:
    """``--overwrite`` when ``path`` holds an earlier run's outputs (a --workdir given again)."""
    return ["--overwrite"] if os.path.exists(path) else []


def smoke_data(setup: Setup, name: str) -> Tuple[str, str]:
    """--smoke: a tiny synthetic Cityscapes (shared by the steps, made once) and a small
    regressor for 64 x 128 crops (``name``.pth)."""
    from datasets.synthetic import ensure_synthetic

    root = ensure_synthetic(setup.path("smoke_cityscapes"), train=4, val=4, test=0, height=64, width=128, seed=0,
                            progress=False)
    return root, save_random_regressor(setup, f"{name}.pth")


def smoke_options(root: str, regressor: str) -> List[str]:
    return ["--device", "cpu", "--opt", f"data.dataset_dir={root}", f"loss.inverseform_path={regressor}",
            "loss.regressor_config=null", "loss.inverseform_tile_factor=1", "data.crop_size=[64,128]",
            "data.scale_range=[0.75,1.0]", "data.num_workers=0", "val.num_workers=0", "train.batch_size=2",
            "val.batch_size=2", "train.max_iters=2", "train.log_interval=1", "train.image_interval=0"]


MAIN_JOB_FIGURES = (("[6] main job (CUDA recipe): wall time", "<= 90 s"),
                    ("[6] main job: mIoU vs the CPU recipe", f">= {CPU_RECIPE_MIOU:.2f} (README)"),
                    ("[6] folder inference (experiment.infer)", "runs"),
                    ("[6] ONNX export of the trained model (tools/export.py)", "runs"))


def step_main_job(setup: Setup) -> None:
    rec = setup.rec
    for figure in MAIN_JOB_FIGURES:
        rec.plan(*figure)
    run_dir = setup.path("main_job")
    with rec.guard(MAIN_JOB_FIGURES):  # without a trained model the last two fail with the job's error
        main_job(setup, run_dir)
    if not os.path.isfile(os.path.join(run_dir, "best.pth")):
        return
    with rec.guard(MAIN_JOB_FIGURES[2:3]):
        folder_inference(setup, run_dir)
    with rec.guard(MAIN_JOB_FIGURES[3:]):
        onnx_export(setup, run_dir)


def main_job(setup: Setup, run_dir: str) -> None:
    """``python -m experiment.train --config configs/synthetic.yaml`` as the README runs it (the
    CUDA recipe on a GPU); what it had to make first (dataset, regressor) is said."""
    cmd = [sys.executable, "-m", "experiment.train", "--config", "configs/synthetic.yaml", "--output_dir", run_dir]
    cmd += fresh(run_dir)
    made = []
    if setup.smoke:
        cmd += smoke_options(*smoke_data(setup, "main_job_regressor"))
    else:
        made = [what for what, path in (("dataset", "data/synthetic_cityscapes"),
                                        ("regressor", "checkpoints/synthetic_regressor.pth"))
                if not os.path.exists(os.path.join(ROOT, path))]
    seconds = run_command(setup, cmd, "main_job")
    note = f" (made first: {', '.join(made)})" if made else " (dataset and regressor existed)"
    setup.rec.judge(*MAIN_JOB_FIGURES[0], f"{seconds:.1f} s{'' if setup.smoke else note}", seconds <= 90, seconds)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        miou = 100 * json.load(f)["miou"]
    setup.rec.judge(*MAIN_JOB_FIGURES[1], f"{miou:.2f}", miou >= CPU_RECIPE_MIOU, miou)


def run_dataset_root(run_dir: str) -> str:
    """The dataset a finished run trained on, from its config.yaml."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        data = yaml.safe_load(f)["data"]
    root = data.get("dataset_dir") or data["synthetic_dir"]
    return root if os.path.isabs(root) else os.path.join(ROOT, root)


def folder_inference(setup: Setup, run_dir: str) -> None:
    images = os.path.join(run_dataset_root(run_dir), "leftImg8bit", "val")
    count = sum(name.endswith(".png") for _, _, files in os.walk(images) for name in files)
    cmd = [sys.executable, "-m", "experiment.infer", "--model_path", os.path.join(run_dir, "best.pth"),
           "--input", images, "--output_dir", setup.path("infer")] + fresh(setup.path("infer"))
    if setup.smoke:
        cmd += ["--device", "cpu", "--num_workers", "0"]
    seconds = run_command(setup, cmd, "infer")
    setup.rec.judge(*MAIN_JOB_FIGURES[2], f"{count} images in {seconds:.1f} s, start-up included "
                                          f"({count / seconds:.1f} img/s)", True, seconds)


def onnx_export(setup: Setup, run_dir: str) -> None:
    """The trained checkpoint to ONNX, checked against the eager model; the legacy exporter when
    onnxscript (the default exporter's) is missing, no check without onnxruntime."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise InputError('onnx is not installed: pip install -e ".[export]" to export')
    height, width = (64, 128) if setup.smoke else (256, 512)
    cmd = [sys.executable, "tools/export.py", "--model_path", os.path.join(run_dir, "best.pth"), "--format", "onnx",
           "--output", setup.path("model.onnx"), "--height", str(height), "--width", str(width)]
    cmd += fresh(setup.path("model.onnx"))
    notes, checked = [], importlib.util.find_spec("onnxruntime") is not None
    if importlib.util.find_spec("onnxscript") is None:
        cmd += ["--onnx_exporter", "legacy"]
        notes.append("legacy exporter: onnxscript is not installed")
    if not checked:
        cmd += ["--verify", "False"]
        notes.append("onnxruntime is not installed")
    seconds = run_command(setup, cmd, "export")
    text = f"written{' and checked against eager' if checked else ''} in {seconds:.1f} s"
    setup.rec.judge(*MAIN_JOB_FIGURES[3], text + (f" ({'; '.join(notes)})" if notes else ""), True, seconds)


# ----------------------------------------------------------------------------- 7. determinism
def step_deterministic(setup: Setup) -> None:
    figure = (f"[7] --deterministic twice ({setup.sizes.deterministic_iters} iterations): last.pth", "equal")
    setup.rec.plan(*figure)
    with setup.rec.guard([figure]):
        options = deterministic_options(setup)
        run_dirs = [setup.path(f"deterministic_{name}") for name in ("a", "b")]
        run_commands(setup, [([sys.executable, "-m", "experiment.train", "--config", "configs/synthetic.yaml",
                               "--deterministic", "--output_dir", run_dir, "--max_iters",
                               str(setup.sizes.deterministic_iters)] + fresh(run_dir) + options,
                              os.path.basename(run_dir)) for run_dir in run_dirs])
        equal, text = compare_weights(*(os.path.join(run_dir, "last.pth") for run_dir in run_dirs))
        setup.rec.judge(*figure, text, equal, equal)


def deterministic_options(setup: Setup) -> List[str]:
    """The main job's config with a regressor of its shape (random weights: the runs never
    train one first), validating 4 images; in smoke the tiny set-up."""
    if setup.smoke:
        return smoke_options(*smoke_data(setup, "deterministic_regressor"))
    regressor = save_random_regressor(setup, "deterministic_regressor.pth")
    return ["--opt", f"loss.inverseform_path={regressor}", "loss.regressor_config=null", "val.max_images=4"]


def compare_weights(path_a: str, path_b: str) -> Tuple[bool, str]:
    import torch

    from experiment.checkpoints import load_training_checkpoint

    a, b = (load_training_checkpoint(p)["state_dict"] for p in (path_a, path_b))
    if a.keys() != b.keys():
        return False, f"different keys ({len(a)} vs {len(b)} tensors)"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if not differ:
        return True, f"equal ({len(a)} tensors)"
    worst = max(differ, key=lambda k: (a[k].double() - b[k].double()).abs().max().item())
    gap = (a[worst].double() - b[worst].double()).abs().max().item()
    return False, f"{len(differ)} of {len(a)} tensors differ (largest: {worst}, {gap:.3g})"


STEP_FUNCTIONS: Dict[str, Callable[[Setup], None]] = {
    "forward": step_forward, "evaluate": step_evaluate, "train": step_train, "rloss": step_rloss, "nus": step_nus,
    "main_job": step_main_job, "deterministic": step_deterministic,
}


if __name__ == "__main__":
    sys.exit(main())
