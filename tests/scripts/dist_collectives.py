"""Run under torchrun by tests/test_utils_dist.py: exercises utils.dist on every rank."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from utils import dist  # noqa: E402


def main(out_dir: str) -> None:
    ctx = dist.init_distributed(device="cpu")
    try:
        summed = dist.all_reduce(torch.tensor([ctx.rank + 1.0, 10.0 * (ctx.rank + 1)]))
        mean = dist.all_reduce(torch.tensor([float(ctx.rank)]), op="mean")
        biggest = dist.all_reduce(torch.tensor([ctx.rank * 3]), op="max")
        gathered = dist.all_gather_object({"rank": ctx.rank})
        bcast = dist.broadcast_object(f"from-{ctx.rank}")
        anyflag = dist.any_rank_true(ctx.rank == ctx.world_size - 1)
        dist.barrier()
        result = dict(rank=ctx.rank, world=ctx.world_size, backend=ctx.backend, local_rank=ctx.local_rank,
                      summed=summed.tolist(), mean=mean.tolist(), max=biggest.tolist(), gathered=gathered,
                      bcast=bcast, anyflag=anyflag, is_main=ctx.is_main, device=str(ctx.device))
        with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
