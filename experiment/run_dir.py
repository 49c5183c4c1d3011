"""A run's output directory: nothing of an earlier run is replaced without ``--overwrite``.

Each kind of run names the files that mark it (:class:`Outputs`); a directory holding any of
them is refused unless the run continues it (``--resume``) or ``--overwrite`` moves them, with
their companions, into ``OUTPUT_DIR/replaced-<time>/``.  Call on rank 0 (``on_main_first``).
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
from typing import List, Sequence, Tuple

from experiment.errors import UserError

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
