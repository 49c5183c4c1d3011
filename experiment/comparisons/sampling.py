"""Uniform vs adaptive sampling (NUS, experiment/methods/nus.py): the runs a ``method: nus``
config asks for, and their report.

* ``nus.mode: uniform`` / ``adaptive``: one segmentation run (after the auxiliary net's run, or
  with ``nus.aux_checkpoint``), OUTPUT_DIR/metrics.json;
* ``compare``: both, at every size of ``nus.compare_sizes``; the chart as a table (sampling
  size, MFLOPs, mIoU uniform / adaptive), OUTPUT_DIR/comparison.json (``uniform_miou``,
  ``adaptive_miou`` at ``nus.sampling_size``), a picture of both sampling grids (PNG and
  TensorBoard);
* ``nus.seeds: [0, 1, ...]``: the comparison once per seed (OUTPUT_DIR/seed<k>, ``nus.processes``
  at a time as child processes), then the mean over the seeds and each seed's margin.

Every training run is an ordinary run of the engine in OUTPUT_DIR/<run> (``aux``,
``uniform_<h>x<w>``, ``adaptive_<h>x<w>``); ``--resume`` continues each unfinished one and
re-validates the finished ones.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from datasets import ClassTable
from experiment.acceleration import place_model, to_device_images
from experiment.comparisons import comparison_dir, run_options, with_settings
from experiment.comparisons.children import ChildRun, run_children, use_children
from experiment.data import dataset_root, table_of, val_dataset
from experiment.engine import fit
from experiment.errors import UserError
from experiment.methods import RunOptions
from experiment.methods.nus import (NUSExperimentConfig, build_aux_task, central_crop, comparison_sizes, load_aux_net,
                                    model_flops, seg_task_builder)
from experiment.pictures import denormalize, write_png
from experiment.run_dir import Outputs
from experiment.runtime import Rank0Writer
from models.nus import AuxiliaryNet, NUSSegmenter
from utils import dist
from utils.stats import paired_difference
from utils.config import save_config
from utils.io import atomic_torch_save, atomic_write_json

log = logging.getLogger("experiment.sampling")

OUTPUTS = Outputs(marks=("comparison.json", "metrics.json", "sampling_grid.png", "aux", "uniform_*", "adaptive_*",
                         "seed*"),
                  companions=("config.yaml", "tensorboard"))


def run_nus(cfg: NUSExperimentConfig, ctx: dist.DistContext, options: RunOptions) -> Dict[str, Any]:
    """Run what ``nus.mode`` asks; returns what OUTPUT_DIR/comparison.json (compare) or
    metrics.json holds."""
    with comparison_dir(cfg.output_dir, OUTPUTS, options):
        return _run(cfg, ctx, options)


def _run(cfg: NUSExperimentConfig, ctx: dist.DistContext, options: RunOptions) -> Dict[str, Any]:
    if cfg.nus.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(cfg.nus.cpu_threads)
    if cfg.nus.mode == "compare" and len(cfg.nus.seeds) > 1:
        return run_seeds(cfg, ctx, options)
    if cfg.nus.seeds:
        cfg = copy.deepcopy(cfg)
        cfg.train.seed = cfg.nus.seeds[0]
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    sizes = comparison_sizes(cfg)
    modes = ["uniform", "adaptive"] if cfg.nus.mode == "compare" else [cfg.nus.mode]
    aux, flops = _auxiliary_net(cfg, ctx, options, sizes) if "adaptive" in modes else (None, None)
    flops = flops or model_flops(cfg, sizes)
    rows, nets = [], {}
    headline = tuple(cfg.nus.sampling_size) if tuple(cfg.nus.sampling_size) in sizes else sizes[0]
    for size in sizes:
        row: Dict[str, Any] = {"size": f"{size[0]}x{size[1]}"}
        for mode in modes:
            net, metrics = _segmentation_run(cfg, ctx, options, aux if mode == "adaptive" else None, size)
            seg_flops = flops["seg"][row["size"]] + (flops["aux"] if mode == "adaptive" else 0)
            row.update({f"{mode}_miou": metrics["miou"], f"{mode}_mflops": seg_flops / 1e6,
                        f"{mode}_per_class_iou": metrics["per_class_iou"], f"{mode}_pixel_acc": metrics["pixel_acc"],
                        f"{mode}_boundary_iou": metrics["boundary_iou"]})
            log.info("%s at %s: mIoU %.4f, Boundary IoU %.4f (%d images%s)", mode, row["size"], metrics["miou"],
                     metrics["boundary_iou"], metrics["num_images"],
                     f", central {cfg.nus.val_crop[0]} x {cfg.nus.val_crop[1]} crop" if cfg.nus.val_crop
                     else ", whole images")
            if size == headline:
                nets[mode] = net
        rows.append(row)
    result = _result(cfg, modes, rows, headline, flops)
    if ctx.is_main:
        _report(cfg, ctx, result, nets, rows, headline, flops)
    return result


def _auxiliary_net(cfg: NUSExperimentConfig, ctx: dist.DistContext, options: RunOptions,
                   sizes: List[Tuple[int, int]]) -> Tuple[AuxiliaryNet, Optional[Dict[str, Any]]]:
    """The auxiliary net (from ``nus.aux_checkpoint``, or trained in OUTPUT_DIR/aux) and, when
    trained, the FLOPs its run counted."""
    if cfg.nus.aux_checkpoint:
        if not os.path.isfile(cfg.nus.aux_checkpoint):
            raise UserError(f"config key 'nus.aux_checkpoint': file {cfg.nus.aux_checkpoint} does not exist")
        return place_model(load_aux_net(cfg, cfg.nus.aux_checkpoint), ctx.device).eval(), None
    sub = with_settings(cfg, os.path.join(cfg.output_dir, "aux"), {})
    metrics, net = fit(sub, ctx, build_aux_task, **_fit_options(options))
    if ctx.is_main:  # the plain weights, loadable with nus.aux_checkpoint
        atomic_torch_save({"state_dict": net.state_dict()}, os.path.join(sub.output_dir, "aux_net.pth"))
    return net.eval(), metrics["flops"]


def _segmentation_run(cfg: NUSExperimentConfig, ctx: dist.DistContext, options: RunOptions,
                      aux: Optional[AuxiliaryNet], size: Tuple[int, int]) -> Tuple[NUSSegmenter, Dict[str, Any]]:
    name = f"{'adaptive' if aux is not None else 'uniform'}_{size[0]}x{size[1]}"
    sub = with_settings(cfg, os.path.join(cfg.output_dir, name), {})
    metrics, net = fit(sub, ctx, seg_task_builder(aux, size), **_fit_options(options))
    return net.eval(), metrics


def _fit_options(options: RunOptions) -> Dict[str, Any]:
    return {"resume": run_options(options).resume}


def _result(cfg: NUSExperimentConfig, modes: List[str], rows: List[Dict[str, Any]], headline: Tuple[int, int],
            flops: Dict[str, Any]) -> Dict[str, Any]:
    root, synthetic = dataset_root(cfg.data)
    result: Dict[str, Any] = {
        "mode": cfg.nus.mode, "sampling_size": list(headline),
        "val_crop": list(cfg.nus.val_crop) if cfg.nus.val_crop else None,
        "dataset": "synthetic" if synthetic else root, "arch": cfg.model.arch, "rows": rows,
        "flops": {"aux_mflops": flops["aux"] / 1e6,
                  "seg_mflops": {k: v / 1e6 for k, v in flops["seg"].items()},
                  "unit": "FLOPs = 2 per multiply-add (the reference's chart counts multiply-adds: half)"}}
    head = next(r for r in rows if r["size"] == f"{headline[0]}x{headline[1]}")
    for mode in modes:
        result[f"{mode}_miou"] = head[f"{mode}_miou"]
    return result


def _report(cfg: NUSExperimentConfig, ctx: dist.DistContext, result: Dict[str, Any], nets: Dict[str, NUSSegmenter],
            rows: List[Dict[str, Any]], headline: Tuple[int, int], flops: Dict[str, Any]) -> None:
    """Rank 0: the picture, the results file, the table."""
    nus = cfg.nus
    root, _ = dataset_root(cfg.data)
    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), True)
    for row in rows:
        for mode in ("uniform", "adaptive"):
            if row.get(f"{mode}_miou") is not None:
                writer.add_scalar(f"nus/{mode}_miou", row[f"{mode}_miou"], int(row["size"].split("x")[0]))
    path = os.path.join(cfg.output_dir, "comparison.json" if nus.mode == "compare" else "metrics.json")
    picture_path = os.path.join(cfg.output_dir, "sampling_grid.png")
    picture = sampling_figure(nets, val_dataset(cfg.data, root, max_images=cfg.val.max_images), ctx.device,
                              nus.val_crop)
    write_png(picture_path, picture)
    writer.add_image("nus/sampling_grid", picture, 0, dataformats="HWC")
    writer.close()
    result["picture"] = picture_path
    atomic_write_json(path, result)
    seg_head = flops["seg"][f"{headline[0]}x{headline[1]}"]
    print(f"\nFLOPs (2 per multiply-add): auxiliary net {flops['aux'] / 1e6:.1f} M at "
          f"{nus.aux_input_size} x {nus.aux_input_size}; {cfg.model.arch} {seg_head / 1e6:.1f} M at "
          f"{headline[0]} x {headline[1]}; together {(flops['aux'] + seg_head) / 1e6:.1f} M")
    print(flops_table(rows))
    if nus.mode == "compare":
        where = f"central {nus.val_crop[0]} x {nus.val_crop[1]} crop" if nus.val_crop else "whole images"
        print(f"\nmIoU at full resolution ({where}, {headline[0]}x{headline[1]} samples): uniform "
              f"{result['uniform_miou']:.4f}, adaptive {result['adaptive_miou']:.4f} "
              f"({100 * (result['adaptive_miou'] - result['uniform_miou']):+.2f} points)")
    print(f"results:      {path}\npicture:      {picture_path}\n"
          f"TensorBoard:  tensorboard --logdir {os.path.join(cfg.output_dir, 'tensorboard')}")


# ----------------------------------------------------------------------------- seeds
def run_seeds(cfg: NUSExperimentConfig, ctx: dist.DistContext, options: RunOptions) -> Dict[str, Any]:
    """The comparison once per seed of ``nus.seeds``, then the mean over the seeds: one seed's
    margin on a small synthetic val split moves by a few points, the mean of the paired margins
    much less."""
    nus = cfg.nus
    subs = [(seed, with_settings(cfg, os.path.join(cfg.output_dir, f"seed{seed}"),
                                 {"train.seed": seed, "nus.seeds": []})) for seed in nus.seeds]
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    if use_children(nus.processes, ctx.world_size, "nus.processes"):
        run_children([ChildRun(f"seed {seed}", sub, resume_file="config.yaml") for seed, sub in subs],
                     nus.processes, nus.cpu_threads, bool(options.resume), what="NUS comparison")
        per_seed = {seed: _read_comparison(sub.output_dir) for seed, sub in subs}
    else:
        per_seed = {seed: run_nus(sub, ctx, options) for seed, sub in subs}
    result = seed_summary(per_seed)
    if ctx.is_main:
        _report_seeds(cfg, result, per_seed, subs)
    return result


def _read_comparison(output_dir: str) -> Dict[str, Any]:
    path = os.path.join(output_dir, "comparison.json")
    if not os.path.isfile(path):
        raise UserError(f"NUS comparison {output_dir} wrote no comparison.json; continue with --resume")
    with open(path) as f:
        return json.load(f)


def _report_seeds(cfg: NUSExperimentConfig, result: Dict[str, Any], per_seed: Dict[int, Dict[str, Any]],
                  subs: List[Tuple[int, Any]]) -> None:
    nus = cfg.nus
    picture_path = os.path.join(cfg.output_dir, "sampling_grid.png")
    shutil.copyfile(per_seed[nus.seeds[0]]["picture"], picture_path)
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


def _mean_row(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row of the table, each mIoU, per-class IoU and pixel accuracy the mean over ``rows``."""
    mean_row = dict(rows[0])
    for mode in ("uniform", "adaptive"):
        if rows[0].get(f"{mode}_miou") is None:
            continue
        mean_row[f"{mode}_miou"] = float(np.mean([r[f"{mode}_miou"] for r in rows]))
        mean_row[f"{mode}_per_class_iou"] = [
            None if any(r[f"{mode}_per_class_iou"][c] is None for r in rows) else
            float(np.mean([r[f"{mode}_per_class_iou"][c] for r in rows]))
            for c in range(len(rows[0][f"{mode}_per_class_iou"]))]
        mean_row[f"{mode}_pixel_acc"] = float(np.mean([r[f"{mode}_pixel_acc"] for r in rows]))
    return mean_row


