"""Does the InverseForm term help?  The paper's ablation (its Table 1), run here.

The same model, data, schedule and seeds are trained under four objectives:

* ``ce``          image-weighted cross-entropy alone (the edge head is built but not trained)
* ``joint``       + 0.3 balanced BCE on the edge head + 0.1 edge-attention CE (the reference's
                  joint loss without the term)
* ``inverseform`` ``joint`` + 0.3 InverseForm, Euclidean distance (as released)
* ``geodesic``    ``joint`` + 0.3 InverseForm, the paper's geodesic distance

(the weights are the config's ``loss`` section; each variant only switches terms off or picks
the distance).  For every (variant, seed) it runs ``experiment.train``'s training in
OUTPUT_DIR/<variant>/seed<k>, then prints the table - mIoU, mBA, boundary F and the edge head's
F-score against the edge targets (ODS), mean and spread over the seeds, and the training cost
per step - and writes OUTPUT_DIR/ablation.json and OUTPUT_DIR/ablation.png (also in TensorBoard
under OUTPUT_DIR/tensorboard): the same validation images' predictions and edge maps, one row per
variant, from the first seed's models.

    python -m experiment.ablation --config configs/synthetic_ablation.yaml
    torchrun --nproc_per_node=8 -m experiment.ablation --config configs/cityscapes_ablation.yaml \\
        --dataset_dir /path/to/cityscapes

``--resume`` keeps every finished run (its metrics.json) and continues an interrupted one.
With ``ablation.processes`` > 1 (single-process runs only) that many runs train at once as child
processes, each with ``ablation.cpu_threads`` threads.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script (torchrun experiment/ablation.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
import torch

from datasets import colorize
from experiment.acceleration import place_model, to_device_images
from experiment.common import (SHARED_FLAGS, Rank0Writer, UserError, autocast, flag_overrides,
                               script_main, script_parser)
from experiment.children import ChildRun, run_children, use_children
from experiment.config import ExperimentConfig
from experiment.data import dataset_root, val_dataset
from experiment.validation import build_model, denormalize, edge_image, write_png
from models import load_checkpoint
from utils import dist
from utils.config import apply_overrides, build_dataclass, config_to_dict
from utils.io import atomic_write_text

log = logging.getLogger("experiment.ablation")

# name -> (title in the table, config overrides on top of the ablation's config)
VARIANTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "ce": ("CE", ("loss.edge_weight=0", "loss.att_weight=0", "loss.inv_weight=0")),
    "joint": ("CE + BCE + att", ("loss.inv_weight=0",)),
    "inverseform": ("+ InverseForm (Euclid.)", ("loss.inverseform_distance=euclidean",)),
    "geodesic": ("+ InverseForm (geodesic)", ("loss.inverseform_distance=geodesic",)),
}
METRICS = (("miou", "mIoU"), ("mba", "mBA"), ("boundary_f", "bnd F"), ("edge_f", "edge F"))

# What the paper reports for the term (without -> with InverseForm), printed beside the table.
PAPER = {"HRNet-18-IF, Cityscapes val mIoU": [77.0, 77.6],
         "HRNet-16-Slim, Cityscapes val mIoU": [76.1, 77.8],
         "OCRNet-48, Cityscapes val mIoU": [86.0, 86.3],
         "HMS-OCRNet-48, Cityscapes val mIoU": [86.7, 87.0],
         "HRNet-48, NYU-Depth-v2 mBA gain (Table 1)": [0.0, 3.3]}


def check_config(cfg: ExperimentConfig) -> None:
    if not cfg.model.has_edge:
        raise UserError("the ablation compares edge-head objectives: set model.has_edge=true")
    if cfg.weak.enabled or cfg.nus.mode != "off":
        raise UserError("the ablation trains with full labels on uniformly sampled images: set weak.enabled=false "
                        "and nus.mode=off")
    needs_term = any(v in ("inverseform", "geodesic") for v in cfg.ablation.variants)
    if needs_term and cfg.loss.inv_weight <= 0:
        raise UserError("ablation variants inverseform/geodesic need loss.inv_weight > 0 (the paper: 0.3)")
    if cfg.loss.edge_weight <= 0 and any(v != "ce" for v in cfg.ablation.variants):
        raise UserError("ablation variants other than ce need loss.edge_weight > 0 (the paper: 0.3)")


def variant_config(cfg: ExperimentConfig, variant: str, seed: int) -> ExperimentConfig:
    """The config of one run: the ablation's, with the variant's loss switches and the seed."""
    overrides = list(VARIANTS[variant][1]) + [f"train.seed={seed}",
                                               f"output_dir={os.path.join(cfg.output_dir, variant, f'seed{seed}')}"]
    return build_dataclass(ExperimentConfig, apply_overrides(config_to_dict(cfg), overrides))


def summarise(per_seed: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Mean and sample standard deviation (0 for one seed) of each metric over the seeds."""
    keys = [k for k, _ in METRICS] + ["train_seconds_per_iteration"]
    mean, std = {}, {}
    for key in keys:
        values = [r[key] for r in per_seed.values() if r.get(key) is not None and math.isfinite(r[key])]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None)
    return {"mean": mean, "std": std}


