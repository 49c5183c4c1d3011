"""Errors about input, configuration or environment, raised on purpose.

Each carries a message that names the file, key or path and says what was expected; the
commands print it as one line without a traceback.  Any other exception is a bug (or an
unexpected failure) and keeps its traceback.  The subclasses also derive from the built-in
error a caller may already catch (``FileNotFoundError``, ``ValueError``, ``OSError``).

This module depends on nothing else of the project.
"""


class InputError(Exception):
    """Bad input, configuration or environment, with a one-line message naming what is wrong."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the input names does not exist."""


class InvalidInputError(InputError, ValueError):
    """A file, key or value does not have the form expected."""


class UnreadableInputError(InputError, OSError):
    """A file exists but cannot be read or written (corrupt, truncated, no permission, disk full)."""


class InvalidOptionError(InputError, TypeError):
    """An option (a keyword of a builder, an argument) that does not exist or does not apply."""


class SetupError(InputError, RuntimeError):
    """The environment a run was started in does not fit it (launcher variables, devices)."""


class ExistingOutputError(InputError, FileExistsError):
    """An output already exists and is replaced only with an explicit flag (or never, when it is
    not what the command itself wrote)."""
