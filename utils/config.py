"""Typed configuration: YAML files merged with command-line overrides into dataclasses.

Why: the reference kept one global mutable ``cfg`` that any module could read or
change at import time, so nobody could tell which settings a run used.  Here a
config is read once, validated against a dataclass schema, and passed explicitly.

* ``load_config(Schema, ["configs/a.yaml"], ["optim.lr=0.01"])`` merges the YAML
  files in order (a file may name a parent with ``_base_: other.yaml``), applies
  ``key.sub=value`` overrides, and builds ``Schema``.
* Unknown keys and wrong types are rejected with the full dotted key name.
* ``save_config(cfg, path)`` writes the effective config (atomically) beside a
  run's outputs so the run can be reproduced with ``--config path``.
* Fields declared with :func:`path_field` hold paths.  A relative one written in a config
  file resolves against that file's *project root* (:func:`project_root`: the parent of the
  ``configs/`` folder holding it, else the file's own folder), and so do the schema's relative
  defaults when a config file is given (against the last file's root), so a run does not depend
  on the current directory; ``kind="config"`` paths (another config file) resolve like
  ``_base_``, against the file's own folder.  ``--opt`` values are shell input: relative to
  the current directory, as is everything when no config file is given.

This module depends on nothing else of the project.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from utils.errors import InvalidInputError
from utils.io import atomic_write_text

T = TypeVar("T")

BASE_KEY = "_base_"


class ConfigError(InvalidInputError):
    """A config file, key or value that does not fit the schema."""


class NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a config has no use for them, and nested aliases expand
    exponentially (a few hundred bytes can ask for gigabytes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}: YAML aliases "
                              "(*name) are not accepted in configs; write the value out")
        return super().compose_node(parent, index)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where in the file and what is wrong."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    return where + " ".join(str(what).split())


# ----------------------------------------------------------------------------- path fields
PATH_KIND = "path_kind"  # dataclass field metadata key: "data" or "config"

RootOf = Callable[[Path], Path]


def path_field(default: Any = None, kind: str = "data") -> Any:
    """A dataclass field that holds a file or directory path (see the module docstring):
    ``kind="data"`` (data, checkpoints, outputs) resolves against the config file's project
    root, ``kind="config"`` (another config file) against the config file's folder."""
    if kind not in ("data", "config"):
        raise ValueError(f"path_field kind must be 'data' or 'config', got {kind!r}")
    return dataclasses.field(default=default, metadata={PATH_KIND: kind})


def path_keys(cls: Type[Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], str]:
    """``{('loss', 'inverseform_path'): 'data', ...}``: every path field of a (nested) schema."""
    hints = typing.get_type_hints(cls)
    out: Dict[Tuple[str, ...], str] = {}
    for f in dataclasses.fields(cls):
        key = prefix + (f.name,)
        if PATH_KIND in f.metadata:
            out[key] = f.metadata[PATH_KIND]
        elif dataclasses.is_dataclass(hints.get(f.name)):
            out.update(path_keys(hints[f.name], key))
    return out


def project_root(config_path: Union[str, os.PathLike]) -> Path:
    """The folder a config file's relative data paths resolve against: the parent of the
    ``configs/`` folder holding the file (a project: configs/, data/, checkpoints/, runs/ side by
    side), else the file's own folder."""
    folder = Path(config_path).resolve().parent
    return folder.parent if folder.name == "configs" else folder


def _path_values(data: Dict[str, Any], keys: Mapping[Tuple[str, ...], str]):
    """``(node, name, value, kind)`` for every path key that ``data`` sets to a non-empty string
    (``value`` with ``~`` expanded); ``node[name] = ...`` replaces it."""
    for key, kind in keys.items():
        node = data
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key[-1]), str) and node[key[-1]]:
            yield node, key[-1], os.path.expanduser(node[key[-1]]), kind


