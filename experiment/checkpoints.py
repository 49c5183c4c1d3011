"""Checkpoints: training checkpoints written atomically and read back safely, the RNG states
they carry, the comparison that decides whether a resume continues exactly, finiteness checks,
and one loader for every model file a command reads."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from experiment.errors import NonFiniteWeightsError, UserError
from utils import dist
from utils.io import atomic_torch_save


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in a form that
    ``torch.load(weights_only=True)`` accepts (tensors, ints, tuples)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- finiteness
def first_non_finite(tensors: Mapping[str, Any]) -> Optional[str]:
    """Name of the first floating-point tensor of ``tensors`` holding NaN or Inf (None if all
    are finite); one reduction per tensor, one host sync in all."""
    names = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return None
    sums = torch.stack([tensors[k].detach().float().sum() for k in names])
    finite = torch.isfinite(sums)
    if bool(finite.all()):
        return None
    for name, ok in zip(names, finite.tolist()):
        if not ok and not bool(torch.isfinite(tensors[name]).all()):
            return name
    return None  # only a sum overflowed: the values themselves are finite


def require_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Raise NonFiniteWeightsError naming ``what`` and the first tensor holding NaN or Inf."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteWeightsError(f"{what}: tensor {bad!r} holds NaN or Inf")


def state_is_finite_everywhere(tensors: Mapping[str, Any], device: torch.device) -> Optional[str]:
    """The first non-finite tensor name on this rank, after agreeing across ranks whether any
    rank has one (so that all of them raise together instead of one waiting in a collective)."""
    bad = first_non_finite(tensors)
    flag = torch.tensor([1.0 if bad is not None else 0.0], device=device)
    dist.all_reduce(flag, op="max")
    if flag.item() > 0:
        return bad or "(on another rank)"
    return None


# ----------------------------------------------------------------------------- files
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_status(path: str) -> str:
    """What is on disk at ``path``, for messages that must be true ("... is intact")."""
    if not os.path.isfile(path):
        return f"no checkpoint was written yet ({path} does not exist)"
    return f"the last checkpoint {path} is intact"


def unreadable_reason(path: str, exc: BaseException) -> str:
    """A one-line reason why ``torch.load`` failed on ``path`` (never blank)."""
    with contextlib.suppress(OSError):
        if os.path.getsize(path) == 0:
            return "the file is empty (0 bytes)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else f"{type(exc).__name__} (truncated or not a PyTorch file?)"


def save_training_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    atomic_torch_save(state, path)


def read_checkpoint_file(path: str) -> Any:
    """``torch.load`` (weights only, to the CPU) of an existing file; one line when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, a foreign format, pickled code refused by weights_only
        raise UserError(f"cannot read checkpoint {path}: {unreadable_reason(path, exc)}") from exc


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"cannot resume: checkpoint {path} does not exist")
    state = read_checkpoint_file(path)
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} is not a training checkpoint of this project "
                        f"(holds a {type(state).__name__})")
    for key in ("state_dict", "optimizer", "iteration"):
        if key not in state:
            raise UserError(f"checkpoint {path} is not a training checkpoint of this project (no {key!r} key)")
    bad = first_non_finite(state["state_dict"])
    if bad is not None:
        raise NonFiniteWeightsError(f"checkpoint {path}: tensor {bad!r} holds NaN or Inf; "
                                    "it cannot be resumed from")
    return state