def seed_summary(per_seed: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
    """comparison.json of several seeds -> one: every row's mIoU the mean over the seeds, the
    headline ``uniform_miou``/``adaptive_miou`` means, their spread, and each seed's margin."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    result = {k: v for k, v in first.items() if k not in ("rows", "picture")}
    rows = [_mean_row([per_seed[s]["rows"][k] for s in seeds]) for k in range(len(first["rows"]))]
    margins = [100 * (per_seed[s]["adaptive_miou"] - per_seed[s]["uniform_miou"]) for s in seeds]
    result.update({
        "rows": rows, "seeds": seeds,
        "uniform_miou": float(np.mean([per_seed[s]["uniform_miou"] for s in seeds])),
        "adaptive_miou": float(np.mean([per_seed[s]["adaptive_miou"] for s in seeds])),
        "uniform_miou_std": float(np.std([per_seed[s]["uniform_miou"] for s in seeds], ddof=1)),
        "adaptive_miou_std": float(np.std([per_seed[s]["adaptive_miou"] for s in seeds], ddof=1)),
        "margin_points": float(np.mean(margins)), "margin_points_std": float(np.std(margins, ddof=1)),
        "margin_points_ci": paired_difference(margins).as_dict(),
        "per_seed": {str(s): {"uniform_miou": per_seed[s]["uniform_miou"], "adaptive_miou": per_seed[s]["adaptive_miou"],
                              "margin_points": m} for s, m in zip(seeds, margins)}})
    return result


# ----------------------------------------------------------------------------- tables and the picture
def flops_table(rows: List[Dict[str, Any]]) -> str:
    lines = [f"{'sampling size':>13}  {'uniform MFLOPs':>14}  {'uniform mIoU':>12}  "
             f"{'adaptive MFLOPs':>15}  {'adaptive mIoU':>13}"]
    for row in rows:
        def cell(key, fmt):
            return format(row[key], fmt) if row.get(key) is not None else "-"
        lines.append(f"{row['size']:>13}  {cell('uniform_mflops', '14.1f')}  {cell('uniform_miou', '12.4f')}  "
                     f"{cell('adaptive_mflops', '15.1f')}  {cell('adaptive_miou', '13.4f')}")
    return "\n".join(lines)


def seed_table(result: Dict[str, Any]) -> str:
    lines = [f"{'seed':>6}  {'uniform mIoU':>12}  {'adaptive mIoU':>13}  {'adaptive - uniform':>18}"]
    for seed, r in result["per_seed"].items():
        lines.append(f"{seed:>6}  {100 * r['uniform_miou']:>12.2f}  {100 * r['adaptive_miou']:>13.2f}  "
                     f"{r['margin_points']:>+18.2f}")
    lines.append(f"{'mean':>6}  {100 * result['uniform_miou']:>12.2f}  {100 * result['adaptive_miou']:>13.2f}  "
                 f"{result['margin_points']:>+18.2f} (std over seeds {result['margin_points_std']:.2f})")
    margins = [r["margin_points"] for r in result["per_seed"].values()]
    lines.append(f"adaptive - uniform: {paired_difference(margins).describe(scale=1.0)}")
    return "\n".join(lines)


def sampling_picture(image: torch.Tensor, label: torch.Tensor, grids: Dict[str, torch.Tensor],
                     preds: Dict[str, torch.Tensor], table: ClassTable) -> np.ndarray:
    """One row per method: the image with its sample points, then its prediction (uint8 RGB)."""
    rgb = denormalize(image)
    height, width = rgb.shape[:2]
    rows = []
    for name, grid in grids.items():
        canvas = rgb.copy()
        points = grid.reshape(-1, 2).cpu().numpy() * np.array([height - 1, width - 1])
        for r, c in np.round(points).astype(int):
            cv2.circle(canvas, (int(c), int(r)), 1, (255, 255, 0), -1)
        pred = table.colorize(preds[name].cpu().numpy().astype(np.uint8))
        cv2.putText(canvas, name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(np.concatenate([canvas, pred], 1))
    truth = table.colorize(label.cpu().numpy().astype(np.uint8))
    rows.append(np.concatenate([rgb, truth], 1))
    return np.concatenate(rows, 0)


@torch.no_grad()
def sampling_figure(nets: Dict[str, NUSSegmenter], val_data, device: torch.device,
                    crop: Optional[Tuple[int, int]]) -> np.ndarray:
    """The first validation image: each method's sample points and prediction, and the truth."""
    sample0 = val_data[0]
    image = central_crop(to_device_images(sample0["image"].unsqueeze(0), device), crop)
    label = central_crop(sample0["label"], crop)
    grids, preds = {}, {}
    for name, net in nets.items():
        out = net.eval()(image)
        grids[name] = out["locations"][0]
        preds[name] = out["pred"][0].argmax(0)
    return sampling_picture(image[0], label, grids, preds, table_of(val_data))
