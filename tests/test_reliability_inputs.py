"""Inputs and outputs that must never fail silently or with a traceback: a full disk while PNGs
are written, configs that are malformed or blow up, output folders that cannot be made, infer
inputs with odd names, links and overlaps, file modes, non-finite edge maps, images too small for
the network, and resumes of NUS stages and ablation runs with changed settings."""
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from experiment.errors import NonFiniteOutputError, UserError
from utils.config import ConfigError, load_config, read_yaml
from utils.errors import UnreadableInputError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- PNGs on a full disk
def test_a_png_that_does_not_fit_on_the_disk_is_an_error_naming_it(tmp_path):
    """The file-size limit stands in for a full disk: the write fails when the PNG is flushed at
    its end, which cv2.imwrite reported as a success (a truncated or empty file was left)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from experiment.pictures import write_png
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
        label = np.zeros((64, 128), np.uint8)
        label[10:30, 20:90] = 7
        write_png(sys.argv[1], label)
    """)
    target = tmp_path / "out" / "a_labelIds.png"
    target.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"UnreadableInputError: [Errno 27] cannot write {target}: File too large" in proc.stderr
    assert list(target.parent.iterdir()) == []


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("text, message", [
    ("a: [1, 2\nb: 3\n", r"is not valid YAML: line 2, column 2: expected ',' or ']', but got ':'$"),
    ("_base_: 5\n", r"'_base_' must name a config file or a list of them, got int 5"),
    ("_base_: [null]\n", r"got list \[None\]"),
    ("_base_: [tiny.yaml, 7]\n", r"got list \['tiny.yaml', 7\]"),
    ("train:\n  epochs: &a [1, 2]\nx: *a\n", r"line 3, column 4: YAML aliases \(\*name\) are not accepted"),
])
def test_malformed_configs_are_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_yaml(path)
    assert len(str(info.value).splitlines()) == 1 and str(path) in str(info.value)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("train:\n  epochs: 1\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases"):
        read_yaml(path)


def test_a_huge_value_is_described_without_building_it():
    from experiment.config import ExperimentConfig

    huge = "[" + ",".join(["[" + ",".join(["1"] * 2000) + "]"] * 2000) + "]"  # 4 M numbers
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, [], [f"train.epochs={huge}"])
    assert "config key 'train.epochs': expected int, got list" in str(info.value)
    assert len(str(info.value)) < 200


# ----------------------------------------------------------------------------- output folders
def test_output_folders_that_cannot_be_made_are_named(tmp_path):
    from utils.io import make_dirs

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UnreadableInputError, match=f"cannot create output_dir {tmp_path / 'a_file' / 'run'}: "
                                                   "Not a directory"):
        make_dirs(tmp_path / "a_file" / "run")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(UnreadableInputError, match=f"output_dir {tmp_path / 'link'} is a symbolic link to "
                                                   f"{tmp_path / 'gone'}, which does not exist"):
        make_dirs(tmp_path / "link")


def test_reading_the_umask_leaves_it_alone():
    from utils.io import current_umask

    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # not reset in between
    finally:
        os.umask(previous)


