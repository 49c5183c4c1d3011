"""Learned non-uniform downsampling near semantic boundaries (Marin et al., ICCV 2019), end to end.

    python -m experiment.train --config configs/synthetic_nus.yaml          # CPU demo, minutes
    torchrun --nproc_per_node=8 experiment/train.py --config configs/cityscapes_nus_mobilenetv2.yaml

Dispatched from experiment/train.py when ``nus.mode`` is not ``off``:

1. **Auxiliary net** (``adaptive``/``compare``): MobileNetV2 x0.25 + DeepLab head on the image
   resized to 64 x 64, trained with MSE against the regularised target locations of the label
   (``datasets.nus_targets``, computed in the loader workers); or loaded from ``nus.aux_checkpoint``.
2. **Segmentation net** (any ``get_net`` arch; the reference's is ``deeplabv3.MobileNetV2``)
   trained in the sampled space: the frozen auxiliary net's grid (or the uniform grid for the
   baseline) is resized to ``nus.sampling_size``, image and label are gathered there on the
   device, cross-entropy (ignore 255) on the sampled label.
3. **Validation at full resolution**: logits un-sampled (``models.nus.unsample``) to the whole
   image or its central ``nus.val_crop``, argmax, mIoU over the classes.
4. ``compare``: both, at every size of ``nus.compare_sizes``; a table (sampling size, MFLOPs,
   mIoU uniform / adaptive), ``OUTPUT_DIR/comparison.json`` (``uniform_miou``, ``adaptive_miou``
   at ``nus.sampling_size``), a picture of both sampling grids (PNG and TensorBoard).

Each stage writes ``OUTPUT_DIR/<stage>/last.pth`` atomically (model, optimizer, schedule, grad
scaler, iteration, every rank's RNG states); ``--resume`` continues each unfinished stage exactly
and skips finished ones.  DDP/torchrun and AMP (``train.amp``) as in experiment/train.py.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from datasets import colorize
from datasets.nus_targets import NUSTargets
from experiment.children import ChildRun, run_children, use_children
from experiment.common import Rank0Writer, UserError, autocast, resolve_amp, seed_everything
from experiment.config import ExperimentConfig
from experiment.data import dataset_root, eval_loader, train_dataset, train_loader, val_dataset
from experiment.engine import (batch_stream, check_finite, load_training_checkpoint, poly_with_warmup, rng_state,
                               save_training_checkpoint, set_rng_state, total_iterations)
from models import count_flops, get_net
from models.mobilenetv2 import load_imagenet_mobilenetv2
from models.nus import AuxiliaryNet, NUSSegmenter, sample
from utils import dist
from utils.config import config_to_dict, save_config
from utils.io import atomic_torch_save, atomic_write_json
from utils.metrics import confusion_matrix, scores_from_confusion

log = logging.getLogger("experiment.nus")


# ----------------------------------------------------------------------------- models
def build_aux_net(cfg: ExperimentConfig) -> AuxiliaryNet:
    return AuxiliaryNet(cfg.nus.aux_input_size, cfg.nus.aux_width, cfg.nus.aux_output_stride)


def build_seg_net(cfg: ExperimentConfig) -> torch.nn.Module:
    """``model.arch`` without edge head (the NUS objective is cross-entropy alone)."""
    options = {"output_stride": cfg.nus.seg_output_stride, "width": cfg.nus.seg_width} \
        if cfg.model.arch == "deeplabv3.MobileNetV2" else {}
    net = get_net(cfg.model.arch, num_classes=cfg.model.num_classes, has_edge=False,
                  hrnet_base=cfg.model.hrnet_base, **options)
    if cfg.model.pretrained_backbone:
        if cfg.model.arch != "deeplabv3.MobileNetV2":
            raise UserError("config key 'model.pretrained_backbone' with nus.mode is supported for arch "
                            f"deeplabv3.MobileNetV2 (an ImageNet MobileNetV2 in torchvision's layout), not {cfg.model.arch}")
        report = load_imagenet_mobilenetv2(net.backbone, cfg.model.pretrained_backbone)
        log.info("ImageNet MobileNetV2 %s: %d tensors loaded, skipped %s", cfg.model.pretrained_backbone,
                 report["loaded"], report["skipped"])
    return net


def load_aux_net(cfg: ExperimentConfig, path: str) -> AuxiliaryNet:
    net = build_aux_net(cfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not an auxiliary net for nus.aux_input_size {cfg.nus.aux_input_size}, "
                        f"aux_width {cfg.nus.aux_width}, aux_output_stride {cfg.nus.aux_output_stride}: "
                        f"{str(exc).splitlines()[0]}") from exc
    return net


def model_flops(cfg: ExperimentConfig, sizes: List[Tuple[int, int]]) -> Dict[str, Any]:
    """FLOPs (2 per multiply-add; the reference's chart counts multiply-adds, half of these) of the
    auxiliary net at its input size and of the segmentation net at each sampling size."""
    aux = count_flops(build_aux_net(cfg), (1, 3, cfg.nus.aux_input_size, cfg.nus.aux_input_size))
    seg = {f"{h}x{w}": count_flops(build_seg_net(cfg), (1, 3, h, w)) for h, w in sizes}
    return {"aux": aux, "seg": seg}


# ----------------------------------------------------------------------------- one training stage
def _sgd(params, lr: float, cfg: ExperimentConfig, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=cfg.optim.momentum,
                           weight_decay=weight_decay, nesterov=cfg.optim.nesterov)


def run_stage(name: str, cfg: ExperimentConfig, ctx: dist.DistContext, net: torch.nn.Module, loader,
              total: int, lr: float, weight_decay: float, loss_fn: Callable[[torch.nn.Module, Dict], torch.Tensor],
              writer: Rank0Writer, resume: bool) -> None:
    """SGD + poly schedule over ``total`` iterations of ``loader``; ``OUTPUT_DIR/<name>/last.pth``
    holds everything needed to continue exactly (``resume``); a finished stage is skipped."""
    device = ctx.device
    amp_dtype = resolve_amp(cfg.train.amp, device)
    stage_dir = os.path.join(cfg.output_dir, name)
    os.makedirs(stage_dir, exist_ok=True)
    last_path = os.path.join(stage_dir, "last.pth")
    # Seg nets with outputs the NUS loss does not use (HRNet 'aux' heads) leave parameters without gradient.
    unused = isinstance(net, NUSSegmenter) and cfg.model.arch != "deeplabv3.MobileNetV2"
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                    find_unused_parameters=unused) if ctx.distributed else net
    optimizer = _sgd(net.parameters(), lr, cfg, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_with_warmup(total, cfg.optim.poly_power, cfg.optim.warmup_iters, cfg.optim.warmup_factor))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start = 0
    if resume and os.path.isfile(last_path):
        state = load_training_checkpoint(last_path)
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][min(ctx.rank, len(state["rng"]) - 1)])
        start = int(state["iteration"])
        if int(state.get("total", total)) != total:
            raise UserError(f"cannot resume {last_path}: it was written for {state.get('total')} iterations, "
                            f"this config asks for {total}")
        log.info("%s: resumed from %s at iteration %d/%d", name, last_path, start, total)
    if start >= total:
        log.info("%s: already finished (%s)", name, last_path)
        net.eval()
        return

    def checkpoint(iteration: int) -> None:
        rngs = dist.all_gather_object(rng_state())
        if ctx.is_main:
            save_training_checkpoint(last_path, {
                "state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                "total": total, "rng": rngs, "stage": name, "config": config_to_dict(cfg)})

    model.train()
    bar = tqdm(total=total, initial=start, desc=name, unit="it", disable=not ctx.is_main, dynamic_ncols=True)
    interval = cfg.train.checkpoint_interval or max(1, total // 4)
    running, seen, t0 = 0.0, 0, time.time()
    for epoch, iteration, batch in batch_stream(loader, start, total):
        with autocast(device, amp_dtype):
            loss = loss_fn(model, batch)
        check_finite({name: loss}, iteration, epoch, last_path)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        running, seen = running + loss.detach().float(), seen + 1
        done = iteration + 1
        if done % cfg.train.log_interval == 0 or done == total:
            mean = dist.all_reduce(torch.stack([running / seen]), op="mean").item()
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            it_s=f"{seen / max(1e-9, time.time() - t0):.1f}")
            writer.add_scalar(f"{name}/loss", mean, done)
            writer.add_scalar(f"{name}/lr", scheduler.get_last_lr()[0], done)
            running, seen, t0 = 0.0, 0, time.time()
        if done % interval == 0 or done == total:
            checkpoint(done)
        bar.update(1)
    bar.close()
    net.eval()


# ----------------------------------------------------------------------------- the two nets
def train_aux(cfg: ExperimentConfig, ctx: dist.DistContext, root: str, writer: Rank0Writer,
              resume: bool) -> AuxiliaryNet:
    """The auxiliary net: loaded from ``nus.aux_checkpoint``, or trained (MSE to the targets)."""
    if cfg.nus.aux_checkpoint:
        if not os.path.isfile(cfg.nus.aux_checkpoint):
            raise UserError(f"config key 'nus.aux_checkpoint': file {cfg.nus.aux_checkpoint} does not exist")
        return load_aux_net(cfg, cfg.nus.aux_checkpoint).to(ctx.device).eval()
    grid = cfg.nus.aux_input_size // cfg.nus.aux_output_stride
    data = NUSTargets(train_dataset(cfg.data, root, seed=cfg.train.seed), size=(grid, grid), alpha=cfg.nus.alpha,
                      target_classes=cfg.nus.target_classes)
    loader = train_loader(data, cfg.nus.aux_batch_size, cfg.data.num_workers, cfg.train.seed)
    net = build_aux_net(cfg).to(ctx.device)
    if ctx.world_size > 1 and cfg.model.sync_bn:
        from models import convert_sync_batchnorm
        net = convert_sync_batchnorm(net, ctx.device.type)

    def loss_fn(model, batch):
        images = batch["image"].to(ctx.device, non_blocking=True)
        target = batch["locations"].to(ctx.device, non_blocking=True)
        return F.mse_loss(model(images).float(), target)

    log.info("auxiliary net: %d x %d grid from %d x %d inputs, %d steps of %d crops (targets: classes %s, "
             "alpha %.2f)", grid, grid, cfg.nus.aux_input_size, cfg.nus.aux_input_size, cfg.nus.aux_steps,
             cfg.nus.aux_batch_size, cfg.nus.target_classes, cfg.nus.alpha)
    run_stage("aux", cfg, ctx, net, loader, cfg.nus.aux_steps, cfg.nus.aux_lr, cfg.nus.aux_weight_decay,
              loss_fn, writer, resume)
    if ctx.is_main:  # the plain weights, loadable with nus.aux_checkpoint
        atomic_torch_save({"state_dict": net.state_dict()}, os.path.join(cfg.output_dir, "aux", "aux_net.pth"))
    return net.eval()


def train_seg(cfg: ExperimentConfig, ctx: dist.DistContext, root: str, aux: Optional[AuxiliaryNet],
              size: Tuple[int, int], writer: Rank0Writer, resume: bool) -> NUSSegmenter:
    """The segmentation net trained on sampled images against sampled labels (``aux=None``: uniform)."""
    seed_everything(cfg.train.seed + ctx.rank)
    name = f"{'adaptive' if aux is not None else 'uniform'}_{size[0]}x{size[1]}"
    data = train_dataset(cfg.data, root, seed=cfg.train.seed)
    loader = train_loader(data, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed)
    total = total_iterations(loader, cfg.train.epochs, cfg.train.max_iters)
    seg = build_seg_net(cfg)
    if ctx.world_size > 1 and cfg.model.sync_bn:
        from models import convert_sync_batchnorm
        seg = convert_sync_batchnorm(seg, ctx.device.type)
    net = NUSSegmenter(seg, aux, size, cfg.nus.gather).to(ctx.device)

    def loss_fn(model, batch):
        images = batch["image"].to(ctx.device, non_blocking=True)
        labels = batch["label"].to(ctx.device, non_blocking=True)
        out = model(images)
        return F.cross_entropy(out["sampled_pred"].float(), sample(labels, out["locations"]), ignore_index=255)

    log.info("%s: %s on %d x %d samples, %d iterations x batch %d x %d processes", name, cfg.model.arch,
             size[0], size[1], total, cfg.train.batch_size, ctx.world_size)
    run_stage(name, cfg, ctx, net, loader, total, cfg.optim.lr, cfg.optim.weight_decay, loss_fn, writer, resume)
    return net.eval()


# ----------------------------------------------------------------------------- evaluation
def central_crop(tensor: torch.Tensor, crop: Optional[Tuple[int, int]]) -> torch.Tensor:
    if crop is None:
        return tensor
    height, width = tensor.shape[-2:]
    ch, cw = crop
    if ch > height or cw > width:
        raise UserError(f"config key 'nus.val_crop' {list(crop)} is larger than the validation images "
                        f"({height} x {width})")
    top, left = (height - ch) // 2, (width - cw) // 2
    return tensor[..., top:top + ch, left:left + cw]


@torch.no_grad()
def evaluate_nus(net: NUSSegmenter, loader, device: torch.device, num_classes: int,
                 crop: Optional[Tuple[int, int]] = None, amp_dtype=None, desc: str = "validation") -> Dict[str, Any]:
    """mIoU at full resolution (or on the central ``crop``) after un-sampling; identical on every rank."""
    net.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    images_seen = torch.zeros((), dtype=torch.long, device=device)
    for batch in tqdm(loader, desc=desc, unit="img", disable=not dist.is_main_process(), leave=False):
        images = central_crop(batch["image"].to(device, non_blocking=True), crop)
        labels = central_crop(batch["label"].to(device, non_blocking=True), crop)
        with autocast(device, amp_dtype):
            pred = net(images)["pred"]
        conf += confusion_matrix(pred.argmax(1), labels, num_classes)
        images_seen += images.shape[0]
    dist.all_reduce(conf)
    dist.all_reduce(images_seen)
    scores = scores_from_confusion(conf.cpu().numpy())
    scores["num_images"] = int(images_seen)
    return scores


# ----------------------------------------------------------------------------- the picture
def sampling_picture(image: torch.Tensor, label: torch.Tensor, grids: Dict[str, torch.Tensor],
                     preds: Dict[str, torch.Tensor]) -> np.ndarray:
    """One row per method: the image with its sample points, then its prediction (uint8 RGB)."""
    from experiment.validation import denormalize

    rgb = denormalize(image)
    height, width = rgb.shape[:2]
    rows = []
    for name, grid in grids.items():
        canvas = rgb.copy()
        points = grid.reshape(-1, 2).cpu().numpy() * np.array([height - 1, width - 1])
        for r, c in np.round(points).astype(int):
            cv2.circle(canvas, (int(c), int(r)), 1, (255, 255, 0), -1)
        pred = colorize(preds[name].cpu().numpy().astype(np.uint8))
        cv2.putText(canvas, name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(np.concatenate([canvas, pred], 1))
    truth = colorize(np.where(label.cpu().numpy() == 255, 255, label.cpu().numpy()).astype(np.uint8))
    rows.append(np.concatenate([rgb, truth], 1))
    return np.concatenate(rows, 0)


# ----------------------------------------------------------------------------- the runner
def flops_table(rows: List[Dict[str, Any]]) -> str:
    lines = [f"{'sampling size':>13}  {'uniform MFLOPs':>14}  {'uniform mIoU':>12}  "
             f"{'adaptive MFLOPs':>15}  {'adaptive mIoU':>13}"]
    for row in rows:
        def cell(key, fmt):
            return format(row[key], fmt) if row.get(key) is not None else "-"
        lines.append(f"{row['size']:>13}  {cell('uniform_mflops', '14.1f')}  {cell('uniform_miou', '12.4f')}  "
                     f"{cell('adaptive_mflops', '15.1f')}  {cell('adaptive_miou', '13.4f')}")
    return "\n".join(lines)


def run_nus(cfg: ExperimentConfig, ctx: dist.DistContext, resume=False) -> Dict[str, Any]:
    """Run ``nus.mode`` (uniform, adaptive or compare); returns the results written to
    ``OUTPUT_DIR/comparison.json`` (compare) or ``OUTPUT_DIR/metrics.json``.  ``resume``: continue
    every stage from its ``OUTPUT_DIR/<stage>/last.pth`` (a path is refused: there are several)."""
    if isinstance(resume, str):
        raise UserError(f"--resume {resume}: with nus.mode each stage resumes from its own "
                        f"OUTPUT_DIR/<stage>/last.pth; give --resume without a path")
    resume = bool(resume)
    nus = cfg.nus
    if nus.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(nus.cpu_threads)
    if nus.mode == "compare" and len(nus.seeds) > 1:
        return run_seeds(cfg, ctx, resume)
    if nus.seeds:
        cfg = copy.deepcopy(cfg)
        cfg.train.seed = nus.seeds[0]
    os.makedirs(cfg.output_dir, exist_ok=True)
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    seed_everything(cfg.train.seed + ctx.rank)
    device = ctx.device
    amp_dtype = resolve_amp(cfg.val.amp, device)
    root, synthetic = dataset_root(cfg.data)
    modes = ["uniform", "adaptive"] if nus.mode == "compare" else [nus.mode]
    sizes = [(s, s) for s in nus.compare_sizes] if nus.mode == "compare" and nus.compare_sizes \
        else [tuple(nus.sampling_size)]
    headline = tuple(nus.sampling_size) if tuple(nus.sampling_size) in sizes else sizes[0]
    val_data = val_dataset(cfg.data, root, max_images=cfg.val.max_images)
    val_loader = eval_loader(val_data, cfg.val.batch_size, cfg.val.num_workers)
    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), ctx.is_main)

    flops = model_flops(cfg, sizes)
    aux = train_aux(cfg, ctx, root, writer, resume) if "adaptive" in modes else None
    rows, nets = [], {}
    for size in sizes:
        row: Dict[str, Any] = {"size": f"{size[0]}x{size[1]}"}
        for mode in modes:
            net = train_seg(cfg, ctx, root, aux if mode == "adaptive" else None, size, writer, resume)
            metrics = evaluate_nus(net, val_loader, device, cfg.model.num_classes, nus.val_crop, amp_dtype,
                                   desc=f"validation {mode} {row['size']}")
            seg_flops = flops["seg"][row["size"]] + (flops["aux"] if mode == "adaptive" else 0)
            row.update({f"{mode}_miou": metrics["miou"], f"{mode}_mflops": seg_flops / 1e6,
                        f"{mode}_per_class_iou": metrics["per_class_iou"], f"{mode}_pixel_acc": metrics["pixel_acc"]})
            writer.add_scalar(f"nus/{mode}_miou", metrics["miou"], size[0])
            log.info("%s at %s: mIoU %.4f (%d images%s)", mode, row["size"], metrics["miou"], metrics["num_images"],
                     f", central {nus.val_crop[0]} x {nus.val_crop[1]} crop" if nus.val_crop else ", whole images")
            if size == headline:
                nets[mode] = net
        rows.append(row)

    result: Dict[str, Any] = {
        "mode": nus.mode, "sampling_size": list(headline), "val_crop": list(nus.val_crop) if nus.val_crop else None,
        "dataset": "synthetic" if synthetic else root, "arch": cfg.model.arch, "rows": rows,
        "flops": {"aux_mflops": flops["aux"] / 1e6,
                  "seg_mflops": {k: v / 1e6 for k, v in flops["seg"].items()},
                  "unit": "FLOPs = 2 per multiply-add (the reference's chart counts multiply-adds: half)"}}
    head = next(r for r in rows if r["size"] == f"{headline[0]}x{headline[1]}")
    for mode in modes:
        result[f"{mode}_miou"] = head[f"{mode}_miou"]
    if ctx.is_main:
        name = "comparison.json" if nus.mode == "compare" else "metrics.json"
        path = os.path.join(cfg.output_dir, name)
        picture_path = os.path.join(cfg.output_dir, "sampling_grid.png")
        picture = sampling_figure(nets, val_data, device, nus.val_crop)
        from experiment.validation import write_png
        write_png(picture_path, picture)
        writer.add_image("nus/sampling_grid", picture, 0, dataformats="HWC")
        result["picture"] = picture_path
        atomic_write_json(path, result)
        seg_head = flops["seg"][f"{headline[0]}x{headline[1]}"]
        print(f"\nFLOPs (2 per multiply-add): auxiliary net {flops['aux'] / 1e6:.1f} M at "
              f"{nus.aux_input_size} x {nus.aux_input_size}; {cfg.model.arch} {seg_head / 1e6:.1f} M at "
              f"{headline[0]} x {headline[1]}; together {(flops['aux'] + seg_head) / 1e6:.1f} M")
        print(flops_table(rows))
        if nus.mode == "compare":
            print(f"\nmIoU at full resolution ({'central %d x %d crop' % tuple(nus.val_crop) if nus.val_crop else 'whole images'}, "
                  f"{head.get('size')} samples): uniform {result['uniform_miou']:.4f}, adaptive "
                  f"{result['adaptive_miou']:.4f} ({100 * (result['adaptive_miou'] - result['uniform_miou']):+.2f} points)")
        print(f"results:      {path}\npicture:      {picture_path}\n"
              f"TensorBoard:  tensorboard --logdir {os.path.join(cfg.output_dir, 'tensorboard')}")
    writer.close()
    return result


def run_seeds(cfg: ExperimentConfig, ctx: dist.DistContext, resume: bool) -> Dict[str, Any]:
    """The comparison once per seed of ``nus.seeds`` (OUTPUT_DIR/seed<k>, ``nus.processes`` at a
    time as child processes), then the mean over the seeds: one seed's margin on a small
    synthetic val split moves by a few points, the mean of the paired margins much less."""
    nus = cfg.nus
    subs = []
    for seed in nus.seeds:
        sub = copy.deepcopy(cfg)
        sub.output_dir = os.path.join(cfg.output_dir, f"seed{seed}")
        sub.train.seed, sub.nus.seeds = seed, []
        subs.append((seed, sub))
    os.makedirs(cfg.output_dir, exist_ok=True)
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    parallel = use_children(nus.processes, ctx.world_size, "nus.processes")
    if parallel:
        run_children([ChildRun(f"seed {seed}", sub, resume_file="config.yaml") for seed, sub in subs],
                     nus.processes, nus.cpu_threads, resume, what="NUS comparison")
        per_seed = {}
        for seed, sub in subs:
            path = os.path.join(sub.output_dir, "comparison.json")
            if not os.path.isfile(path):
                raise UserError(f"NUS comparison {sub.output_dir} wrote no comparison.json; continue with --resume")
            with open(path) as f:
                per_seed[seed] = json.load(f)
    else:
        per_seed = {seed: run_nus(sub, ctx, resume) for seed, sub in subs}
    result = seed_summary(per_seed)
    if ctx.is_main:
        first = per_seed[nus.seeds[0]]
        picture_path = os.path.join(cfg.output_dir, "sampling_grid.png")
        shutil.copyfile(first["picture"], picture_path)
        result["picture"] = picture_path
        writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), True)
        writer.add_image("nus/sampling_grid", cv2.cvtColor(cv2.imread(picture_path), cv2.COLOR_BGR2RGB), 0,
                         dataformats="HWC")
        for mode in ("uniform", "adaptive"):
            writer.add_scalar(f"nus/{mode}_miou_mean", result[f"{mode}_miou"], result["sampling_size"][0])
        writer.close()
        path = os.path.join(cfg.output_dir, "comparison.json")
        atomic_write_json(path, result)
        print(f"\nmean over seeds {list(nus.seeds)}:")
        print(flops_table(result["rows"]))
        print(seed_table(result))
        print(f"results:      {path}\npicture:      {picture_path} (seed {nus.seeds[0]})\n"
              f"per seed:     {', '.join(os.path.join(sub.output_dir, 'comparison.json') for _, sub in subs)}")
    return result


def seed_summary(per_seed: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """comparison.json of several seeds -> one: every row's mIoU the mean over the seeds, the
    headline ``uniform_miou``/``adaptive_miou`` means, their spread, and each seed's margin."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    result = {k: v for k, v in first.items() if k not in ("rows", "picture")}
    rows = []
    for k, row in enumerate(first["rows"]):
        mean_row = dict(row)
        for mode in ("uniform", "adaptive"):
            if row.get(f"{mode}_miou") is None:
                continue
            values = [per_seed[s]["rows"][k][f"{mode}_miou"] for s in seeds]
            mean_row[f"{mode}_miou"] = float(np.mean(values))
            mean_row[f"{mode}_per_class_iou"] = [
                None if any(per_seed[s]["rows"][k][f"{mode}_per_class_iou"][c] is None for s in seeds) else
                float(np.mean([per_seed[s]["rows"][k][f"{mode}_per_class_iou"][c] for s in seeds]))
                for c in range(len(row[f"{mode}_per_class_iou"]))]
            mean_row[f"{mode}_pixel_acc"] = float(np.mean([per_seed[s]["rows"][k][f"{mode}_pixel_acc"] for s in seeds]))
        rows.append(mean_row)
    margins = [100 * (per_seed[s]["adaptive_miou"] - per_seed[s]["uniform_miou"]) for s in seeds]
    result.update({
        "rows": rows, "seeds": seeds,
        "uniform_miou": float(np.mean([per_seed[s]["uniform_miou"] for s in seeds])),
        "adaptive_miou": float(np.mean([per_seed[s]["adaptive_miou"] for s in seeds])),
        "uniform_miou_std": float(np.std([per_seed[s]["uniform_miou"] for s in seeds], ddof=1)),
        "adaptive_miou_std": float(np.std([per_seed[s]["adaptive_miou"] for s in seeds], ddof=1)),
        "margin_points": float(np.mean(margins)), "margin_points_std": float(np.std(margins, ddof=1)),
        "per_seed": {str(s): {"uniform_miou": per_seed[s]["uniform_miou"], "adaptive_miou": per_seed[s]["adaptive_miou"],
                              "margin_points": m} for s, m in zip(seeds, margins)}})
    return result


def seed_table(result: Dict[str, Any]) -> str:
    lines = [f"{'seed':>6}  {'uniform mIoU':>12}  {'adaptive mIoU':>13}  {'adaptive - uniform':>18}"]
    for seed, r in result["per_seed"].items():
        lines.append(f"{seed:>6}  {100 * r['uniform_miou']:>12.2f}  {100 * r['adaptive_miou']:>13.2f}  "
                     f"{r['margin_points']:>+18.2f}")
    lines.append(f"{'mean':>6}  {100 * result['uniform_miou']:>12.2f}  {100 * result['adaptive_miou']:>13.2f}  "
                 f"{result['margin_points']:>+18.2f} (std over seeds {result['margin_points_std']:.2f})")
    return "\n".join(lines)


@torch.no_grad()
def sampling_figure(nets: Dict[str, NUSSegmenter], val_data, device: torch.device,
                    crop: Optional[Tuple[int, int]]) -> np.ndarray:
    """The first validation image: each method's sample points and prediction, and the truth."""
    sample0 = val_data[0]
    image = central_crop(sample0["image"].unsqueeze(0).to(device), crop)
    label = central_crop(sample0["label"], crop)
    grids, preds = {}, {}
    for name, net in nets.items():
        out = net.eval()(image)
        grids[name] = out["locations"][0]
        preds[name] = out["pred"][0].argmax(0)
    return sampling_picture(image[0], label, grids, preds)