def _resolve_paths(data: Dict[str, Any], keys: Mapping[Tuple[str, ...], str], config_path: Path,
                   root_of: RootOf) -> Dict[str, Any]:
    """Make the relative path values that ``config_path`` itself sets absolute."""
    for node, name, value, kind in _path_values(data, keys):
        if os.path.isabs(value):
            node[name] = value
        elif kind == "config":  # beside the file, as _base_; a name relative to the project (configs/x.yaml) too
            options = [config_path.resolve().parent / value, project_root(config_path) / value,
                       root_of(config_path) / value]
            node[name] = str(next((p for p in options if p.exists()), options[0]))
        else:
            node[name] = str(root_of(config_path) / value)
    return data


# ----------------------------------------------------------------------------- YAML files
def read_yaml(path: Union[str, os.PathLike], _seen: Tuple[str, ...] = (), *,
              paths: Optional[Mapping[Tuple[str, ...], str]] = None,
              root_of: Optional[RootOf] = None) -> Dict[str, Any]:
    """Read one YAML mapping, resolving ``_base_`` parents (relative to the file).  ``paths``
    (from :func:`path_keys`): the keys whose relative values are made absolute, against
    ``root_of(file)`` (default :func:`project_root`) for each file of the chain."""
    path = Path(path)
    resolved = str(path.resolve())
    if resolved in _seen:
        chain = " -> ".join(_seen + (resolved,))
        raise ConfigError(f"config file {path}: circular '{BASE_KEY}' chain: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.load(f, Loader=NoAliasLoader)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}, {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    if paths:
        data = _resolve_paths(data, paths, path, root_of or project_root)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"config file {path}: '{BASE_KEY}' must name a config file or a list of them, "
                          f"got {_describe(bases)}")
    merged: Dict[str, Any] = {}
    for base in bases:
        base_path = Path(base) if os.path.isabs(base) else path.parent / base
        merged = deep_merge(merged, read_yaml(base_path, _seen + (resolved,), paths=paths, root_of=root_of))
    return deep_merge(merged, data)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """Return ``base`` updated by ``update``; nested mappings are merged, not replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- overrides
def parse_override(text: str) -> Tuple[List[str], Any]:
    """``'optim.lr=0.01'`` -> (['optim', 'lr'], 0.01).  The value is parsed as YAML,
    so ``true``, ``[1, 2]``, ``null`` and numbers work; anything else stays a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=NoAliasLoader) if raw.strip() else ""
    except ConfigError as exc:
        raise ConfigError(f"override {text!r}: {exc}") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


Override = Union[str, Tuple[str, Any]]


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[Override]) -> Dict[str, Any]:
    """``overrides``: ``"key.sub=value"`` texts (the value parsed as YAML) or ``(key, value)``
    pairs whose value is taken as it is (flags already typed by argparse)."""
    out = dict(data)
    for item in overrides:
        if isinstance(item, tuple):
            parts, value = str(item[0]).split("."), item[1]
        else:
            parts, value = parse_override(item)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        out = deep_merge(out, nested)
    return out


