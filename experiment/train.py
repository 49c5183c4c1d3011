"""Train a segmentation network with the InverseForm loss, on one or many processes.

    torchrun --nproc_per_node=8 experiment/train.py --config configs/cityscapes_hrnet18_if.yaml
    python -m experiment.train --config configs/synthetic.yaml          # CPU, a few minutes

Reads top to bottom: config in (YAML + ``--opt key=value``), distributed init (NCCL on GPUs,
gloo on CPUs; SyncBatchNorm when more than one process), data, model, the joint loss with a
frozen InverseForm regressor, SGD with a poly schedule, then the loop.  Checkpoints
``OUTPUT_DIR/last.pth`` and ``best.pth`` are written atomically and hold model, optimizer,
scheduler, grad scaler, epoch, iteration and every rank's RNG states: ``--resume``
continues exactly as an uninterrupted run would (the data stream is seeded by (seed, epoch,
index) and restarts at the same sample).  A non-finite loss stops the run before it reaches
the weights, naming the iteration and the component, with the last checkpoint intact.

If the InverseForm regressor file (``loss.inverseform_path``) is missing and
``loss.regressor_config`` names a regressor config, one is trained first on the same dataset
(experiment/train_inverseform.py) and reused by later runs.
"""
from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple, Union

if __package__ in (None, ""):  # run as a script (torchrun experiment/train.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from datasets import NUM_CLASSES, colorize
from experiment.acceleration import compile_model, load_config_for_device, place_model, to_device_images
from experiment.common import (SHARED_FLAGS, Rank0Writer, UserError, autocast, flag_overrides, on_main_first,
                               resolve_amp, script_main, script_parser, seed_everything, str2bool)
from experiment.config import ExperimentConfig, RegressorConfig
from experiment.data import dataset_root, eval_loader, train_dataset, train_loader, val_dataset
from experiment.engine import (History, NonFiniteWeightsError, StopRequested, batch_stream,
                               check_finite, checkpoint_status, load_training_checkpoint, poly_with_warmup,
                               rng_state, save_training_checkpoint, set_rng_state, total_iterations)
from experiment.run_safety import (StopSignal, check_resume, claim_output_dir, require_finite,
                                   state_is_finite_everywhere)
from experiment import weak
from experiment.losses import SegmentationObjective, load_inverseform
from experiment.paths import missing_file_message
from experiment.validation import (PredictionDumper, build_model, denormalize, edge_image, evaluate,
                                   metrics_table, write_metrics)
from models import convert_sync_batchnorm, count_parameters, load_checkpoint, load_pretrained_backbone
from utils import dist
from utils.config import config_to_dict, save_config

log = logging.getLogger("experiment.train")


def ensure_regressor(cfg: ExperimentConfig, ctx: dist.DistContext) -> None:
    """Train the InverseForm regressor for this dataset if the file is missing and a regressor
    config is given (the main job's path on a fresh machine)."""
    path = cfg.loss.inverseform_path
    if not cfg.model.has_edge or cfg.loss.inv_weight == 0 or not path or os.path.isfile(path):
        return
    if not cfg.loss.regressor_config:
        return  # load_inverseform says the term is left out
    from experiment.train_inverseform import train_regressor

    reg_cfg = regressor_config_for(cfg)
    log.info("InverseForm regressor %s not found: training one with %s (output %s)", path,
             cfg.loss.regressor_config, reg_cfg.output_dir)
    train_regressor(reg_cfg, ctx)


def regressor_config_for(cfg: ExperimentConfig) -> RegressorConfig:
    """``loss.regressor_config`` writing ``loss.inverseform_path``, on this run's dataset (never
    the regressor config's own default, relative to the current directory) and device."""
    synthetic = ", ".join(f"{k}: {v}" for k, v in config_to_dict(cfg.data.synthetic).items())
    overrides = [f"output_path={cfg.loss.inverseform_path}", f"train.device={cfg.train.device}",
                 f"data.synthetic_dir={cfg.data.synthetic_dir}", f"data.synthetic={{{synthetic}}}",
                 f"data.edge_image_border={cfg.data.edge_image_border}"]  # tiles of the targets it will compare
    if cfg.data.dataset_dir:
        overrides.append(f"data.dataset_dir={cfg.data.dataset_dir}")
    return load_config_for_device(RegressorConfig, [cfg.loss.regressor_config], overrides)


def build_optimizer(cfg: ExperimentConfig, net: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)


