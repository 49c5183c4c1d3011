"""Export a segmentation checkpoint to ONNX, TorchScript or a model folder (safetensors), and
check the export against the eager model.

    python tools/export.py --model_path checkpoints/hrnet18_IF_checkpoint.pth --arch ocrnet.AuxHRNet \\
        --has_edge True --format onnx --output exported/hrnet18_if.onnx --dynamic
    python tools/export.py --model_path checkpoints/hr16s_4k_slim.pth --arch lighthrnet.HRNet16 \\
        --format torchscript --output exported/hr16s.pt --height 1024 --width 2048
    python tools/export.py --model_path runs/synthetic/best.pth --format safetensors --output exported/hr16s

A checkpoint written by this project's training describes its model (arch, hrnet_base, has_edge,
num_classes); the released files need ``--arch``, ``--hrnet_base`` and ``--has_edge``.  A flag
that contradicts the checkpoint is refused (except ``--has_edge False``, which drops the edge head).

The exported graph is the eval-mode network: input ``images`` (N x 3 x H x W, RGB ImageNet-
normalised as in training), outputs ``logits`` (N x 19 x H x W) and, with ``--has_edge True``,
``edge_prob`` (N x 1 x H x W, in [0, 1]).  ``--dynamic`` makes batch, height and width free
(otherwise the file is specialised to ``--height`` x ``--width``, batch 1).  HMS
(``ocrnet.HRNet_Mscale``) is exported with its attention scales fixed (``--scales``, default
the model's 0.25,0.5,1.0,2.0) and a fixed input size.

After writing, the file is loaded (onnxruntime for ONNX: ``pip install -e ".[export]"``;
torch.jit for TorchScript) and run beside the eager model on seeded random inputs (with
``--dynamic`` also at batch 2 and another size); the largest difference relative to the largest
eager magnitude (at least 1: probabilities are compared absolutely) is printed per output, and
the exit status is 1 when it exceeds ``--tolerance`` (1e-4) - unless the float64 model shows that
eager float32 is itself that far from exact and the export is no further (deep models with large
logits, e.g. OCRNet-48 on random weights; both figures are then printed).

``--format safetensors`` writes a model folder (``models.save_pretrained``): ``model.safetensors``,
``config.json`` (the model, the Cityscapes class names and colours, the input normalisation) and
a model card ``README.md`` (the model, how to load it, the metrics of a ``metrics.json`` beside the
checkpoint, the training config the checkpoint stores, the citation); it is read back with
``models.from_pretrained`` and must hold the same tensors.  ``--push_to_hub REPO_ID`` then uploads
it to the Hugging Face Hub (``pip install -e ".[hub]"``).

Every output is written whole or not at all; an existing one is replaced only with
``--overwrite``, and never the checkpoint itself (or, for a folder, one holding it).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

if __package__ in (None, ""):  # python tools/export.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import yaml
from torch import nn

from datasets import TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES, ClassTable
from experiment.cli import run_main, str2bool
from experiment.config import ModelConfig
from experiment.errors import UserError
from experiment.network import describe_from_checkpoint, load_state, read_model_file
from models import ARCHS, from_pretrained, get_net, save_pretrained
from models.pretrained import model_config
from utils.errors import InvalidInputError

HMS_ARCH = "ocrnet.HRNet_Mscale"
DEFAULT_ARCH = "ocrnet.AuxHRNet"
FORMATS = ("onnx", "torchscript", "safetensors")
EXPORT_EXTRA = 'install the export extra: pip install -e ".[export]"'


class ExportWrapper(nn.Module):
    """The eval-mode network with tensor outputs instead of a dict: ``(logits,)`` or
    ``(logits, edge_prob)`` (exporters need a fixed tuple of tensors)."""

    def __init__(self, net: nn.Module, with_edges: bool):
        super().__init__()
        self.net = net
        self.with_edges = with_edges

    def output_names(self) -> List[str]:
        return ["logits", "edge_prob"] if self.with_edges else ["logits"]

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.net(images)
        if self.with_edges:
            return out["pred"], out["edge_prob"]
        return (out["pred"],)


def build_wrapper(arch: str, hrnet_base: Optional[int], has_edge: bool, model_path: Optional[str],
                  scales: Optional[Sequence[float]] = None, num_classes: int = 19, state: Any = None) -> ExportWrapper:
    """The eval-mode model in its export wrapper, with the checkpoint's weights (``state``: what
    ``model_path`` holds, when already read)."""
    options = {}
    if scales is not None:
        if arch != HMS_ARCH:
            raise UserError(f"--scales applies to {HMS_ARCH} only (its fixed attention scales), not to {arch}")
        options["scales"] = tuple(scales)
    net = get_net(arch, num_classes=num_classes, has_edge=has_edge, hrnet_base=hrnet_base, **options)
    if model_path is not None:
        if state is None:
            state = read_model_file(model_path, "model file")
        print(load_state(net, state, model_path, purpose="cannot be exported"))
    return ExportWrapper(net, has_edge).eval()


# ----------------------------------------------------------------------------- checks before any work
def require_packages(fmt: str, exporter: str = "dynamo", verify: bool = True,
                     push_to_hub: Optional[str] = None) -> None:
    """One line naming the missing optional package and how to install it."""
    needed = []
    if fmt == "onnx":
        needed.append(("onnx", "--format onnx", EXPORT_EXTRA))
        if exporter == "dynamo":
            needed.append(("onnxscript", "--format onnx with the dynamo exporter (the default)",
                           EXPORT_EXTRA + " (or use --onnx_exporter legacy)"))
        if verify:
            needed.append(("onnxruntime", "checking the ONNX file", EXPORT_EXTRA + " (or pass --verify False)"))
    if fmt == "safetensors":
        needed.append(("safetensors", "--format safetensors", "pip install -e . (a requirement of setup.py)"))
    if push_to_hub:
        needed.append(("huggingface_hub", "--push_to_hub", 'install the hub extra: pip install -e ".[hub]"'))
    for module, purpose, hint in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{purpose} needs the {module} package, which is not installed: {hint}") from None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (or is a dangling link)
        return False


def check_output(output: str, model_path: Optional[str], overwrite: bool, folder: bool = False) -> None:
    """Refuse an output that is the checkpoint (through any link) or, for a model folder, holds
    it; an existing output without ``overwrite``; a folder where a file is to be written."""
    if model_path and _same_file(output, model_path):
        raise InvalidInputError(f"--output {output} is the --model_path file itself: write the export elsewhere")
    if folder and model_path and os.path.realpath(model_path).startswith(os.path.realpath(output) + os.sep):
        raise InvalidInputError(f"--output {output} holds the --model_path file {model_path}: replacing the folder "
                                "would delete it; write the model folder elsewhere")
    if not folder and os.path.isdir(output):
        raise InvalidInputError(f"--output {output} is a folder: this format is written as one file, name it "
                                "(e.g. model.onnx, model.pt)")
    if os.path.lexists(output) and not overwrite:
        raise InvalidInputError(f"--output {output} already exists: pass --overwrite to replace it")


def check_options(arch: str, fmt: str, height: int, width: int, dynamic: bool, tolerance: float,
                  exporter: str, push_to_hub: Optional[str], scales: Optional[Sequence[float]] = None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; valid: {', '.join(ARCHS)}")
    if height < 32 or width < 32:
        raise UserError(f"--height and --width must be at least 32 (the trunk downsamples by 32), got {height}x{width}")
    if dynamic and arch == HMS_ARCH:
        raise UserError(f"{HMS_ARCH} is exported at a fixed input size and fixed scales: leave out --dynamic "
                        "and give --height/--width")
    if not tolerance >= 0:
        raise UserError(f"--tolerance must be >= 0, got {tolerance}")
    if exporter not in ("dynamo", "legacy"):
        raise UserError(f"--onnx_exporter must be dynamo or legacy, got {exporter!r}")
    if scales is not None and arch != HMS_ARCH:
        raise UserError(f"--scales applies to {HMS_ARCH} only (its fixed attention scales), not to {arch}")
    if push_to_hub and fmt != "safetensors":
        raise UserError(f"--push_to_hub uploads a model folder: use it with --format safetensors, not {fmt}")


def describe_model(model_path: str, state: Any, arch: Optional[str] = None, hrnet_base: Optional[int] = None,
                   has_edge: Optional[bool] = None) -> ModelConfig:
    """The model of a checkpoint: what it stores (one of this project), else the flags given
    (``None``: not given), else ocrnet.AuxHRNet without edge head; a flag contradicting the
    checkpoint is refused."""
    given = {"arch": arch, "hrnet_base": hrnet_base, "has_edge": has_edge}
    explicit = {key: f"--{key}" for key, value in given.items() if value is not None}
    model = ModelConfig(arch=arch or DEFAULT_ARCH, hrnet_base=hrnet_base, has_edge=bool(has_edge), num_classes=19)
    describe_from_checkpoint(SimpleNamespace(model=model), state, model_path, explicit)
    return model


@contextlib.contextmanager
def _quiet_tracer():
    """The models' input checks read shapes in Python; tracing them is fine (the shapes are
    re-checked at runtime by the verification below), so the TracerWarnings are noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def export_torchscript(wrapper: ExportWrapper, example: torch.Tensor, path: str) -> None:
    with _quiet_tracer(), torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, path)


