"""Validate a segmentation checkpoint on Cityscapes (or the synthetic stand-in), on one or many
processes (torchrun: NCCL on GPUs, gloo on CPUs).

The reference's command line still works::

    torchrun --nproc_per_node=8 experiment/validation.py --output_dir runs/val_ocr48 \\
        --model_path checkpoints/hrnet48_OCR_IF_checkpoint.pth --arch ocrnet.HRNet --hrnet_base 48 --has_edge True

Every image of the split is evaluated exactly once across ranks (contiguous shards, no
padding), at full resolution, single scale, no flip by default - HMS runs its own hierarchical
multi-scale inference (``--scales``); ``--sliding_window``, ``--flip`` and, for the other archs,
``--scales`` select the test-time modes of ``experiment/inference.py``.  Per-rank confusion matrices and boundary counts are
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
from experiment.acceleration import (compile_model, is_compiled, pad_batch, place_model, resolve_eval_amp,
                                     to_device_images)
from experiment.background import BackgroundWriter, HostCopy, to_host
from experiment.common import (INFERENCE_FLAGS, SHARED_FLAGS, Rank0Writer, UserError, add_inference_arguments,
                               autocast, flag_overrides, normalise_inference_flags, script_main, script_parser,
                               str2bool)
from experiment.common import on_main_first
from experiment.config import ExperimentConfig
from experiment.data import dataset_root, eval_loader, val_dataset
from experiment.inference import WHOLE, InferenceMode, inference_mode_from_config, predict
from experiment.losses import joint_loss, load_inverseform
from datasets import NUM_CLASSES  # noqa: E402  (issue 14: num_classes check)
from experiment.engine import unreadable_reason
from experiment.run_safety import claim_output_dir, require_finite
from models import CheckpointMismatchError
from experiment.paths import find_config, load_run_config, missing_file_message
from models import get_net, load_checkpoint
from utils import dist
from utils.config import parse_override, read_yaml, save_config
from utils.io import atomic_write_json
from utils.metrics import (EDGE_LEVELS, boundary_accuracy_batch, boundary_f_counts_batch, boundary_f_from_counts,
                           confusion_matrix, edge_f_counts_batch, edge_f_from_counts, format_table,
                           majority_class_confusion, scores_from_confusion)

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
    """Edge probability in [0, 1] -> uint8 grey; an array already in uint8 is taken as is."""
    if prob.dtype == np.uint8:
        return prob
    return (np.clip(prob, 0, 1) * 255 + 0.5).astype(np.uint8)


def edge_u8(prob: torch.Tensor) -> torch.Tensor:
    """:func:`edge_image` on the device (a quarter of the bytes to copy to the host)."""
    return (prob.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def write_batch_outputs(names: List[str], pred_host: HostCopy, edge_host: Optional[HostCopy], batch: Dict[str, Any],
                        dumper: Optional["PredictionDumper"], writer: Optional[Rank0Writer], step: int,
                        first_logged: int, n_log: int) -> None:
    """The background part of :func:`evaluate` for one batch: prediction PNGs for every image
    (with a dumper), TensorBoard images for the first ``n_log``."""
    pred = pred_host.get().numpy()
    edge = edge_host.get().numpy() if edge_host is not None else None
    if dumper is not None:
        for i, name in enumerate(names):
            dumper(name, pred[i], None if edge is None else edge[i])
    for i in range(n_log if writer is not None else 0):
        k = first_logged + i
        label = batch["label"][i].numpy().astype(np.uint8)
        writer.add_image(f"val/{k}_input", denormalize(batch["image"][i]), step, dataformats="HWC")
        writer.add_image(f"val/{k}_prediction", colorize(pred[i]), step, dataformats="HWC")
        writer.add_image(f"val/{k}_errors", error_map(pred[i], label), step, dataformats="HWC")
        if edge is not None:
            writer.add_image(f"val/{k}_edge", edge[i], step, dataformats="HW")


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


class NonFiniteOutputError(UserError):
    """The network produced NaN/Inf logits: metrics computed from them would be meaningless."""


def per_image_loss_sums(criterion: torch.nn.Module, logits: torch.Tensor, edge_logits: Optional[torch.Tensor],
                        labels: torch.Tensor, edges: Optional[torch.Tensor]):
    """Sums over the batch's images of each image's own joint loss (total, then LOSS_PARTS) and a
    0/1 mask of the parts computed.  One image at a time: the joint loss sums some terms over
    its batch and averages others (balanced BCE weights even depend on the whole batch), so
    only per-image values make the validation loss independent of batch size and world size."""
    sums = torch.zeros(1 + len(LOSS_PARTS), dtype=torch.float64, device=logits.device)
    present = torch.zeros(len(LOSS_PARTS), device=logits.device)
    zero = torch.zeros((), device=logits.device)
    for i in range(logits.shape[0]):
        one = slice(i, i + 1)
        total, parts = criterion(logits[one], None if edge_logits is None else edge_logits[one], labels[one],
                                 None if edge_logits is None else edges[one])
        sums += torch.stack([total.detach().double()] + [parts.get(k, zero).double() for k in LOSS_PARTS])
        present = torch.maximum(present, torch.tensor([float(k in parts) for k in LOSS_PARTS], device=logits.device))
    return sums, present


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader, device: torch.device, *, num_classes: int = 19,
             criterion: Optional[torch.nn.Module] = None, amp_dtype: Optional[torch.dtype] = None,
             boundary_tolerance: int = 2, dumper: Optional[PredictionDumper] = None,
             writer: Optional[Rank0Writer] = None, step: int = 0, num_images_logged: int = 4,
             progress: bool = True, desc: str = "validation",
             inference: InferenceMode = WHOLE, pad_to_batch: Optional[bool] = None) -> Dict[str, Any]:
    """Evaluate ``net`` on ``loader`` (sharded by DistributedEvalSampler) and return the metrics,
    identical on every rank.  Used by validation.py and by train.py's periodic validation.
    ``inference``: whole image (default), sliding window, flip, scales (experiment/inference.py).
    The metrics are computed for the whole batch on ``device`` (utils.metrics ``*_batch``) and
    read back once at the end; prediction dumps and TensorBoard images are written by a
    background thread from asynchronous host copies.  ``pad_to_batch`` (default: when ``net``
    is compiled) pads a short last batch so that a compiled model sees one shape."""
    was_training = net.training
    net.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sums = torch.zeros(1 + len(LOSS_PARTS), dtype=torch.float64, device=device)
    # [images, mBA sum, mBA count]
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    boundary = torch.zeros(num_classes, 4, dtype=torch.int64, device=device)
    edge_counts = torch.zeros(EDGE_LEVELS - 1, 4, dtype=torch.int64, device=device)
    logged = 0
    if pad_to_batch is None:
        pad_to_batch = is_compiled(net)
    jobs = BackgroundWriter() if dumper is not None or writer is not None else None
    # the loss terms the criterion computes (edge terms only with an edge head), max over ranks
    present = torch.zeros(len(LOSS_PARTS), device=device)
    non_finite = torch.zeros((), dtype=torch.int64, device=device)  # images with NaN/Inf logits, no sync
    bar = tqdm(total=len(loader.sampler), desc=desc, unit="img", disable=not (progress and dist.is_main_process()),
               dynamic_ncols=True, leave=False)
    for batch in loader:
        images = to_device_images(batch["image"], device)
        labels = batch["label"].to(device, non_blocking=True)
        inputs = pad_batch(images, loader.batch_size) if pad_to_batch and loader.batch_size else images
        with autocast(device, amp_dtype):
            out = predict(net, inputs, inference)
        if inputs is not images:
            out = {k: v[:images.shape[0]] for k, v in out.items()}
        logits = out["pred"].float()
        # images whose logits hold a NaN/Inf: they propagate into the image's sum (one vectorised
        # pass: 8 ms for 19 x 1024 x 2048 on one CPU thread, against 112 ms for a per-image aminmax
        # and ~1 s for isfinite() over every logit; only logits near 1e31 could overflow the sum)
        non_finite += (~torch.isfinite(logits.flatten(1).sum(1))).sum()
        pred = logits.max(1).indices  # = argmax(1) (first maximum on ties), 2x faster on CPUs
        conf += confusion_matrix(pred, labels, num_classes)
        edge_prob = out.get("edge_prob")
        if criterion is not None:
            edges = batch["edge"].to(device, non_blocking=True)
            edge_logits = torch.logit(edge_prob.float(), eps=1e-6) if edge_prob is not None else None
            batch_sums, batch_present = per_image_loss_sums(criterion, logits, edge_logits, labels, edges)
            loss_sums += batch_sums
            present = torch.maximum(present, batch_present)
        counts[0] += pred.shape[0]
        mba = boundary_accuracy_batch(pred, labels)
        counts[1] += mba.nan_to_num(0.0).sum()
        counts[2] += (~mba.isnan()).sum()
        boundary += boundary_f_counts_batch(pred, labels, num_classes, boundary_tolerance)
        if edge_prob is not None and "edge" in batch:  # the edge head against the edge targets
            edge_counts += edge_f_counts_batch(edge_prob[:, 0], batch["edge"].to(device, non_blocking=True)[:, 0],
                                               tolerance=boundary_tolerance)
        n_log = min(pred.shape[0], num_images_logged - logged) if writer is not None else 0
        if jobs is not None and (dumper is not None or n_log > 0):
            keep = pred.shape[0] if dumper is not None else n_log  # only what is written leaves the device
            pred_host = to_host(pred[:keep].to(torch.uint8))
            edge_host = to_host(edge_u8(edge_prob[:keep, 0])) if edge_prob is not None else None
            jobs.submit(write_batch_outputs, list(batch["name"]), pred_host, edge_host, batch, dumper,
                        writer if n_log > 0 else None, step, logged, n_log)
            logged += max(0, n_log)
        bar.update(len(batch["name"]))
    bar.close()
    if jobs is not None:
        jobs.close()  # every dump and image written (or its error raised)

    dist.all_reduce(non_finite)
    if int(non_finite) > 0:  # every rank has the same count: all raise together
        hint = " (fp16 autocast overflowed? try --amp bf16 or off)" if amp_dtype == torch.float16 else ""
        net.train(was_training)
        raise NonFiniteOutputError(f"{int(non_finite)} images of the {desc} have NaN or Inf logits{hint}: metrics "
                                   "computed from them would be meaningless and are not reported")
    dist.all_reduce(conf)
    dist.all_reduce(loss_sums)
    dist.all_reduce(present, op="max")
    counts = dist.all_reduce(counts).cpu()
    boundary_t = dist.all_reduce(boundary).cpu().numpy()
    edge_t = dist.all_reduce(edge_counts).cpu().numpy()
    conf_np = conf.cpu().numpy()
    metrics: Dict[str, Any] = {"num_images": int(counts[0])}
    metrics.update(scores_from_confusion(conf_np))
    metrics["majority_class_miou"] = scores_from_confusion(majority_class_confusion(conf_np))["miou"]
    metrics["mba"] = float(counts[1] / counts[2]) if counts[2] > 0 else float("nan")
    metrics.update(boundary_f_from_counts(boundary_t))
    metrics["boundary_tolerance"] = boundary_tolerance
    if edge_t[:, 3].any():  # an edge head, evaluated against the edge targets
        metrics.update(edge_f_from_counts(edge_t))
    if criterion is not None and counts[0] > 0:
        sums = (loss_sums.cpu() / counts[0]).tolist()
        metrics["val_loss"] = sums[0]
        metrics["val_loss_parts"] = {k: v for k, v, p in zip(LOSS_PARTS, sums[1:], present.tolist()) if p > 0}
    metrics["class_names"] = list(TRAIN_CLASS_NAMES[:num_classes])
    net.train(was_training)
    return metrics


def metrics_table(metrics: Dict[str, Any]) -> str:
    summary = {"mIoU": metrics["miou"], "pixel accuracy": metrics["pixel_acc"],
               "mean class accuracy": metrics["mean_class_acc"], "fwIoU": metrics["fwiou"],
               "mBA": metrics["mba"], f"boundary F (tol {metrics['boundary_tolerance']}px)": metrics["boundary_f"]}
    if "majority_class_miou" in metrics:
        summary["majority-class mIoU"] = metrics["majority_class_miou"]
    if "edge_f" in metrics:
        summary[f"edge F (ODS, t={metrics['edge_f_threshold']:.2f})"] = metrics["edge_f"]
    text = format_table(metrics["class_names"], metrics["per_class_iou"], summary,
                        {"boundary F": metrics["per_class_boundary_f"]})
    if "val_loss" in metrics:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in metrics["val_loss_parts"].items())
        text += f"\nvalidation loss     {metrics['val_loss']:.4f}  ({parts})"
    return text


def write_metrics(metrics: Dict[str, Any], writer: Rank0Writer, output_dir: str, step: int, prefix: str = "val",
                  filename: str = "metrics.json") -> str:
    for key in ("miou", "pixel_acc", "mean_class_acc", "fwiou", "mba", "boundary_f", "edge_f", "val_loss"):
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
    p.add_argument("--amp", nargs="?", const="on", choices=("auto", "on", "off", "bf16", "fp16"),
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


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    normalise_inference_flags(args)
    if args.amp == "on":
        args.amp = "bf16"
    if args.fp16 is not None and args.amp is None:  # the reference's --fp16 flag
        args.amp = "fp16" if args.fp16 else "off"
    overrides = flag_overrides(args, {
        **SHARED_FLAGS, "arch": "model.arch", "hrnet_base": "model.hrnet_base", "has_edge": "model.has_edge",
        "batch_size": "val.batch_size", "num_workers": "val.num_workers", "amp": "val.amp",
        "dump_predictions": "val.dump_predictions",
        "inverseform_path": "loss.inverseform_path", "boundary_tolerance": "val.boundary_tolerance",
        "max_images": "val.max_images", "compile": "val.compile", **INFERENCE_FLAGS})
    if getattr(args, "output_dir", None) is None:  # never the training run's output_dir of a --config file
        stem = os.path.splitext(os.path.basename(args.model_path or ""))[0] or "model"
        overrides.append(f"output_dir={os.path.join('runs', 'validation', stem)}")
    if not os.path.isfile(args.model_path or ""):
        raise UserError(missing_file_message("model file", args.model_path))

    def load(extra: List[str]) -> ExperimentConfig:
        return load_run_config(ExperimentConfig, args.config, overrides + extra,
                               defaults={"output_dir": "runs/validation"})

    cfg = load([])
    described = model_settings_from_checkpoint(cfg, args.model_path, explicit_model_settings(args))
    return load(described) if described else cfg


MODEL_KEYS = ("arch", "hrnet_base", "has_edge", "num_classes")


def stored_model_settings(path: str) -> Dict[str, Any]:
    """The model description a training checkpoint of this project stores (arch, hrnet_base,
    has_edge, num_classes); {} for the released files, which store weights only, or an unreadable
    file (``load_checkpoint`` reports that one)."""
    state = None
    for mmap in (True, False):  # mmap: no need to read the weights; older files need a plain load
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:
            continue
    if not isinstance(state, dict):
        return {}
    return {key: state[key] for key in MODEL_KEYS if state.get(key) is not None}


def explicit_model_settings(args: argparse.Namespace) -> Dict[str, str]:
    """model.* keys the user set, each with where (a flag, --opt, a config file)."""
    given: Dict[str, str] = {}
    for spec in args.config:
        section = read_yaml(find_config(spec)).get("model")
        for key in MODEL_KEYS:
            if isinstance(section, dict) and key in section:
                given[key] = f"model.{key} of {spec}"
    for text in args.opt:
        parts, _ = parse_override(text)
        if len(parts) == 2 and parts[0] == "model" and parts[1] in MODEL_KEYS:
            given[parts[1]] = f"--opt model.{parts[1]}"
    for key in ("arch", "hrnet_base", "has_edge"):
        if getattr(args, key, None) is not None:
            given[key] = f"--{key}"
    return given


def model_settings_from_checkpoint(cfg: ExperimentConfig, model_path: str, explicit: Dict[str, str]) -> List[str]:
    """Overrides that build the model a checkpoint describes; a setting given explicitly that
    disagrees is an error naming both (except has_edge False on an edge checkpoint: drops the head)."""
    overrides = []
    for key, stored in stored_model_settings(model_path).items():
        current = getattr(cfg.model, key)
        if key not in explicit:
            if current != stored:
                overrides.append(f"model.{key}={stored}")
        elif current != stored and not (key == "has_edge" and stored and not current):
            raise UserError(f"{explicit[key]} is {current!r} but {model_path} was trained with {key} {stored!r}; "
                            f"leave it out (the checkpoint describes its model) or pick the matching checkpoint")
    return overrides


def build_model(cfg: ExperimentConfig) -> torch.nn.Module:
    options = {}
    if cfg.model.eval_scales is not None:
        if cfg.model.arch != "ocrnet.HRNet_Mscale":
            log.info("--scales / model.eval_scales for %s: logits averaged over scales %s",
                     cfg.model.arch, ",".join(f"{s:g}" for s in cfg.model.eval_scales))
        else:
            options["scales"] = tuple(cfg.model.eval_scales)
    return get_net(cfg.model.arch, num_classes=cfg.model.num_classes, has_edge=cfg.model.has_edge,
                   hrnet_base=cfg.model.hrnet_base, **options)


def validate(cfg: ExperimentConfig, model_path: str, ctx: dist.DistContext, split: str = "val",
             model_summary: bool = False, overwrite: bool = False) -> Dict[str, Any]:
    if not model_path:
        raise UserError("--model_path is required: the checkpoint to evaluate")
    if not os.path.isfile(model_path):
        raise UserError(missing_file_message("model file", model_path))
    net = build_model(cfg)
    try:
        report = load_checkpoint(net, model_path)
    except CheckpointMismatchError:
        raise
    except RuntimeError as exc:  # unreadable, truncated, empty, or pickled code refused by weights_only
        raise UserError(f"cannot read checkpoint {model_path}: {unreadable_reason(model_path, exc.__cause__ or exc)}"
                        ) from exc
    require_finite(net.state_dict(), f"checkpoint {model_path} cannot be evaluated")
    if cfg.model.num_classes != NUM_CLASSES and split != "test":
        raise UserError(f"config key 'model.num_classes' is {cfg.model.num_classes} but the dataset has "
                        f"{NUM_CLASSES} classes (train ids 0-{NUM_CLASSES - 1})")
    log.info("loaded %s into %s (hrnet_base %s, has_edge %s): %s", model_path, cfg.model.arch, net.hrnet_base,
             cfg.model.has_edge, report)
    if model_summary:
        from models import count_flops, count_parameters

        if ctx.is_main:
            flops = count_flops(net, (1, 3, 1024, 2048))
            print(f"{cfg.model.arch}: {count_parameters(net):,} parameters, {flops / 1e9:.1f} GFLOPs at 1024x2048")
        return {}
    device = ctx.device
    place_model(net, device).eval()  # channels_last on CUDA
    amp_dtype = resolve_eval_amp(cfg.val.amp, device, cfg.model.arch)
    root, synthetic = dataset_root(cfg.data)
    dataset = val_dataset(cfg.data, root, split, cfg.val.max_images)
    loader = eval_loader(dataset, cfg.val.batch_size, cfg.val.num_workers)
    criterion = None
    if split != "test":
        inverseform = load_inverseform(cfg.loss, device) if cfg.model.has_edge else None
        criterion = joint_loss(cfg.loss, cfg.model.num_classes, inverseform).to(device)
    on_main_first(lambda: claim_output_dir(cfg.output_dir, overwrite=overwrite, resuming_here=False,
                                           command="validate"))
    os.makedirs(cfg.output_dir, exist_ok=True)
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    dumper = PredictionDumper(os.path.join(cfg.output_dir, "predictions"), cfg.model.has_edge) \
        if cfg.val.dump_predictions else None
    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), ctx.is_main)
    inference = inference_mode_from_config(cfg.val, cfg.model)
    log.info("validating %d images of %s/%s (%s) on %d process(es), device %s, amp %s, inference: %s", len(dataset),
             root, split, "synthetic" if synthetic else "Cityscapes", ctx.world_size, device, amp_dtype or "off",
             inference.describe())
    start = time.time()
    metrics = evaluate(compile_model(net, cfg.val.compile), loader, device, num_classes=cfg.model.num_classes,
                       criterion=criterion, amp_dtype=amp_dtype, boundary_tolerance=cfg.val.boundary_tolerance, dumper=dumper,
                       writer=writer, num_images_logged=cfg.val.num_images_logged, inference=inference)
    metrics["inference"] = inference.describe()
    elapsed = time.time() - start
    metrics.update(model_path=os.path.abspath(model_path), arch=cfg.model.arch, hrnet_base=net.hrnet_base,
                   has_edge=cfg.model.has_edge, split=split, dataset=root, synthetic_dataset=synthetic,
                   world_size=ctx.world_size, seconds=round(elapsed, 2),
                   images_per_second=round(metrics["num_images"] / elapsed, 3) if elapsed > 0 else None)
    if ctx.is_main:
        path = write_metrics(metrics, writer, cfg.output_dir, step=0)
        print(metrics_table(metrics))
        print(f"{metrics['num_images']} images in {elapsed:.1f}s ({metrics['images_per_second']} img/s), "
              f"inference: {metrics['inference']}; metrics: {path}")
        if dumper is not None:
            print(f"predictions: {os.path.dirname(dumper.dirs['color'])}")
    writer.close()
    return metrics


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    def body(cfg: ExperimentConfig, ctx: dist.DistContext) -> None:
        if args.apex or args.syncbn:
            log.info("--apex/--syncbn are accepted for compatibility: this code uses native DDP and AMP")
        validate(cfg, args.model_path, ctx, split=args.split, model_summary=args.model_summary,
                 overwrite=args.overwrite)

    script_main(args, config_from_args, body, "validation_log.txt")


if __name__ == "__main__":
    main()