def ablation_table(results: Dict[str, Any], seeds: List[int]) -> str:
    """The paper's table: one row per variant, metrics in % as mean +- std over the seeds."""
    def cell(summary: Dict[str, Any], key: str, scale: float = 100.0, digits: int = 2) -> str:
        m, s = summary["mean"].get(key), summary["std"].get(key)
        if m is None:
            return "-"
        return f"{scale * m:.{digits}f} +- {scale * s:.{digits}f}"

    head = f"{'objective':<26}" + "".join(f"{title:>16}" for _, title in METRICS) + f"{'s/step':>16}"
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean +- std, metrics in %", head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{r['title']:<26}" + "".join(f"{cell(r, k):>16}" for k, _ in METRICS)
                     + f"{cell(r, 'train_seconds_per_iteration', 1.0, 3):>16}")
    for name in ("inverseform", "geodesic"):  # the term's effect, paired by seed
        if "joint" not in results or name not in results:
            continue
        lines.append("")
        for key, title in METRICS:
            a, b = results[name]["per_seed"], results["joint"]["per_seed"]
            diffs = [a[s][key] - b[s][key] for s in b if s in a and a[s][key] is not None and b[s][key] is not None]
            if diffs:
                lines.append(f"{name} - joint, {title:<7}: {100 * np.mean(diffs):+.2f} points "
                             f"(per seed: {', '.join(f'{100 * d:+.2f}' for d in diffs)})")
    lines.append("")
    lines.append("paper, without -> with InverseForm: " + "; ".join(
        f"{k} {v[0]} -> {v[1]}" if v[0] else f"{k} +{v[1]}" for k, v in PAPER.items()))
    return "\n".join(lines)


@torch.no_grad()
def figure_rows(net: torch.nn.Module, samples: List[Dict[str, Any]], device: torch.device,
                amp_dtype: Optional[torch.dtype]) -> Tuple[np.ndarray, np.ndarray]:
    """Predicted colours (K x H x W x 3) and edge probabilities (K x H x W, uint8) of ``net``."""
    was_training = net.training
    net.eval()
    images = to_device_images(torch.stack([s["image"] for s in samples]), device)
    with autocast(device, amp_dtype):
        out = net(images)
    pred = out["pred"].float().argmax(1).cpu().numpy()
    edge = out["edge_prob"][:, 0].float().cpu().numpy() if "edge_prob" in out else np.zeros(pred.shape, np.float32)
    net.train(was_training)
    return np.stack([colorize(p) for p in pred]), np.stack([edge_image(e) for e in edge])