def export_onnx(wrapper: ExportWrapper, example: torch.Tensor, path: str, dynamic: bool, exporter: str,
                opset: Optional[int]) -> None:
    names = wrapper.output_names()
    with _quiet_tracer(), torch.no_grad():
        if exporter == "dynamo":
            dim = torch.export.Dim.AUTO
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=["images"], output_names=names,
                dynamic_shapes=({0: dim, 2: dim, 3: dim},) if dynamic else None, opset_version=opset,
                verbose=False)
            program.save(path, external_data=False)
        else:
            axes = {"images": {0: "batch", 2: "height", 3: "width"}}
            axes.update({name: {0: "batch", 2: "height", 3: "width"} for name in names})
            torch.onnx.export(wrapper, (example,), path, dynamo=False, input_names=["images"], output_names=names,
                              dynamic_axes=axes if dynamic else None, opset_version=opset or 17)


def load_runner(fmt: str, path: str):
    """A callable images -> list of numpy outputs, running the exported file."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise UserError("checking an ONNX file needs onnxruntime: pip install -e \".[export]\" "
                            "(or pass --verify False)") from None
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": images.numpy()})
    with _quiet_tracer():
        module = torch.jit.load(path, map_location="cpu").eval()

    def run(images: torch.Tensor) -> List[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(images)]
    return run


def verification_inputs(height: int, width: int, dynamic: bool, seed: int = 0) -> List[torch.Tensor]:
    """Seeded N(0, 1) images (the statistics of normalised images): the export size, and with
    ``dynamic`` also batch 2 at a different size."""
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(1, 3, height, width, generator=g)]
    if dynamic:
        inputs.append(torch.randn(2, 3, height + 32, width - 32 if width > 64 else width + 32, generator=g))
    return inputs


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b).max()), 1.0))


def compare(wrapper: ExportWrapper, runner, inputs: Sequence[torch.Tensor]) -> Dict[str, float]:
    """Largest |exported - eager| / max(largest |eager|, 1) per output, over all inputs: relative for
    logits, absolute for probabilities (an edge map near 0 everywhere would make a pure ratio
    meaningless)."""
    worst: Dict[str, float] = {}
    for images in inputs:
        with torch.no_grad():
            eager = [t.numpy() for t in wrapper(images)]
        exported = runner(images)
        if len(exported) != len(eager):
            raise UserError(f"the exported file returns {len(exported)} outputs, the eager model {len(eager)}")
        for name, a, b in zip(wrapper.output_names(), exported, eager):
            if a.shape != b.shape:
                raise UserError(f"output {name}: exported shape {a.shape} != eager {b.shape} for input "
                                f"{tuple(images.shape)}")
            worst[name] = max(worst.get(name, 0.0), _relative(a, b))
    return worst


def float64_errors(wrapper: ExportWrapper, runner, inputs: Sequence[torch.Tensor]) -> Dict[str, Tuple[float, float]]:
    """Per output, (exported vs the float64 model, eager float32 vs the float64 model), same
    measure as :func:`compare`: how far each float32 run is from the exact model."""
    exact = copy.deepcopy(wrapper).double()
    worst: Dict[str, Tuple[float, float]] = {}
    for images in inputs:
        with torch.no_grad():
            eager = [t.numpy() for t in wrapper(images)]
            reference = [t.numpy() for t in exact(images.double())]
        for name, a, b, r in zip(wrapper.output_names(), runner(images), eager, reference):
            old = worst.get(name, (0.0, 0.0))
            worst[name] = (max(old[0], _relative(a, r)), max(old[1], _relative(b, r)))
    return worst


def verify_file(wrapper: ExportWrapper, fmt: str, path: str, inputs: Sequence[torch.Tensor],
                tolerance: float) -> Dict[str, float]:
    """The relative differences per output of the file at ``path`` from the eager model; raises
    UserError when one exceeds ``tolerance`` beyond the float32 rounding of eager itself."""
    runner = load_runner(fmt, path)
    diffs = compare(wrapper, runner, inputs)
    for name, rel in diffs.items():
        print(f"max |exported - eager| / max(max |eager|, 1), {name}: {rel:.3e} (tolerance {tolerance:g})")
    bad = {name: rel for name, rel in diffs.items() if not rel <= tolerance}
    if bad:
        # Deep models with large logits can differ by more than that between any two float32
        # runs (another kernel, another summation order).  Judge the file against the exact
        # (float64) model then: it passes if it is as close to it as eager float32 is.
        exact = float64_errors(wrapper, runner, inputs)
        for name in list(bad):
            exported_err, eager_err = exact[name]
            print(f"{name} vs the float64 model: exported {exported_err:.3e}, eager float32 {eager_err:.3e}")
            if exported_err <= max(tolerance, 2.0 * eager_err):
                print(f"{name}: within the float32 rounding of the eager model itself; accepted")
                del bad[name]
    if bad:
        raise UserError(f"the exported {fmt} file differs from the eager model by more than {tolerance:g} "
                        f"(relative): {', '.join(f'{k} {v:.3e}' for k, v in bad.items())}; not written")
    return diffs


def write_file(wrapper: ExportWrapper, arch: str, fmt: str, output: str, inputs: Sequence[torch.Tensor], dynamic: bool,
               exporter: str, opset: Optional[int], verify: bool, tolerance: float) -> Dict[str, float]:
    """Export into a temporary folder beside ``output``, check, then move into place."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".export.", dir=folder)
    try:
        tmp = os.path.join(tmp_dir, os.path.basename(output))
        start = time.time()
        if fmt == "onnx":
            export_onnx(wrapper, inputs[0], tmp, dynamic, exporter, opset)
        else:
            export_torchscript(wrapper, inputs[0], tmp)
        size = "dynamic batch/height/width" if dynamic else "1x3x{}x{}".format(*inputs[0].shape[2:])
        print(f"exported {arch} ({size}, outputs {', '.join(wrapper.output_names())}) as {fmt} in "
              f"{time.time() - start:.1f}s")
        diffs = verify_file(wrapper, fmt, tmp, inputs, tolerance) if verify else {}
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"wrote {output} ({os.path.getsize(output) / 2 ** 20:.1f} MiB)")
    return diffs


