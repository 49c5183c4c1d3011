"""tools/regressor_by_orientation.py: the coherence of tiles whose answer is known exactly, and the
tool end to end on a briefly trained regressor (its 'all' line is the run's own report)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.regressor_by_orientation import coherence  # noqa: E402


def test_one_orientation_is_1_two_equal_ones_0_an_empty_tile_0():
    tiles = torch.zeros(4, 1, 32, 32)
    tiles[0, 0, :, 10:13] = 1.0                      # a vertical band across the tile
    tiles[1, 0, 20:22, :] = 1.0                      # a horizontal one
    tiles[2, 0, :, 14:18] = 1.0                      # a centred cross of equal arms
    tiles[2, 0, 14:18, :] = 1.0
    c = coherence(tiles)
    assert c[0].item() == 1.0 and c[1].item() == 1.0
    assert abs(c[2].item()) < 1e-12
    assert c[3].item() == 0.0


def test_a_diagonal_line_is_more_coherent_than_a_ring():
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    diagonal = ((xx - yy).abs() <= 1).float()
    ring = (((xx - 23.5) ** 2 + (yy - 23.5) ** 2).sqrt() - 15).abs().le(1).float()
    c = coherence(torch.stack([diagonal, ring])[:, None])
    assert c[0] > 0.9 and c[1] < 0.05


def test_the_tool_reproduces_the_runs_report_on_all_tiles(tmp_path, tiny_cityscapes):
    out, weights = tmp_path / "run", tmp_path / "reg.pth"
    config = os.path.join(ROOT, "configs", "synthetic_regressor.yaml")
    opts = [f"output_path={weights}", "train.steps=20", "train.images_per_batch=4", "train.eval_images=12",
            "data.crop_size=[64,128]", f"data.dataset_dir={tiny_cityscapes}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    train = subprocess.run([sys.executable, "-m", "experiment.train_inverseform", "--config", config,
                            "--output_dir", str(out), "--opt"] + opts,
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert train.returncode == 0, train.stdout + train.stderr
    report = json.loads((out / "report.json").read_text())
    tool = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "regressor_by_orientation.py"),
                           "--config", config, "--regressor", str(weights), "--bins", "2", "--opt"] + opts,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert tool.returncode == 0, tool.stdout + tool.stderr
    everything, *bins = [line.split() for line in tool.stdout.splitlines()[2:]]
    assert everything[0] == "all" and len(bins) == 2
    assert int(everything[1]) == report["num_tiles"]
    assert float(everything[3]) == pytest.approx(report["spearman"], abs=5e-4)
    assert float(everything[4]) == pytest.approx(report["identity_mean_distance"], abs=5e-5)
    assert float(everything[5]) == pytest.approx(report["transformed_mean_distance"], abs=5e-5)
    assert sum(int(row[5]) for row in bins) == report["num_tiles"]


def test_a_missing_regressor_is_one_line(tmp_path):
    tool = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "regressor_by_orientation.py"),
                           "--regressor", str(tmp_path / "none.pth")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert tool.returncode != 0
    assert tool.stderr.strip().splitlines() == [f"error: --regressor {tmp_path / 'none.pth'} does not exist "
                                                f"(train it with python -m experiment.train_inverseform "
                                                f"--config configs/synthetic_regressor.yaml)"]
