"""Loading trained checkpoints and ImageNet-pretrained trunks, saying what did not match.

The reference loader silently skipped every key whose name or shape differed, so
a wrong ``--arch`` loaded nothing and still reported an mIoU.  Here a full
checkpoint must match exactly (strict), and a pretrained-trunk load reports what
it used and what it did not.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from utils.errors import InputError, InvalidInputError, MissingInputError

logger = logging.getLogger("models")

EDGE_HEAD_PREFIXES = ("edge_head.", "edgeocr_cls_head.")
# Prefixes that wrappers add in front of the model's own names (DDP / DataParallel
# save ``module.``, torch.compile ``_orig_mod.``; some tools save ``model.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Keys of the HRNet authors' ImageNet classification models that a segmentation
# trunk has no counterpart for.
CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")

PathOrDict = Union[str, os.PathLike, Mapping[str, object]]


class CheckpointMismatchError(InputError, RuntimeError):
    """A checkpoint's keys or shapes do not match the model."""


@dataclass
class LoadReport:
    """What a load did.  ``str(report)`` gives a one-line summary."""

    source: str
    loaded: int = 0
    missing: List[str] = field(default_factory=list)       # model keys absent from the file
    unexpected: List[str] = field(default_factory=list)    # file keys the model lacks
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    dropped_edge_keys: List[str] = field(default_factory=list)
    stripped_prefix: Optional[str] = None                  # e.g. 'module.'
    added_backbone_prefix: int = 0                         # keys matched as 'backbone.' + key

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"{self.source}: loaded {self.loaded} tensors"]
        if self.stripped_prefix:
            parts.append(f"stripped prefix {self.stripped_prefix!r}")
        if self.added_backbone_prefix:
            parts.append(f"{self.added_backbone_prefix} keys matched under 'backbone.'")
        if self.dropped_edge_keys:
            parts.append(f"dropped {len(self.dropped_edge_keys)} edge-head keys")
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unused")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatches")
        return ", ".join(parts)


