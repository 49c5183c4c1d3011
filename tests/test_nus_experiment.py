"""The NUS experiment end to end on a tiny synthetic Cityscapes (experiment/nus.py via experiment.train)."""
import json
import os
import time

import pytest
import scipy.stats
import torch

from experiment.methods.nus import NUSExperimentConfig
from experiment.train import main
from utils.config import ConfigError, load_config

TINY = ["data.num_workers=0", "val.num_workers=0", "data.crop_size=64,64", "data.scale_range=1.0,1.0",
        "data.class_uniform_fraction=0", "model.arch=deeplabv3.MobileNetV2", "model.has_edge=false",
        "train.batch_size=2", "train.max_iters=2", "train.amp=off", "train.device=cpu", "val.batch_size=2",
        "nus.sampling_size=16,16", "nus.aux_steps=2", "nus.aux_batch_size=2", "nus.seg_width=0.35",
        "nus.val_crop=64,64", "nus.seeds=[]", "nus.processes=1"]


def run(tiny_cityscapes, out, *extra):
    args = ["--config", "configs/synthetic_nus.yaml", "--dataset_dir", tiny_cityscapes, "--output_dir", str(out)]
    for opt in TINY + [e for e in extra if not e.startswith("--")]:
        args += ["--opt", opt]
    main(args + [e for e in extra if e.startswith("--")])


def test_compare_writes_results_table_picture_and_resumes(tiny_cityscapes, tmp_path, capsys):
    out = tmp_path / "nus"
    run(tiny_cityscapes, out)
    printed = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    for key in ("uniform_miou", "adaptive_miou"):
        assert 0.0 <= result[key] <= 1.0
    assert result["sampling_size"] == [16, 16] and result["val_crop"] == [64, 64]
    assert result["flops"]["aux_mflops"] > 0 and result["flops"]["seg_mflops"]["16x16"] > 0
    row = result["rows"][0]
    assert row["adaptive_mflops"] == pytest.approx(row["uniform_mflops"] + result["flops"]["aux_mflops"])
    assert "sampling size" in printed and "auxiliary net" in printed and "adaptive" in printed
    assert os.path.getsize(out / "sampling_grid.png") > 0
    assert (out / "aux" / "aux_net.pth").is_file()
    for stage in ("aux", "uniform_16x16", "adaptive_16x16"):
        state = torch.load(out / stage / "last.pth", map_location="cpu", weights_only=True)
        assert state["iteration"] == state["total_iterations"] == 2
    # --resume skips the finished stages (checkpoints untouched) and gives the same numbers.
    stamps = {s: os.path.getmtime(out / s / "last.pth") for s in ("aux", "uniform_16x16", "adaptive_16x16")}
    time.sleep(0.05)
    run(tiny_cityscapes, out, "--resume")
    resumed = json.loads((out / "comparison.json").read_text())
    assert resumed["uniform_miou"] == pytest.approx(result["uniform_miou"])
    assert resumed["adaptive_miou"] == pytest.approx(result["adaptive_miou"])
    assert stamps == {s: os.path.getmtime(out / s / "last.pth") for s in stamps}


def test_uniform_mode_trains_no_auxiliary_net(tiny_cityscapes, tmp_path):
    out = tmp_path / "uniform"
    run(tiny_cityscapes, out, "nus.mode=uniform")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "uniform_miou" in metrics and "adaptive_miou" not in metrics
    assert not (out / "aux").exists()


def test_bad_nus_settings_are_named():
    with pytest.raises(ConfigError, match="nus.mode"):
        load_config(NUSExperimentConfig, ["configs/synthetic_nus.yaml"], ["nus.mode=fancy"])
    with pytest.raises(ConfigError, match="nus.aux_input_size"):
        load_config(NUSExperimentConfig, ["configs/synthetic_nus.yaml"], ["nus.aux_input_size=60"])
    with pytest.raises(ConfigError, match="nus.gather"):
        load_config(NUSExperimentConfig, ["configs/synthetic_nus.yaml"], ["nus.gather=cubic"])


def test_missing_aux_checkpoint_is_one_clear_error(tiny_cityscapes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_cityscapes, tmp_path / "x", "nus.aux_checkpoint=/nonexistent/aux.pth")
    assert exit_info.value.code != 0
    assert "nus.aux_checkpoint" in capsys.readouterr().err


def test_seeds_in_child_processes_equal_in_process_and_report_the_mean(tiny_cityscapes, tmp_path, capsys):
    """nus.seeds runs the comparison once per seed and reports the mean; two child processes at
    once give the same numbers as the seeds one after the other in this process."""
    run(tiny_cityscapes, tmp_path / "serial", "nus.seeds=[0,1]", "nus.processes=1")
    run(tiny_cityscapes, tmp_path / "parallel", "nus.seeds=[0,1]", "nus.processes=2")
    printed = capsys.readouterr().out
    assert "mean over seeds [0, 1]" in printed and "adaptive - uniform" in printed
    serial = json.loads((tmp_path / "serial" / "comparison.json").read_text())
    parallel = json.loads((tmp_path / "parallel" / "comparison.json").read_text())
    per_seed = [json.loads((tmp_path / "parallel" / f"seed{s}" / "comparison.json").read_text()) for s in (0, 1)]
    for key in ("uniform_miou", "adaptive_miou"):
        assert parallel[key] == pytest.approx(serial[key], abs=1e-6)
        assert parallel[key] == pytest.approx(sum(r[key] for r in per_seed) / 2)
    assert parallel["margin_points"] == pytest.approx(
        100 * sum(r["adaptive_miou"] - r["uniform_miou"] for r in per_seed) / 2)
    assert parallel["seeds"] == [0, 1] and set(parallel["per_seed"]) == {"0", "1"}
    margins = [100 * (r["adaptive_miou"] - r["uniform_miou"]) for r in per_seed]
    interval = scipy.stats.ttest_1samp(margins, 0.0).confidence_interval(0.95)
    ci = parallel["margin_points_ci"]
    assert (ci["ci_low"], ci["ci_high"]) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert "% CI [" in printed and "(paired t, 2 seeds)" in printed
    assert (tmp_path / "parallel" / "seed1" / "console.txt").stat().st_size > 0
    assert os.path.getsize(tmp_path / "parallel" / "sampling_grid.png") > 0
