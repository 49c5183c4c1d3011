"""tools/export.py: ONNX and TorchScript files that reproduce the eager model (logits and edge
probabilities) to 1e-4, fixed or dynamic sizes; HMS at fixed scales; clear refusals; nothing written
when the check fails.  The default run exports the small HRNet-16-Slim; the full matrix (four archs,
with and without edge head, both formats) is marked slow."""
import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from experiment.errors import UserError
from synthetic_weights import synthetic_state_dict

ROOT = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def make_checkpoint(folder: Path, arch: str, has_edge: bool, base=None, seed=5) -> Path:
    net = models.get_net(arch, has_edge=has_edge, hrnet_base=base)
    path = folder / f"{arch}_{base}_{has_edge}.pth"
    if not path.exists():
        torch.save({"state_dict": {f"module.{k}": v for k, v in synthetic_state_dict(net.state_dict(), seed).items()}},
                   path)
    return path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export_ckpts")


def check_file_against_eager(fmt, path, arch, has_edge, ckpt, shape, base=None):
    """Independently of the tool's own check: run the written file and the eager model."""
    wrapper = tool.build_wrapper(arch, base, has_edge, str(ckpt))
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        eager = [t.numpy() for t in wrapper(images)]
    exported = tool.load_runner(fmt, str(path))(images)
    assert len(exported) == (2 if has_edge else 1)
    exact = None
    for i, (a, b) in enumerate(zip(exported, eager)):
        assert a.shape == b.shape
        scale = max(np.abs(b).max(), 1.0)
        if np.abs(a - b).max() > 1e-4 * scale:  # then no further from the float64 model than eager float32
            if exact is None:
                with torch.no_grad():
                    exact = [t.numpy() for t in copy.deepcopy(wrapper).double()(images.double())]
            assert np.abs(a - exact[i]).max() <= max(1e-4 * scale, 2 * np.abs(b - exact[i]).max())
    if has_edge:
        assert 0.0 <= exported[1].min() and exported[1].max() <= 1.0


def test_torchscript_dynamic_with_edges_from_the_command_line(ckpt_dir, tmp_path):
    ckpt = make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", True)
    out = tmp_path / "hr16s.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "--model_path", str(ckpt),
                           "--arch", "lighthrnet.HRNet16", "--has_edge", "True", "--format", "torchscript",
                           "--output", str(out), "--height", "64", "--width", "128", "--dynamic"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "outputs logits, edge_prob" in proc.stdout and proc.stdout.count("max |exported - eager|") == 2
    check_file_against_eager("torchscript", out, "lighthrnet.HRNet16", True, ckpt, (3, 3, 96, 64))
    assert [p.name for p in tmp_path.iterdir()] == ["hr16s.pt"]  # no temporary left behind


