"""Evaluation of a segmentation network: the library that validation, training, the ablation and
the comparisons share.

:func:`evaluate` runs a network over a loader (sharded by DistributedEvalSampler), computes the
metrics for whole batches on the device (confusion matrix, mBA, boundary F, Boundary IoU, the
edge head's F against the edge targets, the validation loss per image) and reads them back once at the end,
identical on every rank; prediction dumps and TensorBoard images are written by a background
thread from asynchronous host copies.  :func:`metrics_table` and :func:`write_metrics` report it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datasets import ClassTable
from experiment.acceleration import is_compiled, pad_batch, to_device_images
from experiment.background import BackgroundWriter, HostCopy, to_host
from experiment.errors import NonFiniteOutputError, UserError
from experiment.pictures import PredictionDumper, denormalize, edge_u8, error_map
from experiment.runtime import Rank0Writer, autocast
from experiment.tta import WHOLE, InferenceMode, predict
from utils import dist
from utils.io import atomic_write_json
from utils.metrics import (EDGE_LEVELS, boundary_accuracy_batch, boundary_f_counts_batch, boundary_f_from_counts,
                           boundary_iou_counts_batch, boundary_iou_from_counts, confusion_matrix,
                           edge_f_counts_batch, edge_f_from_counts, format_table, majority_class_confusion,
                           scores_from_confusion)

LOSS_PARTS = ("seg", "edge_bce", "edge_att", "inverseform")

# What PyTorch's layers say when an input is smaller than a kernel or a pooling window.
TOO_SMALL_MESSAGES = ("Kernel size can't be greater than actual input", "Output size is too small",
                      "smaller than kernel size", "Expected more than 1 value per channel")


def too_small_for_the_network(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(message in str(exc) for message in TOO_SMALL_MESSAGES)


def forward_named(net: torch.nn.Module, inputs: torch.Tensor, mode: InferenceMode, names) -> Dict[str, torch.Tensor]:
    """``predict``; an image too small for the network is an error naming it (and its size)."""
    try:
        return predict(net, inputs, mode)
    except RuntimeError as exc:
        if not too_small_for_the_network(exc):
            raise
        shown = ", ".join(list(names)[:3]) + (" ..." if len(names) > 3 else "")
        raise UserError(f"image {shown} ({inputs.shape[-2]} x {inputs.shape[-1]} pixels) is too small for "
                        f"{type(net).__name__}: {str(exc).strip().splitlines()[0]}") from exc


def per_image_loss_sums(criterion: torch.nn.Module, logits: torch.Tensor, edge_logits: Optional[torch.Tensor],
                        labels: torch.Tensor, edges: Optional[torch.Tensor]):
    """Sums over the batch's images of each image's own joint loss (total, then LOSS_PARTS) and a
    0/1 mask of the parts computed.  One image at a time: the joint loss sums some terms over
    its batch and averages others (balanced BCE weights even depend on the whole batch), so
    only per-image values make the validation loss independent of batch size and world size."""
    sums = torch.zeros(1 + len(LOSS_PARTS), dtype=torch.float64, device=logits.device)
    present = torch.zeros(len(LOSS_PARTS), device=logits.device)
    zero = torch.zeros((), device=logits.device)
    computed = set()
    for i in range(logits.shape[0]):
        one = slice(i, i + 1)
        total, parts = criterion(logits[one], None if edge_logits is None else edge_logits[one], labels[one],
                                 None if edge_logits is None else edges[one])
        sums += torch.stack([total.detach().double()] + [parts.get(k, zero).double() for k in LOSS_PARTS])
        computed.update(parts)
    for j, key in enumerate(LOSS_PARTS):  # fills on the device: no host-to-device copy
        if key in computed:
            present[j] = 1.0
    return sums, present


def class_names(table: Optional[ClassTable], num_classes: int) -> List[str]:
    """The names of the ``num_classes`` classes from ``table`` (default Cityscapes); classes past
    the table's are "class <id>"."""
    names = list((table or ClassTable.cityscapes()).names[:num_classes])
    return names + [f"class {i}" for i in range(len(names), num_classes)]


