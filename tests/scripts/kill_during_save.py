"""Run by tests/test_experiment_train.py: trains with a checkpoint every iteration and kills
itself (SIGKILL, no clean-up possible) half-way through writing the second checkpoint."""
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiment.config import ExperimentConfig  # noqa: E402
from experiment.methods import train  # noqa: E402
from utils import dist  # noqa: E402
from utils.config import load_config  # noqa: E402

calls = {"n": 0}
real_save = torch.save


def dying_save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2 and isinstance(obj, dict) and "optimizer" in obj:
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


if __name__ == "__main__":
    torch.save = dying_save
    cfg = load_config(ExperimentConfig, [], json.loads(sys.argv[1]))
    train(cfg, dist.init_distributed("cpu"))
