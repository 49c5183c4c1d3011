"""The inverse-transformation regressor (``InverseNet``) and its checkpoint format.

The released ``distance_measures_regressor.pth`` is a BARE state dict (the reference's
loader iterates the loaded object's items as parameter names) with the keys
``fc.0.weight [1000, 100352]``, ``fc.0.bias [1000]``, ``fc.2.weight [32, 1000]``,
``fc.2.bias [32]``, ``fc.4.weight [4, 32]``, ``fc.4.bias [4]``. :meth:`InverseNet.
from_checkpoint` also accepts ``{'state_dict': ...}`` and a ``module.`` prefix, and infers
the tile size, hidden sizes and number of outputs from the shapes.

Everything the weights do not say (parameterisation, normalisation statistics, how the
net was trained) lives in a JSON file beside the weights, same path with the suffix
replaced by ``.json``::

    {
      "format": "inverseform-regressor",
      "format_version": 1,
      "parameterisation": "scale_shift",      # released | shift | scale_shift | affine | homography
      "tile_size": 224,
      "num_params": 4,
      "hidden": [1000, 32],
      "normalisation": {"mean": [0, 0, 0, 0], "std": [0.05, 0.05, 0.06, 0.06]},
      ...                                      # anything else: informational (dataset, steps, ranges)
    }

Any of these keys may be missing (a file from elsewhere); present ones are checked against
the weights. The regressor is a fully connected net, so the tile size is fixed by its
first layer.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distances import PARAMETERISATIONS, matrix_kind, regressor_distance
from .warps import ParamNormaliser

__all__ = ["InverseNet", "VARIANTS", "create_inverse_net", "save_regressor", "METADATA_FORMAT"]

METADATA_FORMAT = "inverseform-regressor"
METADATA_VERSION = 1

# name -> constructor arguments. 'released' and 'small' are the reference's two nets.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "released": dict(tile_size=224, num_params=4, parameterisation="released"),
    "small": dict(tile_size=112, num_params=2, parameterisation="released"),
    "scale_shift": dict(tile_size=224, num_params=4, parameterisation="scale_shift"),
    "affine": dict(tile_size=224, num_params=6, parameterisation="affine"),
    "homography": dict(tile_size=224, num_params=8, parameterisation="homography"),
}

_RELEASED_LAYOUT = ("fc.0.weight [1000, 100352], fc.0.bias [1000], fc.2.weight [32, 1000], "
                    "fc.2.bias [32], fc.4.weight [4, 32], fc.4.bias [4]")
_EXPECTED_LAYOUT = (
    "expected an InverseNet state dict: keys fc.0.weight [H1, 2*T*T], fc.0.bias [H1], "
    "fc.2.weight [H2, H1], fc.2.bias [H2], ..., fc.<2k>.weight [P, Hk], fc.<2k>.bias [P] "
    f"(the released distance_measures_regressor.pth: {_RELEASED_LAYOUT}), optionally under "
    "'state_dict' and/or with a 'module.' prefix")
_KEY = re.compile(r"^fc\.(\d+)\.(weight|bias)$")


def _default_parameterisation(num_params: int) -> str:
    return {2: "released", 4: "released", 6: "affine", 8: "homography"}.get(num_params, "")


class InverseNet(nn.Module):
    """Regress the transform between two boundary tiles: (x1, x2) -> N x P parameters.

    Two T x T tiles are flattened, concatenated and fed to Linear(2*T*T -> hidden[0]), ReLU,
    ..., Linear(hidden[-1] -> P), under the released key names fc.0 / fc.2 / fc.4. Unlike the
    reference, ``forward`` returns the parameter vector alone (not ``(x1, x2, params)``).

    The outputs are normalised deviations from identity; ``param_mean``/``param_std``
    (non-persistent buffers, so the state dict keeps the released format) de-normalise them.

    Training convention (the loss feeds x1 = predicted boundary, x2 = ground truth): for a
    target tile ``x2`` and deviations ``dev`` of kind ``parameterisation``, the pair is
    ``x1 = warp(x2, params_to_matrix(dev, kind))`` and the regression target is
    ``normaliser.normalise(dev)`` (see :func:`inverseform.warps.warp_pairs`).
    """

    def __init__(self, tile_size: int = 224, num_params: int = 4,
                 hidden: Sequence[int] = (1000, 32), parameterisation: Optional[str] = None):
        super().__init__()
        if not isinstance(tile_size, int) or tile_size < 1:
            raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
        if not isinstance(num_params, int) or num_params < 1:
            raise ValueError(f"num_params must be a positive int, got {num_params!r}")
        hidden = tuple(hidden)
        if not hidden or not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        if parameterisation is None:
            parameterisation = _default_parameterisation(num_params)
            if not parameterisation:
                raise ValueError(
                    f"no default parameterisation for {num_params} outputs; pass one of {PARAMETERISATIONS}")
        matrix_kind(parameterisation, num_params)  # validates the pair
        self.tile_size = tile_size
        self.num_params = num_params
        self.hidden = hidden
        self.parameterisation = parameterisation
        self.metadata: Dict[str, Any] = {}
        layers = []
        width = 2 * tile_size * tile_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_params))
        self.fc = nn.Sequential(*layers)
        self.register_buffer("param_mean", torch.zeros(num_params), persistent=False)
        self.register_buffer("param_std", torch.ones(num_params), persistent=False)

    def extra_repr(self) -> str:
        return (f"tile_size={self.tile_size}, num_params={self.num_params}, "
                f"parameterisation={self.parameterisation!r}")

    def _flatten(self, x: torch.Tensor, name: str) -> torch.Tensor:
        t = self.tile_size
        if not (x.dim() == 4 and x.shape[1:] == (1, t, t)) and not (x.dim() == 3 and x.shape[1:] == (t, t)):
            raise ValueError(
                f"InverseNet {name} must be N x 1 x {t} x {t} or N x {t} x {t} tiles, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], t * t)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x1: predicted-boundary tiles, x2: target tiles -> N x P normalised parameters."""
        a = self._flatten(x1, "x1")
        b = self._flatten(x2, "x2")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"InverseNet got {a.shape[0]} x1 tiles but {b.shape[0]} x2 tiles")
        first = self.fc[0]
        if first.weight.requires_grad:  # training the regressor: one matmul, one weight gradient
            h = first(torch.cat([a, b], dim=1))
        else:
            # Frozen (as a loss): fc.0(cat(x1, x2)) split by weight halves, so that backward
            # computes the input gradient of the x1 half only, half of the layer's cost.
            tt = self.tile_size * self.tile_size
            h = F.linear(a, first.weight[:, :tt]) + F.linear(b, first.weight[:, tt:], first.bias)
        for i, layer in enumerate(self.fc):
            if i:
                h = layer(h)
        return h

    def distance(self, x1: torch.Tensor, x2: torch.Tensor, distance: str = "euclidean",
                 geodesic_lambda: float = 0.1) -> torch.Tensor:
        """Per-pair distance to the identity of the predicted transform (N values); see
        :func:`inverseform.distances.regressor_distance` for ``distance``."""
        return regressor_distance(self(x1, x2), self.parameterisation, distance, self.param_mean,
                                  self.param_std, geodesic_lambda)

    # normalisation -------------------------------------------------------------------
    def set_normalisation(self, mean, std=None) -> None:
        """Set the de-normalisation statistics (a ParamNormaliser, or mean and std)."""
        norm = mean if isinstance(mean, ParamNormaliser) else ParamNormaliser(mean, std)
        if norm.num_params != self.num_params:
            raise ValueError(
                f"normalisation has {norm.num_params} parameters, the regressor outputs {self.num_params}")
        self.param_mean = norm.mean.to(self.param_mean)
        self.param_std = norm.std.to(self.param_std)

    @property
    def normaliser(self) -> ParamNormaliser:
        return ParamNormaliser(self.param_mean.detach().cpu(), self.param_std.detach().cpu())

    def denormalise(self, params: torch.Tensor) -> torch.Tensor:
        """Normalised outputs -> deviations from identity in the parameterisation's units."""
        return params * self.param_std.to(params) + self.param_mean.to(params)

    # checkpoints ---------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path_or_state_dict, map_location="cpu",
                        metadata: Optional[Mapping[str, Any]] = None) -> "InverseNet":
        """Load a regressor saved in the released format (see the module docstring).

        ``path_or_state_dict`` is a path (read with ``torch.load(weights_only=True)``; a
        metadata JSON beside it is read too) or an already-loaded object (state dict or
        ``{'state_dict': ...}``; ``map_location`` applies to files only; ``metadata`` may
        then supply what the JSON would). Loading is strict: unknown, missing or mis-shaped
        keys raise a ValueError naming the source, the keys and the expected layout.
        """
        json_meta: Dict[str, Any] = {}
        if isinstance(path_or_state_dict, Mapping):
            source = "<state dict>"
            state = _extract_state_dict(path_or_state_dict, source)
            state = {k: v.detach().clone() for k, v in state.items()}  # never alias the caller's
        elif isinstance(path_or_state_dict, (str, os.PathLike)):
            path = Path(os.fspath(path_or_state_dict))
            source = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"InverseNet checkpoint {path} does not exist")
            try:
                loaded = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # pickle errors, non-weights content, truncated files
                raise ValueError(
                    f"{path}: could not be read as a weights-only torch checkpoint ({exc}); "
                    f"{_EXPECTED_LAYOUT}") from exc
            state = _extract_state_dict(loaded, source)
            json_meta, source = _metadata_beside(path, state)
        else:
            raise TypeError(
                "InverseNet.from_checkpoint expects a path or a state dict, got "
                f"{type(path_or_state_dict).__name__}")
        hidden, tile_size, num_params = _infer_layout(state, source)
        meta = dict(json_meta)
        meta.update(metadata or {})
        parameterisation = _validate_metadata(meta, tile_size, num_params, hidden, source)
        with torch.device("meta"):
            net = cls(tile_size, num_params, hidden, parameterisation)
        net.load_state_dict(state, strict=True, assign=True)
        device = state["fc.0.weight"].device
        net.param_mean = torch.zeros(num_params, device=device)
        net.param_std = torch.ones(num_params, device=device)
        if "normalisation" in meta:
            net.set_normalisation(ParamNormaliser.from_dict(meta["normalisation"]))
        net.metadata = meta
        return net


