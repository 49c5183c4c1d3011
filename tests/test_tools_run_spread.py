"""tools/run_spread.py on a two-image set in the Cityscapes layout, with mIoU worked out by hand."""
import os
import subprocess
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROAD, SIDEWALK = 7, 8   # Cityscapes label ids of train ids 0 and 1


def write(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, image)


def test_spread_of_a_perfect_and_a_flawed_run(tmp_path):
    half = np.full((4, 4), ROAD, np.uint8)
    half[:, 2:] = SIDEWALK                      # 8 road and 8 sidewalk pixels
    stems = ["a_000000_000019", "a_000001_000019"]
    for stem in stems:
        write(str(tmp_path / "data" / "gtFine" / "val" / "a" / f"{stem}_gtFine_labelIds.png"), half)
        write(str(tmp_path / "perfect" / "predictions" / "labelIds" / f"{stem}_labelIds.png"), half)
    flawed = tmp_path / "flawed" / "predictions" / "labelIds"
    write(str(flawed / f"{stems[0]}_labelIds.png"), np.full((4, 4), ROAD, np.uint8))  # sidewalk missed
    write(str(flawed / f"{stems[1]}_labelIds.png"), half)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_spread.py"), str(tmp_path / "perfect"),
                          str(tmp_path / "flawed"), "--dataset_dir", str(tmp_path / "data"), "--resamples", "50"],
                         capture_output=True, text=True, check=True).stdout
    # road: 16 correct of 16 true and 24 predicted, IoU 16/24; sidewalk: 8 of 16 true, 8 predicted, IoU 8/16
    assert f"{tmp_path / 'perfect'}: mIoU 100.00, std over resampled images 0.00" in out
    assert f"{tmp_path / 'flawed'}: mIoU 58.33," in out
    assert "highest - lowest: 41.67 points" in out


def test_a_missing_prediction_is_named(tmp_path):
    write(str(tmp_path / "data" / "gtFine" / "val" / "a" / "a_000000_000019_gtFine_labelIds.png"),
          np.full((4, 4), ROAD, np.uint8))
    (tmp_path / "run").mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_spread.py"), str(tmp_path / "run"),
                             "--dataset_dir", str(tmp_path / "data")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "a_000000_000019_labelIds.png is missing" in result.stderr
