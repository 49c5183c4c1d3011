"""Run under torchrun by tests/test_experiment_train.py: trains a few steps on every rank and
saves each rank's weights and returned metrics, so the test can compare ranks."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiment.config import ExperimentConfig  # noqa: E402
from experiment.methods import train  # noqa: E402
from utils import dist  # noqa: E402
from utils.config import load_config  # noqa: E402


def main(out_dir: str, overrides_json: str) -> None:
    cfg = load_config(ExperimentConfig, [], json.loads(overrides_json))
    ctx = dist.init_distributed("cpu")
    try:
        metrics, net = train(cfg, ctx)
        torch.save(net.state_dict(), os.path.join(out_dir, f"rank{ctx.rank}.pth"))
        with open(os.path.join(out_dir, f"metrics{ctx.rank}.json"), "w") as f:
            json.dump({k: metrics[k] for k in ("miou", "pixel_acc", "mba", "num_images")}, f)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
