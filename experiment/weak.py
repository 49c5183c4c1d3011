"""Weakly-supervised training from scribbles (Tang et al., ECCV 2018): partial cross-entropy on
the labeled pixels plus the DenseCRF regularized loss of rloss/ on every pixel inside the roi.

Wired into experiment/train.py by the ``weak`` config section: the datasets (scribbles drawn from
the full labels of a Cityscapes root, or PASCAL VOC 2012 with the reference's scribbles), the
objective, and the comparison the paper reports (pCE / pCE + DenseCRF / full supervision, same
seed, schedule and scribbles), which writes OUTPUT_DIR/comparison.json.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from datasets import IMAGENET_MEAN, IMAGENET_STD, Cityscapes, ScribbleCityscapes, TrainTransform, ValTransform
from experiment.children import ChildRun, run_children, use_children
from experiment.common import UserError
from experiment.config import ExperimentConfig, LossConfig, WeakConfig
from experiment.data import color_jitter, dataset_root
from experiment.losses import joint_loss
from rloss import DenseCRFLoss
from utils import dist
from utils.io import atomic_write_text

log = logging.getLogger("experiment.weak")

IGNORE = 255


def check_config(cfg: ExperimentConfig) -> None:
    """Edge and InverseForm terms need boundaries of full labels: refused with scribbles."""
    if cfg.weak.labels == "scribbles" and cfg.model.has_edge and (
            cfg.loss.edge_weight > 0 or cfg.loss.att_weight > 0 or cfg.loss.inv_weight > 0):
        raise UserError("weak supervision with scribbles: the edge and InverseForm terms need full labels; set "
                        "model.has_edge=false (or loss.edge_weight=0 loss.att_weight=0 loss.inv_weight=0)")


# ----------------------------------------------------------------------------- data
def datasets(cfg: ExperimentConfig) -> Tuple[str, bool, Any, Any]:
    """(root, is_synthetic, train dataset with roi, val dataset with full labels)."""
    check_config(cfg)
    d, w = cfg.data, cfg.weak
    transform = TrainTransform(crop_size=d.crop_size, scale_range=d.scale_range, flip=d.flip,
                               color_jitter=color_jitter(d.color_jitter), blur_prob=d.blur_prob,
                               edge_radius=d.edge_radius, with_roi=True)
    if w.source == "voc":
        from datasets.voc import VOC_NUM_CLASSES, VOCSegmentation

        if cfg.model.num_classes != VOC_NUM_CLASSES:
            raise UserError(f"config key 'model.num_classes' is {cfg.model.num_classes} but PASCAL VOC has "
                            f"{VOC_NUM_CLASSES} classes; set model.num_classes={VOC_NUM_CLASSES}")
        labels = "scribble" if w.labels == "scribbles" else "full"
        try:
            train = VOCSegmentation(w.voc_dir, d.train_split, labels=labels, transform=transform, seed=cfg.train.seed)
            val = VOCSegmentation(w.voc_dir, d.val_split, labels="full",
                                  transform=ValTransform(edge_radius=d.edge_radius))
        except FileNotFoundError as exc:
            raise UserError(f"weak.voc_dir: {exc}") from exc
        if cfg.val.max_images:
            val = torch.utils.data.Subset(val, range(min(cfg.val.max_images, len(val))))
        return w.voc_dir, False, train, val
    root, synthetic = dataset_root(d)
    common = dict(edge_radius=d.edge_radius, class_uniform_fraction=d.class_uniform_fraction, seed=cfg.train.seed)
    if w.labels == "full":
        train = Cityscapes(root, d.train_split, transform=transform, **common)
    else:
        train = ScribbleCityscapes(root, d.train_split, transform=transform, scribble_seed=w.scribble_seed,
                                   scribble_fraction=w.scribble_fraction, stroke_width=w.stroke_width,
                                   min_area=w.min_area, precompute=synthetic, **common)
    val = Cityscapes(root, d.val_split, transform=ValTransform(edge_radius=d.edge_radius), edge_radius=d.edge_radius)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"{root}: the {d.train_split!r} or {d.val_split!r} split holds no images")
    if cfg.val.max_images:
        val = torch.utils.data.Subset(val, range(min(cfg.val.max_images, len(val))))
    return root, synthetic, train, val


# ----------------------------------------------------------------------------- objective
def image_to_255(images: torch.Tensor) -> torch.Tensor:
    """The network input (ImageNet-normalised) back to RGB in [0, 255], as the DenseCRF loss wants it."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.detach().float() * std + mean) * 255.0


