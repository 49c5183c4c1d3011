"""Run under torchrun by tests/test_reliability_validation.py: evaluates the same weights on
every rank (all 4 images with batch 2, then only the first image, so that rank 0's shard is
empty) and writes each rank's loss metrics."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import models  # noqa: E402
from experiment.config import DataConfig, LossConfig  # noqa: E402
from experiment.data import eval_loader, val_dataset  # noqa: E402
from experiment.joint_loss import joint_loss  # noqa: E402
from experiment.evaluation import evaluate  # noqa: E402
from inverseform import InverseFormLoss, InverseNet  # noqa: E402
from utils import dist  # noqa: E402


def main(out_dir: str, weights: str, root: str) -> None:
    ctx = dist.init_distributed("cpu")
    try:
        net = models.get_net("lighthrnet.HRNet16", has_edge=True)
        net.load_state_dict(torch.load(weights, weights_only=True))
        torch.manual_seed(0)  # the same regressor as the test's
        inverseform = InverseFormLoss(InverseNet(tile_size=32, num_params=4, hidden=(64, 16)), tile_factor=1,
                                      check_inputs=False)
        criterion = joint_loss(LossConfig(), 19, inverseform)
        result = {}
        for key, batch, max_images in (("all", 2, None), ("one", 1, 1)):
            data = val_dataset(DataConfig(dataset_dir=root), root, "val", max_images)
            m = evaluate(net, eval_loader(data, batch, 0), ctx.device, criterion=criterion, progress=False)
            result[key] = {k: m[k] for k in ("num_images", "val_loss", "val_loss_parts")}
        with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main(*sys.argv[1:4])