def export(arch: str, fmt: str, output: str, *, model_path: Optional[str], hrnet_base: Optional[int] = None,
           has_edge: bool = False, height: int = 1024, width: int = 2048, dynamic: bool = False,
           scales: Optional[Sequence[float]] = None, exporter: str = "dynamo", opset: Optional[int] = None,
           verify: bool = True, tolerance: float = 1e-4, num_classes: int = 19, state: Any = None,
           overwrite: bool = False, push_to_hub: Optional[str] = None) -> Dict[str, float]:
    """Write the export and return the relative differences per output (empty without
    ``verify``, and for a model folder); raises UserError when they exceed ``tolerance``.
    ``state``: what ``model_path`` holds, when already read."""
    check_options(arch, fmt, height, width, dynamic, tolerance, exporter, push_to_hub, scales)
    check_output(output, model_path, overwrite, folder=fmt == "safetensors")
    if model_path is not None and state is None:
        state = read_model_file(model_path, "model file")
    require_packages(fmt, exporter, verify, push_to_hub)
    wrapper = build_wrapper(arch, hrnet_base, has_edge, model_path, scales, num_classes, state)
    if fmt == "safetensors":
        export_folder(wrapper.net, output, model_path=model_path, state=state, overwrite=overwrite, verify=verify)
        if push_to_hub:
            push_folder(output, push_to_hub)
        return {}
    inputs = verification_inputs(height, width, dynamic)
    return write_file(wrapper, arch, fmt, output, inputs, dynamic, exporter, opset, verify, tolerance)


