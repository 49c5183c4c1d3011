"""utils.dist: a plain process is a world of one; two gloo processes reduce correctly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import dist

SCRIPT = Path(__file__).parent / "scripts" / "dist_collectives.py"


@pytest.fixture
def clean_env(monkeypatch):
    for key in dist.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    dist.cleanup()


def test_plain_process_is_a_world_of_one(clean_env):
    ctx = dist.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed, ctx.is_main) == (0, 1, None, False, True)
    assert ctx.device == torch.device("cpu")
    t = torch.tensor([2.0, 3.0])
    assert dist.all_reduce(t) is t and t.tolist() == [2.0, 3.0]
    assert dist.all_reduce(torch.tensor([4.0]), op="mean").tolist() == [4.0]
    assert dist.all_gather_object("x") == ["x"]
    assert dist.broadcast_object(5) == 5
    assert dist.any_rank_true(False) is False and dist.any_rank_true(True) is True
    dist.barrier()  # no-op, must not raise
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()


def test_bad_environment_is_reported(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT not set"):
        dist.init_distributed(device="cpu")
    clean_env.setenv("RANK", "5")
    with pytest.raises(RuntimeError, match=r"RANK=5 is outside"):
        dist.init_distributed(device="cpu")
    clean_env.setenv("RANK", "zero")
    with pytest.raises(RuntimeError, match="RANK='zero' is not an integer"):
        dist.init_distributed(device="cpu")


def test_unknown_device_and_op(clean_env):
    with pytest.raises(ValueError, match="device must be"):
        dist.init_distributed(device="tpu")
    with pytest.raises(ValueError, match="op must be one of"):
        dist.all_reduce(torch.zeros(1), op="prod")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cuda_request_without_cuda_is_explained(clean_env):
    with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
        dist.init_distributed(device="cuda")


def test_two_process_gloo_collectives(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["backend"] == "gloo" and res["device"] == "cpu"
        assert res["summed"] == [3.0, 30.0]  # (1 + 2), (10 + 20)
        assert res["mean"] == [0.5]
        assert res["max"] == [3]
        assert res["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert res["bcast"] == "from-0"
        assert res["anyflag"] is True
        assert res["is_main"] == (r == 0)
