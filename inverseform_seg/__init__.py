"""The console scripts' way in (``inverseform-train``, ...): puts this project's own packages
(``models``, ``datasets``, ``utils``, ``experiment``; generic names that other distributions use
too, e.g. Hugging Face ``datasets``) first on the script's own ``sys.path``, then runs the script.

Why: installing those names as top-level packages would shadow or overwrite other software, so
``pip install .`` keeps them in the private folder ``inverseform_seg/_root/`` (with the configs),
and only the standalone plug-ins (``inverseform``) are importable from anywhere.  From a
repository checkout (``pip install -e .``, or ``python -m experiment.train`` in the repository)
the checkout itself is that folder.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["code_root", "run"]

PRIVATE_PACKAGES = ("experiment", "models", "datasets", "utils")


def code_root() -> Path:
    """The folder holding ``experiment/``, ``models/``, ... and ``configs/``."""
    here = Path(__file__).resolve().parent
    installed = here / "_root"
    if (installed / "experiment").is_dir():
        return installed
    checkout = here.parent
    if (checkout / "experiment" / "train.py").is_file() and (checkout / "setup.py").is_file():
        return checkout
    raise RuntimeError(f"inverseform_seg: neither {installed} nor a repository checkout at {checkout} holds the "
                       "project's packages; reinstall with `pip install .`")


def activate() -> Path:
    """Put :func:`code_root` first on ``sys.path`` (once); refuse if another distribution's
    module of a private name (e.g. Hugging Face ``datasets``) is already imported."""
    root = str(code_root())
    for name in PRIVATE_PACKAGES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin and not os.path.abspath(origin).startswith(root + os.sep):
            raise RuntimeError(f"inverseform_seg: a module named {name!r} from {origin} is already imported; "
                               "run this project's scripts in their own process")
    if not sys.path or sys.path[0] != root:
        sys.path.insert(0, root)
    return root


def run(module: str) -> Any:
    """Run ``module.main()`` with this project's packages first on ``sys.path``."""
    activate()
    return importlib.import_module(module).main()
