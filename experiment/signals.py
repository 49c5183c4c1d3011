"""Stop signals: SIGTERM (what job schedulers send before they kill) and SIGUSR1 end a run with a
checkpoint instead of killing it, and loader workers never die before their main process."""
from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import signal
import threading
from typing import Any, Iterator, List, Optional, Tuple

log = logging.getLogger("experiment")


class StopSignal:
    """Records SIGTERM (and SIGUSR1, which some schedulers send first) instead of dying, so that
    the training loop can agree on it across ranks, write a checkpoint and stop.  A no-op outside
    the main thread (Python delivers signals only there)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: List[Tuple[int, Any]] = []

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: finishing this iteration, then saving a checkpoint and stopping",
                        signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    num = getattr(signal, name)
                    self._previous.append((num, signal.signal(num, self._handler)))
        try:
            yield self
        finally:
            for num, handler in reversed(self._previous):
                signal.signal(num, handler)
            self._previous.clear()

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
    forever for a worker a loader never shut down: kill them first (they hold nothing to save)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# atexit runs handlers last-registered first: this runs before multiprocessing's (registered when
# torch imported it).
atexit.register(_kill_daemonic_children)
