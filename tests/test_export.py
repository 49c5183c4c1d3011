"""tools/export.py: ONNX and TorchScript files that reproduce the eager model (logits and edge
probabilities) to 1e-4, fixed or dynamic sizes; HMS at fixed scales; clear refusals; nothing written
when the check fails; an existing output (and never the checkpoint itself) replaced only with
--overwrite; unreadable checkpoints and missing optional packages as one line.  Written files are
checked here against the model built without the tool (models.get_net + the weights), so a bug of
the tool's own wrapper shows.  Model folders (--format safetensors) from this project's and the
released checkpoints, with their model card.  The default run exports the small HRNet-16-Slim and
Aux-HRNet-18; the full matrix (four archs, with and without edge head, both formats) is marked slow."""
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from datasets import TRAIN_CLASS_NAMES
from experiment.errors import UserError
from synthetic_weights import synthetic_state_dict
from utils.errors import InvalidInputError

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


def eager_model(arch, has_edge, ckpt, base=None):
    """The eval-mode network with the checkpoint's weights, built here without the tool."""
    net = models.get_net(arch, has_edge=has_edge, hrnet_base=base)
    models.load_checkpoint(net, str(ckpt))
    return net.eval()


def run_exported(fmt, path, images):
    """The written file run directly: its output names (ONNX only, else None) and outputs."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        return [o.name for o in session.get_outputs()], session.run(None, {"images": images.numpy()})
    module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return None, [t.numpy() for t in module(images)]


def eager_outputs(net, images):
    with torch.no_grad():
        out = net(images)
    return {"logits": out["pred"].numpy(), **({"edge_prob": out["edge_prob"].numpy()} if "edge_prob" in out else {})}


def check_file_against_eager(fmt, path, arch, has_edge, ckpt, shape, base=None):
    """Independently of the tool (its wrapper, loader and runner): the written file against the
    model's own outputs ``pred`` and ``edge_prob``."""
    net = eager_model(arch, has_edge, ckpt, base)
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(123))
    eager = eager_outputs(net, images)
    names, exported = run_exported(fmt, path, images)
    assert len(exported) == (2 if has_edge else 1) == len(eager)
    if names is not None:
        assert names == list(eager)
    exact = None
    for a, (name, b) in zip(exported, eager.items()):
        assert a.shape == b.shape
        scale = max(np.abs(b).max(), 1.0)
        if np.abs(a - b).max() > 1e-4 * scale:  # then no further from the float64 model than eager float32
            if exact is None:
                exact = eager_outputs(copy.deepcopy(net).double(), images.double())
            assert np.abs(a - exact[name]).max() <= max(1e-4 * scale, 2 * np.abs(b - exact[name]).max())
    if has_edge:
        assert 0.0 <= exported[1].min() and exported[1].max() <= 1.0


def call_main(argv, capsys):
    """The tool's command line in this process: (exit status, stdout, stderr)."""
    try:
        tool.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code, err):
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


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


def small_export_argv(ckpt, out, *extra):
    return ["--model_path", ckpt, "--arch", "lighthrnet.HRNet16", "--format", "torchscript", "--output", out,
            "--height", 64, "--width", 64, *extra]


def test_an_existing_output_is_kept_unless_overwrite_is_given(ckpt_dir, tmp_path, capsys):
    ckpt = make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", False)
    out = tmp_path / "hr16s.pt"
    out.write_bytes(b"an earlier export")
    line = one_error_line(*call_main(small_export_argv(ckpt, out), capsys)[::2])
    assert str(out) in line and "--overwrite" in line
    assert out.read_bytes() == b"an earlier export"
    code, _, err = call_main(small_export_argv(ckpt, out, "--overwrite"), capsys)
    assert code == 0, err
    check_file_against_eager("torchscript", out, "lighthrnet.HRNet16", False, ckpt, (1, 3, 64, 64))


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_the_checkpoint_is_never_its_own_output(ckpt_dir, tmp_path, capsys, how):
    ckpt = tmp_path / "model.pth"
    shutil.copyfile(make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", False), ckpt)
    before = ckpt.read_bytes()
    out = ckpt if how == "same path" else tmp_path / "other.pt"
    if how == "symlink":
        out.symlink_to(ckpt)
    elif how == "hard link":
        os.link(ckpt, out)
    for extra in ([], ["--overwrite"]):
        line = one_error_line(*call_main(small_export_argv(ckpt, out, *extra), capsys)[::2])
        assert str(out) in line and "--model_path" in line
    assert ckpt.read_bytes() == before


def unreadable_checkpoint(kind, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.pth"
    if kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "not a torch file":
        path.write_text("model weights: see the wiki\n")
    elif kind == "not a state dict":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "directory", "not a torch file", "not a state dict"])
