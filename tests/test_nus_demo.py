"""The NUS demo (configs/synthetic_nus.yaml): adaptive sampling beats uniform sampling at the same
sampling size at full resolution, detectably: the 95 % interval of the mean margin over the
config's six seeds lies above 0 (one seed's margin moves by a few points: docs/nus.md).  Minutes
on a CPU: marked slow.

    python -m pytest -m slow tests/test_nus_demo.py
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_adaptive_beats_uniform_detectably(tmp_path):
    out = tmp_path / "synthetic_nus"
    subprocess.run([sys.executable, "-m", "experiment.train", "--config", "configs/synthetic_nus.yaml",
                    "--output_dir", str(out)], cwd=ROOT, check=True)
    result = json.loads((out / "comparison.json").read_text())
    assert result["seeds"] == [0, 1, 2, 3, 4, 5]
    # Measured (docs/nus.md) at 40 x 40 samples: +2.32 points, 95 % CI [+0.57, +4.07] on a 2-core Intel
    # Xeon.  At 32 x 32, three draws (two CPUs, two summation orders) gave +1.31 to +2.25, each interval
    # above 0.  The mean's bound leaves 1.32 below the 40 x 40 draw and 0.31 below the lowest at 32 x 32.
    assert result["margin_points_ci"]["ci_low"] > 0, result["margin_points_ci"]
    assert result["margin_points"] >= 1.0, result["margin_points"]
    assert (out / "sampling_grid.png").is_file()