# ----------------------------------------------------------------------------- resume
# Config keys a resume may change, and what the change does.  Every other key is part of the
# training trajectory (data, model, loss, optimizer, schedule, seed, precision): a changed value
# cannot continue exactly, so the resume is refused and the keys are named.  Methods add theirs.
# what the keys below that change only how a run is scored, or only how a new run starts, say they affect
VALIDATION_ONLY = "validation only"
INITIALISATION_ONLY = "nothing (used only to initialise a new run)"
RESUME_MAY_CHANGE = {
    "output_dir": "where outputs go",
    "data.dataset_dir": "the dataset's location (the images must be the same)",
    "data.synthetic_dir": "the synthetic dataset's location",
    "data.num_workers": "loading speed only (samples are seeded by index, not by worker)",
    "model.pretrained_backbone": INITIALISATION_ONLY,
    "model.init_checkpoint": INITIALISATION_ONLY,
    "model.eval_scales": VALIDATION_ONLY,
    "train.device": "the device; results stay equal only to floating-point tolerance across devices",
    "train.log_interval": "logging cadence only",
    "train.image_interval": "TensorBoard images only",
    "train.val_interval": "when validation runs (and so which iteration best.pth holds), not the weights",
    "train.checkpoint_interval": "how often last.pth is written",
    "train.deterministic": "kernel selection: later iterations may differ in the last bits",
    "train.compile": "speed only: the same computation compiled (equal to floating-point tolerance)",
    "train.stop_timeout": "how long a stop signal may take",
    "train.resume": "how a start finds an earlier run, not the run itself",
    "cuda_overrides": "nothing by itself (the keys it sets are compared like any other)",
}
RESUME_MAY_CHANGE_SECTIONS = {"val": VALIDATION_ONLY + " (metrics and best.pth selection), not the weights"}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _allowed(key: str, may_change: Mapping[str, str]) -> Optional[str]:
    if key in may_change:
        return may_change[key]
    return RESUME_MAY_CHANGE_SECTIONS.get(key.split(".", 1)[0])


def config_differences(saved_cfg: Mapping[str, Any], config: Mapping[str, Any],
                       may_change: Mapping[str, str] = RESUME_MAY_CHANGE) -> tuple:
    """(refused, notices): the changed keys a resume may not change ("key old -> new"), and one
    line per allowed change or key the saved config lacks."""
    old, new = flatten(saved_cfg), flatten(config)
    changed = [k for k in new if k in old and old[k] != new[k]]
    refused = [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed if _allowed(k, may_change) is None]
    notices = [f"{k} changed {old[k]!r} -> {new[k]!r}: affects {_allowed(k, may_change)}"
               for k in changed if _allowed(k, may_change) is not None]
    unknown = sorted(set(new) - set(old))
    if unknown:
        notices.append(f"keys not recorded in the checkpoint (taken as given now): {', '.join(unknown)}")
    return refused, notices


def changes_affecting(saved_cfg: Mapping[str, Any], config: Mapping[str, Any], effect: str) -> List[str]:
    """The changed keys a resume may change whose effect is ``effect`` (VALIDATION_ONLY: the
    metrics a finished run recorded were measured without them; INITIALISATION_ONLY: a finished
    run started from other weights)."""
    old, new = flatten(saved_cfg), flatten(config)
    return [k for k in new if k in old and old[k] != new[k]
            and (_allowed(k, RESUME_MAY_CHANGE) or "").startswith(effect)]


def check_resume(state: Mapping[str, Any], path: str, config: Mapping[str, Any], *, world_size: int,
                 iterations_per_epoch: int, total_iterations: int, model_fields: Mapping[str, Any],
                 may_change: Optional[Mapping[str, str]] = None) -> List[str]:
    """Compare a training checkpoint with the run about to continue it.

    Raises UserError naming every setting that would make the continuation differ from the
    uninterrupted run (config keys, number of processes, iterations per epoch, a checkpoint
    past the configured end, the checkpoint's own model fields).  Returns one line per allowed
    change saying what it does.  ``may_change``: the keys a resume may change (default
    RESUME_MAY_CHANGE)."""
    problems: List[str] = []
    for key, value in model_fields.items():
        saved = state.get(key)
        if saved is not None and saved != value:
            problems.append(f"{key} {saved!r} in the checkpoint, {value!r} now")
    saved_world = len(state.get("rng", [])) or None
    if saved_world is not None and saved_world != world_size:
        problems.append(f"{saved_world} processes wrote it, {world_size} now (each process's shard of the data, "
                        "its batches, the samples seen per iteration and so the schedule would differ: a run "
                        "continues with the number of processes it started with, also after an elastic restart "
                        "with another count)")
    notices: List[str] = []
    saved_cfg = state.get("config")
    if isinstance(saved_cfg, Mapping):
        refused, notices = config_differences(saved_cfg, config, RESUME_MAY_CHANGE if may_change is None
                                               else may_change)
        if refused:
            problems.append("config " + ", ".join(refused))
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
        start_anew = " initialised from it with --opt model.init_checkpoint=" + path \
            if "model.init_checkpoint" in flatten(config) else ""
        raise UserError(f"cannot resume exactly from {path}: " + "; ".join(problems)
                        + ". Resume with the checkpoint's settings (its config.yaml), or start a new run "
                        f"(--output_dir){start_anew}")
    return notices

