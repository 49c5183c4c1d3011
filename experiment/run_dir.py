"""A run's output directory: nothing of an earlier run is replaced without ``--overwrite``.

Each kind of run names the files that mark it (:class:`Outputs`); a directory holding any of
them is refused unless the run continues it (``--resume``) or ``--overwrite`` moves them, with
their companions, into ``OUTPUT_DIR/replaced-<time>/``.  Call on rank 0 (``on_main_first``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from experiment.errors import UserError
from experiment.runtime import on_main_first
from utils.io import make_dirs

log = logging.getLogger("experiment")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a kind of run leaves in its directory (glob patterns)."""
    marks: Tuple[str, ...]              # files or folders that mean "an earlier run is here"
    companions: Tuple[str, ...] = ()    # moved aside with them, so nothing of the old run mixes in
    resume_hint: str = "continue it with --resume, "
    foreign: Tuple[str, ...] = ()       # marks of another kind of run: never written into
    foreign_message: str = ""


# A training run (train_log.txt is an append-only text log and config.yaml is rewritten by every
# start: neither marks a run).
TRAINING = Outputs(marks=("last.pth", "best.pth", "train_log.jsonl", "metrics.json", "metrics_iter*.json",
                          "report.json"),
                   companions=("config.yaml", "tensorboard", "predictions"))
VALIDATION = Outputs(marks=("metrics.json",), companions=("config.yaml", "tensorboard", "predictions"),
                     resume_hint="", foreign=("last.pth", "train_log.jsonl"),
                     foreign_message="holds a training run ({found}); validation would replace its metrics.json "
                                     "and config.yaml: give validation its own --output_dir")


def matches(output_dir: str, patterns: Sequence[str]) -> List[str]:
    found: List[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))):
            name = os.path.relpath(path, output_dir)
            if name not in found:
                found.append(name)
    return found


def move_aside(output_dir: str, names: List[str]) -> str:
    """Move ``names`` (files or folders, relative to ``output_dir``) into ``output_dir/replaced-<time>/``."""
    target = os.path.join(output_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    os.makedirs(target)
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def claim_output_dir(output_dir: str, outputs: Outputs, *, overwrite: bool, resuming_here: bool) -> None:
    """Refuse (or, with ``overwrite``, move aside) the outputs of an earlier run in ``output_dir``.
    ``resuming_here``: the run continues this directory's run, whose outputs it extends."""
    foreign = matches(output_dir, outputs.foreign)
    if foreign:
        raise UserError(f"output_dir {output_dir} " + outputs.foreign_message.format(found=", ".join(foreign)))
    if resuming_here:
        return
    found = matches(output_dir, outputs.marks)
    if not found:
        return
    if not overwrite:
        raise UserError(f"output_dir {output_dir} already holds the outputs of an earlier run "
                        f"({', '.join(found)}); {outputs.resume_hint}choose a new --output_dir, or pass --overwrite "
                        f"to move them into {output_dir}/replaced-<time>/")
    moved = move_aside(output_dir, found + [n for n in matches(output_dir, outputs.companions) if n not in found])
    log.warning("--overwrite: moved the earlier run's outputs of %s into %s", output_dir, moved)


def remove_stale_temporaries(output_dir: str) -> None:
    """A run killed while writing leaves its temporary file (never the checkpoint itself)."""
    for path in glob.glob(os.path.join(glob.escape(output_dir), ".*.pth.*.tmp")):
        log.info("removing %s, left by an interrupted checkpoint write", path)
        os.unlink(path)


# ----------------------------------------------------------------------------- one run at a time
LOCK_NAME = ".lock"


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux /proc; None elsewhere or when it is gone): with
    the pid it identifies a process, so a pid reused by another process is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: Dict[str, Any]) -> bool:
    """Whether the process that wrote a lock still runs (only knowable on the same host)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _process_start(pid)
    return started is None or holder.get("process_start") in (None, started)


class RunLock:
    """``OUTPUT_DIR/.lock``: the directory is held by one run at a time.  It names the holder
    (pid, host, start time, command); a second start is refused naming it, a lock left by a
    process that no longer runs (killed, crashed, a node restarted) is taken over with a notice.
    Held by rank 0 for the whole run and released when it ends."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.token = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        self.held = False

    def acquire(self) -> None:
        make_dirs(os.path.dirname(self.path))
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise UserError(f"output_dir {os.path.dirname(self.path)} is in use by another run: pid "
                                    f"{holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
                                    f"({holder.get('command')}); wait for it to end or stop it (if that process "
                                    f"is gone on another machine, remove {self.path})") from None
                log.warning("%s was left by pid %s on %s, which no longer runs: taking it over", self.path,
                            (holder or {}).get("pid"), (holder or {}).get("host"))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.token, f)
            self.held = True
            return
        raise UserError(f"output_dir {os.path.dirname(self.path)}: another run took its lock at the same time")

    def _holder(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # torn or unreadable: its writer died while writing it

    def release(self) -> None:
        if self.held and self._holder() == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def holding(output_dir: str) -> Iterator[None]:
    """Rank 0 holds ``output_dir``'s lock for the block; every rank fails together if another run
    holds it (call it on every rank)."""
    lock = RunLock(output_dir)
    on_main_first(lock.acquire)
    try:
        yield
    finally:
        lock.release()
