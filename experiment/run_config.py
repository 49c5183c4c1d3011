"""The one way every script turns ``--config`` files, ``--opt`` overrides and flags into a
config object.

* ``--config`` takes files or names of shipped configs (experiment/paths.py); relative paths
  resolve against the config's project root; ``--opt key=value`` and flags (typed ``(key,
  value)`` pairs, experiment/cli.py) are applied after the files.
* The schema is the one of the config's method (``method:``, experiment/methods/) unless the
  caller names it.
* ``cuda_overrides`` of a config are applied, before the command line's, when the run will be
  on CUDA; the CPU run never sees them.
* Keys of older configs and saved runs are migrated (:func:`migrate_legacy`), so every config
  and checkpoint written earlier still loads.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Type, TypeVar, Union

import torch

from experiment.paths import config_root, find_config
from utils.config import ConfigError, Override, load_config, merged_data

T = TypeVar("T")

log = logging.getLogger("experiment")

Specs = Sequence[Union[str, os.PathLike]]

# Keys of the DenseCRF term, once in the loss section, now in the weak method's own section.
LEGACY_DENSECRF = {"densecrf_weight": "weight", "densecrf_sigma_rgb": "sigma_rgb", "densecrf_sigma_xy": "sigma_xy",
                   "densecrf_scale": "scale", "densecrf_kernel": "kernel"}
LEGACY_DENSECRF_DEFAULTS = {"densecrf_weight": 0.0, "densecrf_sigma_rgb": 15.0, "densecrf_sigma_xy": 100.0,
                            "densecrf_scale": 0.5, "densecrf_kernel": "permutohedral"}


def raw_config(specs: Specs, overrides: Sequence[Override] = (),
               defaults: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The merged files and overrides, before any schema (for the method name and the keys a
    user set)."""
    return merged_data([find_config(s) for s in specs], overrides, defaults)


def will_use_cuda(device_setting: str) -> bool:
    """Whether a run with ``train.device`` = ``device_setting`` will be on CUDA (as
    utils.dist.init_distributed decides: 'auto' means CUDA when available)."""
    return device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())


def load_run_config(specs: Specs, overrides: Sequence[Override] = (), *, schema: Optional[Type[T]] = None,
                    method: Optional[str] = None, defaults: Optional[Mapping[str, Any]] = None,
                    cuda: Optional[bool] = None) -> T:
    """Build the config of ``specs`` + ``overrides`` (module docstring) with ``schema``, else the
    schema of ``method``, else of the method the config names.  ``cuda``: None decides from
    ``train.device``; ``--opt cuda_overrides=[]`` switches the CUDA overrides off."""
    if schema is None:
        from experiment.methods import get_method, method_name
        name = method or method_name(raw_config(specs, overrides, defaults))
        schema = get_method(name).config_class
    files = [find_config(s) for s in specs]

    def load(extra: Sequence[Override]) -> T:
        return load_config(schema, files, list(extra) + list(overrides), defaults=defaults, root_of=config_root,
                           migrate=lambda data: migrate_legacy(data, schema))

    cfg = load(())
    extra = list(getattr(cfg, "cuda_overrides", None) or [])
    if not extra or not (will_use_cuda(cfg.train.device) if cuda is None else cuda):
        return cfg
    log.info("CUDA run: applying cuda_overrides %s", " ".join(extra))
    return load(extra)


def migrate_legacy(data: Dict[str, Any], schema: type) -> Dict[str, Any]:
    """Older configs (and the config.yaml of older runs) carried every method's section in every
    run and the DenseCRF keys in ``loss``: sections of other methods that were switched off are
    dropped, the DenseCRF keys move to ``weak.densecrf``."""
    fields = {f.name for f in dataclasses.fields(schema)}
    data = dict(data)
    nus, weak = data.get("nus"), data.get("weak")
    if "nus" not in fields and isinstance(nus, Mapping) and nus.get("mode") in (None, "off", False):
        del data["nus"]
    if isinstance(weak, Mapping):
        weak = {k: v for k, v in weak.items() if k != "enabled"} if "weak" in fields else weak
        if "weak" in fields:
            data["weak"] = weak
        elif not data["weak"].get("enabled"):
            del data["weak"]
    if "ablation" in data and "ablation" not in fields:
        log.info("config section 'ablation' is read by experiment.ablation only: ignored by this run")
        del data["ablation"]
    loss = data.get("loss")
    if isinstance(loss, Mapping) and any(k in loss for k in LEGACY_DENSECRF):
        data["loss"] = {k: v for k, v in loss.items() if k not in LEGACY_DENSECRF}
        moved = {LEGACY_DENSECRF[k]: v for k, v in loss.items() if k in LEGACY_DENSECRF}
        if "weak" in fields:
            data["weak"] = {**(data.get("weak") or {}), "densecrf": {**moved, **(data.get("weak") or {}).get(
                "densecrf", {})}}
        else:
            used = [f"loss.{k}" for k in LEGACY_DENSECRF if k in loss and loss[k] != LEGACY_DENSECRF_DEFAULTS[k]]
            if used:
                raise ConfigError(f"config keys {', '.join(used)} belong to the DenseCRF loss of method weak "
                                  "(weak.densecrf.*): set method: weak, or remove them")
    return data
