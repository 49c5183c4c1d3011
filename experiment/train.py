"""Train what a config asks for, on one or many processes.

    torchrun --nproc_per_node=8 experiment/train.py --config configs/cityscapes_hrnet18_if.yaml
    python -m experiment.train --config configs/synthetic.yaml          # CPU, a few minutes

The config's ``method`` (experiment/methods/: segmentation with the InverseForm loss by default,
weak supervision with DenseCRF, NUS, the InverseForm regressor) says what is trained; every run
goes through the same engine (experiment/engine.py): torchrun/DDP (NCCL on GPUs, gloo on CPUs,
SyncBatchNorm with more than one process), AMP, exact ``--resume``, atomic ``last.pth`` and
``best.pth``, SIGTERM checkpoints, TensorBoard, validation.  Configs that ask for a comparison
(``weak.compare``, ``nus.mode: compare``, ``nus.seeds``) start several ordinary runs and report
them together.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

if __package__ in (None, ""):  # run as a script (torchrun experiment/train.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiment.cli import AMP_CHOICES, SHARED_FLAGS, flag_overrides, script_main, script_parser, str2bool
from experiment.errors import UserError
from experiment.methods import RunOptions, run
from experiment.network import read_model_file
from experiment.run_config import load_run_config

FLAGS = {**SHARED_FLAGS, "max_iters": "train.max_iters", "amp": "train.amp", "seed": "train.seed",
         "deterministic": "train.deterministic", "compile": "train.compile"}


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__, "run directory: config, checkpoints, metrics, TensorBoard, predictions",
                      opt_example="optim.lr=0.01 train.batch_size=4", config_required=True)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH|auto",
                   help="continue from PATH, or from OUTPUT_DIR/last.pth when no path is given; refused "
                        "(naming the keys) when the settings differ from the checkpoint's.  auto: continue "
                        "OUTPUT_DIR/last.pth when it exists, else start anew (one command line for the first "
                        "launch and every restart, e.g. under torchrun --max-restarts; train.resume: auto)")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew in an OUTPUT_DIR that holds an earlier run: its outputs are moved into "
                        "OUTPUT_DIR/replaced-<time>/ (without it such a directory is refused)")
    p.add_argument("--stop_after", type=int, help="stop (with a checkpoint) after this iteration; resume later")
    p.add_argument("--max_iters", type=int, help="cap on iterations (the schedule spans them)")
    p.add_argument("--amp", nargs="?", const="on", choices=AMP_CHOICES,
                   help="autocast (train.amp): auto (bf16 on CUDA, off on CPU), on (= bf16; the bare flag), off, "
                        "bf16, fp16 (with a gradient scaler)")
    p.add_argument("--seed", type=int, help="random seed (train.seed); rank r uses seed + r")
    p.add_argument("--compile", nargs="?", const="on", metavar="MODE",
                   help="torch.compile the model (train.compile): on (the bare flag), off, max-autotune, "
                        "reduce-overhead, or a debugging backend (eager, aot_eager)")
    p.add_argument("--deterministic", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="deterministic algorithms, no cuDNN benchmark (train.deterministic); the bare flag means on")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    if not args.config:
        raise UserError("--config is required, e.g. --config configs/synthetic.yaml")
    cfg = load_run_config(args.config, flag_overrides(args, FLAGS))  # + cuda_overrides on CUDA
    model = getattr(cfg, "model", None)
    for what in ("init_checkpoint", "pretrained_backbone"):
        path = getattr(model, what, None)
        if path and not os.path.isfile(path):
            read_model_file(path, f"model.{what}")  # says what is wrong with it, in one line
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    options = RunOptions(resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after)
    script_main(args, config_from_args, lambda cfg, ctx: run(cfg, ctx, options), "train_log.txt")


if __name__ == "__main__":
    main()