def create_inverse_net(variant: str = "released", **overrides) -> InverseNet:
    """Build a named variant of :data:`VARIANTS`, e.g. ``create_inverse_net('small')``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown InverseNet variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return InverseNet(**{**VARIANTS[variant], **overrides})


# helpers ---------------------------------------------------------------------------------
def _extract_state_dict(obj, source: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: holds a {type(obj).__name__}, not a state dict; {_EXPECTED_LAYOUT}")
    state: Dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor; {_EXPECTED_LAYOUT}")
        name = key[len("module."):] if key.startswith("module.") else key
        if name in state:
            raise ValueError(f"{source}: key {name!r} appears both with and without 'module.'")
        state[name] = value
    return state


def _infer_layout(state: Mapping[str, torch.Tensor], source: str) -> Tuple[Tuple[int, ...], int, int]:
    unexpected = sorted(k for k in state if not _KEY.match(k))
    layers = sorted({int(_KEY.match(k).group(1)) for k in state if _KEY.match(k)})
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if not layers:
        raise ValueError(f"{source}: no fc.* keys found ({'; '.join(problems) or 'empty'}); {_EXPECTED_LAYOUT}")
    n_layers = layers[-1] // 2 + 1
    expected_layers = list(range(0, 2 * n_layers, 2))
    missing = [f"fc.{i}.{p}" for i in expected_layers for p in ("weight", "bias") if f"fc.{i}.{p}" not in state]
    stray = sorted(f"fc.{i}.*" for i in layers if i % 2)
    if missing:
        problems.append(f"missing keys {missing}")
    if stray:
        problems.append(f"unexpected keys {stray} (Linear layers sit at even indices)")
    if len(expected_layers) < 2:
        problems.append("a single Linear layer (need at least one hidden layer)")
    widths = []
    if not problems:
        prev_out = None
        for i in expected_layers:
            w, b = state[f"fc.{i}.weight"], state[f"fc.{i}.bias"]
            if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[0]:
                problems.append(f"fc.{i}.weight {list(w.shape)} / fc.{i}.bias {list(b.shape)} are not a Linear layer")
                break
            if prev_out is not None and w.shape[1] != prev_out:
                problems.append(f"fc.{i}.weight {list(w.shape)} does not take the previous layer's {prev_out} outputs")
                break
            widths.append((w.shape[1], w.shape[0]))
            prev_out = w.shape[0]
    tile_size = 0
    if not problems:
        first_in = widths[0][0]
        tile_size = math.isqrt(first_in // 2)
        if 2 * tile_size * tile_size != first_in:
            problems.append(f"fc.0.weight takes {first_in} inputs, not 2*T*T for a square tile T")
    if problems:
        raise ValueError(f"{source}: wrong InverseNet layout: {'; '.join(problems)}; {_EXPECTED_LAYOUT}")
    hidden = tuple(out for _, out in widths[:-1])
    return hidden, tile_size, widths[-1][1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _metadata_beside(path: Path, state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, Any], str]:
    """The JSON beside a weights file and the name messages give them.  A JSON written for other
    weights (its ``weights_sha256``) is refused; a missing one is accepted only for the released
    layout, whose parameterisation the weights imply (any other needs its normalisation)."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file() or json_path == path:
        _, tile_size, num_params = _infer_layout(state, str(path))
        released = {(v["tile_size"], v["num_params"]) for v in VARIANTS.values() if v["parameterisation"] == "released"}
        if (tile_size, num_params) not in released:
            raise ValueError(f"{path}: no metadata file {json_path} beside it; a regressor of another layout than "
                             "the released one needs the normalisation that save_regressor writes there")
        return {}, str(path)
    meta = _read_json(json_path)
    recorded = meta.get("weights_sha256")
    if recorded is not None and recorded != _sha256(path):
        raise ValueError(f"{json_path} was written for other weights than {path} (weights_sha256 differs: "
                         "one of the two was replaced or a save was interrupted); save the regressor again")
    return meta, f"{path} (metadata {json_path})"


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: regressor metadata is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: regressor metadata must be a JSON object, got {type(data).__name__}")
    return data


