"""Several ``experiment.train`` runs at once, as child processes (single-process jobs only).

On a small CPU, two single-thread runs keep the cores busier than one two-thread run, and they
do not spin OpenMP threads against other jobs on a busy machine.  Comparisons that train the
same model several times (the ablation, the scribble comparison, the NUS seeds) hand their runs
here: each run's config is written to OUTPUT_DIR/<run>/child_config.yaml, its console (progress
bars, log, metrics) goes to OUTPUT_DIR/<run>/console.txt, a failed child is reported by its own
last line, and SIGTERM or Ctrl-C stops every child with a checkpoint (continue with --resume).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from experiment.config import ExperimentConfig
from experiment.errors import StopRequested, UserError
from experiment.signals import StopSignal
from utils import dist
from utils.config import save_config

log = logging.getLogger("experiment.children")

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class ChildRun:
    """One ``python -m experiment.train --config <cfg>`` child; ``label`` names it in the log."""
    label: str
    cfg: ExperimentConfig
    resume_file: str = "last.pth"  # the child resumes when OUTPUT_DIR/<this> exists and resume was asked

    @property
    def console(self) -> str:
        return os.path.join(self.cfg.output_dir, "console.txt")


def use_children(processes: int, world_size: int, key: str) -> bool:
    """Whether ``processes`` (config key ``key``) asks for child processes that can be had:
    only single-process jobs start them; under torchrun every run uses all ranks instead."""
    if processes > 1 and world_size > 1:
        log.info("%s=%d ignored: under torchrun every run uses all ranks", key, processes)
    return processes > 1 and world_size == 1


def last_line(path: str) -> str:
    """The last non-empty line of a console file (progress-bar carriage returns split lines)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace").replace("\r", "\n")
    except OSError:
        return "no console output"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def progress(path: str) -> str:
    """The newest ``done/total`` of a child's progress bars (its console file), or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    found = _PROGRESS.findall(tail)
    return f"{found[-1][0]} {found[-1][1]}/{found[-1][2]}" if found else ""


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that has Linux send the child SIGTERM when this process dies (also by
    kill -9): it then checkpoints and stops instead of training on as an orphan.  None where
    prctl is not available (the children then outlive a killed parent)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # sent when the forking (main) thread of the parent ends
        if os.getppid() != parent:  # the parent died before the call: nobody would send it
            os._exit(1)

    return set_death_signal


_PROGRESS = re.compile(r"([\w @]+):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")  # tqdm: "train:  40%|###   | 193/480"


def run_children(runs: List[ChildRun], processes: int, threads: Optional[int], resume: bool = False,
                 overwrite: bool = False, what: str = "run", report_every: float = 60.0) -> Dict[str, float]:
    """Train ``runs``, ``processes`` at a time, each child with ``threads`` CPU threads
    (OMP_NUM_THREADS); returns each run's wall seconds by label.  Every ``report_every`` seconds
    one log line says how far each running child is.  Raises UserError naming the first failed
    child (the others are stopped with a checkpoint) and StopRequested on SIGTERM."""
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    pending, running, seconds = list(runs), [], {}
    reported = time.time()
    stop = StopSignal()
    with stop.installed():
        try:
            while (pending or running) and not stop.requested:
                while pending and len(running) < max(1, processes):
                    run = pending.pop(0)
                    running.append((run, time.time(), _start(run, env, resume, overwrite, what)))
                time.sleep(0.5)
                if running and time.time() - reported >= report_every:
                    reported = time.time()
                    log.info("%s progress: %s", what, "; ".join(
                        f"{run.label} {progress(run.console) or 'starting'}" for run, _, _ in running))
                for item in list(running):
                    run, started, proc = item
                    if proc.poll() is None:
                        continue
                    running.remove(item)
                    if proc.returncode != 0:
                        raise UserError(f"{what} {run.cfg.output_dir} failed (exit code {proc.returncode}): "
                                        f"{last_line(run.console)} (console: {run.console}); continue with --resume")
                    seconds[run.label] = time.time() - started
                    log.info("%s %s finished in %.1f min (%d/%d)", what, run.label, seconds[run.label] / 60,
                             len(seconds), len(runs))
        finally:
            for _, _, proc in running:  # an error, an interrupt or SIGTERM: each child checkpoints and stops
                proc.terminate()
            for _, _, proc in running:
                proc.wait()
    if stop.requested:
        raise StopRequested(f"stopped by {stop.name()}: each unfinished {what} saved a checkpoint; continue with "
                            "--resume", stop.exit_code())
    return seconds


def _start(run: ChildRun, env: Dict[str, str], resume: bool, overwrite: bool, what: str) -> subprocess.Popen:
    os.makedirs(run.cfg.output_dir, exist_ok=True)
    spec = os.path.join(run.cfg.output_dir, "child_config.yaml")
    run.cfg.cuda_overrides = []  # already applied to the parent's config: never twice
    save_config(run.cfg, spec)
    cmd = [sys.executable, "-m", "experiment.train", "--config", spec]
    if resume and os.path.isfile(os.path.join(run.cfg.output_dir, run.resume_file)):
        cmd.append("--resume")
    elif overwrite:
        cmd.append("--overwrite")
    log.info("%s %s started -> %s (progress: %s)", what, run.label, run.cfg.output_dir, run.console)
    # the console goes to a file, not a pipe: a pipe nobody reads until the end would block a chatty child
    with open(run.console, "ab") as out:
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent())
