"""Atomic file writing.

Why: a run killed while it writes a checkpoint or a metrics file must leave the
previous version intact, never a truncated file.  Everything is written to a
temporary file in the destination directory, flushed to disk, then moved into
place with ``os.replace`` (atomic on POSIX and Windows for the same filesystem).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

from utils.errors import UnreadableInputError

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success move it onto ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open: mode must be a write mode, got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as exc:
        raise _named_os_error(exc, path) from exc
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (umask applied),
        # so that teammates can read checkpoints as they could any other file of the run.
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        interrupt = find_in_chain(exc, KeyboardInterrupt)
        if interrupt is not None and interrupt is not exc:
            raise KeyboardInterrupt from None  # torch.save wraps a Ctrl-C in a RuntimeError
        os_error = find_in_chain(exc, OSError)
        if os_error is not None:  # e.g. disk full: say which file, not just "file write failed"
            raise _named_os_error(os_error, path) from exc
        raise


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status).  Where that is not
    available it is set and restored, which another thread creating a file at that moment could
    see."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def find_in_chain(exc: BaseException, kind: type):
    """``exc`` or the first exception of ``kind`` it was raised from (``__cause__``/``__context__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _named_os_error(exc: OSError, path: Path) -> OSError:
    """An OSError of the same errno whose message names the destination ``path`` (a file the
    user's settings chose: an input error, shown as one line)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return UnreadableInputError(exc.errno, f"cannot write {path}: {reason}")


def make_dirs(path: PathLike, what: str = "output_dir") -> None:
    """``os.makedirs(path, exist_ok=True)``, failing with one line that names ``what`` and the
    path: a file in the way, a link to nowhere, no permission, a full or read-only disk."""
    path = os.fspath(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise UnreadableInputError(errno.ENOENT, f"{what} {path} is a symbolic link to {os.readlink(path)}, "
                                                 "which does not exist")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UnreadableInputError(exc.errno, f"cannot create {what} {path}: {reason}"
                                              f"{f' ({exc.filename})' if exc.filename not in (None, path) else ''}"
                                   ) from exc


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a half-written file behind."""
    import torch  # local import: keeps this module importable without torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
