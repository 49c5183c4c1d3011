"""Validate a segmentation checkpoint on Cityscapes (or the synthetic stand-in), on one or many
processes (torchrun: NCCL on GPUs, gloo on CPUs).

The reference's command line still works::

    torchrun --nproc_per_node=8 experiment/validation.py --output_dir runs/val_ocr48 \\
        --model_path checkpoints/hrnet48_OCR_IF_checkpoint.pth --arch ocrnet.HRNet --hrnet_base 48 --has_edge True

Every image of the split is evaluated exactly once across ranks (contiguous shards, no
padding), at full resolution, single scale, no flip by default - HMS runs its own hierarchical
multi-scale inference (``--scales``); ``--sliding_window``, ``--flip`` and, for the other archs,
``--scales`` select the test-time modes of ``experiment/tta.py``.  Rank 0 prints a per-class IoU
table with mIoU, pixel accuracy, mean class accuracy, fwIoU, the validation loss (the joint
loss, with the InverseForm term when its regressor file exists) and the boundary metrics (mBA as
in CascadePSP, boundary F-score), writes them to ``OUTPUT_DIR/metrics.json`` and to TensorBoard
with a few images; ``--dump_predictions`` writes colour PNGs, labelIds PNGs named as the
official Cityscapes evaluator expects, and edge-probability PNGs (experiment/evaluation.py).

A checkpoint of this project describes its model (``--arch`` etc. are needed only for the
released files).  ``--has_edge False`` on a checkpoint with an edge head drops the head's
weights and gives the same segmentation: InverseForm costs nothing at inference.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script (torchrun experiment/validation.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import ClassTable
from experiment.acceleration import compile_model, evaluation_amp, place_model
from experiment.cli import (AMP_CHOICES, INFERENCE_FLAGS, SHARED_FLAGS, add_inference_arguments, explicit_keys,
                            flag_overrides, script_main, script_parser, str2bool)
from experiment.data import class_table, dataset_root, eval_loader, val_dataset
from experiment.errors import UserError
from experiment.evaluation import evaluate, metrics_table, write_metrics
from experiment.joint_loss import joint_loss, load_inverseform
from experiment.network import MODEL_KEYS, describe_from_checkpoint, load_model, read_model_file
from experiment.pictures import PredictionDumper
from experiment.run_config import load_run_config
from experiment.run_dir import VALIDATION, claim_output_dir, holding
from experiment.runtime import Rank0Writer, on_main_first
from experiment.tta import inference_mode_from_config
from utils import dist
from utils.config import save_config

log = logging.getLogger("experiment.validation")

FLAGS = {**SHARED_FLAGS, "arch": "model.arch", "hrnet_base": "model.hrnet_base", "has_edge": "model.has_edge",
         "batch_size": "val.batch_size", "num_workers": "val.num_workers", "amp": "val.amp",
         "dump_predictions": "val.dump_predictions", "inverseform_path": "loss.inverseform_path",
         "boundary_tolerance": "val.boundary_tolerance", "max_images": "val.max_images", "compile": "val.compile",
         **INFERENCE_FLAGS}


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__, "where metrics.json, predictions and TensorBoard logs go",
                      opt_example="val.batch_size=2 val.max_images=10")
    p.required_arguments.add_argument(
        "--model_path", "--model-path", dest="model_path", required=True,
        help="checkpoint to evaluate (released .pth or one of ours); ours store their architecture, so "
             "--arch/--hrnet_base/--has_edge are needed only for the released files")
    p.add_argument("--arch", help="ocrnet.AuxHRNet (default for released files) | lighthrnet.HRNet16 | ocrnet.HRNet "
                                  "| ocrnet.HRNet_Mscale")
    p.add_argument("--hrnet_base", type=int, help="trunk width: 16, 18 or 48 (default: the arch's own)")
    p.add_argument("--has_edge", type=str2bool, help="build the edge head (True/False); False on an edge "
                                                     "checkpoint drops the head")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="dataset split (default val)")
    p.add_argument("--batch_size", type=int, help="images per process")
    p.add_argument("--num_workers", type=int, help="data-loading workers per process")
    p.add_argument("--amp", nargs="?", const="on", choices=AMP_CHOICES,
                   help="autocast: auto (off on CPU; on CUDA bf16 only for the archs where it was measured "
                        "faster than fp32, see experiment/acceleration.py), on (=bf16; the bare flag), off, bf16, fp16")
    add_inference_arguments(p)
    p.add_argument("--dump_predictions", type=str2bool, nargs="?", const=True, default=None,
                   help="write colour, labelIds and edge PNGs under OUTPUT_DIR/predictions")
    p.add_argument("--inverseform_path", help="regressor for the validation loss's InverseForm term")
    p.add_argument("--boundary_tolerance", type=int, help="pixels, for the boundary F-score")
    p.add_argument("--max_images", type=int, help="evaluate only the first N images")
    p.add_argument("--compile", nargs="?", const="on", metavar="MODE",
                   help="torch.compile the eval forward (val.compile): on (the bare flag), off, max-autotune, "
                        "reduce-overhead, or a debugging backend (eager, aot_eager)")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse an OUTPUT_DIR holding an earlier validation (its outputs move to OUTPUT_DIR/replaced-<time>/)")
    p.add_argument("--model_summary", type=str2bool, nargs="?", const=True, default=False,
                   help="print parameters and FLOPs at 1024x2048 and exit")
    # Accepted for compatibility with the reference's command line; native DDP/AMP replace them.
    p.add_argument("--apex", type=str2bool, default=None, help=argparse.SUPPRESS)
    p.add_argument("--syncbn", type=str2bool, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fp16", type=str2bool, default=None, help=argparse.SUPPRESS)
    p.add_argument("--crop_size", default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The config of the validation, with the model the checkpoint describes; the checkpoint is
    read once, here, and kept in ``args.model_state`` for :func:`validate`."""
    if args.fp16 is not None and args.amp is None:  # the reference's --fp16 flag
        args.amp = "fp16" if args.fp16 else "off"
    overrides = flag_overrides(args, FLAGS)
    if getattr(args, "output_dir", None) is None:  # never the training run's output_dir of a --config file
        stem = os.path.splitext(os.path.basename(args.model_path or ""))[0] or "model"
        overrides.append(("output_dir", os.path.join("runs", "validation", stem)))
    args.model_state = read_model_file(args.model_path, "model file")
    cfg = load_run_config(args.config, overrides, defaults={"output_dir": "runs/validation"})
    explicit = explicit_keys(args.config, args.opt, FLAGS, args, "model", MODEL_KEYS)
    describe_from_checkpoint(cfg, args.model_state, args.model_path, explicit)
    explicit = explicit_keys(args.config, args.opt, FLAGS, args, "data", EDGE_TARGET_KEYS)
    edge_targets_from_checkpoint(cfg, args.model_state, explicit)
    return cfg


