"""experiment/validation.py: distributed equality, the official evaluator as oracle, exact metrics
for a perfect model, the has_edge toggle, and clear errors with non-zero exits."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from datasets import labelid_to_trainid
from experiment.evaluation import evaluate
from synthetic_weights import synthetic_state_dict

ROOT = Path(__file__).resolve().parents[1]
ARCH = "lighthrnet.HRNet16"


def run_cli(args, nproc=1, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CITYSCAPES_DATASET")}
    env["OMP_NUM_THREADS"] = "1"
    if nproc == 1:
        cmd = [sys.executable, "-m", "experiment.validation"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "experiment" / "validation.py")]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def edge_checkpoint(tmp_path_factory):
    """HRNet-16-Slim with an edge head and seeded O(1) weights (varied predictions), saved as the
    released files are: {'state_dict': ...} with DDP's 'module.' prefix."""
    net = models.get_net(ARCH, has_edge=True)
    weights = synthetic_state_dict(net.state_dict(), seed=7)
    path = tmp_path_factory.mktemp("ckpt") / "hr16s_edge.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    return path


def cli_args(root, out, checkpoint, *extra):
    return ["--output_dir", out, "--model_path", checkpoint, "--arch", ARCH, "--hrnet_base", 16,
            "--dataset_dir", root, "--num_workers", 0, "--batch_size", 1, *extra]


