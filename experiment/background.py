"""A background writer: PNG dumps and TensorBoard images leave the evaluation loop.

Why: encoding PNGs and colouring maps on the host took as long as the forward pass, and the
loop waited for it.  Here the loop hands each batch's host copies to one worker thread
(``cv2.imwrite`` and zlib release the GIL, so the writes overlap the next forward) and goes on.
The queue is bounded, so a slow disk slows the loop down instead of filling the memory;
``close()`` waits for every job and re-raises the first error, so when evaluation returns
every file is complete (each one written atomically by its job) or the error is known.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

import torch

__all__ = ["BackgroundWriter", "to_host"]


def to_host(tensor: torch.Tensor) -> "HostCopy":
    """Start copying ``tensor`` to the host without waiting for it (CUDA: into pinned memory,
    ordered after the kernels that produce it); ``.get()`` in the writer thread waits."""
    return HostCopy(tensor)


class HostCopy:
    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.device.type == "cuda":
            self._tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._tensor.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._tensor = tensor.detach().cpu()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensor


class BackgroundWriter:
    """One worker thread running submitted jobs in order; ``max_pending`` bounds the queue."""

    def __init__(self, max_pending: int = 8, name: str = "background-writer"):
        self._jobs: "queue.Queue[Optional[tuple]]" = queue.Queue(maxsize=max(1, max_pending))
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:  # after a failure the remaining jobs are skipped, then reported
                fn, args, kwargs = job
                try:
                    fn(*args, **kwargs)
                except BaseException as exc:  # re-raised in the caller's thread by submit/close
                    self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self._closed:
            raise RuntimeError("BackgroundWriter: submit after close")
        self._raise_if_failed()
        self._jobs.put((fn, args, kwargs))

    def close(self) -> None:
        """Wait for every submitted job; raise the first error any of them raised."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # an error in the loop wins; still wait so no job writes after we return
            try:
                self.close()
            except BaseException:
                pass