def _few(names, n: int = 5) -> str:
    names = list(names)
    shown = ", ".join(str(x) for x in names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _unwrap_model(net: nn.Module) -> nn.Module:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return net.module if isinstance(net, wrappers) else net


def _read_state_dict(path_or_dict: PathOrDict, name: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint file or dict, plus a name for messages (``name``: a dict's)."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        source = os.fspath(path_or_dict)
        if not os.path.isfile(source):
            raise MissingInputError(f"checkpoint file not found: {source}")
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in several types
            raise RuntimeError(
                f"could not read {source} with torch.load(weights_only=True): {exc}. "
                "If the file is trusted but holds non-tensor objects, load it yourself "
                "and pass the dict.") from exc
    elif isinstance(path_or_dict, Mapping):
        source, obj = name or "<state dict>", path_or_dict
    else:
        raise TypeError(
            f"expected a checkpoint path or a dict, got {type(path_or_dict).__name__}")

    if not isinstance(obj, Mapping):
        raise InvalidInputError(f"{source}: expected a dict, found {type(obj).__name__}")
    state = obj["state_dict"] if "state_dict" in obj else obj
    if not isinstance(state, Mapping):
        raise InvalidInputError(f"{source}: 'state_dict' is a {type(state).__name__}, not a dict")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        hint = "" if "state_dict" in obj else " (and there is no 'state_dict' entry)"
        raise InvalidInputError(
            f"{source}: not a state dict{hint}: {len(not_tensors)} entries are not tensors, "
            f"e.g. {_few(not_tensors)}")
    return dict(state), source


def _strip_wrapper_prefix(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Remove a ``module.``/``model.`` prefix carried by every key (possibly repeated)."""
    stripped = []
    while state:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped.append(prefix)
                break
        else:
            break
    return state, ("".join(stripped) or None)


def _match_backbone_prefix(state: Dict[str, torch.Tensor], model_keys) -> Tuple[Dict[str, torch.Tensor], int]:
    """Accept trunk keys saved without ``backbone.`` (tolerated by the reference loader)."""
    renamed, count = {}, 0
    for k, v in state.items():
        if k not in model_keys and ("backbone." + k) in model_keys:
            k, count = "backbone." + k, count + 1
        renamed[k] = v
    return renamed, count


def _compare(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport):
    report.missing = [k for k in target if k not in state]
    report.unexpected = [k for k in state if k not in target]
    report.mismatched = [
        (k, tuple(state[k].shape), tuple(target[k].shape))
        for k in state if k in target and state[k].shape != target[k].shape
    ]
    bad = {k for k, _, _ in report.mismatched}
    return {k: v for k, v in state.items() if k in target and k not in bad}


def _mismatch_message(what: str, report: LoadReport) -> str:
    lines = [f"{report.source} does not match {what}:"]
    if report.missing:
        lines.append(f"  {len(report.missing)} missing keys: {_few(report.missing)}")
    if report.unexpected:
        lines.append(f"  {len(report.unexpected)} unexpected keys: {_few(report.unexpected)}")
    if report.mismatched:
        shapes = [f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in report.mismatched]
        lines.append(f"  {len(report.mismatched)} shape mismatches: {_few(shapes, 3)}")
    return "\n".join(lines)


def load_checkpoint(net: nn.Module, path_or_dict: PathOrDict, strict: bool = True,
                    source: Optional[str] = None) -> LoadReport:
    """Load a trained checkpoint (e.g. a released ``*.pth``) into ``net``.

    Accepts ``{'state_dict': ...}`` or a bare state dict, keys with or without a
    ``module.`` prefix, trunk keys with or without ``backbone.``.  Files are read
    with ``torch.load(map_location='cpu', weights_only=True)``.

    If ``net`` has no edge heads (``has_edge=False``), edge-head keys in the file
    are dropped with one INFO line on the ``models`` logger; the segmentation
    then equals that of the same file loaded with ``has_edge=True``.

    ``strict=True``: any missing, unexpected or mis-shaped key raises
    :class:`CheckpointMismatchError` naming the file, the first few keys of each
    kind and their counts; nothing is loaded then.  ``strict=False`` loads the
    matching tensors and logs a WARNING summarising the rest.

    ``source``: the name messages give a dict (e.g. the file it was read from).

    Returns a :class:`LoadReport`.
    """
    model = _unwrap_model(net)
    state, source = _read_state_dict(path_or_dict, source)
    report = LoadReport(source=source)
    state, report.stripped_prefix = _strip_wrapper_prefix(state)
    target = model.state_dict()
    state, report.added_backbone_prefix = _match_backbone_prefix(state, target)

    model_has_edge = any(k.startswith(EDGE_HEAD_PREFIXES) for k in target)
    if not model_has_edge:
        report.dropped_edge_keys = [k for k in state if k.startswith(EDGE_HEAD_PREFIXES)]
        if report.dropped_edge_keys:
            state = {k: v for k, v in state.items() if not k.startswith(EDGE_HEAD_PREFIXES)}
            logger.info("%s: dropped %d edge-head keys (%s); the model was built with "
                        "has_edge=False", source, len(report.dropped_edge_keys),
                        "edge_head.*, edgeocr_cls_head.*")

    usable = _compare(state, target, report)
    arch = getattr(model, "arch", type(model).__name__)
    if not report.ok:
        message = _mismatch_message(f"the model ({arch})", report)
        if strict:
            raise CheckpointMismatchError(message + "\nWas the model built with the right "
                                          "arch / hrnet_base / has_edge?")
        logger.warning(message)
    model.load_state_dict(usable, strict=report.ok)
    report.loaded = len(usable)
    return report


def load_pretrained_backbone(net: nn.Module, path_or_dict: PathOrDict) -> LoadReport:
    """Initialise ``net.backbone`` from an ImageNet-pretrained HRNet classifier.

    The HRNet authors' files (e.g. ``hrnetv2_w48_imagenet_pretrained.pth``) are
    bare state dicts named like the trunk without ``backbone.`` and also hold the
    classification head (``incre_modules``, ``downsamp_modules``, ``final_layer``,
    ``classifier``), which a segmentation trunk does not use.  Keys with a
    ``module.``/``model.``/``backbone.`` prefix are accepted too.

    Loads every tensor whose name and shape match a trunk parameter or buffer;
    reports (and logs at INFO) the file keys left unused and the trunk keys not
    found (e.g. ``conv0`` of the slim W16 trunk, which ImageNet models lack).
    Raises ``ValueError`` if a name matches with a different shape (a file for
    another width) or if nothing matches at all.
    """
    model = _unwrap_model(net)
    trunk = getattr(model, "backbone", None)
    if trunk is None:
        raise InvalidInputError(f"{type(model).__name__} has no 'backbone' to load into")
    state, source = _read_state_dict(path_or_dict)
    report = LoadReport(source=source)
    state, report.stripped_prefix = _strip_wrapper_prefix(state)
    if any(k.startswith("backbone.") for k in state):
        state = {(k[len("backbone."):] if k.startswith("backbone.") else k): v
                 for k, v in state.items()}
    target = trunk.state_dict()
    usable = _compare(state, target, report)
    if report.mismatched:
        raise InvalidInputError(_mismatch_message("the trunk", report)
                         + "\nIs it a pretrained model of the same HRNet width?")
    if not usable:
        raise InvalidInputError(f"{source}: no key matches the trunk; file keys look like "
                         f"{_few(state, 3)}, trunk keys like {_few(target, 3)}")
    trunk.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    classifier = [k for k in report.unexpected if k.startswith(CLASSIFIER_PREFIXES)]
    other = [k for k in report.unexpected if not k.startswith(CLASSIFIER_PREFIXES)]
    logger.info("%s: loaded %d trunk tensors; unused: %d classifier keys, %d other%s; "
                "trunk keys not in the file: %d%s", source, report.loaded, len(classifier),
                len(other), f" ({_few(other)})" if other else "", len(report.missing),
                f" ({_few(report.missing)})" if report.missing else "")
    return report
