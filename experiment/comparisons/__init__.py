"""Comparisons: drivers above the engine that start ordinary runs and report them side by side
(the InverseForm ablation, the supervision comparison for scribbles, uniform vs adaptive
sampling over seeds).  Each claims its own directory like a run does, and hands its runs to the
engine in this process or to child processes (children.py).  A comparison whose runs fine-tune
one base model trains it here once and caches it under a name made of its settings."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

from experiment.checkpoints import (INITIALISATION_ONLY, VALIDATION_ONLY, changes_affecting, config_differences,
                                    flatten, load_training_checkpoint)
from experiment.errors import UserError
from experiment.methods import RunOptions, get_method, run_single
from experiment.run_dir import Outputs, claim_output_dir, holding
from experiment.runtime import on_main_first
from utils import dist
from utils.config import config_to_dict

log = logging.getLogger("experiment.comparisons")


@contextlib.contextmanager
def comparison_dir(output_dir: str, outputs: Outputs, options: RunOptions) -> Iterator[None]:
    """Hold ``output_dir`` for the comparison: refused while another run holds it, or when it
    holds an earlier comparison that is neither resumed nor ``--overwrite``n (then all its runs
    are moved aside together)."""
    if options.stop_after is not None:
        raise UserError("--stop_after stops a single run; a comparison stops with SIGTERM (each unfinished run "
                        "checkpoints) and continues with --resume")
    if isinstance(options.resume, str) and options.resume not in ("", "auto"):
        raise UserError(f"--resume {options.resume}: a comparison continues each of its runs from its own "
                        "OUTPUT_DIR/<run>/last.pth; give --resume without a path")

    with holding(output_dir):
        on_main_first(lambda: claim_output_dir(output_dir, outputs, overwrite=options.overwrite,
                                               resuming_here=bool(options.resume)))
        yield


def run_options(options: RunOptions) -> RunOptions:
    """The options of one run of a comparison: continued when the comparison is resumed and the
    run has a checkpoint, started anew otherwise."""
    return RunOptions(resume="auto" if options.resume else False)


def with_settings(cfg: Any, output_dir: str, settings: Mapping[str, Any]) -> Any:
    """A copy of ``cfg`` writing into ``output_dir``, with the dotted ``settings`` applied."""
    sub = copy.deepcopy(cfg)
    sub.output_dir = output_dir
    for key, value in settings.items():
        *path, name = key.split(".")
        owner = sub
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, value)
    return sub


def finished_earlier(sub: Any, what: str) -> bool:
    """Whether the run of ``sub`` (a ``what``: "ablation run", ...) finished earlier with the same
    settings, so that a resumed comparison keeps it; a finished run whose settings differ (it
    would be reported under the new ones) is refused, naming them, and so is one that started
    from other weights (a fine-tune of another base), which a resume of an unfinished run may
    ignore.  One whose validation settings changed is not kept: resumed, it is validated again."""
    if not os.path.isfile(os.path.join(sub.output_dir, "metrics.json")):
        return False
    path = os.path.join(sub.output_dir, "last.pth")
    saved = load_training_checkpoint(path).get("config") if os.path.isfile(path) else None
    if not isinstance(saved, dict):
        raise UserError(f"{what} {sub.output_dir} finished but its last.pth records no config to compare; "
                        "start anew (--overwrite) or in another --output_dir")
    config = config_to_dict(sub)
    refused, _ = config_differences(saved, config)
    refused += [f"{k} (other starting weights)" for k in changes_affecting(saved, config, INITIALISATION_ONLY)]
    if refused:
        raise UserError(f"--resume: the finished {what} {sub.output_dir} was trained with other settings "
                        f"({', '.join(refused)}); start anew (--overwrite) or in another --output_dir")
    scored = changes_affecting(saved, config, VALIDATION_ONLY)
    if scored:  # the weights are the same, the metrics were not measured this way: validate again
        log.info("%s %s finished earlier; validated again for the changed %s", what, sub.output_dir, ", ".join(scored))
        return False
    log.info("%s %s finished earlier with the same settings: kept", what, sub.output_dir)
    return True


# Keys that change neither a base model's weights nor its data: left out of its folder's name.
NOT_IN_BASE_NAME = ("output_dir", "data.num_workers", "val.", "train.log_interval", "train.image_interval",
                    "train.val_interval", "train.checkpoint_interval", "train.stop_timeout", "train.resume")


def cached_base(sub: Any, base_dir: str, prefix: str, ignore: Sequence[str] = ()) -> Any:
    """``sub`` writing into BASE_DIR/<prefix>-<hash of the settings that shape its weights> (all
    but :data:`NOT_IN_BASE_NAME` and ``ignore``; a key ending in "." names its section): the same
    settings find the same folder, so a finished base model is trained once and reused by later
    comparisons."""
    skip = NOT_IN_BASE_NAME + tuple(ignore)
    settings = {k: v for k, v in flatten(config_to_dict(sub)).items()
                if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in skip)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return with_settings(sub, os.path.join(base_dir, f"{prefix}-{digest}"), {})


def ensure_base(sub: Any, ctx: dist.DistContext, what: str) -> str:
    """The last.pth of the base run ``sub`` (a ``what``: "ablation", ...): reused when its run
    finished, else trained in this process (an interrupted base continues where it stopped)."""
    path = os.path.join(sub.output_dir, "last.pth")
    if os.path.isfile(os.path.join(sub.output_dir, "metrics.json")) and os.path.isfile(path):
        log.info("%s: reusing the base model %s (same settings)", what, sub.output_dir)
        return path
    log.info("%s: training the base model (%d epochs, seed %d) into %s; later runs with the same settings "
             "reuse it", what, sub.train.epochs, sub.train.seed, sub.output_dir)
    run_single(get_method(sub.method), sub, ctx, RunOptions(resume="auto"))
    return path
