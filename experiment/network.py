"""The segmentation network of a config, and of a checkpoint.

A checkpoint written by this project's training stores the model it holds (``arch``,
``hrnet_base``, ``has_edge``, ``num_classes``); the released files store weights only, so
their architecture comes from the flags, as in the reference.  :func:`read_model_file` reads a
file once; :func:`describe_from_checkpoint` fills the model settings the user did not give from
what the file stores, and refuses a given setting that contradicts it (except ``has_edge``
false on an edge checkpoint, which drops the edge head).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping

import torch

from experiment.checkpoints import read_checkpoint_file, require_finite
from experiment.errors import UserError
from experiment.paths import missing_file_message
from models import get_net, load_checkpoint, pretrained

log = logging.getLogger("experiment")

MODEL_KEYS = ("arch", "hrnet_base", "has_edge", "num_classes")
HMS_ARCH = "ocrnet.HRNet_Mscale"


def build_model(cfg) -> torch.nn.Module:
    """``get_net`` from a config's ``model`` section (HMS takes ``model.eval_scales`` as its
    attention scales; other archs average over them at evaluation, experiment/tta.py)."""
    options = {}
    if cfg.model.eval_scales is not None:
        if cfg.model.arch != HMS_ARCH:
            log.info("--scales / model.eval_scales for %s: logits averaged over scales %s",
                     cfg.model.arch, ",".join(f"{s:g}" for s in cfg.model.eval_scales))
        else:
            options["scales"] = tuple(cfg.model.eval_scales)
    return get_net(cfg.model.arch, num_classes=cfg.model.num_classes, has_edge=cfg.model.has_edge,
                   hrnet_base=cfg.model.hrnet_base, **options)


def read_model_file(path: str, what: str = "model file") -> Any:
    """What a model file holds (one ``torch.load``, weights only), or a model folder written by
    ``models.save_pretrained`` as the same ``{'state_dict', 'arch', ...}`` mapping (safetensors:
    no pickle); one line naming the path when it is missing or unreadable."""
    if not path or not os.path.exists(path):
        raise UserError(missing_file_message(what, path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, pretrained.CONFIG_FILE)):
            raise UserError(f"{what} {path} is a directory, not a checkpoint file or a model folder (which holds "
                            f"{pretrained.CONFIG_FILE} and {pretrained.WEIGHTS_FILE})")
        config = pretrained.read_config(path)
        return {"state_dict": pretrained.read_weights(path), **{key: config[key] for key in MODEL_KEYS},
                "options": config.get("options", {}), "class_table": config.get("class_table")}
    return read_checkpoint_file(path)


def stored_model_settings(state: Any) -> Dict[str, Any]:
    """The model description a checkpoint of this project stores; {} for the released files."""
    if not isinstance(state, Mapping):
        return {}
    return {key: state[key] for key in MODEL_KEYS if state.get(key) is not None}


def describe_from_checkpoint(cfg, state: Any, path: str, explicit: Mapping[str, str]) -> None:
    """Set (in place) the ``cfg.model`` settings the checkpoint stores and the user left out;
    ``explicit``: the keys the user set, each with where (a flag, --opt, a config file).  A key set
    to None (a run's own config.yaml writes ``hrnet_base: null``, "the arch's own") names no value
    and takes the stored one."""
    for key, stored in stored_model_settings(state).items():
        current = getattr(cfg.model, key)
        if key not in explicit or current is None:
            setattr(cfg.model, key, stored)
        elif current != stored and not (key == "has_edge" and stored and not current):
            raise UserError(f"{explicit[key]} is {current!r} but {path} was trained with {key} {stored!r}; "
                            f"leave it out (the checkpoint describes its model) or pick the matching checkpoint")
    cfg.model.validate()


def load_state(net: torch.nn.Module, state: Any, path: str, purpose: str = "cannot be used"):
    """Load ``state`` (what :func:`read_model_file` read from ``path``) into ``net`` strictly: a
    file that does not fit names the keys (CheckpointMismatchError); a file that holds no state
    dict, and weights holding NaN/Inf ("checkpoint PATH <purpose>: ..."), are refused in one
    line.  Returns the load report."""
    try:
        report = load_checkpoint(net, state, source=path)
    except (ValueError, TypeError) as exc:
        raise UserError(f"checkpoint {path} is not a model checkpoint: {exc}") from exc
    require_finite(net.state_dict(), f"checkpoint {path} {purpose}")
    return report


def load_weights(net: torch.nn.Module, path: str, what: str = "model file"):
    """:func:`read_model_file` then :func:`load_state` (``what`` names the file when it is missing)."""
    return load_state(net, read_model_file(path, what), path)


def load_model(cfg, state: Any, path: str) -> torch.nn.Module:
    """The network of ``cfg`` with the weights of ``state`` read from ``path``."""
    net = build_model(cfg)
    report = load_state(net, state, path, purpose="cannot be evaluated")
    log.info("loaded %s into %s (hrnet_base %s, has_edge %s): %s", path, cfg.model.arch, net.hrnet_base,
             cfg.model.has_edge, report)
    return net
