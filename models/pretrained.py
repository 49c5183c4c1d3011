"""Model folders: a network's weights as safetensors beside the description that rebuilds it.

A model folder holds

* ``model.safetensors``: the state dict (no pickle: reading it runs no code of the file);
* ``config.json``: ``format_version``, ``arch``, ``hrnet_base``, ``has_edge``, ``num_classes``,
  ``class_names``, ``class_colors`` (one ``[R, G, B]`` per class), ``normalisation`` (the
  input's ``mean``/``std``) and, for archs that take them, the ``options`` of :func:`get_net`
  (HMS: ``scales``, ``lo_scale``); other keys are kept as given;
* ``README.md``, when a model card is given.

:func:`save_pretrained` writes one (never over an existing one without ``overwrite``, never
half: the files go into a temporary folder beside it, which is then renamed);
:func:`from_pretrained` rebuilds the network with :func:`get_net` and loads the weights strictly.
:func:`pretrained_net` builds an arch and loads a model folder or a ``.pth`` into it, refusing
weights of another arch (the ``torch.hub`` entry points, ``hubconf.py``).  A folder that is
missing, incomplete or malformed is an error of :mod:`utils.errors` naming the file and what
was expected.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

from utils.io import current_umask
from utils.errors import InvalidInputError, MissingInputError, UnreadableInputError

from .checkpoint import EDGE_HEAD_PREFIXES, _unwrap_model, load_checkpoint
from .factory import ARCHS, get_net

__all__ = ["FORMAT_VERSION", "IMAGENET_NORMALISATION", "from_pretrained", "pretrained_net", "read_config",
           "read_weights", "save_pretrained"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
MODEL_KEYS = ("arch", "hrnet_base", "has_edge", "num_classes")
REQUIRED_KEYS = ("format_version",) + MODEL_KEYS + ("class_names", "class_colors", "normalisation")
# What every model here expects (datasets.transforms.IMAGENET_MEAN/STD, which models/ cannot import).
IMAGENET_NORMALISATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "input": "N x 3 x H x W, RGB in [0, 1], then (x - mean) / std per channel"}


def _safetensors():
    """The safetensors package, with its ``torch`` functions imported."""
    try:
        import safetensors.torch
    except ImportError:
        raise ModuleNotFoundError("model folders need the safetensors package (a requirement of setup.py): "
                                  "pip install safetensors") from None
    return safetensors


# ----------------------------------------------------------------------------- config.json
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_triple(value: Any, ok=_is_number) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(ok(v) for v in value)


def _is_normalisation(value: Any) -> bool:
    return (isinstance(value, dict) and _is_triple(value.get("mean"))
            and _is_triple(value.get("std")) and min(value["std"]) > 0)


# key -> (check, what is expected)
CHECKS = {
    "format_version": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "arch": (lambda v: isinstance(v, str) and bool(v), f"an arch name ({', '.join(ARCHS)})"),
    "hrnet_base": (lambda v: v is None or _is_int(v), "an integer such as 18, or null"),
    "has_edge": (lambda v: isinstance(v, bool), "true or false"),
    "num_classes": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of names"),
    "class_colors": (lambda v: isinstance(v, list) and all(_is_triple(c, lambda x: _is_int(x) and 0 <= x <= 255)
                                                           for c in v), "a list of [R, G, B] of integers 0-255"),
    "normalisation": (_is_normalisation, 'an object {"mean": [3 numbers], "std": [3 positive numbers]}'),
    "options": (lambda v: isinstance(v, dict), "an object of get_net options"),
}


def check_config(config: Any, where: str) -> None:
    """Raise InvalidInputError naming ``where`` and the first key that is missing or malformed."""
    if not isinstance(config, dict):
        raise InvalidInputError(f"{where}: expected a JSON object, found {type(config).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise InvalidInputError(f"{where}: missing key(s) {', '.join(missing)} (a model config holds "
                                f"{', '.join(REQUIRED_KEYS)})")
    for key, (ok, expected) in CHECKS.items():
        if key in config and not ok(config[key]):
            raise InvalidInputError(f"{where}: key {key!r} is {config[key]!r}, expected {expected}")
    if config["format_version"] > FORMAT_VERSION:
        raise InvalidInputError(f"{where}: format_version {config['format_version']} is newer than this code reads "
                                f"({FORMAT_VERSION}); update the code")
    for key in ("class_names", "class_colors"):
        if len(config[key]) != config["num_classes"]:
            raise InvalidInputError(f"{where}: key {key!r} has {len(config[key])} entries, expected one per class "
                                    f"(num_classes {config['num_classes']})")


def _net_settings(net: nn.Module) -> Dict[str, Any]:
    """What the network says about itself: arch, hrnet_base, has_edge, num_classes, options."""
    arch = getattr(net, "arch", None)
    settings = {"arch": arch, "hrnet_base": getattr(net, "hrnet_base", None),
                "has_edge": getattr(net, "has_edge", None), "num_classes": getattr(net, "num_classes", None)}
    names = ARCHS[arch].options if arch in ARCHS else ()
    options = {name: getattr(net, name) for name in names if hasattr(net, name)}
    settings["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    return {k: v for k, v in settings.items() if v is not None and v != {}}


def model_config(net: nn.Module, config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` completed from the network (arch, hrnet_base, has_edge, num_classes, options),
    with ImageNet normalisation unless it gives one, and the format version; a value of
    ``config`` that contradicts the network is refused."""
    settings = _net_settings(net)
    for key, value in settings.items():
        if key in config and config[key] != value:
            raise InvalidInputError(f"save_pretrained config: key {key!r} is {config[key]!r} but the network has "
                                    f"{value!r}")
    full = {"format_version": FORMAT_VERSION, **settings, **{k: v for k, v in config.items() if k not in settings}}
    full["format_version"] = FORMAT_VERSION
    full.setdefault("normalisation", copy.deepcopy(IMAGENET_NORMALISATION))
    check_config(full, "save_pretrained config")
    return full