# ----------------------------------------------------------------------------- model folders
ARCH_TITLES = {"ocrnet.AuxHRNet": "HRNet-{base}-IF (Aux-HRNet)", "lighthrnet.HRNet16": "HRNet-16-Slim",
               "ocrnet.HRNet": "OCRNet-{base}", "ocrnet.HRNet_Mscale": "HMS-OCRNet-{base}"}
# The torch.hub entry point of each arch (hubconf.py) and the trunk width it builds.
HUB_ENTRIES = {"ocrnet.AuxHRNet": ("hrnet18_if", 18), "lighthrnet.HRNet16": ("hrnet16_slim", 16),
               "ocrnet.HRNet": ("ocrnet48_if", 48), "ocrnet.HRNet_Mscale": ("hms_ocrnet48_if", 48)}
CITATION = """@inproceedings{borse2021inverseform,
  title     = {InverseForm: A Loss Function for Structured Boundary-Aware Segmentation},
  author    = {Borse, Shubhankar and Wang, Ying and Zhang, Yizhe and Porikli, Fatih},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}"""


def class_table(num_classes: int, state: Any = None) -> Dict[str, Any]:
    """The names and colours of the classes (and the ``class_table`` mapping infer reads): the
    table the checkpoint records, else Cityscapes' train ids."""
    recorded = state.get("class_table") if isinstance(state, Mapping) else None
    if isinstance(recorded, Mapping):
        table = ClassTable.from_dict(dict(recorded), source="the checkpoint's class_table")
        if table.num_classes != num_classes:
            raise InvalidInputError(f"the checkpoint's class_table has {table.num_classes} classes but its network "
                                    f"{num_classes}")
        return {"class_names": list(table.names), "class_colors": [list(c) for c in table.colors],
                "class_table": dict(recorded)}
    if num_classes > len(TRAIN_CLASS_NAMES):
        raise InvalidInputError(f"the checkpoint has {num_classes} classes but records no class table and the "
                                f"default (Cityscapes train ids) has {len(TRAIN_CLASS_NAMES)}: a model folder names "
                                f"every class")
    return {"class_names": list(TRAIN_CLASS_NAMES[:num_classes]),
            "class_colors": [list(c) for c in TRAIN_CLASS_COLORS[:num_classes]]}


