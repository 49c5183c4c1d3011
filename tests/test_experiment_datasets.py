"""Training, validation, the regressor, scribbles and infer on data that is not in the Cityscapes
layout: the synthetic scenes in the folder layout train exactly as in the Cityscapes layout; a
dataset with its own class table is named, coloured and written back in its own label ids; the
NYU-Depth-v2 configs train HRNet-18 with the InverseForm term on a small set in NYU's layout;
bad data is a one-line error naming the file."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets import ClassTable, synthetic
from experiment.config import ExperimentConfig
from experiment.methods import train
from experiment.methods.regressor import RegressorConfig, train_regressor
from experiment.run_config import load_run_config
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = {"data.crop_size": "[64, 128]", "data.scale_range": "[0.75, 1.0]", "data.class_uniform_fraction": 0.5,
            "data.num_workers": 0, "model.arch": "lighthrnet.HRNet16", "model.has_edge": "true",
            "loss.inverseform_tile_factor": 1, "optim.lr": 0.01, "optim.warmup_iters": 1, "train.max_iters": 3,
            "train.batch_size": 2, "train.log_interval": 1, "train.image_interval": 0, "train.val_interval": 0,
            "train.checkpoint_interval": 0, "train.device": "cpu", "train.amp": "off", "val.batch_size": 2,
            "val.num_workers": 0}


def config(out, regressor, **extra):
    values = {**TINY_RUN, "output_dir": out, "loss.inverseform_path": regressor, **extra}
    return load_config(ExperimentConfig, [], [f"{k}={v}" for k, v in values.items()])


def history(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_folder(tiny_cityscapes, tmp_path_factory):
    """The scenes of tiny_cityscapes in the folder layout."""
    params = synthetic.read_manifest(tiny_cityscapes)
    root = tmp_path_factory.mktemp("tiny_folder") / "folder"
    return synthetic.generate(str(root), progress=False, layout="folder", **{k: params[k] for k in synthetic.DEFAULTS})


# ----------------------------------------------------------------------------- the same scenes, two layouts
def test_folder_layout_trains_and_validates_exactly_like_the_cityscapes_layout(tiny_cityscapes, tiny_folder,
                                                                                 regressor, tmp_path, ctx):
    # a copy: class-uniform sampling writes its centroid cache into the dataset root
    tiny_cityscapes = shutil.copytree(tiny_cityscapes, tmp_path / "cityscapes")
    city, _ = train(config(tmp_path / "city", regressor, **{"data.dataset_dir": tiny_cityscapes}), ctx)
    folder, _ = train(config(tmp_path / "folder", regressor, **{"data.dataset": "folder",
                                                                "data.dataset_dir": tiny_folder}), ctx)
    assert history(tmp_path / "city") == history(tmp_path / "folder")  # every loss term of every step
    same = {k: v for k, v in city.items() if "seconds" not in k}
    assert same == {k: v for k, v in folder.items() if k in same}
    assert 0 <= folder["boundary_iou"] <= 1 and len(folder["per_class_boundary_iou"]) == 19
    saved = json.loads((tmp_path / "folder" / "metrics.json").read_text())
    assert saved["boundary_iou"] == pytest.approx(folder["boundary_iou"]) and saved["class_names"][0] == "road"
    # the synthetic folder layout stores train ids: its predictions are written as train ids
    for name in os.listdir(tmp_path / "folder" / "predictions" / "labelIds"):
        ours = cv2.imread(str(tmp_path / "folder" / "predictions" / "labelIds" / name), cv2.IMREAD_UNCHANGED)
        cityscapes = cv2.imread(str(tmp_path / "city" / "predictions" / "labelIds" / name), cv2.IMREAD_UNCHANGED)
        expected = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], np.uint8)
        assert np.array_equal(expected[ours], cityscapes)


# ----------------------------------------------------------------------------- a dataset of its own
TABLE = """names: [background, disc, bar]
colors: [[10, 20, 30], [200, 0, 0], [0, 0, 250]]
label_ids: [100, 7, 42]
ignore_label_ids: [0]
"""


def write_shapes(root, splits=(("train", 6), ("val", 3))):
    """Images of discs and bars on a background, their labels stored as 100 / 7 / 42 (0 = ignore)."""
    rng = np.random.default_rng(0)
    for split, count in splits:
        for kind in ("images", "labels"):
            os.makedirs(os.path.join(root, kind, split), exist_ok=True)
        for i in range(count):
            label = np.full((64, 96), 100, np.uint8)
            cv2.circle(label, (int(rng.integers(20, 76)), int(rng.integers(20, 44))), int(rng.integers(8, 16)), 7, -1)
            x = int(rng.integers(0, 80))
            label[:, x:x + 10] = 42
            label[:2] = 0
            colours = {100: (90, 90, 90), 7: (30, 30, 220), 42: (220, 220, 40), 0: (0, 0, 0)}
            image = np.zeros((64, 96, 3), np.uint8)
            for value, colour in colours.items():
                image[label == value] = colour
            image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(os.path.join(root, "images", split, f"shape_{i}.jpg"), image)
            cv2.imwrite(os.path.join(root, "labels", split, f"shape_{i}.png"), label)
    with open(os.path.join(root, "shapes.yaml"), "w") as f:
        f.write(TABLE)


def test_own_class_table_names_colours_and_label_ids_in_training_validation_and_infer(tmp_path, ctx):
    root = tmp_path / "shapes"
    write_shapes(str(root))
    data = {"data.dataset": "folder", "data.dataset_dir": root, "data.class_table": root / "shapes.yaml",
            "data.crop_size": "[48, 64]", "model.num_classes": 3, "loss.inverseform_path": "null",
            "val.dump_predictions": "true"}
    metrics, _ = train(config(tmp_path / "run", None, **data), ctx)
    assert metrics["class_names"] == ["background", "disc", "bar"] and metrics["num_images"] == 3
    assert len(metrics["per_class_iou"]) == len(metrics["per_class_boundary_iou"]) == 3
    colours = {(10, 20, 30), (200, 0, 0), (0, 0, 250)}
    for name in os.listdir(tmp_path / "run" / "predictions" / "labelIds"):
        ids = cv2.imread(str(tmp_path / "run" / "predictions" / "labelIds" / name), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(ids).tolist()) <= {100, 7, 42}
    for name in os.listdir(tmp_path / "run" / "predictions" / "color"):
        rgb = cv2.imread(str(tmp_path / "run" / "predictions" / "color" / name))[..., ::-1]
        assert {tuple(c) for c in np.unique(rgb.reshape(-1, 3), axis=0)} <= colours
    # infer reads the table the checkpoint records: the same label ids with no --class_table
    out = subprocess.run([sys.executable, "-m", "experiment.infer", "--model_path", str(tmp_path / "run" / "best.pth"),
                          "--input", str(root / "images" / "val"), "--output_dir", str(tmp_path / "infer"),
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for i in range(3):
        ids = cv2.imread(str(tmp_path / "infer" / f"shape_{i}_labelIds.png"), cv2.IMREAD_UNCHANGED)
        dumped = cv2.imread(str(tmp_path / "run" / "predictions" / "labelIds" / f"shape_{i}_labelIds.png"),
                            cv2.IMREAD_UNCHANGED)
        assert np.array_equal(ids, dumped)
    # validation with the same flags prints the table's names and Boundary IoU
    out = subprocess.run([sys.executable, "-m", "experiment.validation", "--model_path",
                          str(tmp_path / "run" / "best.pth"), "--dataset", "folder", "--dataset_dir", str(root),
                          "--class_table", str(root / "shapes.yaml"), "--output_dir", str(tmp_path / "val"),
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "  1  disc " in out.stdout and "Boundary IoU (0.02 diag)" in out.stdout
    validated = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert validated["miou"] == pytest.approx(metrics["miou"], abs=1e-12)
    assert validated["boundary_iou"] == pytest.approx(metrics["boundary_iou"], abs=1e-12)


def run_train(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CITYSCAPES_DATASET")}
    return subprocess.run([sys.executable, "-m", "experiment.train", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_data_is_a_one_line_error_naming_the_file(tmp_path):
    root = tmp_path / "shapes"
    write_shapes(str(root), splits=(("train", 2), ("val", 1)))
    def command(table, *opts):
        return ["--config", "configs/synthetic_folder.yaml", "--dataset_dir", root, "--class_table", table,
                "--opt", "model.num_classes=3", "loss.inv_weight=0", "train.max_iters=1", "train.batch_size=2",
                "data.crop_size=[48,64]", "data.num_workers=0", "val.num_workers=0", *opts]

    table = root / "shapes.yaml"
    label = root / "labels" / "val" / "shape_0.png"
    stored = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    stored[5, 5] = 9
    cv2.imwrite(str(label), stored)
    cases = [(command(table), rf"{label}: values \[9\] are not in the class table {table}"),
             (command(table, "model.num_classes=19"), r"'model.num_classes' is 19 but the folder dataset .* has 3 classes"),
             (command(tmp_path / "none.yaml"), r"none\.yaml does not exist")]
    for i, (args, message) in enumerate(cases):
        out = run_train(args + ["--output_dir", tmp_path / f"run{i}"])
        lines = [line for line in out.stderr.splitlines() if "error" in line]
        assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert re.search(message, lines[0]), lines[0]
    os.remove(root / "labels" / "train" / "shape_1.png")
    out = run_train(command(table) + ["--output_dir", tmp_path / "missing"])
    assert out.returncode != 0 and "Traceback" not in out.stderr and "shape_1" in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------------------------- NYU-Depth-v2
def write_nyu(root, train_ids=(1, 2, 3, 4), test_ids=(5, 6), size=(96, 128)):
    """A small NYUv2-40 in its layout: frames with a floor, a wall and a few boxes of other classes."""
    rng = np.random.default_rng(1)
    os.makedirs(os.path.join(root, "RGB"))
    os.makedirs(os.path.join(root, "Label"))
    for i in train_ids + test_ids:
        label = np.full(size, 1, np.uint8)
        label[size[0] * 2 // 3:] = 2
        for value in rng.choice(np.arange(3, 41), 4, replace=False):
            y, x = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
            label[y:y + 20, x:x + 24] = value
        label[:, :3] = 0
        image = ClassTable.from_yaml(ROOT / "configs" / "classes" / "nyu40.yaml").colorize(
            np.where(label == 0, 255, label.astype(np.int64) - 1).astype(np.uint8))
        cv2.imwrite(os.path.join(root, "RGB", f"{i}.jpg"), image[..., ::-1])
        cv2.imwrite(os.path.join(root, "Label", f"{i}.png"), label)
    for split, ids in (("train", train_ids), ("test", test_ids)):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("".join(f"RGB/{i}.jpg\tLabel/{i}.png\n" for i in ids))


def test_nyu_configs_train_hrnet18_with_a_regressor_of_nyu_boundaries(tmp_path, ctx):
    root = tmp_path / "NYUDepthv2"
    write_nyu(str(root))
    small = [f"output_dir={tmp_path / 'run'}", f"data.dataset_dir={root}", "data.crop_size=[96,128]",
             "data.num_workers=0", "model.pretrained_backbone=null", "model.sync_bn=false", "train.max_iters=2",
             "train.batch_size=2", "train.device=cpu", "train.amp=off", "train.val_interval=0",
             "train.image_interval=0", "val.num_workers=0", f"loss.inverseform_path={tmp_path / 'regressor_nyu.pth'}"]
    cfg = load_run_config([str(ROOT / "configs" / "nyu_hrnet18_if.yaml")], small)
    assert cfg.model.num_classes == 40 and cfg.loss.inverseform_tile_grid == [3, 4] and cfg.data.val_split == "test"
    # the regressor its config trains on NYU boundaries, tiles cut 3 x 4 as the term cuts them
    reg = load_run_config([str(ROOT / "configs" / "regressor_nyu.yaml")],
                          [f"output_dir={tmp_path / 'reg'}", f"output_path={tmp_path / 'regressor_nyu.pth'}",
                           f"data.dataset_dir={root}", "data.crop_size=[96,128]", "data.num_workers=0",
                           "model.tile_size=32", "model.hidden=[64,16]", "train.steps=2", "train.images_per_batch=2",
                           "train.eval_images=2", "train.device=cpu", "train.checkpoint_interval=0"],
                          schema=RegressorConfig)
    train_regressor(reg, ctx)
    metrics, net = train(cfg, ctx)
    assert metrics["num_images"] == 2 and len(metrics["per_class_boundary_iou"]) == 40
    assert metrics["class_names"][23] == "refridgerator" and net.num_classes == 40
    assert "inverseform" in history(tmp_path / "run")[-1]
    assert load_run_config([str(ROOT / "configs" / "nyu_hrnet18.yaml")], []).loss.inv_weight == 0


def test_scribble_training_on_the_folder_layout_equals_the_cityscapes_layout(tiny_cityscapes, tiny_folder, tmp_path,
                                                                             ctx):
    common = {"method": "weak", "model.has_edge": "false", "weak.min_area": 10, "weak.densecrf.weight": 1e-3,
              "weak.densecrf.sigma_xy": 20, "train.max_iters": 2,
              "val.max_images": 2, "val.dump_predictions": "false"}
    tiny_cityscapes = shutil.copytree(tiny_cityscapes, tmp_path / "cityscapes")  # class-uniform writes a cache there
    runs = {}
    for name, data in (("city", {"data.dataset_dir": tiny_cityscapes}),
                       ("folder", {"data.dataset": "folder", "data.dataset_dir": tiny_folder})):
        values = {**TINY_RUN, **common, **data, "output_dir": tmp_path / name}
        cfg = load_run_config([], [f"{k}={v}" for k, v in values.items()])
        runs[name], _ = train(cfg, ctx)
    assert history(tmp_path / "city") == history(tmp_path / "folder")
    assert "densecrf" in history(tmp_path / "folder")[-1] and "pce" in history(tmp_path / "folder")[-1]
    assert runs["city"]["miou"] == runs["folder"]["miou"]
    assert runs["city"]["boundary_iou"] == runs["folder"]["boundary_iou"]


def test_a_small_training_split_is_decoded_once_and_a_large_one_is_read_from_its_files(tiny_folder, monkeypatch,
                                                                                        caplog):
    from experiment import data

    cfg = config("unused", "unused", **{"data.dataset": "folder", "data.dataset_dir": tiny_folder,
                                        "data.class_uniform_fraction": 0}).data  # no centroid cache in the root
    with caplog.at_level("INFO", logger="experiment"):
        small = data.train_dataset(cfg, tiny_folder, seed=0)
    assert not small.read_item(0)[0].flags.writeable
    assert re.search(rf"keeping the {len(small.items)} decoded training images in memory", caplog.text)
    monkeypatch.setattr(data, "KEEP_DECODED_BYTES", 1)
    assert data.train_dataset(cfg, tiny_folder, seed=0).read_item(0)[0].flags.writeable
