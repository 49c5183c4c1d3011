"""Run by tests/test_reliability_runs.py as two processes of a gloo group: rank 1 never joins
the collective, rank 0 waits in it under the engine's stop-signal handling (grace seconds) and
writes "waiting" once it is blocked there."""
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch.distributed as dist  # noqa: E402

from experiment.signals import StopSignal  # noqa: E402


def main(store_file: str, rank: int, grace: float, marker: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=600))
    if rank == 1:
        time.sleep(600)
        return
    with StopSignal(grace=grace).installed():
        with open(marker, "w") as f:
            f.write("waiting")
        dist.barrier()  # blocks in C until rank 1 comes, which it never does


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
