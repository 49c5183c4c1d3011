"""Distributed set-up from torchrun's environment, and the few collectives we use.

``torchrun --nproc_per_node=N script.py`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for every process.  ``init_distributed`` reads them
once and returns an explicit :class:`DistContext` that the scripts pass around
(no hidden global state to consult).  A plain ``python script.py`` is a world of
one: no process group is created and every collective is a no-op.

Backend: NCCL when the process drives a CUDA device, gloo otherwise (so the same
command runs on a CPU-only machine).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
import time
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from utils.errors import InvalidInputError, SetupError
from utils.io import make_dirs

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group (world of one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: Optional[int] = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise SetupError(f"environment variable {name} is not set (expected from torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise SetupError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Initialise from torchrun's environment (or a world of one without it).

    device: 'auto' (CUDA when available, else CPU), 'cpu', or 'cuda'.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise SetupError("device 'cuda' was requested but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}; a CPU-only build cannot use a GPU)")

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise SetupError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")

    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise SetupError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    if world_size == 1:
        return DistContext(rank=0, world_size=1, local_rank=local_rank, device=dev, backend=None)

    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SetupError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = dict(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            kwargs["store"] = round_store(rank, timeout)
        else:
            kwargs["init_method"] = "env://"
        if use_cuda:
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


ROUND_STORE_KEY = "inverseform/round_store"


def round_store(rank: int, timeout: datetime.timedelta) -> dist.Store:
    """A store of this launch round alone, for the process group.

    torchrun shares its rendezvous TCPStore with the workers and keeps it across restarts, so
    the keys a process group writes (gloo's addresses, NCCL's unique id) from an earlier round
    are still there when the restarted workers look them up: a worker may connect to a dead
    peer's address (pytorch/pytorch#135712).  Rank 0 starts a fresh TCPStore on a free port and
    publishes its port with a random nonce in the shared store; the others read that entry,
    connect, and accept the store only when it holds the same nonce (an entry of an earlier
    round names a store that is gone, or another one), re-reading until rank 0 has written it."""
    addr, port = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT")
    shared = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(addr, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = os.urandom(8).hex()
        store.set("nonce", nonce)
        shared.set(ROUND_STORE_KEY, f"{store.port}:{nonce}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        round_port, nonce = shared.get(ROUND_STORE_KEY).decode().split(":")
        try:
            store = dist.TCPStore(addr, int(round_port), is_master=False, timeout=datetime.timedelta(seconds=2))
            if store.get("nonce").decode() == nonce:
                store.set_timeout(timeout)
                return store
        except (RuntimeError, dist.DistError):  # an earlier round's store: gone, or not the one named
            pass
        if time.monotonic() > deadline:
            raise SetupError(f"rank {rank}: rank 0's store for this launch never appeared in torchrun's store at "
                             f"{addr}:{port} within {timeout.total_seconds():.0f} s")
        time.sleep(0.1)


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'mean', 'max', 'min'); returns the tensor."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    if not is_dist():
        return tensor
    dist.all_reduce(tensor, op=ops[op])
    if op == "mean":
        if tensor.is_floating_point():
            tensor.div_(get_world_size())
        else:
            raise TypeError("all_reduce(op='mean') needs a floating-point tensor")
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank_true(flag: bool, device: torch.device = torch.device("cpu")) -> bool:
    """True on every rank if ``flag`` is True on any rank (for agreeing to stop together)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _StdoutHandler(logging.StreamHandler):
    """A console handler that writes to ``sys.stdout`` as it is when a record is emitted, not as
    it was at set-up: a stdout replaced later (pytest's capture, a notebook, a redirect) never
    leaves the handler writing into a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(output_dir: Optional[str] = None, rank: Optional[int] = None,
                  level: int = logging.INFO, filename: str = "log.txt") -> logging.Logger:
    """Root logging for a run: rank 0 logs INFO to the console and ``output_dir/filename``;
    other ranks log only warnings and errors (prefixed with their rank) to the console."""
    rank = get_rank() if rank is None else rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_inverseform", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = _StdoutHandler()
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    console.addFilter(_RankFilter(rank))
    console._inverseform = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if output_dir is not None and rank == 0:
        make_dirs(output_dir)
        file_handler = logging.FileHandler(os.path.join(output_dir, filename))
        file_handler.setLevel(level)
        file_handler.setFormatter(fmt)
        file_handler.addFilter(_RankFilter(rank))
        file_handler._inverseform = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    return root
