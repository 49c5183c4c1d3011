"""The training methods, registered by name and chosen by a config's ``method:`` key.

A method is one small module of this package: it defines its config schema (ExperimentConfig
extended with its own section, if any) and a function that turns such a config into the
engine's :class:`~experiment.engine.Task` (data, model, the step's loss), then calls
:func:`register`.  The modules of this package are found and imported on the first lookup; a
method living elsewhere is named by its module (``method: mypackage.my_method``), which is
imported and must register a method of that name.  The training CLI, the engine and the
comparisons never name a method.

    register(Method("segmentation", ExperimentConfig, build=build_task))

``run`` is what ``experiment.train`` calls for a config of the method: by default one run of
the engine (:func:`run_single`); a method whose configs may ask for several runs (a comparison
of supervisions, of sampling schemes) names the driver that runs them, ``"module:function"``
(experiment/comparisons/), imported when called.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from experiment.engine import RunOptions, fit, resume_setting
from utils import dist
from utils.config import ConfigError

__all__ = ["Method", "RunOptions", "get_method", "method_name", "method_names", "register", "run", "run_single",
           "train"]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    build: Optional[Callable[[Any, dist.DistContext], Any]] = None     # -> experiment.engine.Task
    prepare: Optional[Callable[[Any, dist.DistContext, RunOptions], None]] = None  # before seeding: files a run needs
    run: Optional[str] = None        # "module:function" taking (cfg, ctx, options)
    summary: str = ""


_METHODS: Dict[str, Method] = {}
_DISCOVERED = False


def register(method: Method) -> Method:
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> List[str]:
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as ``name``; a name not registered yet is imported as a module, which
    must register it."""
    _discover()
    if name not in _METHODS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name.split(".")[0] or "." in name:
                raise ConfigError(f"config key 'method': cannot import module {name!r} ({exc})") from exc
    if name not in _METHODS:
        raise ConfigError(f"config key 'method': unknown method {name!r} (registered: {', '.join(method_names())}; "
                          "or the module of your own, which registers it)")
    return _METHODS[name]


def method_name(data: Mapping[str, Any]) -> str:
    """The method a merged config mapping asks for: its ``method`` key, else the sections older
    configs switched methods on with (``nus.mode`` other than off, ``weak.enabled``)."""
    if data.get("method"):
        return str(data["method"])
    nus, weak = data.get("nus"), data.get("weak")
    if isinstance(nus, Mapping) and nus.get("mode") not in (None, "off", False):
        return "nus"
    if isinstance(weak, Mapping) and weak.get("enabled"):
        return "weak"
    return "segmentation"


def run_single(method: Method, cfg: Any, ctx: dist.DistContext, options: RunOptions
               ) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """One run of the engine for ``cfg``."""
    if method.build is None:
        raise ValueError(f"method {method.name!r} has no single run: its configs are run by its own run()")
    return fit(cfg, ctx, method.build, prepare=method.prepare, resume=options.resume, stop_after=options.stop_after,
               overwrite=options.overwrite)


def run(cfg: Any, ctx: dist.DistContext, options: RunOptions = RunOptions()) -> Any:
    """What ``experiment.train`` does with ``cfg``: its method's ``run``, else one engine run."""
    method = get_method(cfg.method)
    options = dataclasses.replace(options, resume=resume_setting(cfg, options.resume))
    if method.run is None:
        return run_single(method, cfg, ctx, options)
    module, function = method.run.split(":")
    return getattr(importlib.import_module(module), function)(cfg, ctx, options)


def train(cfg: Any, ctx: dist.DistContext, resume: Any = False, stop_after: Optional[int] = None,
          overwrite: bool = False) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """One engine run of ``cfg``'s method: the final validation metrics (empty when stopped early by
    ``stop_after``) and the trained network."""
    return run_single(get_method(cfg.method), cfg, ctx, RunOptions(resume=resume, overwrite=overwrite,
                                                                  stop_after=stop_after))
