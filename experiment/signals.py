"""Stop signals: SIGTERM (what job schedulers send before they kill) and SIGUSR1 end a run with a
checkpoint instead of killing it, and loader workers never die before their main process."""
from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

log = logging.getLogger("experiment")


class StopSignal:
    """Records SIGTERM (and SIGUSR1, which some schedulers send first) instead of dying, so that
    the training loop can agree on it across ranks, write a checkpoint and stop.  A no-op outside
    the main thread (Python delivers signals only there).

    A rank stuck in a collective (its peer gone or stalled) never returns to Python, so the
    handler alone would wait forever: a watcher thread reads the signals from Python's wakeup fd
    (written by the C-level handler whatever the main thread is doing) and exits the process
    without a checkpoint on a second stop signal (more than ``BURST`` seconds after the first), or
    ``grace`` seconds after the first."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    # Signals within this many seconds of the first are one request: a parent killed with -9
    # delivers its death signal once per thread as they exit, and a scheduler and torchrun may
    # both forward the same SIGTERM.
    BURST = 0.5

    def __init__(self, grace: float = 120.0) -> None:
        self.signum: Optional[int] = None
        self.grace = grace
        self._previous: List[Tuple[int, Any]] = []
        self._received = 0
        self._first: Optional[float] = None
        self._timer: Optional[threading.Timer] = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _numbers(self) -> List[int]:
        return [getattr(signal, name) for name in self.SIGNALS if hasattr(signal, name)]

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: finishing this iteration, then saving a checkpoint and stopping",
                        signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for num in self._numbers():
            self._previous.append((num, signal.signal(num, self._handler)))
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watcher = threading.Thread(target=self._watch, args=(read_fd,), name="stop-signal-watcher", daemon=True)
        watcher.start()
        try:
            yield self
        finally:
            signal.set_wakeup_fd(previous_fd)
            # byte 0 (no signal has that number) ends the watcher; end-of-file would not come while
            # forked DataLoader workers hold copies of the write end
            os.set_blocking(write_fd, True)
            os.write(write_fd, b"\x00")
            watcher.join()
            os.close(write_fd)
            os.close(read_fd)
            if self._timer is not None:
                self._timer.cancel()
            for num, handler in reversed(self._previous):
                signal.signal(num, handler)
            self._previous.clear()

    def _watch(self, read_fd: int) -> None:
        numbers = set(self._numbers())
        while True:
            data = os.read(read_fd, 64)
            if not data or 0 in data:
                return
            for signum in data:
                if signum not in numbers:
                    continue
                now = time.monotonic()
                if self._first is not None and now - self._first < self.BURST:
                    continue
                self._first = self._first or now
                self._received += 1
                if self._received == 1:
                    self._timer = threading.Timer(self.grace, self._give_up, args=(signum, f"{self.grace:g} s after "
                                                  f"{signal.Signals(signum).name}, the run had not stopped"))
                    self._timer.daemon = True
                    self._timer.start()
                else:
                    self._give_up(signum, f"{signal.Signals(signum).name} received a second time")

    @staticmethod
    def _give_up(signum: int, reason: str) -> None:
        sys.stderr.write(f"{reason}: exiting without waiting for a checkpoint (the last one written is intact)\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal"


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals every process of a job; a worker killed
    by it would abort the main process before it saves.  Workers ignore it and end with their
    main process (which has the checkpoint to write)."""
    for name in StopSignal.SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _kill_daemonic_children() -> None:
    """At interpreter exit.  DataLoader workers ignore SIGTERM (above), so multiprocessing's own
    exit handler, which terminates daemonic children with SIGTERM and then joins them, would wait
    forever for a worker a loader never shut down: kill them first (they hold nothing to save).
    DataLoader's SIGCHLD handler would report each of these kills as a failed worker, with a
    traceback, so it is switched off first: at exit no loader reads from its workers any more."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children and threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


# atexit runs handlers last-registered first: this runs before multiprocessing's (registered when
# torch imported it).
atexit.register(_kill_daemonic_children)
