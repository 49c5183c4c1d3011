"""Does the InverseForm term help?  The paper's ablation (its Table 1), run here.

    python -m experiment.ablation --config configs/synthetic_ablation.yaml
    torchrun --nproc_per_node=8 -m experiment.ablation --config configs/cityscapes_ablation.yaml \\
        --dataset_dir /path/to/cityscapes

Trains every (objective, seed) of the config's ``ablation`` section as an ordinary segmentation
run and reports them side by side (experiment/comparisons/ablation.py): the table (mean and
spread over the seeds), OUTPUT_DIR/ablation.json and OUTPUT_DIR/ablation.png.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script (torchrun experiment/ablation.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiment.cli import SHARED_FLAGS, flag_overrides, script_main, script_parser
from experiment.comparisons.ablation import VARIANTS, AblationExperimentConfig, run_ablation
from experiment.errors import UserError
from experiment.methods import RunOptions
from experiment.run_config import load_run_config

FLAGS = {**SHARED_FLAGS, "seeds": "ablation.seeds", "variants": "ablation.variants"}


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__, "the ablation's directory: one run per variant and seed, ablation.json, ablation.png",
                      opt_example="ablation.seeds=[0,1] train.epochs=10", config_required=True)
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=(True, "auto"), metavar="auto",
                   help="keep the finished runs and continue an interrupted one (OUTPUT_DIR/<variant>/seed<k>); "
                        "auto: the same, and start anew when OUTPUT_DIR holds no ablation")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew in an OUTPUT_DIR holding an earlier ablation (moved to OUTPUT_DIR/replaced-<time>/)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (ablation.seeds)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="objectives (ablation.variants)")
    return p


def config_from_args(args: argparse.Namespace) -> AblationExperimentConfig:
    if not args.config:
        raise UserError("--config is required, e.g. --config configs/synthetic_ablation.yaml")
    return load_run_config(args.config, flag_overrides(args, FLAGS), schema=AblationExperimentConfig)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    options = RunOptions(resume=args.resume, overwrite=args.overwrite)
    script_main(args, config_from_args, lambda cfg, ctx: run_ablation(cfg, ctx, options), "ablation_log.txt")


if __name__ == "__main__":
    main()
