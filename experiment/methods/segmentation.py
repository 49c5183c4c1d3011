"""Segmentation with the joint edge/segmentation loss and the InverseForm term (the reference's
training): ``method: segmentation``, the default.

The objective applies inverseform/'s JointEdgeSegLoss to every output a model returns (main,
OCR/aux head, HMS scales); the InverseForm term uses the frozen regressor at
``loss.inverseform_path``.  When that file is missing and ``loss.regressor_config`` names a
regressor config, the regressor is trained first on the same dataset (method ``regressor``)
and reused by later runs.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from datasets import NUM_CLASSES, ClassTable
from experiment.acceleration import evaluation_amp, to_device_images
from experiment.checkpoints import file_sha256, require_finite
from experiment.config import ExperimentConfig, LossConfig
from experiment.data import dataset_root, eval_loader, table_of, train_dataset, train_loader, val_dataset
from experiment.engine import OptimizerSpec, Task
from experiment.errors import UserError
from experiment.evaluation import evaluate, metrics_table
from experiment.joint_loss import joint_loss, load_inverseform
from experiment.methods import Method, RunOptions, get_method, register, run_single
from experiment.network import build_model, load_weights, read_model_file
from experiment.pictures import PredictionDumper, denormalize, edge_image
from experiment.run_config import load_run_config
from experiment.schedule import total_iterations
from inverseform import InverseFormLoss
from models import convert_sync_batchnorm, count_parameters, load_pretrained_backbone
from utils import dist
from utils.config import config_to_dict

log = logging.getLogger("experiment.segmentation")


# ----------------------------------------------------------------------------- the objective
class SegmentationObjective(nn.Module):
    """Total loss over a model's training outputs, as the reference combines them:

    * main: joint(pred, edge)
    * aux: ``aux_weight`` x joint(aux, edge_aux)   (OCR/aux head; HMS: joint aux)
    * HMS: ``mscale_weight`` x [joint(pred_05x, edge_aux) + joint(pred_10x, edge)]

    Returns the total and a flat dict of detached components for logging (the main loss's
    terms under their own names, each auxiliary total under ``aux`` / ``mscale``).
    """

    def __init__(self, cfg: LossConfig, num_classes: int, inverseform: Optional[InverseFormLoss]):
        super().__init__()
        self.cfg = cfg
        self.joint = joint_loss(cfg, num_classes, inverseform)

    def forward(self, outputs: Dict[str, torch.Tensor], label: torch.Tensor, edge: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        has_edge = "edge" in outputs
        main, parts = self.joint(outputs["pred"], outputs.get("edge"), label, edge if has_edge else None)
        components = dict(parts)
        total = main
        if self.cfg.aux_weight and "aux" in outputs:
            aux, _ = self.joint(outputs["aux"], outputs.get("edge_aux"), label, edge if has_edge else None)
            components["aux"] = aux.detach()
            total = total + self.cfg.aux_weight * aux
        if self.cfg.mscale_weight and "pred_05x" in outputs:
            lo, _ = self.joint(outputs["pred_05x"], outputs.get("edge_aux"), label, edge if has_edge else None)
            hi, _ = self.joint(outputs["pred_10x"], outputs.get("edge"), label, edge if has_edge else None)
            components["mscale"] = (lo + hi).detach()
            total = total + self.cfg.mscale_weight * (lo + hi)
        return total, components


# ----------------------------------------------------------------------------- the regressor first
# what says which images and labels a run reads
DATA_SOURCE_KEYS = ("dataset", "dataset_dir", "class_table", "layout", "image_folder", "label_folder",
                    "label_suffix", "train_split", "val_split")


def regressor_config_for(cfg: ExperimentConfig):
    """``loss.regressor_config`` writing ``loss.inverseform_path``, on this run's dataset (never
    the regressor config's own default, relative to the current directory) and device."""
    from experiment.methods.regressor import RegressorConfig

    synthetic = ", ".join(f"{k}: {v}" for k, v in config_to_dict(cfg.data.synthetic).items())
    overrides = [f"output_path={cfg.loss.inverseform_path}", f"train.device={cfg.train.device}",
                 f"data.synthetic_dir={cfg.data.synthetic_dir}", f"data.synthetic={{{synthetic}}}",
                 f"data.edge_image_border={cfg.data.edge_image_border}"]  # tiles of the targets it will compare
    # the same images and labels, read the same way; tiles cut as this run's term cuts them
    overrides += [(f"data.{key}", getattr(cfg.data, key)) for key in DATA_SOURCE_KEYS]
    overrides += [("tiles.tile_factor", cfg.loss.inverseform_tile_factor),
                  ("tiles.tile_grid", cfg.loss.inverseform_tile_grid)]
    return load_run_config([cfg.loss.regressor_config], overrides, schema=RegressorConfig)