def test_onnx_dynamic(ckpt_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt = make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", False)
    out = tmp_path / "hr16s.onnx"
    diffs = tool.export("lighthrnet.HRNet16", "onnx", str(out), model_path=str(ckpt), has_edge=False,
                        height=64, width=128, dynamic=True, exporter="legacy")
    assert set(diffs) == {"logits"} and diffs["logits"] <= 1e-4
    check_file_against_eager("onnx", out, "lighthrnet.HRNet16", False, ckpt, (2, 3, 128, 96))


class TinySegNet(torch.nn.Module):
    """A two-conv stand-in with the models' output dict: the tool's checking logic, traced in no time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cls = torch.nn.Conv2d(3, 19, 3, padding=1)
        self.edge = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return {"pred": self.cls(x), "edge_prob": torch.sigmoid(self.edge(x))}


def test_failed_check_raises_and_writes_nothing(tmp_path, monkeypatch):
    """An exported file whose outputs drift from eager by more than the tolerance (and further from
    the float64 model than eager float32 is) is not kept."""
    real_runner = tool.load_runner

    def drifting_runner(fmt, path):
        run = real_runner(fmt, path)
        return lambda images: [o + 1e-3 * max(np.abs(o).max(), 1.0) for o in run(images)]

    monkeypatch.setattr(tool, "build_wrapper", lambda *a, **k: tool.ExportWrapper(TinySegNet(), True).eval())
    out = tmp_path / "sub" / "tiny.pt"
    diffs = tool.export("lighthrnet.HRNet16", "torchscript", str(out), model_path=None, has_edge=True,
                        height=64, width=96)
    assert out.exists() and max(diffs.values()) <= 1e-6
    out.unlink()
    monkeypatch.setattr(tool, "load_runner", drifting_runner)
    with pytest.raises(UserError, match=r"differs from the eager model by more than 0.0001 \(relative\): "
                                        r"logits [19]\.\d+e-0[34], edge_prob [19]\.\d+e-0[34]; not written"):
        tool.export("lighthrnet.HRNet16", "torchscript", str(out), model_path=None, has_edge=True,
                    height=64, width=96)
    assert not out.exists() and not list(out.parent.iterdir())


def test_refusals_name_the_problem(ckpt_dir, tmp_path):
    ckpt = make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", True)
    with pytest.raises(UserError, match="fixed input size"):
        tool.export("ocrnet.HRNet_Mscale", "onnx", str(tmp_path / "x.onnx"), model_path=None, dynamic=True)
    with pytest.raises(UserError, match="--scales applies to ocrnet.HRNet_Mscale only"):
        tool.export("lighthrnet.HRNet16", "onnx", str(tmp_path / "x.onnx"), model_path=str(ckpt), scales=[1.0])
    with pytest.raises(UserError, match="--format must be one of"):
        tool.export("lighthrnet.HRNet16", "tflite", str(tmp_path / "x"), model_path=str(ckpt))
    with pytest.raises(UserError, match="does not exist"):
        tool.export("lighthrnet.HRNet16", "onnx", str(tmp_path / "x.onnx"), model_path=str(tmp_path / "no.pth"))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the full matrix (slow)
ARCH_CASES = [("ocrnet.AuxHRNet", None), ("lighthrnet.HRNet16", None), ("ocrnet.HRNet", None),
              ("ocrnet.HRNet_Mscale", None)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt,exporter", [("torchscript", None), ("onnx", "legacy")])
@pytest.mark.parametrize("has_edge", [True, False], ids=["edge", "no-edge"])
@pytest.mark.parametrize("arch,base", ARCH_CASES, ids=[a for a, _ in ARCH_CASES])
def test_every_arch_exports_to_eager_precision(ckpt_dir, tmp_path, arch, base, has_edge, fmt, exporter):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    ckpt = make_checkpoint(ckpt_dir, arch, has_edge, base)
    hms = arch == "ocrnet.HRNet_Mscale"
    out = tmp_path / f"model.{fmt}"
    diffs = tool.export(arch, fmt, str(out), model_path=str(ckpt), hrnet_base=base, has_edge=has_edge,
                        height=64, width=128, dynamic=not hms, exporter=exporter or "dynamo",
                        scales=[0.5, 1.0, 2.0] if hms else None)
    assert len(diffs) == (2 if has_edge else 1)  # export() raised if a difference was beyond float32 rounding
    if not hms:
        check_file_against_eager(fmt, out, arch, has_edge, ckpt, (2, 3, 96, 160), base)


@pytest.mark.slow
def test_onnx_dynamo_exporter(ckpt_dir, tmp_path):
    """PyTorch's default (torch.export-based) exporter, the tool's default: minutes on a CPU."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt = make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", True)
    out = tmp_path / "hr16s.onnx"
    diffs = tool.export("lighthrnet.HRNet16", "onnx", str(out), model_path=str(ckpt), has_edge=True,
                        height=64, width=128, dynamic=True)
    assert max(diffs.values()) <= 1e-4
    check_file_against_eager("onnx", out, "lighthrnet.HRNet16", True, ckpt, (2, 3, 96, 160))
    assert not Path(str(out) + ".data").exists()  # weights inside the one file
