"""Reliability of validation: the loss does not depend on batch size or world size
(nor lose its breakdown on an empty shard), NaN/Inf logits and weights are refused, bad
files are one-line errors, and validation never writes into another run's directory."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from experiment import validation
from experiment.config import LossConfig
from experiment.data import eval_loader, val_dataset
from experiment.config import DataConfig
from experiment.joint_loss import joint_loss
from experiment.errors import NonFiniteOutputError
from experiment.evaluation import evaluate
from inverseform import InverseFormLoss, InverseNet
from synthetic_weights import synthetic_state_dict
from utils import dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
ARCH = "lighthrnet.HRNet16"


@pytest.fixture(scope="module")
def net():
    model = models.get_net(ARCH, has_edge=True)
    model.load_state_dict(synthetic_state_dict(model.state_dict(), seed=7))
    return model.eval()


@pytest.fixture(scope="module")
def criterion():
    torch.manual_seed(0)
    inverseform = InverseFormLoss(InverseNet(tile_size=32, num_params=4, hidden=(64, 16)), tile_factor=1,
                                  check_inputs=False)
    return joint_loss(LossConfig(), 19, inverseform)


@pytest.fixture
def no_dist(monkeypatch):
    for key in dist.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def run_evaluate(net, criterion, root, batch_size, max_images=None):
    data = val_dataset(DataConfig(dataset_dir=root), root, "val", max_images)
    return evaluate(net, eval_loader(data, batch_size, 0), torch.device("cpu"), criterion=criterion, progress=False)


def test_validation_loss_does_not_depend_on_the_batch_size(net, criterion, tiny_cityscapes, no_dist):
    one, four = (run_evaluate(net, criterion, tiny_cityscapes, b, max_images=3) for b in (1, 3))
    assert one["num_images"] == four["num_images"] == 3
    assert set(one["val_loss_parts"]) == {"seg", "edge_bce", "edge_att", "inverseform"}
    assert math.isclose(one["val_loss"], four["val_loss"], rel_tol=1e-5), (one["val_loss"], four["val_loss"])
    for key, value in one["val_loss_parts"].items():
        assert math.isclose(value, four["val_loss_parts"][key], rel_tol=1e-5), key
    # the total is the weighted sum of its parts, per image (weights 1, 0.3, 0.1, 0.3)
    p = one["val_loss_parts"]
    expected = p["seg"] + 0.3 * p["edge_bce"] + 0.1 * p["edge_att"] + 0.3 * p["inverseform"]
    assert math.isclose(one["val_loss"], expected, rel_tol=1e-5)


def test_validation_loss_does_not_depend_on_the_world_size_or_an_empty_shard(net, criterion, tiny_cityscapes,
                                                                             tmp_path, no_dist):
    weights = tmp_path / "weights.pth"
    torch.save(net.state_dict(), weights)
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPTS / "eval_ranks.py"), str(tmp_path), str(weights), str(tiny_cityscapes)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single_all = run_evaluate(net, criterion, tiny_cityscapes, 1)
    single_one = run_evaluate(net, criterion, tiny_cityscapes, 1, max_images=1)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, single in (("all", single_all), ("one", single_one)):  # "one": rank 0's shard is empty
            assert got[key]["num_images"] == single["num_images"]
            assert math.isclose(got[key]["val_loss"], single["val_loss"], rel_tol=1e-5)
            assert got[key]["val_loss_parts"].keys() == single["val_loss_parts"].keys()
            for part, value in single["val_loss_parts"].items():
                assert math.isclose(got[key]["val_loss_parts"][part], value, rel_tol=1e-5), (key, part)


class NaNLogits(torch.nn.Module):
    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[2:])
        logits[0, 3, 0, 0] = float("nan")
        return {"pred": logits}


def test_non_finite_logits_fail_the_evaluation(tiny_cityscapes, no_dist):
    data = val_dataset(DataConfig(dataset_dir=tiny_cityscapes), tiny_cityscapes, "val", 2)
    with pytest.raises(NonFiniteOutputError, match="2 images of the validation have NaN or Inf logits"):
        evaluate(NaNLogits(), eval_loader(data, 1, 0), torch.device("cpu"), progress=False)
    with pytest.raises(NonFiniteOutputError, match="fp16 autocast overflowed"):
        evaluate(NaNLogits(), eval_loader(data, 1, 0), torch.device("cpu"), progress=False, amp_dtype=torch.float16)


# ----------------------------------------------------------------------------- the command
def cli(root, out, checkpoint, *extra):
    return ["--model_path", str(checkpoint), "--arch", ARCH, "--hrnet_base", "16", "--has_edge", "True",
            "--dataset_dir", str(root), "--num_workers", "0", "--batch_size", "1", "--max_images", "1",
            "--inverseform_path", "none", *(["--output_dir", str(out)] if out else []), *map(str, extra)]


def run_validation(args, capsys):
    try:
        validation.main(args)
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err.strip()
    return 0, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def checkpoint(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hr16s.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    return path


def test_non_finite_weights_and_unreadable_files_are_one_line_errors(checkpoint, tiny_cityscapes, tmp_path,
                                                                    no_dist, capsys):
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    torch.save({"state_dict": state}, tmp_path / "nan.pth")
    code, err = run_validation(cli(tiny_cityscapes, tmp_path / "a", tmp_path / "nan.pth"), capsys)
    assert code == 1 and err == f"[rank 0] error: checkpoint {tmp_path / 'nan.pth'} cannot be evaluated: " \
                                f"tensor '{key}' holds NaN or Inf"
    (tmp_path / "empty.pth").write_bytes(b"")
    code, err = run_validation(cli(tiny_cityscapes, tmp_path / "b", tmp_path / "empty.pth"), capsys)
    assert code == 1 and err.endswith(f"cannot read checkpoint {tmp_path / 'empty.pth'}: the file is empty (0 bytes)")
    assert len(err.splitlines()) == 1
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
    code, err = run_validation(cli(tiny_cityscapes, tmp_path / "c", tmp_path / "junk.pth"), capsys)
    assert code == 1 and f"cannot read checkpoint {tmp_path / 'junk.pth'}: " in err and len(err.splitlines()) == 1


def test_a_corrupt_image_is_named_in_one_line(checkpoint, tiny_cityscapes, tmp_path, no_dist, capsys):
    root = Path(shutil.copytree(tiny_cityscapes, tmp_path / "cityscapes"))
    image = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:100])  # truncated
    args = cli(root, tmp_path / "out", checkpoint)
    args[args.index("--num_workers") + 1] = "1"  # the error crosses a DataLoader worker
    code, err = run_validation(args, capsys)
    assert code == 1 and "Traceback" not in err  # (the progress bar may precede the line)
    assert err.endswith(f"[rank 0] error: cannot read image file {image}: unreadable, truncated or not an image")


def test_validation_has_its_own_output_dir_and_replaces_nothing_silently(checkpoint, tiny_cityscapes, tmp_path,
                                                                         no_dist, capsys, monkeypatch):
    run_config = tmp_path / "run.yaml"
    run_config.write_text(f"output_dir: {tmp_path / 'training_run'}\n")
    args = validation.build_parser().parse_args(cli(tiny_cityscapes, None, checkpoint) + ["--config", str(run_config)])
    assert validation.config_from_args(args).output_dir == os.path.join("runs", "validation", "hr16s")

    training_run = tmp_path / "training_run"
    training_run.mkdir()
    (training_run / "last.pth").write_bytes(b"x")
    code, err = run_validation(cli(tiny_cityscapes, training_run, checkpoint), capsys)
    assert code == 1 and "holds a training run (last.pth)" in err and "its own --output_dir" in err
    assert not (training_run / "metrics.json").exists() and not (training_run / "tensorboard").exists()

    out = tmp_path / "val"
    assert run_validation(cli(tiny_cityscapes, out, checkpoint), capsys)[0] == 0
    first = (out / "metrics.json").read_bytes()
    code, err = run_validation(cli(tiny_cityscapes, out, checkpoint), capsys)
    assert code == 1 and "already holds the outputs of an earlier run (metrics.json)" in err
    assert run_validation(cli(tiny_cityscapes, out, checkpoint, "--overwrite"), capsys)[0] == 0
    (moved,) = out.glob("replaced-*")
    assert (moved / "metrics.json").read_bytes() == first and (moved / "tensorboard").is_dir()
    assert len(list((out / "tensorboard").iterdir())) == 1  # the new run's events alone


def test_max_images_below_one_is_refused(checkpoint, tiny_cityscapes, tmp_path, no_dist, capsys):
    args = cli(tiny_cityscapes, tmp_path / "out", checkpoint)
    args[args.index("--max_images") + 1] = "0"
    code, err = run_validation(args, capsys)
    assert code == 2 and "'val.max_images' (--max_images) must be >= 1, got 0" in err
