"""Export a segmentation checkpoint to ONNX or TorchScript and check the exported file against
the eager model.

    python tools/export.py --model_path checkpoints/hrnet18_IF_checkpoint.pth --arch ocrnet.AuxHRNet \\
        --has_edge True --format onnx --output exported/hrnet18_if.onnx --dynamic
    python tools/export.py --model_path checkpoints/hr16s_4k_slim.pth --arch lighthrnet.HRNet16 \\
        --format torchscript --output exported/hr16s.pt --height 1024 --width 2048

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
logits, e.g. OCRNet-48 on random weights; both figures are then printed).  The file is written
atomically (no half-written output).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # python tools/export.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch import nn

from experiment.cli import run_main, str2bool
from experiment.errors import UserError
from models import ARCHS, get_net, load_checkpoint

HMS_ARCH = "ocrnet.HRNet_Mscale"
FORMATS = ("onnx", "torchscript")


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
                  scales: Optional[Sequence[float]] = None, num_classes: int = 19) -> ExportWrapper:
    """The eval-mode model in its export wrapper, with the checkpoint's weights."""
    options = {}
    if scales is not None:
        if arch != HMS_ARCH:
            raise UserError(f"--scales applies to {HMS_ARCH} only (its fixed attention scales), not to {arch}")
        options["scales"] = tuple(scales)
    net = get_net(arch, num_classes=num_classes, has_edge=has_edge, hrnet_base=hrnet_base, **options)
    if model_path is not None:
        if not os.path.isfile(model_path):
            raise UserError(f"model file {model_path} does not exist")
        print(f"loaded {model_path}: {load_checkpoint(net, model_path)}")
    return ExportWrapper(net, has_edge).eval()


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


def export(arch: str, fmt: str, output: str, *, model_path: Optional[str], hrnet_base: Optional[int] = None,
           has_edge: bool = False, height: int = 1024, width: int = 2048, dynamic: bool = False,
           scales: Optional[Sequence[float]] = None, exporter: str = "dynamo", opset: Optional[int] = None,
           verify: bool = True, tolerance: float = 1e-4) -> Dict[str, float]:
    """Write the export and return the relative differences per output (empty without
    ``verify``); raises UserError when they exceed ``tolerance``."""
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
    wrapper = build_wrapper(arch, hrnet_base, has_edge, model_path, scales)
    inputs = verification_inputs(height, width, dynamic)
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
        print(f"exported {arch} ({'dynamic batch/height/width' if dynamic else f'1x3x{height}x{width}'}, outputs "
              f"{', '.join(wrapper.output_names())}) as {fmt} in {time.time() - start:.1f}s")
        diffs: Dict[str, float] = {}
        if verify:
            runner = load_runner(fmt, tmp)
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
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"wrote {output} ({os.path.getsize(output) / 2 ** 20:.1f} MiB)")
    return diffs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="checkpoint (released .pth or one of ours)")
    p.add_argument("--arch", default="ocrnet.AuxHRNet", help=" | ".join(ARCHS))
    p.add_argument("--hrnet_base", type=int, help="trunk width: 16, 18 or 48 (default: the arch's own)")
    p.add_argument("--has_edge", type=str2bool, default=False, help="export the edge probability too (True/False)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write (.onnx / .pt)")
    p.add_argument("--height", type=int, default=1024, help="export and check size (default 1024)")
    p.add_argument("--width", type=int, default=2048, help="export and check size (default 2048)")
    p.add_argument("--dynamic", action="store_true", help="free batch, height and width (not for HMS)")
    p.add_argument("--scales", help="HMS attention scales, fixed in the export (default 0.25,0.5,1.0,2.0)")
    p.add_argument("--onnx_exporter", default="dynamo", choices=("dynamo", "legacy"),
                   help="dynamo: torch.export-based, PyTorch's default; legacy: the TorchScript-based one "
                        "(deprecated by PyTorch, much faster to export)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--verify", type=str2bool, default=True, help="run the exported file beside the eager model")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative difference")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    def body() -> None:
        scales = None
        if args.scales is not None:
            try:
                scales = [float(s) for s in args.scales.split(",")]
            except ValueError:
                raise UserError(f"--scales must be comma-separated numbers, got {args.scales!r}") from None
        export(args.arch, args.format, args.output, model_path=args.model_path, hrnet_base=args.hrnet_base,
               has_edge=args.has_edge, height=args.height, width=args.width, dynamic=args.dynamic, scales=scales,
               exporter=args.onnx_exporter, opset=args.opset, verify=args.verify, tolerance=args.tolerance)

    run_main(body)


if __name__ == "__main__":
    main()