def test_an_unreadable_checkpoint_is_one_line_naming_it(ckpt_dir, tmp_path, capsys, kind):
    bad = unreadable_checkpoint(kind, make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", False), tmp_path)
    out = tmp_path / "out.pt"
    line = one_error_line(*call_main(small_export_argv(bad, out), capsys)[::2])
    assert str(bad) in line
    if kind == "directory":
        assert "is a directory" in line
    assert not out.exists()


@pytest.mark.parametrize("package,exporter", [("onnxscript", "dynamo"), ("onnx", "legacy"), ("onnx", "dynamo"),
                                              ("onnxruntime", "legacy")])
def test_a_missing_export_package_is_named_with_the_extra(ckpt_dir, tmp_path, capsys, monkeypatch, package,
                                                          exporter):
    ckpt = make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", False)
    for name in ("onnx", "onnxscript", "onnxruntime"):
        if name != package and importlib.util.find_spec(name) is None:  # the others are taken as installed
            monkeypatch.setitem(sys.modules, name, type(sys)(name))
    monkeypatch.setitem(sys.modules, package, None)  # import fails as for a package not installed
    out = tmp_path / "x.onnx"
    argv = ["--model_path", ckpt, "--arch", "lighthrnet.HRNet16", "--format", "onnx", "--output", out,
            "--onnx_exporter", exporter, "--height", 64, "--width", 64]
    line = one_error_line(*call_main(argv, capsys)[::2])
    assert f"{package} " in line and 'pip install -e ".[export]"' in line
    assert not out.exists()


@pytest.mark.parametrize("bug", ["softmax of the logits", "sigmoid of the edge probability"])
def test_the_independent_check_sees_a_bug_of_the_tools_wrapper(ckpt_dir, tmp_path, monkeypatch, bug):
    """A wrapper that changes an output fools the tool's own check (the file equals the wrapper)
    but not the check of these tests."""
    ckpt = make_checkpoint(ckpt_dir, "lighthrnet.HRNet16", True)

    def buggy_forward(self, images):
        out = self.net(images)
        if bug.startswith("softmax"):
            return torch.softmax(out["pred"], 1), out["edge_prob"]
        return out["pred"], torch.sigmoid(out["edge_prob"])

    monkeypatch.setattr(tool.ExportWrapper, "forward", buggy_forward)
    out = tmp_path / "hr16s.pt"
    tool.export("lighthrnet.HRNet16", "torchscript", str(out), model_path=str(ckpt), has_edge=True,
                height=64, width=64)
    with pytest.raises(AssertionError):
        check_file_against_eager("torchscript", out, "lighthrnet.HRNet16", True, ckpt, (1, 3, 64, 64))


# ----------------------------------------------------------------------------- model folders (safetensors)
METRICS = {"miou": 0.4156, "mba": 0.5301, "boundary_f": 0.2913, "boundary_tolerance": 2, "num_images": 20,
           "iteration": 720, "class_names": list(TRAIN_CLASS_NAMES), "per_class_iou": [0.9, None] + [0.5] * 17}


def project_checkpoint(folder: Path, arch="lighthrnet.HRNet16", has_edge=True, iteration=720, metrics=None) -> Path:
    """A checkpoint as this project's training writes it: the model it holds, its config."""
    net = models.get_net(arch, has_edge=has_edge)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "best.pth"
    torch.save({"state_dict": synthetic_state_dict(net.state_dict(), 6), "arch": arch, "hrnet_base": net.hrnet_base,
                "has_edge": has_edge, "num_classes": 19, "iteration": iteration, "metrics": metrics or {},
                "config": {"model": {"arch": arch}, "optim": {"lr": 0.01}}}, path)
    return path


def assert_folder_equals_eager(folder, arch, has_edge, ckpt, base=None):
    net, loaded = eager_model(arch, has_edge, ckpt, base), models.from_pretrained(folder)
    images = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected, got = net(images), loaded(images)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_model_folder_from_a_checkpoint_of_this_project(tmp_path, capsys):
    ckpt = project_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(METRICS))
    out = tmp_path / "exported" / "hr16s"
    code, stdout, err = call_main(["--model_path", ckpt, "--format", "safetensors", "--output", out], capsys)
    assert code == 0, err
    assert "checked: models.from_pretrained" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert (config["arch"], config["hrnet_base"], config["has_edge"], config["source"]) == (
        "lighthrnet.HRNet16", 16, True, "best.pth")
    card = (out / "README.md").read_text()
    for text in ["# HRNet-16-Slim", "mean [0.485, 0.456, 0.406] and std [0.229, 0.224, 0.225]",
                 'models.from_pretrained("hr16s")',
                 'torch.hub.load("path/to/inverseform-seg", "hrnet16_slim", source="local", weights="hr16s")',
                 "python -m experiment.validation --model_path hr16s", "at iteration 720, 20 images",
                 "| mIoU | 41.56 |", "| mBA | 53.01 |", "| boundary F (tol 2px) | 29.13 |", "| 0 | road | 90.00 |",
                 "| 1 | sidewalk | n/a |", "| 18 | bicycle | (119, 11, 32) |", "```yaml", "  lr: 0.01",
                 "@inproceedings{borse2021inverseform", "edge_prob"]:
        assert text in card, text
    assert_folder_equals_eager(out, "lighthrnet.HRNet16", True, ckpt)


