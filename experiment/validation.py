"""Validate a segmentation checkpoint on Cityscapes (or the synthetic stand-in), on one or many
processes (torchrun: NCCL on GPUs, gloo on CPUs).

The reference's command line still works::

    torchrun --nproc_per_node=8 experiment/validation.py --output_dir runs/val_ocr48 \\
        --model_path checkpoints/hrnet48_OCR_IF_checkpoint.pth --arch ocrnet.HRNet --hrnet_base 48 --has_edge True

Every image of the split is evaluated exactly once across ranks (contiguous shards, no
padding), at full resolution, single scale, no flip - HMS runs its own hierarchical
multi-scale inference (``--scales``).  Per-rank confusion matrices and boundary counts are
summed with one all-reduce.  Rank 0 prints a per-class IoU table with mIoU, pixel accuracy,
mean class accuracy, fwIoU, the validation loss (the joint loss, with the InverseForm term
when its regressor file exists) and the boundary metrics (mBA as in CascadePSP, boundary
F-score), writes them to ``OUTPUT_DIR/metrics.json`` and to TensorBoard with a few images;
``--dump_predictions`` writes colour PNGs, labelIds PNGs named as the official Cityscapes
evaluator expects, and edge-probability PNGs.

``--has_edge False`` on a checkpoint with an edge head drops the head's weights and gives the
same segmentation: InverseForm costs nothing at inference.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script (torchrun experiment/validation.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
import torch
from tqdm import tqdm

from datasets import IMAGENET_MEAN, IMAGENET_STD, TRAIN_CLASS_NAMES, colorize, trainid_to_labelid
from experiment.common import (SHARED_FLAGS, Rank0Writer, UserError, autocast, flag_overrides, resolve_amp,
                               script_main, script_parser, str2bool)
from experiment.config import ExperimentConfig
from experiment.data import dataset_root, eval_loader, val_dataset
from experiment.losses import joint_loss, load_inverseform
from models import get_net, load_checkpoint
from utils import dist
from utils.config import load_config, save_config
from utils.io import atomic_write_json
from utils.metrics import (boundary_accuracy, boundary_f_counts, boundary_f_from_counts, confusion_matrix,
                           format_table, majority_class_confusion, scores_from_confusion)

log = logging.getLogger("experiment.validation")

LOSS_PARTS = ("seg", "edge_bce", "edge_att", "inverseform")


# ----------------------------------------------------------------------------- images
def denormalize(image: torch.Tensor) -> np.ndarray:
    """3 x H x W normalised tensor -> H x W x 3 uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return (rgb * 255 + 0.5).astype(np.uint8)


def error_map(pred: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Grey where right, red where wrong, black where the ground truth is void."""
    out = np.full(label.shape + (3,), 128, np.uint8)
    out[(pred != label) & (label != ignore_index)] = (255, 0, 0)
    out[label == ignore_index] = 0
    return out


def edge_image(prob: np.ndarray) -> np.ndarray:
    return (np.clip(prob, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_png(path: str, array: np.ndarray) -> None:
    """Write RGB or single-channel uint8 PNGs (cv2 stores BGR); no half-written files."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    tmp = f"{path}.tmp.png"
    if not cv2.imwrite(tmp, array):
        raise OSError(f"could not write {path}")
    os.replace(tmp, path)


class PredictionDumper:
    """``OUTPUT_DIR/predictions/{color,labelIds,edges}/<name>_*.png``; the labelIds folder is
    what the official evaluator's CITYSCAPES_RESULTS should point at."""

    def __init__(self, root: str, with_edges: bool):
        self.dirs = {"color": os.path.join(root, "color"), "labelIds": os.path.join(root, "labelIds")}
        if with_edges:
            self.dirs["edges"] = os.path.join(root, "edges")
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)

    def __call__(self, name: str, pred: np.ndarray, edge_prob: Optional[np.ndarray]) -> None:
        write_png(os.path.join(self.dirs["color"], f"{name}_color.png"), colorize(pred))
        write_png(os.path.join(self.dirs["labelIds"], f"{name}_labelIds.png"),
                  trainid_to_labelid(pred).astype(np.uint8))
        if edge_prob is not None and "edges" in self.dirs:
            write_png(os.path.join(self.dirs["edges"], f"{name}_edge.png"), edge_image(edge_prob))