# ----------------------------------------------------------------------------- typed build
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    name = getattr(origin, "__name__", str(origin))
    if origin is Union or origin is getattr(types, "UnionType", Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{name}[{args}]"


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 50, 50, 6, 6, 3


def _describe(value: Any) -> str:
    """The type and a short repr, never built whole (a value may be huge)."""
    text = _SHORT.repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_describe(value)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key '{key}': expected one of {list(args)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} settings, got {_describe(value)}")
        return build_dataclass(tp, value, prefix=key)
    if origin in (list, List, tuple, Tuple):
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {_describe(value)}")
        if origin in (tuple, Tuple):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if args:
                if len(value) != len(args):
                    raise ConfigError(
                        f"config key '{key}': expected {len(args)} values ({_type_name(tp)}), got {len(value)}")
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            return tuple(value)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {_describe(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"config key '{key}': expected bool (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected int, got {_describe(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads '1e-4' as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}': expected float, got {_describe(value)}")
        if not math.isfinite(number):  # nan/inf would pass every '>' check and poison the weights
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "true" if value else "false"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric-looking name given on the command line
        raise ConfigError(f"config key '{key}': expected str, got {_describe(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {_describe(value)}")
    return value


def build_dataclass(cls: Type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, validating keys and types."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{prefix}.{key}" if prefix else str(key)
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{full}'{hint} (valid keys at {where}: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], full)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without a default is missing
        raise ConfigError(f"config section '{prefix or cls.__name__}': {exc}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def config_to_dict(obj: Any) -> Any:
    """Plain-data (YAML-safe) view of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def merged_data(paths: Sequence[Union[str, os.PathLike]] = (), overrides: Sequence[Override] = (),
                defaults: Optional[Mapping[str, Any]] = None, *, cls: Optional[Type[Any]] = None,
                root_of: Optional[RootOf] = None) -> Dict[str, Any]:
    """``defaults``, then each YAML file, then the overrides, merged into one mapping (not yet
    checked against a schema).  With ``cls``, the relative path values of its :func:`path_field`
    keys are resolved per file (against ``root_of(file)``, default :func:`project_root`)."""
    data: Dict[str, Any] = dict(defaults or {})
    keys = path_keys(cls) if cls is not None else None
    for path in paths:
        data = deep_merge(data, read_yaml(path, paths=keys, root_of=root_of))
    return apply_overrides(data, overrides)


def load_config(cls: Type[T], paths: Sequence[Union[str, os.PathLike]] = (),
                overrides: Sequence[Override] = (), defaults: Optional[Mapping[str, Any]] = None,
                root_of: Optional[RootOf] = None,
                migrate: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> T:
    """Merge ``defaults``, then each YAML file, then ``key=value`` overrides; build ``cls``.
    Relative :func:`path_field` values of a file resolve against ``root_of(file)`` (default
    :func:`project_root`).  ``migrate``: rewrites the merged mapping before it is checked (keys
    renamed by a newer schema)."""
    data = merged_data(paths, overrides, defaults, cls=cls, root_of=root_of)
    if migrate is not None:
        data = migrate(data)
    keys = path_keys(cls)
    obj = build_dataclass(cls, data)
    if paths:  # the schema's own relative defaults belong to the same project as the config's paths
        _anchor_defaults(obj, data, keys, (root_of or project_root)(Path(paths[-1])))
    return obj


def _anchor_defaults(obj: Any, data: Mapping[str, Any], keys: Mapping[Tuple[str, ...], str], root: Path) -> None:
    """Resolve the relative path defaults that no file, default mapping or override set."""
    for key, kind in keys.items():
        node: Any = data
        for part in key:
            node = node.get(part, _UNSET) if isinstance(node, Mapping) else _UNSET
        if node is not _UNSET or kind != "data":
            continue
        owner = obj
        for part in key[:-1]:
            owner = getattr(owner, part)
        value = getattr(owner, key[-1])
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            setattr(owner, key[-1], str(root / value))


_UNSET = object()


def save_config(obj: Any, path: Union[str, os.PathLike]) -> None:
    """Write the effective config as YAML, atomically.  Relative :func:`path_field` values (shell
    input: relative to the current directory) are written as absolute paths: read back, a relative
    value would resolve against the saved file's folder (a child process's config, ``--config``)."""
    data = config_to_dict(obj)
    for node, name, value, _ in _path_values(data, path_keys(type(obj)) if dataclasses.is_dataclass(obj) else {}):
        node[name] = os.path.abspath(value)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)


def add_config_arguments(parser: argparse.ArgumentParser, opt_example: str = "optim.lr=0.01 train.amp=false",
                         config_help: str = "YAML config file; repeat to merge several (later ones win)",
                         required: bool = False, group: Optional[Any] = None) -> None:
    """``--config FILE`` (repeatable, merged in order) and ``--opt KEY=VALUE ...``; ``opt_example``:
    real keys of the script's schema for the help text; ``group``: where ``--config`` is listed."""
    (group or parser).add_argument("--config", action="append", default=[], metavar="FILE", required=required,
                                   help=config_help)
    parser.add_argument("--opt", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"override config keys, e.g. --opt {opt_example}")
