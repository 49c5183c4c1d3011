"""Training past one machine: torchrun restarts after a rank is killed and the run ends with the
uninterrupted run's weights, two torchrun agents (two "nodes") train like one agent with two
processes, and the Slurm script checkpoints before its time limit, requeues, and continues."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils import dist

from test_experiment_train import overrides

ROOT = Path(__file__).resolve().parents[1]


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS + ("TORCHELASTIC_RUN_ID",)}
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(tmp_path, tiny_cityscapes, regressor, out, **extra):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    opts = overrides(tiny_cityscapes, out, regressor, **{"train.max_iters": 12, "train.epochs": 4,
                                                         "train.batch_size": 1, "train.checkpoint_interval": 2,
                                                         "train.val_interval": 0, **extra})
    return ["experiment/train.py", "--config", str(empty), "--opt", *opts]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def iterations(out):
    return [json.loads(line)["iteration"] for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def worker_pids(agent_pid):
    """The training processes a torchrun agent started (its children that run Python)."""
    pids = []
    for pid in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        try:
            if "experiment/train.py" in Path(f"/proc/{pid}/cmdline").read_text():
                pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the workers in Linux /proc")
def test_a_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(tiny_cityscapes, regressor, tmp_path):
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    proc = subprocess.run(torchrun("--standalone", "--nproc_per_node=2",
                                   *run_args(tmp_path, tiny_cityscapes, regressor, straight), "--resume", "auto"),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    agent = subprocess.Popen(torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=1",
                                      *run_args(tmp_path, tiny_cityscapes, regressor, restarted), "--resume", "auto"),
                             cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while (not (restarted / "train_log.jsonl").is_file() or len(iterations(restarted)) < 5) and \
            time.time() < deadline:
        time.sleep(0.2)
    first_workers = worker_pids(agent.pid)
    assert len(first_workers) == 2
    os.kill(first_workers[1], signal.SIGKILL)  # a node's process dies mid-run
    log, err = agent.communicate(timeout=600)
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in log, log[-3000:]  # the restarted workers continued the checkpoint (--resume auto)
    a, b = weights(straight / "last.pth"), weights(restarted / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert iterations(restarted) == iterations(straight) == list(range(1, 13))


def test_two_agents_train_like_one_agent_with_two_processes(tiny_cityscapes, regressor, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(torchrun("--standalone", "--nproc_per_node=2",
                                   *run_args(tmp_path, tiny_cityscapes, regressor, one, **{"train.max_iters": 4})),
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = free_port()
    agents = [subprocess.Popen(torchrun("--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                                        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two",
                                        *run_args(tmp_path, tiny_cityscapes, regressor, two,
                                                  **{"train.max_iters": 4})),
                               cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in (0, 1)]
    for agent in agents:
        _, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-3000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for key in ("miou", "mba", "boundary_f", "edge_f", "val_loss", "per_class_iou"):
        assert m1[key] == m2[key], key
    a, b = weights(one / "last.pth"), weights(two / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def shim(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_the_slurm_script_checkpoints_requeues_and_continues(tiny_cityscapes, regressor, tmp_path):
    """sbatch stands in by running the script with Slurm's variables; srun runs its command here,
    scontrol records the requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    shim(bin_dir, "scontrol", 'if [[ "$1" == show ]]; then echo 127.0.0.1; else echo "$@" >> "$REQUEUES"; fi\n')
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    opts = overrides(tiny_cityscapes, out, regressor, **{"train.max_iters": 30, "train.epochs": 10,
                                                         "train.checkpoint_interval": 0, "train.val_interval": 0})
    config.write_text("{}\n")  # every setting comes from --opt
    env = clean_env()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="77", SLURM_NNODES="1", SLURM_JOB_NODELIST="node1",
               GPUS_PER_NODE="1", PORT=str(free_port()), CONFIG=str(config), REQUEUES=str(tmp_path / "requeues"))
    script = [str(ROOT / "tools" / "slurm" / "train.sbatch"), "--opt", *opts]
    job = subprocess.Popen(script, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while (not (out / "train_log.jsonl").is_file() or len(iterations(out)) < 3) and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
    log, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert (tmp_path / "requeues").read_text().split() == ["requeue", "77"]
    stopped = torch.load(out / "last.pth", weights_only=True)["iteration"]
    assert 3 <= stopped < 30 and "stopped by SIGTERM" in err
    env["PORT"] = str(free_port())
    again = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # the requeued job
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'last.pth'} at iteration {stopped}/30" in again.stdout
    assert iterations(out) == list(range(1, 31))
