"""The main job's edge head draws boundaries: its edge map's F-score against the edge targets of
the synthetic val split (ODS, 2-px tolerance) reaches the measured level, and no line is drawn
along the image border.  Minutes on a CPU: marked slow.

    python -m pytest -m slow tests/test_edge_demo.py
"""
import glob
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Measured with configs/synthetic.yaml over seeds 0-2 x 1-2 threads (docs/main_job.md): edge F
# 0.8655-0.8811 (1440 iterations, Intel Xeon), 0.8059-0.8252 at 720 iterations (AMD EPYC); the
# threshold leaves 0.05 below the lower recipe for another CPU's float order.
MIN_EDGE_F = 0.75


@pytest.mark.slow
def test_main_job_edge_maps_show_boundaries(tmp_path):
    out = tmp_path / "synthetic"
    subprocess.run([sys.executable, "-m", "experiment.train", "--config", "configs/synthetic.yaml",
                    "--output_dir", str(out)], cwd=ROOT, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["edge_f"] >= MIN_EDGE_F, metrics["edge_f"]
    assert metrics["edge_precision"] > 0.5 and metrics["edge_recall"] > 0.5, metrics
    # the dumped edge maps: dark along the image border (the targets have no line there), bright
    # somewhere inside
    for path in glob.glob(str(out / "predictions" / "edges" / "*.png")):
        edge = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
        frame = np.concatenate([edge[:2].ravel(), edge[-2:].ravel(), edge[:, :2].ravel(), edge[:, -2:].ravel()])
        assert np.median(frame) < 0.2 < np.percentile(edge, 95), path