def _validate_metadata(meta: Mapping[str, Any], tile_size: int, num_params: int,
                       hidden: Tuple[int, ...], source: str) -> str:
    def mismatch(key, value, actual):
        return ValueError(f"{source}: metadata says {key}={value!r} but the weights have {actual!r}")

    if "tile_size" in meta and meta["tile_size"] != tile_size:
        raise mismatch("tile_size", meta["tile_size"], tile_size)
    if "num_params" in meta and meta["num_params"] != num_params:
        raise mismatch("num_params", meta["num_params"], num_params)
    if "hidden" in meta and tuple(meta["hidden"]) != hidden:
        raise mismatch("hidden", meta["hidden"], list(hidden))
    parameterisation = meta.get("parameterisation") or _default_parameterisation(num_params)
    if not parameterisation:
        raise ValueError(
            f"{source}: {num_params} outputs and no 'parameterisation' in the metadata; "
            f"expected one of {PARAMETERISATIONS}")
    try:
        matrix_kind(parameterisation, num_params)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    if "normalisation" in meta:
        try:
            norm = ParamNormaliser.from_dict(meta["normalisation"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: bad 'normalisation' metadata: {exc}") from exc
        if norm.num_params != num_params:
            raise mismatch("normalisation length", norm.num_params, num_params)
    return parameterisation


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_regressor(net: InverseNet, path: Union[str, os.PathLike],
                   metadata: Optional[Mapping[str, Any]] = None) -> Tuple[Path, Path]:
    """Write ``net``'s weights as a bare state dict (the released layout) and the metadata
    JSON beside them (``path`` with the suffix replaced by ``.json``), each atomically.

    ``metadata`` adds informational keys (dataset, steps, ranges, ...); the structural keys
    (parameterisation, tile_size, num_params, hidden, normalisation) come from the net and
    a conflicting value in ``metadata`` is an error. Returns (weights path, JSON path).
    """
    if not isinstance(net, InverseNet):
        raise TypeError(f"save_regressor expects an InverseNet, got {type(net).__name__}")
    path = Path(os.fspath(path))
    json_path = path.with_suffix(".json")
    if json_path == path:
        raise ValueError(f"{path}: the weights file must not end in .json (the metadata goes there)")
    structural = {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "parameterisation": net.parameterisation,
        "tile_size": net.tile_size,
        "num_params": net.num_params,
        "hidden": list(net.hidden),
        "normalisation": net.normaliser.to_dict(),
    }
    meta = dict(metadata or {})
    for key, value in structural.items():
        if key in meta:
            given = meta[key]
            if key == "normalisation":
                try:
                    given_norm = ParamNormaliser.from_dict(given)
                    same = (given_norm.num_params == net.num_params
                            and torch.allclose(given_norm.mean, net.normaliser.mean, rtol=1e-6, atol=0)
                            and torch.allclose(given_norm.std, net.normaliser.std, rtol=1e-6, atol=0))
                except (ValueError, TypeError):
                    same = False
            else:
                same = (list(given) if isinstance(given, (tuple, list)) else given) == value
            if not same:
                raise ValueError(
                    f"save_regressor: metadata {key}={given!r} conflicts with the net's {value!r}"
                    + ("; set it with net.set_normalisation()" if key == "normalisation" else ""))
        meta[key] = value
    try:
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_regressor: metadata is not JSON-serialisable: {exc}") from exc
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buffer)
    weights = buffer.getvalue()
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()  # pairs the two files: see _metadata_beside
    text = json.dumps(meta, indent=2, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(weights))
    _atomic_write(json_path, lambda f: f.write((text + "\n").encode("utf-8")))
    return path, json_path
