"""Entry points of the console scripts (setup.py): each runs one script of ``experiment/`` or
``datasets/`` with the project's private packages first on ``sys.path`` (see the package doc)."""
from __future__ import annotations

import sys
from typing import Optional

from inverseform_seg import run


def train() -> Optional[int]:
    return run("experiment.train")


def validate() -> Optional[int]:
    return run("experiment.validation")


def train_regressor() -> Optional[int]:
    return run("experiment.train_inverseform")


def synthetic() -> Optional[int]:
    return run("datasets.synthetic")


def infer() -> Optional[int]:
    return run("experiment.infer")


def ablation() -> Optional[int]:
    return run("experiment.ablation")


SCRIPTS = {"train": train, "validate": validate, "train-regressor": train_regressor, "synthetic": synthetic, "infer": infer,
           "ablation": ablation}


def main(argv: Optional[list] = None) -> Optional[int]:
    """``python -m inverseform_seg SCRIPT [ARGS]`` (also ``torchrun -m inverseform_seg train ...``)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SCRIPTS:
        print(f"usage: python -m inverseform_seg {{{','.join(SCRIPTS)}}} [ARGS]", file=sys.stderr)
        return 2
    sys.argv = [f"inverseform-{argv[0]}"] + list(argv[1:])
    return SCRIPTS[argv[0]]()
