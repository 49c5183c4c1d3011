"""Train InverseForm's regressor (the inverse-transformation network) on a dataset's own boundaries.

    torchrun --nproc_per_node=N experiment/train_inverseform.py --config configs/regressor_cityscapes.yaml
    python -m experiment.train_inverseform --config configs/synthetic_regressor.yaml

Method ``regressor`` (experiment/methods/regressor.py) through the training engine: tiles cut as
InverseFormLoss cuts them, pairs (warped tile, tile), the warp's normalised deviation as the
target.  Writes the regressor at ``output_path`` (the released weight format, which
InverseFormLoss reads) with a metadata JSON beside it, and ``OUTPUT_DIR/report.json`` (held-out
identity and transformed distances, Spearman correlation, R^2 per parameter).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

if __package__ in (None, ""):  # run as a script (torchrun experiment/train_inverseform.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiment.cli import AMP_CHOICES, SHARED_FLAGS, flag_overrides, script_main, script_parser
from experiment.methods import RunOptions, run
from experiment.run_config import load_run_config

FLAGS = {**SHARED_FLAGS, "output_path": "output_path", "steps": "train.steps", "amp": "train.amp",
         "seed": "train.seed"}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__, "run directory (config, checkpoints, report, TensorBoard)",
                           opt_example="train.lr=0.0003 model.tile_size=64")
    parser.add_argument("--output_path", help="where to write the regressor .pth (+ .json beside it)")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--resume", nargs="?", const=True, default=False, choices=(True, "auto"), metavar="auto",
                        help="continue from OUTPUT_DIR/last.pth; auto: when it exists, else start anew")
    parser.add_argument("--overwrite", action="store_true",
                        help="start anew in an OUTPUT_DIR that holds an earlier run (moved to OUTPUT_DIR/replaced-<time>/)")
    parser.add_argument("--stop_after", type=int, help="stop (with a checkpoint) after this step; resume later")
    parser.add_argument("--amp", nargs="?", const="on", choices=AMP_CHOICES,
                        help="autocast (train.amp): auto (bf16 on CUDA, off on CPU), on (= bf16; the bare flag), "
                             "off, bf16, fp16")
    parser.add_argument("--seed", type=int, help="random seed (train.seed)")
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    return load_run_config(args.config, flag_overrides(args, FLAGS), method="regressor")  # + cuda_overrides


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    options = RunOptions(resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after)
    script_main(args, config_from_args, lambda cfg, ctx: run(cfg, ctx, options), "train_log.txt")


if __name__ == "__main__":
    main()