def _labelled(tile: np.ndarray, text: str) -> np.ndarray:
    tile = np.ascontiguousarray(tile)
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def compose_figure(samples: List[Dict[str, Any]], rows: Dict[str, Tuple[np.ndarray, np.ndarray]],
                   titles: Dict[str, str], width: int = 256) -> np.ndarray:
    """One row per variant (prediction, edge map for each image), under a row of the images with
    their ground truth and edge targets; RGB uint8."""
    def fit(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        img = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
        return cv2.resize(img, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)

    top, gt = [], []
    for s in samples:
        top += [_labelled(fit(denormalize(s["image"])), s["name"][:28]),
                _labelled(fit(colorize(s["label"].numpy())), "ground truth")]
        target = fit(edge_image(s["edge"][0].numpy()))
        gt += [_labelled(target, "edge target"), np.zeros_like(target)]
    lines = [np.concatenate(top, 1), np.concatenate(gt, 1)]
    for name, (colors, edges) in rows.items():
        tiles = []
        for k in range(len(samples)):
            tiles += [_labelled(fit(colors[k]), titles[name]), _labelled(fit(edges[k]), "edge map")]
        lines.append(np.concatenate(tiles, 1))
    return np.concatenate(lines, 0)


def _figure_from_checkpoints(cfg: ExperimentConfig, variants: List[str], seed: int, samples: List[Dict[str, Any]],
                             device: torch.device) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    rows = {}
    for name in variants:
        sub = variant_config(cfg, name, seed)
        net = build_model(sub)
        load_checkpoint(net, os.path.join(sub.output_dir, "last.pth"))
        place_model(net, device)
        rows[name] = figure_rows(net, samples, device, None)
    return rows


def run_ablation(cfg: ExperimentConfig, ctx: dist.DistContext, resume: bool = False,
                 overwrite: bool = False) -> Dict[str, Any]:
    """Train every (variant, seed), then print the table and write ablation.json and the figure."""
    from experiment.train import ensure_regressor, train  # the training loop is experiment.train's, unchanged

    check_config(cfg)
    a = cfg.ablation
    parallel = use_children(a.processes, ctx.world_size, "ablation.processes")
    runs = [(name, seed, variant_config(cfg, name, seed)) for seed in a.seeds for name in a.variants]
    todo = []
    for name, seed, sub in runs:
        if resume and os.path.isfile(os.path.join(sub.output_dir, "metrics.json")):
            log.info("ablation: %s, seed %d finished earlier (%s)", name, seed, sub.output_dir)
        else:
            todo.append((name, seed, sub))
    if any(name in ("inverseform", "geodesic") for name, _, _ in todo):
        ensure_regressor(cfg, ctx)  # once, before the runs that share it (none for CE alone), all threads
    if a.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(a.cpu_threads)
    if parallel and todo:
        run_children([ChildRun(f"{name}, seed {seed}", sub) for name, seed, sub in todo], a.processes,
                     a.cpu_threads, resume, overwrite, what="ablation run")
        for name, seed, sub in todo:
            with open(os.path.join(sub.output_dir, "metrics.json")) as f:
                m = json.load(f)
            log.info("ablation: %s, seed %d: mIoU %.4f, mBA %.4f, boundary F %.4f, edge F %.4f", name, seed,
                     m["miou"], m["mba"], m["boundary_f"], m.get("edge_f", float("nan")))
    else:
        for k, (name, seed, sub) in enumerate(todo, 1):
            log.info("ablation run %d/%d: %s, seed %d -> %s", k, len(todo), name, seed, sub.output_dir)
            metrics, _ = train(sub, ctx, resume=resume and os.path.isfile(os.path.join(sub.output_dir, "last.pth")),
                               overwrite=overwrite)
            if not metrics:
                raise UserError(f"ablation run {sub.output_dir} stopped early; continue it with --resume")

    results: Dict[str, Any] = {name: {"title": VARIANTS[name][0], "overrides": list(VARIANTS[name][1]),
                                      "per_seed": {}} for name in a.variants}
    for name, seed, sub in runs:
        path = os.path.join(sub.output_dir, "metrics.json")
        if not os.path.isfile(path):
            raise UserError(f"ablation run {sub.output_dir} has no metrics.json: it did not finish; "
                            "continue with --resume")
        with open(path) as f:
            metrics = json.load(f)
        results[name]["per_seed"][seed] = {key: metrics.get(key) for key in
                                           [k for k, _ in METRICS] + ["train_seconds_per_iteration", "edge_f_threshold"]}
    for name in a.variants:
        results[name].update(summarise(results[name]["per_seed"]))

    summary = {"variants": results, "seeds": list(a.seeds),
               "settings": {"arch": cfg.model.arch, "crop_size": list(cfg.data.crop_size),
                            "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                            "max_iters": cfg.train.max_iters, "processes": a.processes if parallel else 1,
                            "cpu_threads": a.cpu_threads, "loss": config_to_dict(cfg.loss),
                            "edge_image_border": cfg.data.edge_image_border},
               "paper": PAPER}
    if ctx.is_main:
        json_path = os.path.join(cfg.output_dir, "ablation.json")
        atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
        print(ablation_table(results, list(a.seeds)))
        print(f"\nwritten to {json_path}")
        if a.figure_images:
            root, _ = dataset_root(cfg.data)
            val = val_dataset(cfg.data, root, max_images=a.figure_images)
            samples = [val[i] for i in range(len(val))]
            rows = _figure_from_checkpoints(cfg, list(a.variants), a.seeds[0], samples, ctx.device)
            picture = compose_figure(samples, rows, {n: VARIANTS[n][0] for n in rows})
            png_path = os.path.join(cfg.output_dir, "ablation.png")
            write_png(png_path, picture)
            writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), True)
            writer.add_image("ablation/predictions_and_edges", picture, 0, dataformats="HWC")
            writer.close()
            print(f"figure:       {png_path} (seed {a.seeds[0]}; TensorBoard: tensorboard --logdir "
                  f"{os.path.join(cfg.output_dir, 'tensorboard')})")
    return summary


def build_parser():
    p = script_parser(__doc__, "the ablation's directory: one run per variant and seed, ablation.json, ablation.png",
                      opt_example="ablation.seeds=[0,1] train.epochs=10", config_required=True)
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs and continue an interrupted one (OUTPUT_DIR/<variant>/seed<k>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start every run anew, moving earlier outputs of a run directory aside")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (ablation.seeds)")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="objectives (ablation.variants)")
    return p


def config_from_args(args) -> ExperimentConfig:
    from experiment.acceleration import load_config_for_device

    if not args.config:
        raise UserError("--config is required, e.g. --config configs/synthetic_ablation.yaml")
    overrides = flag_overrides(args, SHARED_FLAGS)
    if args.seeds:
        overrides.append(f"ablation.seeds=[{','.join(map(str, args.seeds))}]")
    if args.variants:
        overrides.append(f"ablation.variants=[{','.join(args.variants)}]")
    return load_config_for_device(ExperimentConfig, args.config, overrides)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    script_main(args, config_from_args, lambda cfg, ctx: run_ablation(cfg, ctx, resume=args.resume,
                                                                     overwrite=args.overwrite),
                "ablation_log.txt")


if __name__ == "__main__":
    main()
