"""Where a run's files are, whatever the current directory: configs by path or by name, the root
that relative paths of a config resolve against, and where the released files come from.

* ``CODE_ROOT`` is the folder holding ``experiment/``, ``models/``, ... and ``configs/``: the
  repository checkout (run from the repository, or ``pip install -e .``), or the private
  ``inverseform_seg/_root`` folder of a ``pip install .`` (see setup.py).
* ``--config`` takes a file (relative to the current directory, as any shell path) or the name of
  a config shipped with the package (``--config synthetic`` = ``configs/synthetic.yaml``).
* Relative data paths of a config (``output_dir``, ``data.*_dir``, checkpoint paths; see
  ``utils.config.path_field``) resolve against its project root: the checkout for the
  repository's configs, wherever they are run from; the current directory for the configs of a
  ``pip install .`` (never site-packages).  ``_base_`` and ``loss.regressor_config`` resolve
  against the config file's own folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

from utils.config import ConfigError, project_root

CODE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = CODE_ROOT / "configs"
# A checkout has setup.py beside the packages; the private folder of an installed copy has not.
INSTALLED_COPY = not (CODE_ROOT / "setup.py").is_file()

# Released by the reference (checkpoints/README.md lists them; a test keeps both in step).
RELEASE_URL = "https://github.com/Qualcomm-AI-research/InverseForm/releases/tag/v1.0"
RELEASED_FILES = ("hrnet18_IF_checkpoint.pth", "hr16s_4k_slim.pth", "hrnet48_OCR_IF_checkpoint.pth",
                  "hrnet48_OCR_HMS_IF_checkpoint.pth", "distance_measures_regressor.pth")


def packaged_configs() -> List[str]:
    """Names accepted by ``--config NAME``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(spec: Union[str, os.PathLike]) -> Path:
    """An existing file ``spec`` (relative to the current directory), else a shipped config:
    ``synthetic``, ``synthetic.yaml`` or ``configs/synthetic.yaml``."""
    path = Path(os.path.expanduser(os.fspath(spec)))
    if path.is_file():
        return path.resolve()
    name = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    candidates = [CONFIG_DIR / name] if len(path.parts) == 1 or path.parent == Path("configs") else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config {os.fspath(spec)!r} not found: no such file (from {os.getcwd()}) and no shipped "
                      f"config of that name (--config NAME takes one of: {', '.join(packaged_configs())})")


def config_root(config_path: Path) -> Path:
    """The folder a config file's relative data paths resolve against (module docstring)."""
    resolved = Path(config_path).resolve()
    if INSTALLED_COPY and CONFIG_DIR in resolved.parents:
        return Path.cwd()
    return project_root(resolved)


def missing_file_message(what: str, path: Union[str, os.PathLike]) -> str:
    """``"<what> <path> does not exist"``, plus where to download it when it is a released file."""
    message = f"{what} {os.fspath(path)} does not exist"
    if os.path.basename(os.fspath(path)) in RELEASED_FILES:
        message += f"; it is a released file: download it from {RELEASE_URL} (see checkpoints/README.md)"
    return message
