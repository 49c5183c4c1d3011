"""Run under torchrun by tests/test_reliability_train.py: trains on every rank through the
scripts' run_main frame, writes this rank's pid (so the test can signal one rank) and, on
exit, its exit code."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiment.cli import run_main  # noqa: E402
from experiment.config import ExperimentConfig  # noqa: E402
from experiment.methods import train  # noqa: E402
from utils import dist  # noqa: E402
from utils.config import load_config  # noqa: E402


def main(out_dir: str, overrides_json: str) -> None:
    rank = os.environ.get("RANK", "0")
    cfg = load_config(ExperimentConfig, [], json.loads(overrides_json))

    def body() -> None:
        ctx = dist.init_distributed("cpu")
        with open(os.path.join(out_dir, f"pid{rank}"), "w") as f:
            f.write(str(os.getpid()))
        train(cfg, ctx)

    try:
        run_main(body)
    except SystemExit as exc:
        with open(os.path.join(out_dir, f"exit{rank}"), "w") as f:
            f.write(str(exc.code))
        raise


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