def partial_cross_entropy(logits: torch.Tensor, label: torch.Tensor, batch_average: bool = False) -> torch.Tensor:
    """Cross-entropy averaged over the labeled pixels (label != 255) of the batch; 0 when there is
    none (no NaN).  ``batch_average`` divides once more by the batch size, as the reference does."""
    logits = logits.float()
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="sum")
    loss = total / (label != IGNORE).sum().clamp(min=1)
    return loss / label.shape[0] if batch_average else loss


class WeakObjective(nn.Module):
    """pCE on every segmentation output (aux outputs x ``loss.aux_weight``) plus
    ``loss.densecrf_weight`` x DenseCRF on the main output's softmax at input resolution.
    Called like :class:`experiment.losses.SegmentationObjective` with the de-normalised image and
    the roi as keywords; ``joint`` is the usual joint loss, for the validation loss on full labels."""

    def __init__(self, loss: LossConfig, weak: WeakConfig, num_classes: int):
        super().__init__()
        self.loss_cfg, self.weak = loss, weak
        self.joint = joint_loss(loss, num_classes, None)
        self.densecrf = DenseCRFLoss(loss.densecrf_weight, loss.densecrf_sigma_rgb, loss.densecrf_sigma_xy,
                                     loss.densecrf_scale, kernel=loss.densecrf_kernel) \
            if loss.densecrf_weight > 0 else None

    def forward(self, outputs: Dict[str, torch.Tensor], label: torch.Tensor, edge: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        avg = self.weak.pce_batch_average
        pce = partial_cross_entropy(outputs["pred"], label, avg)
        total = self.loss_cfg.seg_weight * pce
        components = {"pce": pce.detach()}
        if self.loss_cfg.aux_weight and "aux" in outputs:
            aux = partial_cross_entropy(outputs["aux"], label, avg)
            components["aux"] = aux.detach()
            total = total + self.loss_cfg.aux_weight * aux
        if self.loss_cfg.mscale_weight and "pred_05x" in outputs:
            ms = partial_cross_entropy(outputs["pred_05x"], label, avg) + \
                partial_cross_entropy(outputs["pred_10x"], label, avg)
            components["mscale"] = ms.detach()
            total = total + self.loss_cfg.mscale_weight * ms
        if self.densecrf is not None:
            if image is None or roi is None:
                raise ValueError("WeakObjective: the DenseCRF term needs image= and roi=")
            logits = outputs["pred"].float()
            if logits.shape[-2:] != label.shape[-2:]:
                logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
            crf = self.densecrf(image_to_255(image), torch.softmax(logits, 1), roi.float())
            components["densecrf"] = crf.detach()
            total = total + crf
        return total, components


# ----------------------------------------------------------------------------- comparison
RUNS = (("pce", "pCE"), ("densecrf", "pCE + DenseCRF"), ("full", "full supervision"))


def run_comparison(cfg: ExperimentConfig, ctx: dist.DistContext, resume: bool = False,
                   overwrite: bool = False) -> Dict[str, Any]:
    """Train pCE alone, pCE + DenseCRF and fully supervised (the same objective on full labels),
    same seed, schedule and scribbles, each in OUTPUT_DIR/<name>; print the reference's table and
    write OUTPUT_DIR/comparison.json (``pce_miou``, ``densecrf_miou``, ``full_miou``, seconds per
    iteration of each).  With ``weak.processes`` > 1 (single-process jobs) the three train at once
    as child processes (experiment/children.py), each with ``weak.cpu_threads`` threads."""
    from experiment.train import train

    if cfg.loss.densecrf_weight <= 0:
        raise UserError("weak.compare needs loss.densecrf_weight > 0 (the pCE + DenseCRF run)")
    if cfg.weak.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(cfg.weak.cpu_threads)
    settings = {
        "pce": {"loss.densecrf_weight": 0.0, "weak.labels": "scribbles"},
        "densecrf": {"weak.labels": "scribbles"},
        "full": {"loss.densecrf_weight": 0.0, "weak.labels": "full"},
    }
    subs = {}
    for name, _ in RUNS:
        sub = copy.deepcopy(cfg)
        sub.output_dir = os.path.join(cfg.output_dir, name)
        sub.weak.compare = False
        for key, value in settings[name].items():
            section, field = key.split(".")
            setattr(getattr(sub, section), field, value)
        subs[name] = sub
    parallel = use_children(cfg.weak.processes, ctx.world_size, "weak.processes")
    results: Dict[str, Any] = {}
    if parallel:  # the DenseCRF run (the longest) first: with two processes the other two share the second
        order = ["densecrf"] + [name for name, _ in RUNS if name != "densecrf"]
        walls = run_children([ChildRun(dict(RUNS)[name], subs[name]) for name in order], cfg.weak.processes,
                             cfg.weak.cpu_threads, resume, overwrite, what="comparison run")
        for name, title in RUNS:
            with open(os.path.join(subs[name].output_dir, "metrics.json")) as f:
                metrics = json.load(f)
            results[name] = _run_result(metrics, walls[title])
    else:
        for name, title in RUNS:
            sub = subs[name]
            log.info("comparison: %s -> %s", title, sub.output_dir)
            started = time.time()
            metrics, _ = train(sub, ctx, resume=resume and os.path.isfile(os.path.join(sub.output_dir, "last.pth")),
                               overwrite=overwrite)
            if not metrics:
                raise UserError(f"comparison run {name} stopped early; continue it with --resume")
            results[name] = _run_result(metrics, time.time() - started)
    summary = {
        "pce_miou": results["pce"]["miou"], "densecrf_miou": results["densecrf"]["miou"],
        "full_miou": results["full"]["miou"],
        "densecrf_gain_points": 100.0 * (results["densecrf"]["miou"] - results["pce"]["miou"]),
        "runs": results,
        "settings": {"densecrf_weight": cfg.loss.densecrf_weight, "sigma_rgb": cfg.loss.densecrf_sigma_rgb,
                     "sigma_xy": cfg.loss.densecrf_sigma_xy, "scale": cfg.loss.densecrf_scale,
                     "source": cfg.weak.source, "scribble_fraction": cfg.weak.scribble_fraction,
                     "stroke_width": cfg.weak.stroke_width, "seed": cfg.train.seed,
                     "processes": cfg.weak.processes if parallel else 1},
    }
    if ctx.is_main:
        path = os.path.join(cfg.output_dir, "comparison.json")
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        print(comparison_table(results))
        if parallel:
            print(f"(runs trained {min(cfg.weak.processes, len(RUNS))} at a time as child processes sharing the "
                  "CPU: s/iteration is each run's share of it)")
        print(f"\nDenseCRF - pCE: {summary['densecrf_gain_points']:+.2f} mIoU points "
              f"(paper, VOC 2012: +3.6); written to {path}")
    return summary


def _run_result(metrics: Dict[str, Any], wall: float) -> Dict[str, Any]:
    """One run's row: mIoU and its wall time over its iterations (start-up and the final
    validation included; with child processes, the child's whole life)."""
    iterations = int(metrics.get("iteration") or 1)
    return {"miou": float(metrics["miou"]), "seconds_per_iteration": wall / iterations,
            "iterations": iterations, "wall_seconds": wall}


def comparison_table(results: Dict[str, Any]) -> str:
    def sec(v):
        return f"{v:.3f}" if v else "?"

    lines = [f"{'supervision':<20} {'mIoU (%)':>9} {'s/iteration':>12}  (wall time of the run / iterations)", "-" * 43]
    for name, title in RUNS:
        r = results[name]
        lines.append(f"{title:<20} {100 * r['miou']:>9.2f} {sec(r['seconds_per_iteration']):>12}")
    return "\n".join(lines)
