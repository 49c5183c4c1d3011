"""Run under torchrun by tests/test_reliability_runs.py: every rank trains through the scripts'
run_main frame with the shared overrides plus its own (as a job started with different
settings on each node would)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiment.cli import run_main  # noqa: E402
from experiment.config import ExperimentConfig  # noqa: E402
from experiment.methods import train  # noqa: E402
from utils import dist  # noqa: E402
from utils.config import load_config  # noqa: E402


def main(overrides_json: str, per_rank_json: str) -> None:
    rank = os.environ.get("RANK", "0")
    overrides = json.loads(overrides_json) + json.loads(per_rank_json).get(rank, [])
    cfg = load_config(ExperimentConfig, [], overrides)
    run_main(lambda: train(cfg, dist.init_distributed("cpu")))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