def log_sample_images(writer: Rank0Writer, batch: Dict[str, Any], outputs: Dict[str, torch.Tensor],
                      step: int) -> None:
    writer.add_image("train/input", denormalize(batch["image"][0]), step, dataformats="HWC")
    pred = outputs["pred"][0].detach().float().argmax(0).cpu().numpy().astype(np.uint8)
    writer.add_image("train/prediction", colorize(pred), step, dataformats="HWC")
    writer.add_image("train/ground_truth", colorize(batch["label"][0].numpy().astype(np.uint8)), step,
                     dataformats="HWC")
    if "edge" in outputs:
        prob = torch.sigmoid(outputs["edge"][0, 0].detach().float()).cpu().numpy()
        writer.add_image("train/edge_prediction", edge_image(prob), step, dataformats="HW")
        writer.add_image("train/edge_target", edge_image(batch["edge"][0, 0].numpy()), step, dataformats="HW")


def remove_stale_temporaries(output_dir: str) -> None:
    """A run killed while writing leaves its temporary file (never the checkpoint itself)."""
    for path in glob.glob(os.path.join(output_dir, ".*.pth.*.tmp")):
        log.info("removing %s, left by an interrupted checkpoint write", path)
        os.unlink(path)


def train(cfg: ExperimentConfig, ctx: dist.DistContext, resume: Union[bool, str] = False,
          stop_after: Optional[int] = None, overwrite: bool = False) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """Train, validate; return the final validation metrics (identical on every rank; empty when
    stopped early by ``stop_after``) and the trained network (without its DDP wrapper).

    ``resume``: True (or "") continues OUTPUT_DIR/last.pth, a path continues that checkpoint.
    An output_dir holding an earlier run is refused unless resuming it or ``overwrite`` (which
    moves the earlier outputs aside).  SIGTERM/SIGUSR1 end the run after the current iteration
    with a checkpoint on every rank (StopRequested, exit code 128 + signal)."""
    stop = StopSignal()
    with stop.installed():
        return _train(cfg, ctx, resume, stop_after, overwrite, stop)