class MetricSums:
    """Per-rank sums of every metric, on the device; :meth:`result` all-reduces them (one host
    read) into the metrics dict.  ``boundary_iou``: (dilation ratio, pixels or None) of the band."""

    def __init__(self, num_classes: int, device: torch.device, boundary_tolerance: int, with_loss: bool,
                 names: Optional[List[str]] = None, boundary_iou: Tuple[float, Optional[int]] = (0.02, None)):
        self.num_classes, self.tolerance = num_classes, boundary_tolerance
        self.names = names or class_names(None, num_classes)
        self.biou_ratio, self.biou_pixels = boundary_iou
        self.biou = torch.zeros(num_classes, 2, dtype=torch.int64, device=device)  # [intersection, union]
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.loss_sums = torch.zeros(1 + len(LOSS_PARTS), dtype=torch.float64, device=device)
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)  # [images, mBA sum, mBA count]
        self.boundary = torch.zeros(num_classes, 4, dtype=torch.int64, device=device)
        self.edge_counts = torch.zeros(EDGE_LEVELS - 1, 4, dtype=torch.int64, device=device)
        # the loss terms the criterion computes (edge terms only with an edge head), max over ranks
        self.present = torch.zeros(len(LOSS_PARTS), device=device)
        self.non_finite = torch.zeros((), dtype=torch.int64, device=device)  # images with NaN/Inf logits
        self.with_loss = with_loss

    def add(self, logits: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, edge_prob: Optional[torch.Tensor],
            edges: Optional[torch.Tensor], criterion: Optional[torch.nn.Module]) -> None:
        # images whose logits hold a NaN/Inf: they propagate into the image's sum (one vectorised
        # pass: 8 ms for 19 x 1024 x 2048 on one CPU thread, against 112 ms for a per-image aminmax
        # and ~1 s for isfinite() over every logit; only logits near 1e31 could overflow the sum)
        finite = torch.isfinite(logits.flatten(1).sum(1))
        if edge_prob is not None:  # a NaN edge map would read as 0 in every edge count
            finite &= torch.isfinite(edge_prob.float().flatten(1).sum(1))
        self.non_finite += (~finite).sum()
        self.conf += confusion_matrix(pred, labels, self.num_classes)
        if criterion is not None:
            edge_logits = torch.logit(edge_prob.float(), eps=1e-6) if edge_prob is not None else None
            batch_sums, batch_present = per_image_loss_sums(criterion, logits, edge_logits, labels, edges)
            self.loss_sums += batch_sums
            self.present = torch.maximum(self.present, batch_present)
        self.counts[0] += pred.shape[0]
        mba = boundary_accuracy_batch(pred, labels)
        self.counts[1] += mba.nan_to_num(0.0).sum()
        self.counts[2] += (~mba.isnan()).sum()
        self.boundary += boundary_f_counts_batch(pred, labels, self.num_classes, self.tolerance)
        self.biou += boundary_iou_counts_batch(pred, labels, self.num_classes, self.biou_ratio, self.biou_pixels)
        if edge_prob is not None and edges is not None:  # the edge head against the edge targets
            self.edge_counts += edge_f_counts_batch(edge_prob[:, 0], edges[:, 0], tolerance=self.tolerance)

    def non_finite_images(self) -> int:
        dist.all_reduce(self.non_finite)
        return int(self.non_finite)

    def result(self) -> Dict[str, Any]:
        dist.all_reduce(self.conf)
        dist.all_reduce(self.loss_sums)
        dist.all_reduce(self.present, op="max")
        counts = dist.all_reduce(self.counts).cpu()
        boundary = dist.all_reduce(self.boundary).cpu().numpy()
        biou = dist.all_reduce(self.biou).cpu().numpy()
        edge = dist.all_reduce(self.edge_counts).cpu().numpy()
        conf = self.conf.cpu().numpy()
        metrics: Dict[str, Any] = {"num_images": int(counts[0])}
        metrics.update(scores_from_confusion(conf))
        metrics["majority_class_miou"] = scores_from_confusion(majority_class_confusion(conf))["miou"]
        metrics["mba"] = float(counts[1] / counts[2]) if counts[2] > 0 else float("nan")
        metrics.update(boundary_f_from_counts(boundary))
        metrics["boundary_tolerance"] = self.tolerance
        metrics.update(boundary_iou_from_counts(biou))
        metrics["boundary_iou_band"] = (f"{self.biou_pixels} px" if self.biou_pixels is not None
                                        else f"{self.biou_ratio:g} x diagonal")
        if edge[:, 3].any():  # an edge head, evaluated against the edge targets
            metrics.update(edge_f_from_counts(edge))
        if self.with_loss and counts[0] > 0:
            sums = (self.loss_sums.cpu() / counts[0]).tolist()
            metrics["val_loss"] = sums[0]
            metrics["val_loss_parts"] = {k: v for k, v, p in zip(LOSS_PARTS, sums[1:], self.present.tolist()) if p > 0}
        metrics["class_names"] = list(self.names)
        return metrics