def test_the_synthetic_dataset_and_its_caches_get_the_umask_mode(tmp_path):
    from datasets import Cityscapes
    from datasets.synthetic import generate

    previous = os.umask(0o022)
    try:
        root = generate(str(tmp_path / "data"), train=2, val=1, test=0, height=64, width=128, seed=0, progress=False)
        Cityscapes(root, "train", class_uniform_fraction=0.5, class_uniform_tile=32, progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    (cache,) = Path(root).glob("class_centroids_*.json")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o644


def test_synthetic_overwrite_replaces_only_a_synthetic_dataset(tmp_path):
    from datasets.synthetic import main

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    code = main(["--out", str(mine), "--train", "1", "--val", "1", "--test", "0", "--height", "64", "--width", "128",
                 "--overwrite", "--quiet"])
    assert code == 2 and (mine / "holiday.jpg").read_bytes() == b"precious"
    made = tmp_path / "synthetic"
    args = ["--out", str(made), "--train", "1", "--val", "1", "--test", "0", "--height", "64", "--width", "128",
            "--quiet"]
    assert main(args) == 0 and main(args + ["--overwrite", "--seed", "3"]) == 0


# ----------------------------------------------------------------------------- infer inputs
def test_list_files_keep_names_with_a_hash_and_folders_are_searched_once(tmp_path):
    from experiment.infer import check_outputs_free, find_images

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("img#1.png", "b.png", "c #2.png"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "sub" / "back")  # a loop
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\nimgs/img#1.png\nimgs/b.png   # trailing comment\nimgs/c \\#2.png\n")
    assert [rel for _, rel in find_images(str(listing))] == ["img#1.png", "b.png", "c #2.png"]
    found = [rel for _, rel in find_images(str(tmp_path / "imgs"))]
    assert found == ["b.png", "c #2.png", "img#1.png"]
    with pytest.raises(UserError, match="is inside --input"):
        check_outputs_free(str(tmp_path / "imgs" / "out"), find_images(str(tmp_path / "imgs")), False, False,
                           str(tmp_path / "imgs"))


# ----------------------------------------------------------------------------- validation outputs
def test_non_finite_edge_maps_fail_validation(tiny_cityscapes):
    from experiment.data import eval_loader, val_dataset
    from experiment.config import DataConfig
    from experiment.evaluation import evaluate

    class NaNEdges(torch.nn.Module):
        def forward(self, images):
            n, _, h, w = images.shape
            edge = torch.full((n, 1, h, w), 0.5)
            edge[0, 0, 0, 0] = float("nan")
            return {"pred": torch.zeros(n, 19, h, w), "edge_prob": edge}

    data = val_dataset(DataConfig(), tiny_cityscapes, "val", 2)
    with pytest.raises(NonFiniteOutputError, match="2 images of the validation have NaN or Inf logits or edge"):
        evaluate(NaNEdges(), eval_loader(data, 1, 0), torch.device("cpu"), progress=False)


def test_an_image_too_small_for_the_network_is_named(tiny_cityscapes, tmp_path):
    import cv2

    from experiment.config import DataConfig
    from experiment.data import eval_loader, val_dataset
    from experiment.evaluation import evaluate
    from models import get_net

    root = Path(shutil.copytree(tiny_cityscapes, tmp_path / "cityscapes"))
    image = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    name = image.name[:-len("_leftImg8bit.png")]
    label = root / "gtFine" / "val" / image.parent.name / f"{name}_gtFine_labelIds.png"
    cv2.imwrite(str(image), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(label), np.full((1, 1), 7, np.uint8))
    net = get_net("lighthrnet.HRNet16")
    data = val_dataset(DataConfig(), str(root), "val", 1)
    with pytest.raises(UserError, match=rf"image {name} \(1 x 1 pixels\) is too small for"):
        evaluate(net, eval_loader(data, 1, 0), torch.device("cpu"), progress=False)


# ----------------------------------------------------------------------------- resumes of the drivers
NUS_TINY = ["data.num_workers=0", "val.num_workers=0", "data.crop_size=64,64", "data.scale_range=1.0,1.0",
            "data.class_uniform_fraction=0", "model.arch=deeplabv3.MobileNetV2", "model.has_edge=false",
            "train.batch_size=2", "train.max_iters=2", "train.amp=off", "train.device=cpu", "val.batch_size=2",
            "nus.sampling_size=16,16", "nus.aux_steps=2", "nus.aux_batch_size=2", "nus.seg_width=0.35",
            "nus.val_crop=64,64", "nus.seeds=[]", "nus.processes=1", "nus.mode=uniform"]


def test_a_nus_run_resumes_only_with_its_own_settings(tiny_cityscapes, tmp_path, capsys):
    from experiment.train import main

    def run(*extra):
        args = ["--config", "configs/synthetic_nus.yaml", "--dataset_dir", tiny_cityscapes, "--output_dir",
                str(tmp_path / "nus")]
        for opt in NUS_TINY + list(extra):
            args += ["--opt", opt]
        main(args + (["--resume"] if extra else []))

    run()
    with pytest.raises(SystemExit):
        run("optim.lr=0.5")
    err = capsys.readouterr().err
    assert "cannot resume exactly from" in err and "optim.lr 0.05 -> 0.5" in err


def test_an_ablation_resume_refuses_finished_runs_of_other_settings(tiny_cityscapes, regressor, tmp_path, ctx):
    from experiment.comparisons.ablation import AblationExperimentConfig, run_ablation
    from experiment.methods import RunOptions

    def cfg(*extra):
        return load_config(AblationExperimentConfig, [], [
            f"output_dir={tmp_path}", f"data.dataset_dir={tiny_cityscapes}", "data.crop_size=[64,128]",
            "data.class_uniform_fraction=0.0", "data.num_workers=0", "model.arch=lighthrnet.HRNet16",
            f"loss.inverseform_path={regressor}", "loss.inverseform_tile_factor=1", "train.epochs=1",
            "train.max_iters=1", "train.batch_size=2", "train.val_interval=0", "train.image_interval=0",
            "train.device=cpu", "val.batch_size=2", "val.num_workers=0", "val.max_images=1",
            "ablation.variants=[ce]", "ablation.seeds=[0]", "ablation.figure_images=0", *extra])

    run_ablation(cfg(), ctx)
    before = json.loads((tmp_path / "ablation.json").read_text())
    # the base's learning rate is the fine-tunes': the base changed too, so they started from other weights
    with pytest.raises(UserError, match=r"ce/seed0 was trained with other settings \(optim.lr 0.01 -> 0.5, "
                                        r"model.init_checkpoint \(other starting weights\)\)"):
        run_ablation(cfg("optim.lr=0.5"), ctx, RunOptions(resume=True))
    assert json.loads((tmp_path / "ablation.json").read_text()) == before


# ----------------------------------------------------------------------------- model files, one loader
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a zip", b"\x80\x02}q\x00."])
def test_every_model_file_setting_reads_through_one_loader(tmp_path, content):
    """init_checkpoint, pretrained_backbone, nus.aux_checkpoint and infer's --model_path: an empty,
    truncated or foreign file is one line naming it; a folder that is no model folder too."""
    from experiment.config import ExperimentConfig
    from experiment.methods.nus import NUSExperimentConfig, load_aux_net
    from experiment.methods.segmentation import build_network
    from experiment.network import read_model_file
    from utils import dist

    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    ctx = dist.DistContext()
    for key in ("init_checkpoint", "pretrained_backbone"):
        cfg = load_config(ExperimentConfig, [], ["model.arch=lighthrnet.HRNet16", f"model.{key}={bad}"])
        with pytest.raises(UserError, match=f"cannot read checkpoint {bad}: ") as info:
            build_network(cfg, ctx)
        assert len(str(info.value).splitlines()) == 1
    with pytest.raises(UserError, match=f"cannot read checkpoint {bad}: "):
        load_aux_net(NUSExperimentConfig(), str(bad))
    with pytest.raises(UserError, match=f"model file {tmp_path} is a directory, not a checkpoint file or a model "
                                        "folder"):
        read_model_file(str(tmp_path))


