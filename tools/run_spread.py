"""How much of the mIoU spread between runs is the validation images, and how much the models.

    python tools/run_spread.py runs/a runs/b ...            # runs validated on the synthetic Cityscapes
    python tools/run_spread.py RUN ... --dataset_dir /path/to/cityscapes --split val

Reads each run's ``predictions/labelIds`` (written by every validation) and the split's
ground truth (Cityscapes layout), and prints, per run, its mIoU and the standard deviation of
that mIoU over bootstrap resamples of the images (what another draw of as many images would
move it by); then, for the runs with the highest and lowest mIoU, their difference and its
standard deviation over the same resamples, paired (how surely the two models differ on images
like these).  A paired difference several of its standard deviations from 0 is a difference
between the models, which a larger validation split would not remove.
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets.cityscapes import read_label_ids  # noqa: E402
from datasets.labels import NUM_CLASSES, labelid_to_trainid  # noqa: E402
from utils.metrics import confusion_matrix, scores_from_confusion  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ground_truth(dataset_dir: str, split: str):
    paths = sorted(glob.glob(os.path.join(dataset_dir, "gtFine", split, "*", "*_gtFine_labelIds.png")))
    if not paths:
        sys.exit(f"error: no gtFine/{split}/*/*_gtFine_labelIds.png under --dataset_dir {dataset_dir}")
    return {os.path.basename(p)[:-len("_gtFine_labelIds.png")]: p for p in paths}


def per_image_confusions(run: str, truth) -> np.ndarray:
    """N x C x C: one confusion matrix per ground-truth image, in the order of ``truth``."""
    out = []
    for stem, gt_path in truth.items():
        pred_path = os.path.join(run, "predictions", "labelIds", f"{stem}_labelIds.png")
        if not os.path.isfile(pred_path):
            sys.exit(f"error: {pred_path} is missing: the run {run} has no prediction for {stem}")
        gt = torch.from_numpy(labelid_to_trainid(read_label_ids(gt_path)).astype(np.int64))
        pred = torch.from_numpy(labelid_to_trainid(read_label_ids(pred_path)).astype(np.int64))
        out.append(confusion_matrix(pred, gt, NUM_CLASSES).numpy())
    return np.stack(out)


def miou(confusions: np.ndarray) -> float:
    return 100 * scores_from_confusion(confusions.sum(0))["miou"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories with predictions/labelIds")
    parser.add_argument("--dataset_dir", default=os.path.join(ROOT, "data", "synthetic_cityscapes"))
    parser.add_argument("--split", default="val")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    truth = ground_truth(args.dataset_dir, args.split)
    confusions = {run: per_image_confusions(run, truth) for run in args.runs}
    resamples = np.random.default_rng(args.seed).integers(0, len(truth), (args.resamples, len(truth)))
    full = {run: miou(conf) for run, conf in confusions.items()}
    scores = {run: np.array([miou(conf[i]) for i in resamples]) for run, conf in confusions.items()}
    print(f"{len(truth)} images of {args.dataset_dir} ({args.split}); {args.resamples} bootstrap resamples")
    for run in args.runs:
        print(f"  {run}: mIoU {full[run]:.2f}, std over resampled images {scores[run].std():.2f}")
    if len(args.runs) > 1:
        best, worst = max(args.runs, key=full.get), min(args.runs, key=full.get)
        diff = full[best] - full[worst]
        paired = scores[best] - scores[worst]
        print(f"highest - lowest: {diff:.2f} points, paired std over resampled images {paired.std():.2f} "
              f"({diff / paired.std():.1f} of them)" if paired.std() > 0 else f"highest - lowest: {diff:.2f} points")


if __name__ == "__main__":
    main()
