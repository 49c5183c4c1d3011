"""Keeping run directories and resumes safe (issue 14): nothing of an earlier run is replaced
without an explicit flag, a resume continues exactly or is refused with the keys that differ,
and a stop signal (SIGTERM, what job schedulers send before they kill) ends with a checkpoint.

Used by train.py (and validation.py for its output directory); depends on experiment.common
and the standard library only.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from experiment.common import UserError

log = logging.getLogger("experiment")

# What a training run leaves that a new run would replace or mix with (train_log.txt is an
# append-only text log and config.yaml is rewritten by every start: neither marks a run).
TRAINING_OUTPUTS = ("last.pth", "best.pth", "train_log.jsonl", "metrics.json", "metrics_iter*.json")
# Moved aside with them by --overwrite so that nothing of the old run mixes with the new one.
TRAINING_COMPANIONS = ("config.yaml", "tensorboard", "predictions")
VALIDATION_OUTPUTS = ("metrics.json",)
VALIDATION_COMPANIONS = ("config.yaml", "tensorboard", "predictions")

# Config keys a resume may change, and what the change does.  Every other key is part of the
# training trajectory (data, model, loss, optimizer, schedule, seed, precision): a changed value
# cannot continue exactly, so the resume is refused and the keys are named.
RESUME_MAY_CHANGE = {
    "output_dir": "where outputs go",
    "data.dataset_dir": "the dataset's location (the images must be the same)",
    "data.synthetic_dir": "the synthetic dataset's location",
    "data.num_workers": "loading speed only (samples are seeded by index, not by worker)",
    "model.pretrained_backbone": "nothing (used only to initialise a new run)",
    "model.init_checkpoint": "nothing (used only to initialise a new run)",
    "model.eval_scales": "validation only",
    "loss.inverseform_path": "the regressor file's location (it must hold the same weights)",
    "loss.regressor_config": "nothing (used only when the regressor file is missing)",
    "train.device": "the device; results stay equal only to floating-point tolerance across devices",
    "train.log_interval": "logging cadence only",
    "train.image_interval": "TensorBoard images only",
    "train.val_interval": "when validation runs (and so which iteration best.pth holds), not the weights",
    "train.checkpoint_interval": "how often last.pth is written",
    "train.deterministic": "kernel selection: later iterations may differ in the last bits",
    "train.compile": "speed only: the same computation compiled (equal to floating-point tolerance)",
    "nus.cpu_threads": "CPU threads only",
    "cuda_overrides": "nothing by itself (the keys it sets are compared like any other)",
}
RESUME_MAY_CHANGE_SECTIONS = {"val": "validation only (metrics and best.pth selection), not the weights"}


def _matches(output_dir: str, patterns) -> List[str]:
    found = []
    for pattern in patterns:
        found += sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(output_dir), pattern)))
    return found


def move_aside(output_dir: str, names: List[str]) -> str:
    """Move ``names`` (files or folders of ``output_dir``) into ``output_dir/replaced-<time>/``."""
    target = os.path.join(output_dir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def claim_output_dir(output_dir: str, *, overwrite: bool, resuming_here: bool, command: str = "train") -> None:
    """Refuse (or, with ``overwrite``, move aside) the outputs of an earlier run in ``output_dir``.

    ``resuming_here``: the run continues the checkpoint of this directory, whose outputs it
    extends.  Call on rank 0 (e.g. through ``on_main_first``)."""
    if command == "train":
        outputs, companions = TRAINING_OUTPUTS, TRAINING_COMPANIONS
        hint = "continue it with --resume, "
    else:
        outputs, companions = VALIDATION_OUTPUTS, VALIDATION_COMPANIONS
        hint = ""
        training = _matches(output_dir, ("last.pth", "train_log.jsonl"))
        if training:  # validation never writes into a training run's directory
            raise UserError(f"output_dir {output_dir} holds a training run ({', '.join(training)}); validation "
                            "would replace its metrics.json and config.yaml: give validation its own --output_dir")
    if resuming_here:
        return
    found = _matches(output_dir, outputs)
    if not found:
        return
    if not overwrite:
        raise UserError(f"output_dir {output_dir} already holds the outputs of an earlier run "
                        f"({', '.join(found)}); {hint}choose a new --output_dir, or pass --overwrite "
                        f"to move them into {output_dir}/replaced-<time>/")
    moved = move_aside(output_dir, found + _matches(output_dir, companions))
    log.warning("--overwrite: moved the earlier run's outputs of %s into %s", output_dir, moved)


# ----------------------------------------------------------------------------- resume
def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _allowed(key: str) -> Optional[str]:
    if key in RESUME_MAY_CHANGE:
        return RESUME_MAY_CHANGE[key]
    return RESUME_MAY_CHANGE_SECTIONS.get(key.split(".", 1)[0])


def check_resume(state: Mapping[str, Any], path: str, config: Mapping[str, Any], *, world_size: int,
                 iterations_per_epoch: int, total_iterations: int, model_fields: Mapping[str, Any]) -> List[str]:
    """Compare a training checkpoint with the run about to continue it.

    Raises UserError naming every setting that would make the continuation differ from the
    uninterrupted run (config keys, number of processes, iterations per epoch, a checkpoint
    past the configured end, the checkpoint's own arch/num_classes fields).  Returns one line
    per allowed change saying what it does."""
    problems: List[str] = []
    for key, value in model_fields.items():
        saved = state.get(key)
        if saved is not None and saved != value:
            problems.append(f"{key} {saved!r} in the checkpoint, {value!r} now")
    saved_world = len(state.get("rng", [])) or None
    if saved_world is not None and saved_world != world_size:
        problems.append(f"{saved_world} processes wrote it, {world_size} now (the data shards and the "
                        "per-process batches would differ)")
    notices: List[str] = []
    saved_cfg = state.get("config")
    if isinstance(saved_cfg, Mapping):
        old, new = _flatten(saved_cfg), _flatten(config)
        changed = [k for k in new if k in old and old[k] != new[k]]
        refused = [k for k in changed if _allowed(k) is None]
        if refused:
            problems.append("config " + ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in refused))
        for k in changed:
            if _allowed(k) is not None:
                notices.append(f"{k} changed {old[k]!r} -> {new[k]!r}: affects {_allowed(k)}")
        unknown = sorted(set(new) - set(old))
        if unknown:
            notices.append(f"keys not recorded in the checkpoint (taken as given now): {', '.join(unknown)}")
    else:
        notices.append("the checkpoint records no config: settings could not be compared")
    saved_per_epoch = state.get("iterations_per_epoch")
    if saved_per_epoch is not None and saved_per_epoch != iterations_per_epoch:
        problems.append(f"{saved_per_epoch} iterations per epoch then, {iterations_per_epoch} now (the dataset, "
                        "batch size or number of processes changed)")
    iteration = int(state["iteration"])
    if iteration > total_iterations and not any(p.startswith("config") for p in problems):
        problems.append(f"it is at iteration {iteration}, past this run's end ({total_iterations} iterations)")
    if problems:
        raise UserError(f"cannot resume exactly from {path}: " + "; ".join(problems)
                        + ". Resume with the checkpoint's settings (its config.yaml), or start a new run "
                        "(--output_dir) initialised from it with --opt model.init_checkpoint=" + path)
    return notices


# ----------------------------------------------------------------------------- weights
def require_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Raise NonFiniteWeightsError naming ``what`` and the first tensor holding NaN or Inf."""
    from experiment.engine import NonFiniteWeightsError, first_non_finite

    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteWeightsError(f"{what}: tensor {bad!r} holds NaN or Inf")


# ----------------------------------------------------------------------------- stop signals
class StopSignal:
    """Records SIGTERM (and SIGUSR1, which some schedulers send first) instead of dying, so that
    the training loop can agree on it across ranks, write a checkpoint and stop.  A no-op outside
    the main thread (Python delivers signals only there)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: List[Tuple[int, Any]] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: finishing this iteration, then saving a checkpoint and stopping",
                        signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    num = getattr(signal, name)
                    self._previous.append((num, signal.signal(num, self._handler)))
        try:
            yield self
        finally:
            for num, handler in reversed(self._previous):
                signal.signal(num, handler)
            self._previous.clear()

    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal"


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals every process of a job; a worker killed
    by it would abort the main process before it saves.  Workers ignore it and end with their
    main process (which has the checkpoint to write)."""
    for name in StopSignal.SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _kill_daemonic_children() -> None:
    """At interpreter exit.  DataLoader workers ignore SIGTERM (above), so multiprocessing's own
    exit handler, which terminates daemonic children with SIGTERM and then joins them, would wait
    forever for a worker a loader never shut down: kill them first (they hold nothing to save)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# atexit runs handlers last-registered first: this runs before multiprocessing's (registered when
# torch imported it).
atexit.register(_kill_daemonic_children)


def state_is_finite_everywhere(tensors: Mapping[str, Any], device: torch.device) -> Optional[str]:
    """The first non-finite tensor name on this rank, after agreeing across ranks whether any
    rank has one (so that all of them raise together instead of one waiting in a collective)."""
    from experiment.engine import first_non_finite
    from utils import dist

    bad = first_non_finite(tensors)
    flag = torch.tensor([1.0 if bad is not None else 0.0], device=device)
    dist.all_reduce(flag, op="max")
    if flag.item() > 0:
        return bad or "(on another rank)"
    return None