def _train(cfg: ExperimentConfig, ctx: dist.DistContext, resume: Union[bool, str], stop_after: Optional[int],
           overwrite: bool, stop: StopSignal) -> Tuple[Dict[str, Any], torch.nn.Module]:
    device = ctx.device
    amp_dtype = resolve_amp(cfg.train.amp, device)
    last_path = os.path.join(cfg.output_dir, "last.pth")
    best_path = os.path.join(cfg.output_dir, "best.pth")
    resume_path = None if resume is None or resume is False else \
        (last_path if resume is True or resume == "" else str(resume))
    if resume_path is not None and not os.path.isfile(resume_path):
        raise UserError(f"cannot resume: checkpoint {resume_path} does not exist"
                        + ("" if os.path.exists(cfg.output_dir) else f" (no directory {cfg.output_dir})"))
    resuming_here = resume_path is not None and os.path.abspath(resume_path) == os.path.abspath(last_path)

    def prepare() -> None:
        os.makedirs(cfg.output_dir, exist_ok=True)
        claim_output_dir(cfg.output_dir, overwrite=overwrite, resuming_here=resuming_here)
        remove_stale_temporaries(cfg.output_dir)

    on_main_first(prepare)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.train.seed + ctx.rank)

    # -- data
    if cfg.weak.enabled:  # scribbles (experiment/weak.py): training labels partial, validation on full labels
        root, synthetic, train_data, val_data = weak.datasets(cfg)
    else:
        root, synthetic = dataset_root(cfg.data)
        ensure_regressor(cfg, ctx)
        # seeded again: training the regressor here (a fresh checkout) draws from the same global
        # generators, and the run must be the one a second run (regressor found) trains
        seed_everything(cfg.train.seed + ctx.rank)
        train_data = train_dataset(cfg.data, root, seed=cfg.train.seed)
    # labels >= num_classes would be ignored, then validation fails (VOC: checked by experiment/weak.py)
    if cfg.model.num_classes != NUM_CLASSES and not (cfg.weak.enabled and cfg.weak.source == "voc"):
        raise UserError(f"config key 'model.num_classes' is {cfg.model.num_classes} but the dataset {root} has "
                        f"{NUM_CLASSES} classes (train ids 0-{NUM_CLASSES - 1}); set model.num_classes={NUM_CLASSES}")
    loader = train_loader(train_data, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed)
    if not cfg.weak.enabled:
        val_data = val_dataset(cfg.data, root, max_images=cfg.val.max_images)
    val_loader = eval_loader(val_data, cfg.val.batch_size, cfg.val.num_workers)
    total = total_iterations(loader, cfg.train.epochs, cfg.train.max_iters)

    # -- model
    net = build_model(cfg)
    if cfg.model.pretrained_backbone:
        report = load_pretrained_backbone(net, cfg.model.pretrained_backbone)
        log.info("ImageNet backbone %s: %s", cfg.model.pretrained_backbone, report)
    if cfg.model.init_checkpoint:
        report = load_checkpoint(net, cfg.model.init_checkpoint)
        log.info("initialised from %s: %s", cfg.model.init_checkpoint, report)
    if cfg.model.pretrained_backbone or cfg.model.init_checkpoint:
        require_finite(net.state_dict(), f"model initialised from {cfg.model.init_checkpoint or ''}"
                       f"{' and ' if cfg.model.init_checkpoint and cfg.model.pretrained_backbone else ''}"
                       f"{cfg.model.pretrained_backbone or ''}")
    if ctx.world_size > 1 and cfg.model.sync_bn:
        net = convert_sync_batchnorm(net, device.type)
    place_model(net, device)  # channels_last on CUDA
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.distributed else net
    # --compile: the training step's model and, separately, the eval forward; checkpoints are
    # written from `net`, the plain module (no `_orig_mod.` keys).
    model = compile_model(model, cfg.train.compile)
    eval_net = compile_model(net, cfg.train.compile)

    # -- loss, optimizer, schedule
    inverseform = load_inverseform(cfg.loss, device) if cfg.model.has_edge and cfg.loss.inv_weight > 0 else None
    objective = weak.WeakObjective(cfg.loss, cfg.weak, cfg.model.num_classes).to(device) if cfg.weak.enabled \
        else SegmentationObjective(cfg.loss, cfg.model.num_classes, inverseform).to(device)
    optimizer = build_optimizer(cfg, net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_with_warmup(total, cfg.optim.poly_power, cfg.optim.warmup_iters, cfg.optim.warmup_factor))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    per_epoch = len(loader.sampler) // loader.batch_size
    start, best_miou = 0, -1.0
    if resume_path is not None:
        state = load_training_checkpoint(resume_path)
        notices = check_resume(state, resume_path, config_to_dict(cfg), world_size=ctx.world_size,
                               iterations_per_epoch=per_epoch, total_iterations=total,
                               model_fields={"arch": cfg.model.arch, "num_classes": cfg.model.num_classes,
                                             "hrnet_base": net.hrnet_base, "has_edge": cfg.model.has_edge})
        try:
            net.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"checkpoint {resume_path} does not fit this model/optimizer: "
                            f"{str(exc).strip().splitlines()[0]}") from exc
        set_rng_state(state["rng"][ctx.rank])
        start, best_miou = int(state["iteration"]), float(state.get("best_miou", -1.0))
        for line in notices:
            log.info("resume: %s", line)
        log.info("resumed from %s at iteration %d/%d (epoch %d): it continues exactly as the uninterrupted run",
                 resume_path, start, total, state["epoch"])
    if ctx.is_main:  # after the resume checks: a refused resume leaves the run's config.yaml alone
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))

    def checkpoint(path: str, iteration: int, epoch: int, metrics: Optional[Dict[str, Any]] = None) -> None:
        bad = state_is_finite_everywhere(net.state_dict(), device)
        if bad is not None:  # never replace a good checkpoint with a poisoned one
            raise NonFiniteWeightsError(
                f"weights hold NaN or Inf at iteration {iteration} ({bad}): {path} was not written; "
                f"{checkpoint_status(last_path)}. Lower optim.lr or check the data")
        rngs = dist.all_gather_object(rng_state())
        if ctx.is_main:
            save_training_checkpoint(path, {
                "state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "iteration": iteration, "rng": rngs, "best_miou": best_miou,
                "arch": cfg.model.arch, "hrnet_base": net.hrnet_base, "has_edge": cfg.model.has_edge,
                "num_classes": cfg.model.num_classes, "config": config_to_dict(cfg),
                "iterations_per_epoch": per_epoch, "total_iterations": total, "metrics": metrics or {}})

    def validate_now(iteration: int, epoch: int, final: bool = False) -> Dict[str, Any]:
        nonlocal best_miou
        # The final validation dumps predictions: every rank writes the images of its own shard.
        dumper = PredictionDumper(os.path.join(cfg.output_dir, "predictions"), cfg.model.has_edge) \
            if final and not (cfg.weak.enabled and cfg.weak.source == "voc") else None  # Cityscapes ids only
        metrics = evaluate(eval_net, val_loader, device, num_classes=cfg.model.num_classes, criterion=objective.joint,
                           amp_dtype=amp_dtype, boundary_tolerance=cfg.val.boundary_tolerance, dumper=dumper,
                           writer=writer, step=iteration, num_images_logged=cfg.val.num_images_logged,
                           desc=f"validation @ {iteration}")
        metrics.update(iteration=iteration, epoch=epoch)
        if ctx.is_main:
            write_metrics(metrics, writer, cfg.output_dir, iteration, filename=f"metrics_iter{iteration:07d}.json")
            log.info("validation at iteration %d: mIoU %.4f (majority class %.4f), mBA %.4f, boundary F %.4f",
                     iteration, metrics["miou"], metrics["majority_class_miou"], metrics["mba"],
                     metrics["boundary_f"])
        if metrics["miou"] > best_miou:
            best_miou = metrics["miou"]
            checkpoint(best_path, iteration, epoch, metrics)
        return metrics

    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), ctx.is_main,
                         purge_step=start + 1 if start else None)
    log.info("%s (hrnet_base %s, has_edge %s): %s parameters; %s (%s), %d images/epoch, %d iterations "
             "(%d epochs x %d) x batch %d x %d processes; amp %s; InverseForm %s",
             cfg.model.arch, net.hrnet_base, cfg.model.has_edge, f"{count_parameters(net):,}", root,
             "synthetic" if synthetic else "Cityscapes", len(train_data), total, math.ceil(total / per_epoch),
             per_epoch, cfg.train.batch_size, ctx.world_size, amp_dtype or "off",
             "on" if inverseform is not None else "off")

    stop_at = min(total, stop_after) if stop_after is not None else total
    bar = tqdm(total=total, initial=start, desc="train", unit="it", disable=not ctx.is_main, dynamic_ncols=True)
    history_path = os.path.join(cfg.output_dir, "train_log.jsonl")
    on_main_first(lambda: History(history_path, True, start) and None)  # trims it; an error reaches every rank
    history = History(history_path, ctx.is_main)
    model.train()
    sums: Dict[str, torch.Tensor] = {}
    seen, t0, epoch, iteration = 0, time.time(), start // per_epoch, start
    loop_started = time.time()
    last_epoch_checkpointed = epoch
    for epoch, iteration, batch in batch_stream(loader, start, stop_at):
        if epoch != last_epoch_checkpointed:  # an epoch just ended
            if not cfg.train.checkpoint_interval:
                checkpoint(last_path, iteration, epoch)
            if cfg.train.val_interval and epoch % cfg.train.val_interval == 0 and iteration < total:
                validate_now(iteration, epoch)
                model.train()
            last_epoch_checkpointed = epoch
        images = to_device_images(batch["image"], device)
        labels = batch["label"].to(device, non_blocking=True)
        edges = batch["edge"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            outputs = model(images)
        # weak supervision: the DenseCRF term sees the image and the valid-pixel mask (0 on padding)
        extra = {"image": images, "roi": batch["roi"].to(device, non_blocking=True)} if cfg.weak.enabled else {}
        loss, components = objective(outputs, labels, edges, **extra)
        stop_now = check_finite({"total": loss, **components}, iteration, epoch, last_path, stop.requested)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        for name, value in [("total", loss.detach())] + list(components.items()):
            sums[name] = sums.get(name, 0.0) + value.float()
        seen += 1
        done = iteration + 1
        if done % cfg.train.log_interval == 0 or done == stop_at:
            means = torch.stack([sums[k] / seen for k in sums])
            dist.all_reduce(means, op="mean")
            means = dict(zip(sums, means.tolist()))
            rate = seen * cfg.train.batch_size * ctx.world_size / max(1e-9, time.time() - t0)
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{means['total']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            for name, value in means.items():
                writer.add_scalar(f"loss/{name}", value, done)
            writer.add_scalar("train/lr", lr, done)
            writer.add_scalar("train/images_per_second", rate, done)
            history.write({"iteration": done, "epoch": epoch, "lr": lr, **means})
            sums, seen, t0 = {}, 0, time.time()
        if cfg.train.image_interval and done % cfg.train.image_interval == 0:
            log_sample_images(writer, batch, outputs, done)
        if cfg.train.checkpoint_interval and done % cfg.train.checkpoint_interval == 0 and done < stop_at:
            checkpoint(last_path, done, epoch)
        if stop_now:  # a rank got SIGTERM: all stop here, with a checkpoint, before the scheduler kills
            checkpoint(last_path, done, epoch)
            bar.close()
            writer.close()
            raise StopRequested(f"stopped by {stop.name() if stop.requested else 'a signal to another rank'} "
                                f"after iteration {done} of {total}: checkpoint {last_path} written; "
                                "continue with --resume", stop.exit_code())
        bar.update(1)
    bar.close()
    finished = iteration + 1 if stop_at > start else start
    loop_seconds = time.time() - loop_started
    checkpoint(last_path, finished, finished // per_epoch)
    if finished < total:
        log.info("stopped after iteration %d of %d; continue with --resume", finished, total)
        writer.close()
        return {}, net

    metrics = validate_now(total, math.ceil(total / per_epoch), final=True)
    if finished > start:  # the training loop's wall time per step (epoch-end checkpoints included)
        metrics["train_seconds_per_iteration"] = loop_seconds / (finished - start)
    if ctx.is_main:
        metrics_path = write_metrics(metrics, writer, cfg.output_dir, total)
        print(metrics_table(metrics))
        print(f"\nmIoU {metrics['miou']:.4f} vs {metrics['majority_class_miou']:.4f} for predicting the majority "
              f"class everywhere ({metrics['num_images']} {cfg.data.val_split} images of "
              f"{'the synthetic dataset' if synthetic else root})")
        print(f"checkpoints:  {last_path}, {best_path}\nmetrics:      {metrics_path}\n"
              f"TensorBoard:  tensorboard --logdir {os.path.join(cfg.output_dir, 'tensorboard')}\n"
              f"predictions:  {os.path.join(cfg.output_dir, 'predictions')}")
    writer.close()
    return metrics, net


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = script_parser(__doc__, "run directory: config, checkpoints, metrics, TensorBoard, predictions",
                      opt_example="optim.lr=0.01 train.batch_size=4", config_required=True)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from PATH, or from OUTPUT_DIR/last.pth when no path is given; refused "
                        "(naming the keys) when the settings differ from the checkpoint's")
    p.add_argument("--overwrite", action="store_true",
                   help="start anew in an OUTPUT_DIR that holds an earlier run: its outputs are moved into "
                        "OUTPUT_DIR/replaced-<time>/ (without it such a directory is refused)")
    p.add_argument("--stop_after", type=int, help="stop (with a checkpoint) after this iteration; resume later")
    p.add_argument("--max_iters", type=int, help="cap on iterations (the schedule spans them)")
    p.add_argument("--amp", nargs="?", const="on", choices=("auto", "on", "off", "bf16", "fp16"),
                   help="autocast (train.amp): auto (bf16 on CUDA, off on CPU), on (= bf16; the bare flag), off, "
                        "bf16, fp16 (with a gradient scaler)")
    p.add_argument("--seed", type=int, help="random seed (train.seed); rank r uses seed + r")
    p.add_argument("--compile", nargs="?", const="on", metavar="MODE",
                   help="torch.compile the model (train.compile): on (the bare flag), off, max-autotune, "
                        "reduce-overhead, or a debugging backend (eager, aot_eager)")
    p.add_argument("--deterministic", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="deterministic algorithms, no cuDNN benchmark (train.deterministic); the bare flag means on")
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    if not args.config:
        raise UserError("--config is required, e.g. --config configs/synthetic.yaml")
    overrides = flag_overrides(args, {**SHARED_FLAGS, "max_iters": "train.max_iters", "amp": "train.amp",
                                      "seed": "train.seed", "deterministic": "train.deterministic",
                                      "compile": "train.compile"})
    cfg = load_config_for_device(ExperimentConfig, args.config, overrides)  # + cuda_overrides on CUDA
    for what, path in (("model.init_checkpoint", cfg.model.init_checkpoint),
                       ("model.pretrained_backbone", cfg.model.pretrained_backbone)):
        if path and not os.path.isfile(path):
            raise UserError(missing_file_message(what, path))
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    def body(cfg: ExperimentConfig, ctx: dist.DistContext) -> Any:
        if cfg.nus.mode != "off":  # learned non-uniform downsampling (experiment/nus.py)
            from experiment.nus import run_nus
            return run_nus(cfg, ctx, resume=args.resume)
        if cfg.weak.enabled and cfg.weak.compare:  # pCE / pCE + DenseCRF / full supervision (experiment/weak.py)
            return weak.run_comparison(cfg, ctx, resume=bool(args.resume), overwrite=args.overwrite)
        return train(cfg, ctx, resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)

    script_main(args, config_from_args, body, "train_log.txt")


if __name__ == "__main__":
    main()