# ----------------------------------------------------------------------------- evaluation
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader, device: torch.device, *, num_classes: int = 19,
             criterion: Optional[torch.nn.Module] = None, amp_dtype: Optional[torch.dtype] = None,
             boundary_tolerance: int = 2, dumper: Optional[PredictionDumper] = None,
             writer: Optional[Rank0Writer] = None, step: int = 0, num_images_logged: int = 4,
             progress: bool = True, desc: str = "validation") -> Dict[str, Any]:
    """Evaluate ``net`` on ``loader`` (sharded by DistributedEvalSampler) and return the metrics,
    identical on every rank.  Used by validation.py and by train.py's periodic validation."""
    was_training = net.training
    net.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sums = torch.zeros(1 + len(LOSS_PARTS), dtype=torch.float64, device=device)
    # [images, mBA sum, mBA count]
    counts = torch.zeros(3, dtype=torch.float64)
    boundary = np.zeros((num_classes, 4), dtype=np.int64)
    logged = 0
    present = set()  # the loss terms the criterion computes (edge terms only with an edge head)
    bar = tqdm(total=len(loader.sampler), desc=desc, unit="img", disable=not (progress and dist.is_main_process()),
               dynamic_ncols=True, leave=False)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = net(images)
        logits = out["pred"].float()
        pred = logits.argmax(1)
        conf += confusion_matrix(pred, labels, num_classes)
        edge_prob = out.get("edge_prob")
        if criterion is not None:
            edges = batch["edge"].to(device, non_blocking=True)
            edge_logits = torch.logit(edge_prob.float(), eps=1e-6) if edge_prob is not None else None
            total, parts = criterion(logits, edge_logits, labels, edges if edge_logits is not None else None)
            n = images.shape[0]
            present.update(parts)
            values = [total.detach()] + [parts.get(k, torch.zeros((), device=device)) for k in LOSS_PARTS]
            loss_sums += torch.stack([v.double() for v in values]) * n
        pred_np = pred.cpu().numpy().astype(np.uint8)
        label_np = labels.cpu().numpy().astype(np.uint8)
        edge_np = edge_prob[:, 0].float().cpu().numpy() if edge_prob is not None else None
        for i, name in enumerate(batch["name"]):
            counts[0] += 1
            mba = boundary_accuracy(pred_np[i], label_np[i])
            if not math.isnan(mba):
                counts[1] += mba
                counts[2] += 1
            boundary += boundary_f_counts(pred_np[i], label_np[i], num_classes, boundary_tolerance)
            if dumper is not None:
                dumper(name, pred_np[i], None if edge_np is None else edge_np[i])
            if writer is not None and logged < num_images_logged:
                writer.add_image(f"val/{logged}_input", denormalize(batch["image"][i]), step, dataformats="HWC")
                writer.add_image(f"val/{logged}_prediction", colorize(pred_np[i]), step, dataformats="HWC")
                writer.add_image(f"val/{logged}_errors", error_map(pred_np[i], label_np[i]), step, dataformats="HWC")
                if edge_np is not None:
                    writer.add_image(f"val/{logged}_edge", edge_image(edge_np[i]), step, dataformats="HW")
                logged += 1
        bar.update(len(batch["name"]))
    bar.close()

    dist.all_reduce(conf)
    dist.all_reduce(loss_sums)
    counts = dist.all_reduce(counts.to(device)).cpu()
    boundary_t = dist.all_reduce(torch.from_numpy(boundary).to(device)).cpu().numpy()
    conf_np = conf.cpu().numpy()
    metrics: Dict[str, Any] = {"num_images": int(counts[0])}
    metrics.update(scores_from_confusion(conf_np))
    metrics["majority_class_miou"] = scores_from_confusion(majority_class_confusion(conf_np))["miou"]
    metrics["mba"] = float(counts[1] / counts[2]) if counts[2] > 0 else float("nan")
    metrics.update(boundary_f_from_counts(boundary_t))
    metrics["boundary_tolerance"] = boundary_tolerance
    if criterion is not None and counts[0] > 0:
        sums = (loss_sums.cpu() / counts[0]).tolist()
        metrics["val_loss"] = sums[0]
        metrics["val_loss_parts"] = {k: v for k, v in zip(LOSS_PARTS, sums[1:]) if k in present}
    metrics["class_names"] = list(TRAIN_CLASS_NAMES[:num_classes])
    net.train(was_training)
    return metrics