def read_metrics(path: str) -> Optional[Dict[str, Any]]:
    """The segmentation metrics of a ``metrics.json`` (None when it holds none, e.g. a regressor run's)."""
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"cannot read {path} (the metrics for the model card): {exc}") from exc
    return metrics if isinstance(metrics, dict) and "miou" in metrics else None


def card_metrics(model_path: Optional[str], state: Any) -> Optional[Tuple[Dict[str, Any], str]]:
    """The metrics for the model card and where they come from: the ``metrics.json`` beside the
    checkpoint when it is of this checkpoint (same iteration, or no iteration to tell), else the
    metrics the checkpoint stores itself (``best.pth``), else None."""
    if not model_path:
        return None
    state = state if isinstance(state, Mapping) else {}
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "metrics.json")
    beside = read_metrics(path) if os.path.isfile(path) else None
    if beside is not None and beside.get("iteration") in (None, state.get("iteration")) \
            and beside.get("model_path") in (None, os.path.abspath(model_path)):
        return beside, "`metrics.json` beside the checkpoint"
    stored = state.get("metrics")
    if isinstance(stored, Mapping) and "miou" in stored:
        return dict(stored), "the validation stored in the checkpoint"
    return None


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) and value == value else "n/a"


def _card_header(config: Mapping[str, Any], source: Optional[str]) -> List[str]:
    arch, base, n = config["arch"], config["hrnet_base"], config["num_classes"]
    title = ARCH_TITLES.get(arch, arch).format(base=base)
    origin = f" Converted from `{source}` by `tools/export.py`." if source else ""
    edge = "with its edge head" if config["has_edge"] else "without edge head"
    norm = config["normalisation"]
    lines = ["---", "library_name: pytorch", "license: bsd-3-clause", "pipeline_tag: image-segmentation",
             "tags: [semantic-segmentation, cityscapes, inverseform, hrnet]", "---", "", f"# {title}", "",
             f"{title} (`{arch}`, hrnet_base {base}, {edge}) of the InverseForm codebase (Borse et al., CVPR 2021): "
             f"semantic segmentation into {n} classes (Cityscapes train ids).{origin}", "",
             "## Input and output", "",
             f"- input: N x 3 x H x W float32, RGB in [0, 1], normalised per channel with mean {norm['mean']} and "
             f"std {norm['std']} (ImageNet)",
             f"- `net(images)` (eval mode) returns a dict: `pred`, N x {n} x H x W class logits (argmax: train id)"]
    if config["has_edge"]:
        lines.append("- and, from its edge head, `edge_prob`: N x 1 x H x W boundary probability in [0, 1]")
    if "scales" in config.get("options", {}):
        lines.append(f"- hierarchical multi-scale inference over the scales {config['options']['scales']}")
    return lines + [""]