EDGE_TARGET_KEYS = ("edge_radius", "edge_image_border")


def edge_targets_from_checkpoint(cfg: Any, state: Any, explicit: Dict[str, str]) -> None:
    """Score edges against the targets the checkpoint's run defined (its stored ``data.edge_radius``
    and ``data.edge_image_border``), unless the user set them: with other targets the edge F of
    the same weights differs from the one the run printed.  Released files store no config."""
    stored = state.get("config") if isinstance(state, dict) else None
    data = stored.get("data") if isinstance(stored, dict) else None
    for key in EDGE_TARGET_KEYS:
        if key not in explicit and isinstance(data, dict) and key in data:
            setattr(cfg.data, key, data[key])  # recorded in OUTPUT_DIR/config.yaml


def validate(cfg: Any, model_path: str, ctx: dist.DistContext, split: str = "val", model_summary: bool = False,
             overwrite: bool = False, state: Any = None) -> Dict[str, Any]:
    """Evaluate ``model_path`` (``state``: its contents, if already read) on ``split``."""
    net = load_model(cfg, read_model_file(model_path, "model file") if state is None else state, model_path)
    if model_summary:
        from models import count_flops, count_parameters

        if ctx.is_main:
            flops = count_flops(net, (1, 3, 1024, 2048))
            print(f"{cfg.model.arch}: {count_parameters(net):,} parameters, {flops / 1e9:.1f} GFLOPs at 1024x2048")
        return {}
    root, synthetic = dataset_root(cfg.data)
    table = class_table(cfg.data, root)
    if cfg.model.num_classes != table.num_classes and split != "test":
        raise UserError(f"config key 'model.num_classes' is {cfg.model.num_classes} but the {cfg.data.dataset} "
                        f"dataset {root} has {table.num_classes} classes (train ids 0-{table.num_classes - 1})")
    device = ctx.device
    place_model(net, device).eval()  # channels_last on CUDA
    amp_dtype = evaluation_amp(cfg, device)  # the precision of the validations that chose best.pth
    criterion = None
    if split != "test":
        inverseform = load_inverseform(cfg.loss, device) if cfg.model.has_edge else None
        criterion = joint_loss(cfg.loss, cfg.model.num_classes, inverseform).to(device)
    with holding(cfg.output_dir):
        on_main_first(lambda: claim_output_dir(cfg.output_dir, VALIDATION, overwrite=overwrite, resuming_here=False))
        metrics = _evaluate_checkpoint(cfg, net, model_path, ctx, split, criterion, amp_dtype, (root, synthetic, table))
    return metrics