def ensure_regressor(cfg: ExperimentConfig, ctx: dist.DistContext) -> None:
    """Train the InverseForm regressor for this dataset if the file is missing and a regressor
    config is given (the main job's path on a fresh machine); a regressor run interrupted
    earlier is continued."""
    path = cfg.loss.inverseform_path
    if not cfg.model.has_edge or cfg.loss.inv_weight == 0 or not path or os.path.isfile(path):
        return
    if not cfg.loss.regressor_config:
        return  # load_inverseform says the term is left out
    reg_cfg = regressor_config_for(cfg)
    log.info("InverseForm regressor %s not found: training one with %s (output %s)", path,
             cfg.loss.regressor_config, reg_cfg.output_dir)
    run_single(get_method("regressor"), reg_cfg, ctx, RunOptions(resume="auto"))


def prepare(cfg: ExperimentConfig, ctx: dist.DistContext, options: RunOptions) -> None:
    dataset_root(cfg.data)
    ensure_regressor(cfg, ctx)


# ----------------------------------------------------------------------------- the task
def build_network(cfg: ExperimentConfig, ctx: dist.DistContext) -> torch.nn.Module:
    """``model.arch`` with its ImageNet trunk or initial checkpoint, SyncBatchNorm under torchrun."""
    net = build_model(cfg)
    if cfg.model.pretrained_backbone:
        path = cfg.model.pretrained_backbone
        try:
            report = load_pretrained_backbone(net, read_model_file(path, "model.pretrained_backbone"))
        except ValueError as exc:  # no key of the file fits the trunk, or shapes differ
            raise UserError(f"model.pretrained_backbone {path}: {str(exc).replace('<state dict>: ', '')}") from exc
        log.info("ImageNet backbone %s: %s", path, report)
    if cfg.model.init_checkpoint:
        report = load_weights(net, cfg.model.init_checkpoint, "model.init_checkpoint")
        log.info("initialised from %s: %s", cfg.model.init_checkpoint, report)
    if cfg.model.pretrained_backbone:
        require_finite(net.state_dict(), f"model initialised from {cfg.model.pretrained_backbone}")
    if ctx.world_size > 1 and cfg.model.sync_bn:
        net = convert_sync_batchnorm(net, ctx.device.type)
    return net


def check_num_classes(cfg: ExperimentConfig, root: str, num_classes: int = NUM_CLASSES) -> None:
    """Labels >= num_classes would be ignored in training, then validation fails."""
    if cfg.model.num_classes != num_classes:
        raise UserError(f"config key 'model.num_classes' is {cfg.model.num_classes} but the {cfg.data.dataset} "
                        f"dataset {root} has {num_classes} classes (train ids 0-{num_classes - 1}); set "
                        f"model.num_classes={num_classes}")


def sample_image_logger(table: ClassTable):
    """TensorBoard pictures of a training step's first sample, in the colours of ``table``."""
    def log_sample_images(writer, batch: Dict[str, Any], outputs: Dict[str, torch.Tensor], step: int) -> None:
        writer.add_image("train/input", denormalize(batch["image"][0]), step, dataformats="HWC")
        pred = outputs["pred"][0].detach().float().argmax(0).cpu().numpy().astype(np.uint8)
        writer.add_image("train/prediction", table.colorize(pred), step, dataformats="HWC")
        writer.add_image("train/ground_truth", table.colorize(batch["label"][0].numpy().astype(np.uint8)), step,
                         dataformats="HWC")
        log_edge_images(writer, batch, outputs, step)
    return log_sample_images


def table_record(table: ClassTable) -> Dict[str, Any]:
    """What a checkpoint records of its classes (infer and export read it back): the table's
    YAML mapping, or only names and colours when a class has several stored values."""
    try:
        return table.to_dict()
    except ValueError:
        return {"names": list(table.names), "colors": [list(c) for c in table.colors]}


def log_edge_images(writer, batch: Dict[str, Any], outputs: Dict[str, torch.Tensor], step: int) -> None:
    if "edge" in outputs:
        prob = torch.sigmoid(outputs["edge"][0, 0].detach().float()).cpu().numpy()
        writer.add_image("train/edge_prediction", edge_image(prob), step, dataformats="HW")
        writer.add_image("train/edge_target", edge_image(batch["edge"][0, 0].numpy()), step, dataformats="HW")


def metrics_line(metrics: Dict[str, Any]) -> str:
    return (f"mIoU {metrics['miou']:.4f} (majority class {metrics['majority_class_miou']:.4f}), "
            f"mBA {metrics['mba']:.4f}, boundary F {metrics['boundary_f']:.4f}, "
            f"Boundary IoU {metrics['boundary_iou']:.4f}")


def final_report(cfg: ExperimentConfig, dataset: str) -> Any:
    """What the run prints at its end: the metrics table and where its outputs are."""
    def report(metrics: Dict[str, Any]) -> None:
        out = cfg.output_dir
        print(metrics_table(metrics))
        print(f"\nmIoU {metrics['miou']:.4f} vs {metrics['majority_class_miou']:.4f} for predicting the majority "
              f"class everywhere ({metrics['num_images']} {cfg.data.val_split} images of {dataset})")
        print(f"checkpoints:  {os.path.join(out, 'last.pth')}, {os.path.join(out, 'best.pth')}\n"
              f"metrics:      {os.path.join(out, 'metrics.json')}\n"
              f"TensorBoard:  tensorboard --logdir {os.path.join(out, 'tensorboard')}\n"
              f"predictions:  {os.path.join(out, 'predictions')}")
    return report