def _card_usage(config: Mapping[str, Any], name: str) -> List[str]:
    lines = ["## How to load it", "", "From a checkout of the repository (`models/`, `hubconf.py`):", "", "```python",
             "import models", f'net = models.from_pretrained("{name}")  # eval mode, on the CPU', "```", ""]
    entry, base = HUB_ENTRIES.get(config["arch"], (None, None))
    if entry is not None and base == config["hrnet_base"]:
        lines += ["```python", "import torch",
                  f'net = torch.hub.load("path/to/inverseform-seg", "{entry}", source="local", weights="{name}")',
                  "```", ""]
    return lines + ["```bash", f"python -m experiment.validation --model_path {name} --output_dir runs/val_{name}",
                    "```", ""]


def _card_classes(config: Mapping[str, Any]) -> List[str]:
    lines = ["## Classes", "", "| train id | class | colour (RGB) |", "|---:|---|---|"]
    lines += [f"| {i} | {name} | {tuple(color)} |"
              for i, (name, color) in enumerate(zip(config["class_names"], config["class_colors"]))]
    return lines + [""]


def _card_metrics(metrics: Mapping[str, Any], origin: str, class_names: Sequence[str]) -> List[str]:
    images = f", {metrics['num_images']} images" if "num_images" in metrics else ""
    at = f" at iteration {metrics['iteration']}" if "iteration" in metrics else ""
    lines = ["## Metrics", "", f"From {origin}{at}{images}; in %.", "", "| metric | value |", "|---|---:|",
             f"| mIoU | {_percent(metrics.get('miou'))} |", f"| mBA | {_percent(metrics.get('mba'))} |",
             f"| boundary F (tol {metrics.get('boundary_tolerance', '?')}px) | {_percent(metrics.get('boundary_f'))} |"]
    if "edge_f" in metrics:
        lines.append(f"| edge F (ODS) | {_percent(metrics['edge_f'])} |")
    per_class = metrics.get("per_class_iou") or []
    names = metrics.get("class_names") or class_names
    if per_class:
        lines += ["", "| train id | class | IoU |", "|---:|---|---:|"]
        lines += [f"| {i} | {name} | {_percent(iou)} |" for i, (name, iou) in enumerate(zip(names, per_class))]
    return lines + [""]


def _card_training(config: Mapping[str, Any]) -> List[str]:
    text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False).rstrip()
    return ["## Training config", "", "<details><summary>The config stored in the checkpoint</summary>", "",
            "```yaml", text, "```", "", "</details>", ""]


def model_card(config: Mapping[str, Any], name: str, source: Optional[str] = None,
               metrics: Optional[Tuple[Mapping[str, Any], str]] = None,
               training: Optional[Mapping[str, Any]] = None) -> str:
    """The README.md of a model folder: the model, its input and output, how to load it (``name``:
    the folder), its classes, its metrics and training config when known, the citation."""
    lines = _card_header(config, source) + _card_usage(config, name) + _card_classes(config)
    if metrics is not None:
        lines += _card_metrics(metrics[0], metrics[1], config["class_names"])
    if training:
        lines += _card_training(training)
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def check_folder(net: nn.Module, folder: str) -> None:
    """``models.from_pretrained(folder)`` must rebuild the same network with the same tensors."""
    loaded = from_pretrained(folder)
    ours, theirs = net.state_dict(), loaded.state_dict()
    same = type(loaded) is type(net) and ours.keys() == theirs.keys() and \
        all(torch.equal(ours[k].cpu(), theirs[k]) for k in ours) and getattr(net, "scales", None) == getattr(
            loaded, "scales", None)
    if not same:
        raise RuntimeError(f"models.from_pretrained({folder}) does not rebuild the exported network")
    print(f"checked: models.from_pretrained({folder}) rebuilds {type(net).__name__} with the same {len(ours)} tensors")


