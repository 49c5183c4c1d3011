"""The errors of a run, and how each reaches the user.

A ``UserError`` (and the other classes here) is caused by input, configuration or environment:
it is printed as one line without a traceback.  ``StopRequested`` is not a failure: a stop
signal ended the run with a checkpoint.  Anything else keeps its traceback (experiment/cli.py).
"""
from __future__ import annotations

from models import CheckpointMismatchError
from utils.config import ConfigError


class UserError(Exception):
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


# OSError: unreadable/corrupt files, unwritable directories, a full disk (utils.io names the file).
USER_ERRORS = (UserError, ConfigError, FileNotFoundError, ValueError, KeyError, CheckpointMismatchError, OSError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: a KeyError's key unquoted, the original message of an
    error re-raised by a DataLoader worker (not its copied traceback), never blank."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = str(text).strip()
    if "Original Traceback" in text:  # DataLoader workers re-raise "Caught X in ...\n<traceback>"
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = last.split(": ", 1)[1] if last.startswith(type(exc).__name__ + ":") else last
    return text or f"{type(exc).__name__} (no message)"
