"""The errors of a run, and how each reaches the user.

A ``UserError`` (and the other classes here) is caused by input, configuration or environment:
it is printed as one line without a traceback.  ``StopRequested`` is not a failure: a stop
signal ended the run with a checkpoint.  Anything else keeps its traceback (experiment/cli.py).
"""
from __future__ import annotations

import errno

from utils.errors import InputError


class UserError(InputError):
    """An error caused by the user's input (a file, a flag, a dataset): shown without a traceback."""


class StopRequested(Exception):
    """A stop signal (SIGTERM) reached some rank: every rank saved a checkpoint and stops with
    ``exit_code`` (128 + the signal number, as a shell reports a process ended by it)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite: training stops before the weights are touched."""


class NonFiniteWeightsError(UserError, RuntimeError):
    """Weights (or a checkpoint's tensors) hold NaN or Inf: never saved, never evaluated."""


class NonFiniteOutputError(UserError):
    """The network produced NaN/Inf logits: metrics computed from them would be meaningless."""


# Failures of the machine rather than of the code: a full disk, no permission, too many open files.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                                errno.EMFILE, errno.ENFILE})


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is about input, configuration or environment (raised on purpose, naming
    the file, key or path): shown as one line.  Anything else is a bug and keeps its traceback."""
    return isinstance(exc, InputError) or (isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: a KeyError's key unquoted, the original message of an
    error re-raised by a DataLoader worker (not its copied traceback), never blank."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text).strip()
    if "Original Traceback" in text:  # DataLoader workers re-raise "Caught X in ...\n<traceback>"
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name, _, rest = last.partition(": ")  # "OSError: ..." or "utils.errors.UnreadableInputError: ..."
        text = rest if rest and name.rsplit(".", 1)[-1] == type(exc).__name__ else last
    return text or f"{type(exc).__name__} (no message)"