def segmentation_task(cfg: ExperimentConfig, ctx: dist.DistContext, train_data, val_data, objective_fn,
                      dataset: str, dump_predictions: bool = True, describe: str = "",
                      class_table: Optional[ClassTable] = None) -> Task:
    """The task of a run that trains a segmentation net on ``train_data`` and validates it on
    ``val_data`` with every metric; shared by the segmentation and weak methods.  ``class_table``
    (default: the training data's, else Cityscapes) names and colours the classes.
    ``objective_fn(net)``, called after the network is built, returns the objective: a module
    called as ``objective(outputs, label, edge[, image=, roi=])`` -> (loss, detached components)
    whose ``joint`` attribute, if any, is the criterion of the validation loss."""
    device = ctx.device
    table = class_table or table_of(train_data)
    loader = train_loader(train_data, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed)
    val_loader = eval_loader(val_data, cfg.val.batch_size, cfg.val.num_workers)
    total = total_iterations(loader, cfg.train.epochs, cfg.train.max_iters)
    net = build_network(cfg, ctx)
    objective = objective_fn(net)
    amp_dtype = evaluation_amp(cfg, device)  # val.amp, as experiment.validation: best.pth is chosen on its numbers

    def step(model, batch, info):
        images = to_device_images(batch["image"], device)
        labels = batch["label"].to(device, non_blocking=True)
        edges = batch["edge"].to(device, non_blocking=True)
        with info.amp():
            outputs = model(images)
        extra = {"image": images, "roi": batch["roi"].to(device, non_blocking=True)} if "roi" in batch else {}
        loss, components = objective(outputs, labels, edges, **extra)
        return loss, components, outputs

    def run_evaluation(eval_model, iteration: int, final: bool, writer) -> Dict[str, Any]:
        # The final validation dumps predictions: every rank writes the images of its own shard.
        dumper = PredictionDumper(os.path.join(cfg.output_dir, "predictions"), cfg.model.has_edge, table) \
            if final and dump_predictions else None
        return evaluate(eval_model, val_loader, device, num_classes=cfg.model.num_classes,
                        criterion=getattr(objective, "joint", None),
                        amp_dtype=amp_dtype, boundary_tolerance=cfg.val.boundary_tolerance, dumper=dumper,
                        writer=writer, step=iteration, num_images_logged=cfg.val.num_images_logged,
                        desc=f"validation @ {iteration}", class_table=table,
                        boundary_iou=(cfg.val.boundary_iou_dilation, cfg.val.boundary_iou_pixels))

    return Task(model=net, loader=loader, step=step, optimizer=OptimizerSpec.from_config(cfg.optim), total=total,
                samples_per_batch=cfg.train.batch_size, evaluate=run_evaluation, best_metric="miou",
                val_interval=cfg.train.val_interval, checkpoint_interval=cfg.train.checkpoint_interval,
                fields={"arch": cfg.model.arch, "hrnet_base": net.hrnet_base, "has_edge": cfg.model.has_edge,
                        "num_classes": cfg.model.num_classes, "class_table": table_record(table)},
                describe=f"{cfg.model.arch} (hrnet_base {net.hrnet_base}, has_edge {cfg.model.has_edge}): "
                         f"{count_parameters(net):,} parameters; {dataset}, {len(train_data)} images/epoch, batch "
                         f"{cfg.train.batch_size}{describe}",
                log_images=sample_image_logger(table), metrics_line=metrics_line, report=final_report(cfg, dataset))


def build_task(cfg: ExperimentConfig, ctx: dist.DistContext) -> Task:
    root, synthetic = dataset_root(cfg.data)
    train_data = train_dataset(cfg.data, root, seed=cfg.train.seed)
    check_num_classes(cfg, root, train_data.class_table.num_classes)
    val_data = val_dataset(cfg.data, root, max_images=cfg.val.max_images)
    inverseform_on = cfg.model.has_edge and cfg.loss.inv_weight > 0

    def objective(net):
        inverseform = load_inverseform(cfg.loss, ctx.device) if inverseform_on else None
        return SegmentationObjective(cfg.loss, cfg.model.num_classes, inverseform).to(ctx.device)

    task = segmentation_task(cfg, ctx, train_data, val_data, objective, "the synthetic dataset" if synthetic else root,
                             describe=f"; InverseForm {'on' if inverseform_on else 'off'}")
    if inverseform_on and cfg.loss.inverseform_path and os.path.isfile(cfg.loss.inverseform_path):
        # a resume with another regressor would not continue the same run: check_resume compares it
        task.fields["inverseform_regressor_sha256"] = file_sha256(cfg.loss.inverseform_path)
    return task


register(Method("segmentation", ExperimentConfig, build=build_task, prepare=prepare,
                summary="the joint edge/segmentation loss with the InverseForm term"))