def write_batch_outputs(names: List[str], pred_host: HostCopy, edge_host: Optional[HostCopy], batch: Dict[str, Any],
                        dumper: Optional[PredictionDumper], writer: Optional[Rank0Writer], step: int,
                        first_logged: int, n_log: int, table: ClassTable) -> None:
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
        writer.add_image(f"val/{k}_prediction", table.colorize(pred[i]), step, dataformats="HWC")
        writer.add_image(f"val/{k}_errors", error_map(pred[i], label), step, dataformats="HWC")
        if edge is not None:
            writer.add_image(f"val/{k}_edge", edge[i], step, dataformats="HW")


class _Outputs:
    """Hands each batch's predictions to the background writer: dumps, and TensorBoard images of
    the first ``num_images_logged`` images; only what is written leaves the device."""

    def __init__(self, dumper: Optional[PredictionDumper], writer: Optional[Rank0Writer], step: int,
                 num_images_logged: int, table: ClassTable):
        self.dumper, self.writer, self.step, self.limit = dumper, writer, step, num_images_logged
        self.table = table
        self.logged = 0
        self.jobs = BackgroundWriter() if dumper is not None or writer is not None else None

    def submit(self, batch: Dict[str, Any], pred: torch.Tensor, edge_prob: Optional[torch.Tensor]) -> None:
        n_log = min(pred.shape[0], self.limit - self.logged) if self.writer is not None else 0
        if self.jobs is None or (self.dumper is None and n_log <= 0):
            return
        keep = pred.shape[0] if self.dumper is not None else n_log
        pred_host = to_host(pred[:keep].to(torch.uint8))
        edge_host = to_host(edge_u8(edge_prob[:keep, 0])) if edge_prob is not None else None
        self.jobs.submit(write_batch_outputs, list(batch["name"]), pred_host, edge_host, batch, self.dumper,
                         self.writer if n_log > 0 else None, self.step, self.logged, n_log, self.table)
        self.logged += max(0, n_log)

    def close(self) -> None:
        if self.jobs is not None:
            self.jobs.close()  # every dump and image written (or its error raised)


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader, device: torch.device, *, num_classes: int = 19,
             criterion: Optional[torch.nn.Module] = None, amp_dtype: Optional[torch.dtype] = None,
             boundary_tolerance: int = 2, dumper: Optional[PredictionDumper] = None,
             writer: Optional[Rank0Writer] = None, step: int = 0, num_images_logged: int = 4,
             progress: bool = True, desc: str = "validation",
             inference: InferenceMode = WHOLE, pad_to_batch: Optional[bool] = None,
             class_table: Optional[ClassTable] = None,
             boundary_iou: Tuple[float, Optional[int]] = (0.02, None)) -> Dict[str, Any]:
    """Evaluate ``net`` on ``loader`` and return the metrics, identical on every rank.
    ``class_table`` (default Cityscapes): class names and colours; ``boundary_iou``: the band of
    Boundary IoU, (ratio of the image diagonal, pixels or None).
    ``inference``: whole image (default), sliding window, flip, scales (experiment/tta.py).
    ``pad_to_batch`` (default: when ``net`` is compiled) pads a short last batch so that a
    compiled model sees one shape."""
    was_training = net.training
    net.eval()
    table = class_table or ClassTable.cityscapes()
    sums = MetricSums(num_classes, device, boundary_tolerance, with_loss=criterion is not None,
                      names=class_names(table, num_classes), boundary_iou=boundary_iou)
    outputs = _Outputs(dumper, writer, step, num_images_logged, table)
    if pad_to_batch is None:
        pad_to_batch = is_compiled(net)
    bar = tqdm(total=len(loader.sampler), desc=desc, unit="img", disable=not (progress and dist.is_main_process()),
               dynamic_ncols=True, leave=False)
    for batch in loader:
        images = to_device_images(batch["image"], device)
        labels = batch["label"].to(device, non_blocking=True)
        inputs = pad_batch(images, loader.batch_size) if pad_to_batch and loader.batch_size else images
        with autocast(device, amp_dtype):
            out = forward_named(net, inputs, inference, batch["name"])
        if inputs is not images:
            out = {k: v[:images.shape[0]] for k, v in out.items()}
        logits = out["pred"].float()
        pred = logits.max(1).indices  # = argmax(1) (first maximum on ties), 2x faster on CPUs
        edges = batch["edge"].to(device, non_blocking=True) if "edge" in batch else None
        sums.add(logits, pred, labels, out.get("edge_prob"), edges, criterion)
        outputs.submit(batch, pred, out.get("edge_prob"))
        bar.update(len(batch["name"]))
    bar.close()
    outputs.close()
    non_finite = sums.non_finite_images()
    net.train(was_training)
    if non_finite > 0:  # every rank has the same count: all raise together
        hint = " (fp16 autocast overflowed? try --amp bf16 or off)" if amp_dtype == torch.float16 else ""
        raise NonFiniteOutputError(f"{non_finite} images of the {desc} have NaN or Inf logits or edge "
                                   f"probabilities{hint}: metrics computed from them would be meaningless and are "
                                   "not reported")
    return sums.result()