def export_folder(net: nn.Module, output: str, *, model_path: Optional[str], state: Any = None,
                  overwrite: bool = False, verify: bool = True) -> str:
    """Write ``net`` as a model folder with its model card (metrics and training config from the
    checkpoint ``model_path``, whose contents are ``state``)."""
    source = os.path.basename(model_path) if model_path else None
    config = model_config(net, {**class_table(net.num_classes, state), **({"source": source} if source else {})})
    training = state.get("config") if isinstance(state, Mapping) and isinstance(state.get("config"), Mapping) else None
    card = model_card(config, os.path.basename(os.path.normpath(output)), source, card_metrics(model_path, state),
                      training)
    save_pretrained(net, output, config, card=card, overwrite=overwrite)
    size = os.path.getsize(os.path.join(output, "model.safetensors")) / 2 ** 20
    print(f"wrote {output}: model.safetensors ({size:.1f} MiB), config.json, README.md")
    if verify:
        check_folder(net, output)
    return output


def push_folder(folder: str, repo_id: str) -> None:
    """Upload a model folder to the Hugging Face Hub (needs ``huggingface_hub`` and a login)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id,
                          commit_message=f"{os.path.basename(os.path.normpath(folder))} from tools/export.py")
    except (OSError, ValueError) as exc:  # the Hub's HTTP, login and repo-name errors derive from these
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--push_to_hub {repo_id}: {reason} ({folder} is written and kept)") from exc
    print(f"pushed {folder} to https://huggingface.co/{repo_id}")


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint (released .pth or one of ours)")
    p.add_argument("--arch", help=f"{' | '.join(ARCHS)} (default: what the checkpoint stores, else {DEFAULT_ARCH})")
    p.add_argument("--hrnet_base", type=int, help="trunk width: 16, 18 or 48 (default: the checkpoint's, else the "
                                                  "arch's own)")
    p.add_argument("--has_edge", type=str2bool, help="export the edge probability too (True/False; default: the "
                                                     "checkpoint's, else False)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write (.onnx / .pt), or the model folder (safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--height", type=int, default=1024, help="export and check size (default 1024)")
    p.add_argument("--width", type=int, default=2048, help="export and check size (default 2048)")
    p.add_argument("--dynamic", action="store_true", help="free batch, height and width (not for HMS)")
    p.add_argument("--scales", help="HMS attention scales, fixed in the export (default 0.25,0.5,1.0,2.0)")
    p.add_argument("--onnx_exporter", default="dynamo", choices=("dynamo", "legacy"),
                   help="dynamo: torch.export-based, PyTorch's default; legacy: the TorchScript-based one "
                        "(deprecated by PyTorch, much faster to export)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--verify", type=str2bool, default=True, help="check the export against the eager model")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative difference")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="with --format safetensors: upload the model folder to "
                                                            "the Hugging Face Hub (pip install -e \".[hub]\")")
    return p


def parse_scales(text: Optional[str]) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--scales must be comma-separated numbers, got {text!r}") from None


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    def body() -> None:
        scales = parse_scales(args.scales)
        check_output(args.output, args.model_path, args.overwrite, folder=args.format == "safetensors")
        state = read_model_file(args.model_path, "model file")
        model = describe_model(args.model_path, state, args.arch, args.hrnet_base, args.has_edge)
        export(model.arch, args.format, args.output, model_path=args.model_path, hrnet_base=model.hrnet_base,
               has_edge=model.has_edge, height=args.height, width=args.width, dynamic=args.dynamic, scales=scales,
               exporter=args.onnx_exporter, opset=args.opset, verify=args.verify, tolerance=args.tolerance,
               num_classes=model.num_classes, state=state, overwrite=args.overwrite, push_to_hub=args.push_to_hub)

    run_main(body)


if __name__ == "__main__":
    main()