def _evaluate_checkpoint(cfg: Any, net, model_path: str, ctx: dist.DistContext, split: str, criterion,
                         amp_dtype, data: Tuple[str, bool, ClassTable]) -> Dict[str, Any]:
    """Evaluate on ``data`` (root, is_synthetic, class table), then write and print the metrics (rank 0)."""
    device = ctx.device
    root, synthetic, table = data
    dataset = val_dataset(cfg.data, root, split, cfg.val.max_images)
    loader = eval_loader(dataset, cfg.val.batch_size, cfg.val.num_workers)
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    dumper = PredictionDumper(os.path.join(cfg.output_dir, "predictions"), cfg.model.has_edge, table) \
        if cfg.val.dump_predictions else None
    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), ctx.is_main)
    inference = inference_mode_from_config(cfg.val, cfg.model)
    log.info("validating %d images of %s/%s (%s) on %d process(es), device %s, amp %s, inference: %s", len(dataset),
             root, split, "synthetic" if synthetic else cfg.data.dataset, ctx.world_size, device, amp_dtype or "off",
             inference.describe())
    start = time.time()
    metrics = evaluate(compile_model(net, cfg.val.compile), loader, device, num_classes=cfg.model.num_classes,
                       criterion=criterion, amp_dtype=amp_dtype, boundary_tolerance=cfg.val.boundary_tolerance,
                       dumper=dumper, writer=writer, num_images_logged=cfg.val.num_images_logged, inference=inference,
                       class_table=table, boundary_iou=(cfg.val.boundary_iou_dilation, cfg.val.boundary_iou_pixels))
    elapsed = time.time() - start
    metrics.update(inference=inference.describe(), model_path=os.path.abspath(model_path), arch=cfg.model.arch,
                   hrnet_base=net.hrnet_base, has_edge=cfg.model.has_edge, split=split, dataset=root,
                   synthetic_dataset=synthetic, world_size=ctx.world_size, seconds=round(elapsed, 2),
                   images_per_second=round(metrics["num_images"] / elapsed, 3) if elapsed > 0 else None)
    if ctx.is_main:
        _print(metrics, write_metrics(metrics, writer, cfg.output_dir, step=0), elapsed, dumper)
    writer.close()
    return metrics


def _print(metrics: Dict[str, Any], path: str, elapsed: float, dumper: Optional[PredictionDumper]) -> None:
    print(metrics_table(metrics))
    print(f"{metrics['num_images']} images in {elapsed:.1f}s ({metrics['images_per_second']} img/s), "
          f"inference: {metrics['inference']}; metrics: {path}")
    if dumper is not None:
        print(f"predictions: {os.path.dirname(dumper.dirs['color'])}")


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    def body(cfg: Any, ctx: dist.DistContext) -> None:
        if args.apex or args.syncbn:
            log.info("--apex/--syncbn are accepted for compatibility: this code uses native DDP and AMP")
        if args.crop_size is not None:
            log.info("--crop_size %s is accepted for the reference's command line: validation evaluates whole "
                     "images (--sliding_window evaluates crops)", args.crop_size)
        validate(cfg, args.model_path, ctx, split=args.split, model_summary=args.model_summary,
                 overwrite=args.overwrite, state=args.model_state)

    script_main(args, config_from_args, body, "validation_log.txt")


if __name__ == "__main__":
    main()