# ----------------------------------------------------------------------------- writing
def _check_destination(folder: str, overwrite: bool) -> None:
    empty_folder = os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder)
    if os.path.lexists(folder) and not (overwrite or empty_folder):
        raise InvalidInputError(f"model folder {folder} already exists: pass overwrite=True to replace it")


def _move_into_place(tmp: str, folder: str) -> None:
    """Rename ``tmp`` to ``folder``; what was at ``folder`` is moved aside first, then removed
    (or put back when the rename fails)."""
    if not os.path.lexists(folder):
        os.rename(tmp, folder)
        return
    aside = tmp + ".replaced"
    os.rename(folder, aside)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.unlink(aside)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_pretrained(net: nn.Module, folder: PathLike, config: Mapping[str, Any], card: Optional[str] = None,
                    overwrite: bool = False) -> str:
    """Write ``net`` as a model folder: ``model.safetensors``, ``config.json`` (``config``
    completed by :func:`model_config`; it must give ``class_names`` and ``class_colors``) and,
    with ``card``, ``README.md``.  Returns the folder."""
    folder = os.fspath(folder)
    full = model_config(_unwrap_model(net), config)
    _check_destination(folder, overwrite)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap_model(net).state_dict().items()}
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(folder))}.", suffix=".tmp", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the folder is meant to be shared
    try:
        _safetensors().torch.save_file(state, os.path.join(tmp, WEIGHTS_FILE),
                                       metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
        _write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(full, indent=2) + "\n")
        if card is not None:
            _write_text(os.path.join(tmp, CARD_FILE), card)
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- reading
def _require_folder(folder: str) -> None:
    if not os.path.exists(folder):
        raise MissingInputError(f"model folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise InvalidInputError(f"{folder} is not a model folder (expected a folder holding {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE})")


def read_config(folder: PathLike) -> Dict[str, Any]:
    """The checked ``config.json`` of a model folder."""
    folder = os.fspath(folder)
    _require_folder(folder)
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise MissingInputError(f"model folder {folder} has no {CONFIG_FILE} (expected the model's description, "
                                "written by models.save_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableInputError(f"cannot read {path}: {exc}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not valid JSON ({exc}); expected the object models.save_pretrained "
                                "writes") from exc
    check_config(config, path)
    return config


def read_weights(folder: PathLike) -> Dict[str, torch.Tensor]:
    """The state dict of a model folder's ``model.safetensors`` (no pickle), on the CPU."""
    folder = os.fspath(folder)
    _require_folder(folder)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise MissingInputError(f"model folder {folder} has no {WEIGHTS_FILE} (expected the weights, written by "
                                "models.save_pretrained)")
    st = _safetensors()
    try:
        return st.torch.load_file(path, device="cpu")
    except (OSError, ValueError, st.SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableInputError(f"cannot read {path}: {reason} (expected a safetensors file)") from exc


def build_from_config(config: Mapping[str, Any], where: str = "config", **changes) -> nn.Module:
    """:func:`get_net` of a checked config (``changes``: has_edge / num_classes to use instead)."""
    settings = {**{k: config[k] for k in ("has_edge", "num_classes")}, **changes}
    try:
        return get_net(config["arch"], hrnet_base=config["hrnet_base"], **settings, **config.get("options", {}))
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{where}: {exc}") from exc


def from_pretrained(folder: PathLike, device: Union[str, torch.device] = "cpu", strict: bool = True) -> nn.Module:
    """The eval-mode network of a model folder with its weights (strictly, see
    :func:`load_checkpoint`); its config is kept as ``net.pretrained_config``."""
    folder = os.fspath(folder)
    config = read_config(folder)
    net = build_from_config(config, os.path.join(folder, CONFIG_FILE))
    load_checkpoint(net, read_weights(folder), strict=strict, source=os.path.join(folder, WEIGHTS_FILE))
    net.pretrained_config = config
    return net.to(device).eval()


# ----------------------------------------------------------------------------- an arch with weights
def _refuse_other_model(arch: str, hrnet_base: Optional[int], stored: Mapping[str, Any], where: str) -> None:
    if stored.get("arch") not in (None, arch):
        raise InvalidInputError(f"{where} names arch {stored['arch']}, not {arch}: load it as {stored['arch']} "
                                "(its torch.hub entry point, or models.from_pretrained for a model folder)")
    if hrnet_base is not None and stored.get("hrnet_base") not in (None, hrnet_base):
        raise InvalidInputError(f"{where} holds {arch} with hrnet_base {stored['hrnet_base']}, not {hrnet_base}")


def _read_pth(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, empty, foreign format, pickled code refused by weights_only
        lines = str(exc).strip().splitlines()
        raise UnreadableInputError(f"cannot read {path} as a checkpoint (torch.load, weights only): "
                                   f"{lines[0] if lines else type(exc).__name__}") from exc


def _weights_and_settings(weights: str):
    """(state, stored settings, where) of a model folder or a ``.pth`` file."""
    if os.path.isdir(weights):
        return read_weights(weights), read_config(weights), os.path.join(weights, CONFIG_FILE)
    if not os.path.exists(weights):
        raise MissingInputError(f"weights {weights} do not exist (expected a model folder or a .pth file)")
    state = _read_pth(weights)
    stored = {k: state[k] for k in MODEL_KEYS if isinstance(state, Mapping) and state.get(k) is not None}
    return state, stored, weights


def _holds_edge_head(state: Any) -> bool:
    tensors = state.get("state_dict", state) if isinstance(state, Mapping) else {}
    return any(f".{prefix}" in f".{key}" for key in tensors for prefix in EDGE_HEAD_PREFIXES)


def pretrained_net(arch: str, weights: Optional[PathLike] = None, hrnet_base: Optional[int] = None,
                   has_edge: Optional[bool] = None, num_classes: Optional[int] = None,
                   device: Union[str, torch.device] = "cpu") -> nn.Module:
    """``get_net(arch, ...)`` in eval mode with ``weights`` (a model folder, or a ``.pth`` of this
    project or of the release) loaded strictly.  Weights naming another arch, or another
    ``hrnet_base`` than the one given, are refused.  Settings left out come from the weights
    (a released ``.pth``: an edge head when it holds one, 19 classes); ``has_edge=False`` drops
    an edge head the weights have."""
    if weights is None:
        net = get_net(arch, num_classes=num_classes or 19, has_edge=bool(has_edge), hrnet_base=hrnet_base)
        return net.to(device).eval()
    weights = os.fspath(weights)
    state, stored, where = _weights_and_settings(weights)
    _refuse_other_model(arch, hrnet_base, stored, where)
    net = get_net(arch, num_classes=stored.get("num_classes", 19) if num_classes is None else num_classes,
                  has_edge=stored.get("has_edge", _holds_edge_head(state)) if has_edge is None else has_edge,
                  hrnet_base=stored.get("hrnet_base") if hrnet_base is None else hrnet_base,
                  **stored.get("options", {}))
    load_checkpoint(net, state, source=weights)
    return net.to(device).eval()