# ----------------------------------------------------------------------------- reporting
def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def metrics_table(metrics: Dict[str, Any]) -> str:
    summary = {"mIoU": metrics["miou"], "pixel accuracy": metrics["pixel_acc"],
               "mean class accuracy": metrics["mean_class_acc"], "fwIoU": metrics["fwiou"],
               "mBA": metrics["mba"], f"boundary F (tol {metrics['boundary_tolerance']}px)": metrics["boundary_f"]}
    if "boundary_iou" in metrics:
        band = metrics.get("boundary_iou_band", "0.02 x diagonal").replace(" x diagonal", " diag")
        summary[f"Boundary IoU ({band})"] = metrics["boundary_iou"]
    if "majority_class_miou" in metrics:
        summary["majority-class mIoU"] = metrics["majority_class_miou"]
    if "edge_f" in metrics:
        summary[f"edge F (ODS, t={metrics['edge_f_threshold']:.2f})"] = metrics["edge_f"]
    per_class = {"boundary F": metrics["per_class_boundary_f"]}
    if "per_class_boundary_iou" in metrics:
        per_class["Boundary IoU"] = metrics["per_class_boundary_iou"]
    text = format_table(metrics["class_names"], metrics["per_class_iou"], summary, per_class)
    if "val_loss" in metrics:
        parts = ", ".join(f"{k} {v:.4f}" for k, v in metrics["val_loss_parts"].items())
        text += f"\nvalidation loss     {metrics['val_loss']:.4f}  ({parts})"
    return text


def write_metrics(metrics: Dict[str, Any], writer: Rank0Writer, output_dir: str, step: int, prefix: str = "val",
                  filename: str = "metrics.json") -> str:
    """``output_dir/filename`` (atomically; NaN as null) and TensorBoard: every finite float
    metric under ``prefix/``, per-class IoU under ``prefix_class_iou/`` and Boundary IoU under
    ``prefix_class_boundary_iou/``."""
    for key, value in metrics.items():
        if isinstance(value, float) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    for key, group in (("per_class_iou", "class_iou"), ("per_class_boundary_iou", "class_boundary_iou")):
        for name, value in zip(metrics.get("class_names", ()), metrics.get(key, ())):
            if value is not None:
                writer.add_scalar(f"{prefix}_{group}/{name}", value, step)
    path = os.path.join(output_dir, filename)
    atomic_write_json(path, json_safe(metrics))
    return path