def test_a_bug_keeps_its_traceback_while_input_errors_are_one_line(capsys):
    from experiment.cli import run_main

    def bug():
        return {}["missing"]  # a KeyError of the code, not of the user's input

    with pytest.raises(SystemExit) as info:
        run_main(bug)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "[rank 0] unexpected error:" in err and "Traceback" in err and "KeyError" in err

    def input_error():
        raise UserError("config key 'x': expected y")

    with pytest.raises(SystemExit):
        run_main(input_error)
    assert capsys.readouterr().err.strip() == "[rank 0] error: config key 'x': expected y"


def test_infer_stops_on_failures_that_are_not_about_one_image(tiny_cityscapes, tmp_path, monkeypatch):
    """An image too small for the network is reported and the others go on; any other failure of
    the forward (out of memory, a CUDA error, a bug) stops the run with its traceback."""
    import experiment.infer as infer
    from experiment.config import ExperimentConfig
    from models import get_net
    from utils import dist

    path = tmp_path / "model.pth"
    torch.save({"state_dict": get_net("lighthrnet.HRNet16").state_dict()}, path)
    images = tmp_path / "images"
    shutil.copytree(Path(tiny_cityscapes) / "leftImg8bit" / "val", images)

    def device_assert(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(infer, "predict", device_assert)
    cfg = load_config(ExperimentConfig, [], [f"output_dir={tmp_path / 'out'}", "model.arch=lighthrnet.HRNet16",
                                             "model.has_edge=false", "val.num_workers=0"])
    with pytest.raises(RuntimeError, match="device-side assert"):
        infer.run_inference(cfg, str(path), str(images), dist.DistContext(), progress=False)


def test_sigterm_stops_a_nus_stage_with_a_checkpoint(tiny_cityscapes, tmp_path):
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "nus"
    args = [sys.executable, "-m", "experiment.train", "--config", "configs/synthetic_nus.yaml", "--dataset_dir",
            tiny_cityscapes, "--output_dir", str(out)]
    for opt in NUS_TINY[:-1] + ["nus.mode=adaptive", "nus.aux_steps=400", "train.log_interval=1"]:
        args += ["--opt", opt]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "aux" / "train_log.jsonl"
    deadline = time.time() + 180
    while not (log.is_file() and log.stat().st_size) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = torch.load(out / "aux" / "last.pth", weights_only=True)["iteration"]
    assert f"stopped by SIGTERM after iteration {stopped} of 400" in err and 1 <= stopped < 400