def metrics_table(metrics: Dict[str, Any]) -> str:
    summary = {"mIoU": metrics["miou"], "pixel accuracy": metrics["pixel_acc"],
               "mean class accuracy": metrics["mean_class_acc"], "fwIoU": metrics["fwiou"],
               "mBA": metrics["mba"], f"boundary F (tol {metrics['boundary_tolerance']}px)": metrics["boundary_f"]}
    if "majority_class_miou" in metrics:
        summary["majority-class mIoU"] = metrics["majority_class_miou"]
    text = format_table(metrics["class_names"], metrics["per_class_iou"], summary,
                        {"boundary F": metrics["per_class_boundary_f"]})
    if "val_loss" in metrics:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in metrics["val_loss_parts"].items())
        text += f"\nvalidation loss     {metrics['val_loss']:.4f}  ({parts})"
    return text


def write_metrics(metrics: Dict[str, Any], writer: Rank0Writer, output_dir: str, step: int, prefix: str = "val",
                  filename: str = "metrics.json") -> str:
    for key in ("miou", "pixel_acc", "mean_class_acc", "fwiou", "mba", "boundary_f", "val_loss"):
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    for name, iou in zip(metrics["class_names"], metrics["per_class_iou"]):
        if iou is not None:
            writer.add_scalar(f"{prefix}_class_iou/{name}", iou, step)
    path = os.path.join(output_dir, filename)
    atomic_write_json(path, _json_safe(metrics))
    return path


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__, "where metrics.json, predictions and TensorBoard logs go")
    p.add_argument("--model_path", help="checkpoint to evaluate (released .pth or one of ours)")
    p.add_argument("--arch", help="ocrnet.AuxHRNet | lighthrnet.HRNet16 | ocrnet.HRNet | ocrnet.HRNet_Mscale")
    p.add_argument("--hrnet_base", type=int, help="trunk width: 16, 18 or 48 (default: the arch's own)")
    p.add_argument("--has_edge", type=str2bool, help="build the edge head (True/False)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--batch_size", type=int, help="images per process")
    p.add_argument("--num_workers", type=int, help="data-loading workers per process")
    p.add_argument("--amp", choices=("auto", "on", "off", "bf16", "fp16"),
                   help="autocast: auto (bf16 on CUDA, off on CPU), on (=bf16), off, bf16, fp16")
    p.add_argument("--scales", help="HMS evaluation scales, e.g. 0.25,0.5,1.0,2.0")
    p.add_argument("--dump_predictions", type=str2bool, nargs="?", const=True, default=None,
                   help="write colour, labelIds and edge PNGs under OUTPUT_DIR/predictions")
    p.add_argument("--inverseform_path", help="regressor for the validation loss's InverseForm term")
    p.add_argument("--boundary_tolerance", type=int, help="pixels, for the boundary F-score")
    p.add_argument("--max_images", type=int, help="evaluate only the first N images")
    p.add_argument("--model_summary", type=str2bool, nargs="?", const=True, default=False,
                   help="print parameters and FLOPs at 1024x2048 and exit")
    # Accepted for compatibility with the reference's command line; native DDP/AMP replace them.
    p.add_argument("--apex", type=str2bool, default=None, help=argparse.SUPPRESS)
    p.add_argument("--syncbn", type=str2bool, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fp16", type=str2bool, default=None, help=argparse.SUPPRESS)
    p.add_argument("--crop_size", default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    if args.scales is not None:
        args.scales = "[" + str(args.scales) + "]"
    if args.amp == "on":
        args.amp = "bf16"
    if args.fp16 is not None and args.amp is None:  # the reference's --fp16 flag
        args.amp = "fp16" if args.fp16 else "off"
    overrides = flag_overrides(args, {
        **SHARED_FLAGS, "arch": "model.arch", "hrnet_base": "model.hrnet_base", "has_edge": "model.has_edge",
        "batch_size": "val.batch_size", "num_workers": "val.num_workers", "amp": "val.amp",
        "scales": "model.eval_scales", "dump_predictions": "val.dump_predictions",
        "inverseform_path": "loss.inverseform_path", "boundary_tolerance": "val.boundary_tolerance",
        "max_images": "val.max_images"})
    return load_config(ExperimentConfig, args.config, overrides, defaults={"output_dir": "runs/validation"})


def build_model(cfg: ExperimentConfig) -> torch.nn.Module:
    options = {}
    if cfg.model.eval_scales is not None:
        if cfg.model.arch != "ocrnet.HRNet_Mscale":
            log.warning("--scales / model.eval_scales only apply to ocrnet.HRNet_Mscale; ignored for %s",
                        cfg.model.arch)
        else:
            options["scales"] = tuple(cfg.model.eval_scales)
    return get_net(cfg.model.arch, num_classes=cfg.model.num_classes, has_edge=cfg.model.has_edge,
                   hrnet_base=cfg.model.hrnet_base, **options)


def validate(cfg: ExperimentConfig, model_path: str, ctx: dist.DistContext, split: str = "val",
             model_summary: bool = False) -> Dict[str, Any]:
    if not model_path:
        raise UserError("--model_path is required: the checkpoint to evaluate")
    if not os.path.isfile(model_path):
        raise UserError(f"model file {model_path} does not exist")
    net = build_model(cfg)
    report = load_checkpoint(net, model_path)
    log.info("loaded %s into %s (hrnet_base %s, has_edge %s): %s", model_path, cfg.model.arch, net.hrnet_base,
             cfg.model.has_edge, report)
    if model_summary:
        from models import count_flops, count_parameters

        if ctx.is_main:
            flops = count_flops(net, (1, 3, 1024, 2048))
            print(f"{cfg.model.arch}: {count_parameters(net):,} parameters, {flops / 1e9:.1f} GFLOPs at 1024x2048")
        return {}
    device = ctx.device
    net.to(device).eval()
    amp_dtype = resolve_amp(cfg.val.amp, device)
    root, synthetic = dataset_root(cfg.data)
    dataset = val_dataset(cfg.data, root, split, cfg.val.max_images)
    loader = eval_loader(dataset, cfg.val.batch_size, cfg.val.num_workers)
    criterion = None
    if split != "test":
        inverseform = load_inverseform(cfg.loss, device) if cfg.model.has_edge else None
        criterion = joint_loss(cfg.loss, cfg.model.num_classes, inverseform).to(device)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    dumper = PredictionDumper(os.path.join(cfg.output_dir, "predictions"), cfg.model.has_edge) \
        if cfg.val.dump_predictions else None
    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), ctx.is_main)
    log.info("validating %d images of %s/%s (%s) on %d process(es), device %s, amp %s", len(dataset), root, split,
             "synthetic" if synthetic else "Cityscapes", ctx.world_size, device, amp_dtype or "off")
    start = time.time()
    metrics = evaluate(net, loader, device, num_classes=cfg.model.num_classes, criterion=criterion,
                       amp_dtype=amp_dtype, boundary_tolerance=cfg.val.boundary_tolerance, dumper=dumper,
                       writer=writer, num_images_logged=cfg.val.num_images_logged)
    elapsed = time.time() - start
    metrics.update(model_path=os.path.abspath(model_path), arch=cfg.model.arch, hrnet_base=net.hrnet_base,
                   has_edge=cfg.model.has_edge, split=split, dataset=root, synthetic_dataset=synthetic,
                   world_size=ctx.world_size, seconds=round(elapsed, 2),
                   images_per_second=round(metrics["num_images"] / elapsed, 3) if elapsed > 0 else None)
    if ctx.is_main:
        path = write_metrics(metrics, writer, cfg.output_dir, step=0)
        print(metrics_table(metrics))
        print(f"{metrics['num_images']} images in {elapsed:.1f}s ({metrics['images_per_second']} img/s); "
              f"metrics: {path}")
        if dumper is not None:
            print(f"predictions: {os.path.dirname(dumper.dirs['color'])}")
    writer.close()
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    def body(cfg: ExperimentConfig, ctx: dist.DistContext) -> None:
        if args.apex or args.syncbn:
            log.info("--apex/--syncbn are accepted for compatibility: this code uses native DDP and AMP")
        validate(cfg, args.model_path, ctx, split=args.split, model_summary=args.model_summary)

    script_main(args, config_from_args, body, "validation_log.txt")


if __name__ == "__main__":
    main()