def test_a_released_checkpoint_converts_the_same_way(ckpt_dir, tmp_path, capsys):
    ckpt = make_checkpoint(ckpt_dir, "ocrnet.AuxHRNet", True)
    out = tmp_path / "hrnet18_if"
    code, _, err = call_main(["--model_path", ckpt, "--arch", "ocrnet.AuxHRNet", "--has_edge", "True",
                              "--format", "safetensors", "--output", out], capsys)
    assert code == 0, err
    card = (out / "README.md").read_text()
    assert "# HRNet-18-IF" in card and '"hrnet18_if"' in card and "@inproceedings{borse2021inverseform" in card
    assert "## Metrics" not in card and "## Training config" not in card  # the released file has neither
    assert_folder_equals_eager(out, "ocrnet.AuxHRNet", True, ckpt)


def test_a_model_folder_replaces_nothing_it_should_not(tmp_path, capsys):
    ckpt = project_checkpoint(tmp_path / "run", has_edge=False)
    before = ckpt.read_bytes()
    line = one_error_line(*call_main(["--model_path", ckpt, "--format", "safetensors", "--output", ckpt.parent,
                                      "--overwrite"], capsys)[::2])
    assert "holds the --model_path file" in line and ckpt.read_bytes() == before
    out = tmp_path / "hr16s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--model_path", ckpt, "--format", "safetensors", "--output", out]
    line = one_error_line(*call_main(argv, capsys)[::2])
    assert f"--output {out} already exists: pass --overwrite" in line and (out / "notes.txt").exists()
    assert call_main(argv + ["--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    line = one_error_line(*call_main(argv + ["--overwrite", "--arch", "ocrnet.AuxHRNet"], capsys)[::2])
    assert "--arch is 'ocrnet.AuxHRNet'" in line and "lighthrnet.HRNet16" in line


@pytest.mark.parametrize("package,flags,extra", [("huggingface_hub", ["--push_to_hub", "me/hr16s"], '".[hub]"'),
                                                 ("safetensors", [], "pip install -e .")])
def test_a_missing_package_of_a_model_folder_is_named(tmp_path, capsys, monkeypatch, package, flags, extra):
    ckpt = project_checkpoint(tmp_path / "run", has_edge=False)
    monkeypatch.setitem(sys.modules, package, None)
    out = tmp_path / "hr16s"
    argv = ["--model_path", ckpt, "--format", "safetensors", "--output", out, *flags]
    line = one_error_line(*call_main(argv, capsys)[::2])
    assert f"needs the {package} package" in line and extra in line
    assert not out.exists()


def test_push_to_hub_needs_a_model_folder(tmp_path, capsys):
    ckpt = project_checkpoint(tmp_path / "run", has_edge=False)
    line = one_error_line(*call_main(small_export_argv(ckpt, tmp_path / "x.pt", "--push_to_hub", "me/x"), capsys)[::2])
    assert "--push_to_hub" in line and "--format safetensors" in line


def test_the_card_takes_the_metrics_of_the_checkpoint(tmp_path):
    ckpt = tmp_path / "best.pth"
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    assert tool.card_metrics(str(ckpt), {"iteration": 720})[0]["miou"] == 0.4156
    own = {**METRICS, "miou": 0.3, "iteration": 500}  # best.pth of an earlier validation than metrics.json's
    metrics, origin = tool.card_metrics(str(ckpt), {"iteration": 500, "metrics": own})
    assert metrics["miou"] == 0.3 and "stored in the checkpoint" in origin
    assert tool.card_metrics(str(ckpt), {"iteration": 500, "metrics": {}}) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"regressor_loss": 0.1}))  # not a segmentation run's
    assert tool.card_metrics(str(ckpt), {}) is None
    (tmp_path / "metrics.json").write_text("{")
    with pytest.raises(InvalidInputError, match=f"cannot read {tmp_path / 'metrics.json'}"):
        tool.card_metrics(str(ckpt), {})


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