@pytest.fixture(scope="module")
def single_run(tiny_cityscapes, edge_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("val1")
    proc = run_cli(cli_args(tiny_cityscapes, out, edge_checkpoint, "--has_edge", "True", "--dump_predictions"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def load_metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def test_single_process_outputs(single_run):
    out, proc = single_run
    m = load_metrics(out)
    for key in ("miou", "pixel_acc", "mean_class_acc", "fwiou", "mba", "boundary_f"):
        assert 0.0 <= m[key] <= 1.0, key
    assert len(m["per_class_iou"]) == 19 and m["num_images"] == 4
    assert set(m["val_loss_parts"]) == {"seg", "edge_bce", "edge_att"}  # no regressor file: no InverseForm term
    assert "InverseForm term is left out" in proc.stdout + proc.stderr
    assert "mIoU" in proc.stdout and "traffic light" in proc.stdout  # the table
    for sub in ("color", "labelIds", "edges"):
        assert len(list((Path(out) / "predictions" / sub).glob("*.png"))) == 4
    assert list((Path(out) / "tensorboard").glob("events.out.tfevents.*"))


def test_two_processes_give_identical_metrics(single_run, tiny_cityscapes, edge_checkpoint, tmp_path):
    out1, _ = single_run
    proc = run_cli(cli_args(tiny_cityscapes, tmp_path, edge_checkpoint, "--has_edge", "True"), nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m1, m2 = load_metrics(out1), load_metrics(tmp_path)
    assert m2["world_size"] == 2 and m2["num_images"] == m1["num_images"] == 4
    for key in ("miou", "per_class_iou", "pixel_acc", "mean_class_acc", "fwiou", "mba", "boundary_f",
                "per_class_boundary_f", "majority_class_miou", "boundary_iou", "per_class_boundary_iou"):
        assert m1[key] == m2[key], key
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-9)


def test_miou_equals_official_evaluator(single_run, tiny_cityscapes):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    out, _ = single_run
    pred_dir = Path(out) / "predictions" / "labelIds"
    gts = sorted(glob.glob(os.path.join(tiny_cityscapes, "gtFine", "val", "*", "*_gtFine_labelIds.png")))
    args = ev.args
    args.predictionPath, args.predictionWalk = str(pred_dir), None
    args.evalInstLevelScore, args.quiet, args.JSONOutput = False, True, False
    args.exportFile = str(Path(out) / "official.json")
    preds = [ev.getPrediction(args, gt) for gt in gts]
    result = ev.evaluateImgLists(preds, gts, args)
    assert load_metrics(out)["miou"] == pytest.approx(result["averageScoreClasses"], abs=1e-9)
    # And the dumped labelIds really are our predictions mapped to official ids.
    for pred, gt in zip(preds, gts):
        trainids = labelid_to_trainid(cv2.imread(pred, cv2.IMREAD_UNCHANGED))
        assert trainids.shape == cv2.imread(gt, cv2.IMREAD_UNCHANGED).shape and trainids.max() < 19


def test_boundary_iou_equals_the_opencv_oracle_on_the_dumped_predictions(single_run, tiny_cityscapes):
    from test_utils_boundary_iou import oracle_counts, reference_dilation

    out, _ = single_run
    preds, gts = [], []
    for gt in sorted(glob.glob(os.path.join(tiny_cityscapes, "gtFine", "val", "*", "*_gtFine_labelIds.png"))):
        name = os.path.basename(gt).replace("_gtFine_labelIds.png", "_labelIds.png")
        preds.append(labelid_to_trainid(cv2.imread(str(Path(out) / "predictions" / "labelIds" / name),
                                                   cv2.IMREAD_UNCHANGED)))
        gts.append(labelid_to_trainid(cv2.imread(gt, cv2.IMREAD_UNCHANGED)))
    counts = oracle_counts(np.stack(preds), np.stack(gts), 19, reference_dilation(*gts[0].shape, 0.02))
    expected = [i / u if u else None for i, u in counts]
    m = load_metrics(out)
    assert m["per_class_boundary_iou"] == pytest.approx(expected, abs=1e-12)
    assert m["boundary_iou"] == pytest.approx(np.mean([v for v in expected if v is not None]), abs=1e-12)


def test_has_edge_off_gives_same_predictions(single_run, tiny_cityscapes, edge_checkpoint, tmp_path):
    out1, _ = single_run
    proc = run_cli(cli_args(tiny_cityscapes, tmp_path, edge_checkpoint, "--has_edge", "False", "--dump_predictions"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "edge" in proc.stdout + proc.stderr and "dropped" in (proc.stdout + proc.stderr).lower()
    m1, m2 = load_metrics(out1), load_metrics(tmp_path)
    for key in ("miou", "per_class_iou", "pixel_acc", "mba", "boundary_f", "boundary_iou"):
        assert m1[key] == m2[key], key
    for a in sorted((Path(out1) / "predictions" / "labelIds").glob("*.png")):
        b = Path(tmp_path) / "predictions" / "labelIds" / a.name
        assert a.read_bytes() == b.read_bytes()
    assert not (Path(tmp_path) / "predictions" / "edges").exists()
    assert set(m2["val_loss_parts"]) == {"seg"}


class OracleNet(torch.nn.Module):
    """Reads the label back from the image (channel 0 holds trainId / 100): a perfect model."""

    def forward(self, images):
        label = torch.round(images[:, 0] * 100).long().clamp(0, 18)
        return {"pred": torch.nn.functional.one_hot(label, 19).permute(0, 3, 1, 2).float() * 10}


class LabelImages(torch.utils.data.Dataset):
    def __init__(self, root):
        from datasets import Cityscapes

        self.base = Cityscapes(root, "val")

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        s = self.base[i]
        s["image"] = torch.stack([s["label"].clamp(0, 18).float() / 100] * 3)
        return s


def test_perfect_model_scores_one(tiny_cityscapes):
    from experiment.data import eval_loader

    loader = eval_loader(LabelImages(tiny_cityscapes), batch_size=2, num_workers=0)
    m = evaluate(OracleNet(), loader, torch.device("cpu"), progress=False)
    assert m["miou"] == 1.0 and m["pixel_acc"] == 1.0 and m["mean_class_acc"] == 1.0
    assert m["mba"] == 1.0 and m["boundary_f"] == 1.0 and m["boundary_iou"] == 1.0
    assert m["num_images"] == 4 and m["majority_class_miou"] < 0.1


@pytest.mark.parametrize("case", ["missing", "wrong_arch", "empty_split"])
def test_errors_exit_nonzero_with_message(case, tiny_cityscapes, edge_checkpoint, tmp_path):
    root, ckpt, extra = tiny_cityscapes, edge_checkpoint, []
    if case == "missing":
        ckpt, expected = tmp_path / "nope.pth", "nope.pth does not exist"
    elif case == "wrong_arch":
        extra, expected = ["--opt", "model.arch=ocrnet.AuxHRNet"], "hrhead.last_layer"
    else:
        root = tmp_path / "empty"
        (root / "leftImg8bit" / "val" / "x").mkdir(parents=True)
        (root / "gtFine" / "val" / "x").mkdir(parents=True)
        expected = "holds no images"
    args = cli_args(root, tmp_path / "out", ckpt, "--has_edge", "True", *extra)
    if case == "wrong_arch":  # --arch on the command line wins over --opt: drop it
        i = args.index("--arch")
        del args[i:i + 2]
        args[args.index("--hrnet_base") + 1] = 18
    proc = run_cli(args)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_released_file_reported_once_with_its_url_without_hang(tiny_cityscapes, tmp_path):
    """An error of the arguments alone is the same on every rank: rank 0 names the file and where
    to download it (checkpoints/README.md), the other ranks exit quietly with the same code."""
    from experiment.paths import RELEASE_URL

    missing = tmp_path / "hrnet18_IF_checkpoint.pth"
    proc = run_cli(cli_args(tiny_cityscapes, tmp_path / "out", missing, "--has_edge", "True"), nproc=2, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "ChildFailedError" not in line]
    assert errors == [f"[rank 0] error: model file {missing} does not exist; it is a released file: download it "
                      f"from {RELEASE_URL} (see checkpoints/README.md)"], proc.stderr
    assert "[rank 1]" not in proc.stderr and "Traceback (most recent call last)" not in proc.stdout


def test_error_after_start_still_reported_by_every_rank(tiny_cityscapes, tmp_path):
    """A failure after the start, which may differ between ranks (here: a checkpoint that does not
    fit the model), is still reported by each rank, never hidden behind rank 0."""
    bad = tmp_path / "other_model.pth"
    torch.save({"state_dict": models.get_net(ARCH, has_edge=False).state_dict()}, bad)
    proc = run_cli(cli_args(tiny_cityscapes, tmp_path / "out", bad, "--has_edge", "True"), nproc=2, timeout=120)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] error:" in proc.stderr, proc.stderr


def test_a_model_folder_validates_like_its_checkpoint(tiny_cityscapes, edge_checkpoint, tmp_path):
    """tools/export.py --format safetensors writes a model folder; validation takes it as --model_path
    and reports the checkpoint's metrics exactly."""
    from models import save_pretrained
    from datasets import TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES

    net = models.get_net(ARCH, has_edge=True)
    models.load_checkpoint(net, str(edge_checkpoint))
    folder = tmp_path / "model"
    save_pretrained(net, folder, {"class_names": list(TRAIN_CLASS_NAMES),
                                  "class_colors": [list(c) for c in TRAIN_CLASS_COLORS]})
    runs = {}
    for name, path, flags in (("pth", edge_checkpoint, ["--arch", ARCH, "--hrnet_base", 16, "--has_edge", "True"]),
                              ("folder", folder, [])):
        proc = run_cli(["--output_dir", tmp_path / name, "--model_path", path, "--dataset_dir", tiny_cityscapes,
                        "--num_workers", 0, "--max_images", 2, *flags])
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = load_metrics(tmp_path / name)
    keys = ("miou", "mba", "boundary_f", "edge_f", "per_class_iou", "val_loss")
    assert {k: runs["folder"].get(k) for k in keys} == {k: runs["pth"].get(k) for k in keys}
    assert runs["folder"]["arch"] == ARCH and runs["folder"]["has_edge"] is True
