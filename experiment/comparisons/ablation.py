"""Does the InverseForm term help?  The paper's ablation (its Table 1), as a comparison of
ordinary segmentation runs.

The same model, data, schedule and seeds are trained under four objectives:

* ``ce``          image-weighted cross-entropy alone (the edge head is built but not trained)
* ``joint``       + 0.3 balanced BCE on the edge head + 0.1 edge-attention CE (the reference's
                  joint loss without the term)
* ``inverseform`` ``joint`` + 0.3 InverseForm, Euclidean distance (as released)
* ``geodesic``    ``joint`` + 0.3 InverseForm, the paper's geodesic distance

(the weights are the config's ``loss`` section; each variant only switches terms off or picks
the distance).  Every (variant, seed) is a run of method ``segmentation`` in
OUTPUT_DIR/<variant>/seed<k>; then the table - mIoU, mBA, boundary F and the edge head's
F-score against the edge targets (ODS), mean and spread over the seeds, and the training cost
per step - OUTPUT_DIR/ablation.json and OUTPUT_DIR/ablation.png (also in TensorBoard under
OUTPUT_DIR/tensorboard): the same validation images' predictions and edge maps, one row per
variant, from the first seed's models.  ``--resume`` keeps every finished run (its
metrics.json) and continues an interrupted one.  With ``ablation.processes`` > 1 (single-process
runs only) that many runs train at once as child processes, each with ``ablation.cpu_threads``
threads.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from datasets import ClassTable
from experiment.acceleration import place_model, to_device_images
from experiment.comparisons import cached_base, comparison_dir, ensure_base, finished_earlier, run_options
from experiment.comparisons.children import ChildRun, run_children, use_children
from experiment.config import ExperimentConfig, require
from experiment.data import dataset_root, table_of, val_dataset
from experiment.errors import UserError
from experiment.methods import RunOptions, get_method, run_single
from experiment.network import build_model, load_weights
from experiment.pictures import denormalize, edge_image, labelled, write_png
from experiment.run_dir import Outputs
from experiment.runtime import Rank0Writer, autocast
from utils import dist
from utils.config import apply_overrides, build_dataclass, config_to_dict, path_field, save_config
from utils.io import atomic_write_text
from utils.stats import paired_difference

log = logging.getLogger("experiment.ablation")

ABLATION_VARIANTS = ("ce", "joint", "inverseform", "geodesic")
ABLATION_MODES = ("finetune", "scratch")


@dataclasses.dataclass
class AblationConfig:
    """Which objectives (ce: CE alone; joint: + balanced BCE + edge
    attention; inverseform: joint + the Euclidean InverseForm term; geodesic: joint + the
    geodesic one) and which seeds; every (variant, seed) run uses the rest of the config."""
    variants: List[str] = dataclasses.field(default_factory=lambda: list(ABLATION_VARIANTS))
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    figure_images: int = 3           # validation images in the side-by-side figure
    # finetune: train one base model with the joint loss (cached under base_dir, named by its
    # config's hash), then fine-tune it under each objective with paired seeds, as the paper's gains
    # are differences between converged models; scratch: every run from the initialisation
    mode: str = "finetune"
    base_epochs: int = 60            # the base model's schedule (finetune)
    base_seed: int = 0
    base_dir: str = path_field("runs/ablation_bases")
    finetune_lr: Optional[float] = None       # the fine-tunes' learning rate (None: optim.lr)
    finetune_warmup_iters: int = 0
    processes: int = 1               # runs trained at once as child processes (single-process runs only)
    cpu_threads: Optional[int] = None  # threads per run on a CPU (as weak.cpu_threads)

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in ABLATION_VARIANTS]
        require(bool(self.variants) and not unknown and len(set(self.variants)) == len(self.variants),
               f"config key 'ablation.variants' must list distinct names among {', '.join(ABLATION_VARIANTS)}, "
               f"got {self.variants}")
        require(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
               f"config key 'ablation.seeds' must list distinct seeds, got {self.seeds}")
        require(self.figure_images >= 0, f"config key 'ablation.figure_images' must be >= 0, got {self.figure_images}")
        require(self.mode in ABLATION_MODES, f"config key 'ablation.mode' must be one of {', '.join(ABLATION_MODES)}, "
                f"got {self.mode!r}")
        require(self.base_epochs >= 1, f"config key 'ablation.base_epochs' must be >= 1, got {self.base_epochs}")
        require(self.finetune_lr is None or self.finetune_lr > 0,
                f"config key 'ablation.finetune_lr' must be > 0 or null, got {self.finetune_lr}")
        require(self.processes >= 1, f"config key 'ablation.processes' must be >= 1, got {self.processes}")
        require(self.cpu_threads is None or self.cpu_threads >= 1,
               f"config key 'ablation.cpu_threads' must be >= 1 or null, got {self.cpu_threads}")



# name -> (title in the table, config overrides on top of the ablation's config)
VARIANTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "ce": ("CE", ("loss.edge_weight=0", "loss.att_weight=0", "loss.inv_weight=0")),
    "joint": ("CE + BCE + att", ("loss.inv_weight=0",)),
    "inverseform": ("+ InverseForm (Euclid.)", ("loss.inverseform_distance=euclidean",)),
    "geodesic": ("+ InverseForm (geodesic)", ("loss.inverseform_distance=geodesic",)),
}
METRICS = (("miou", "mIoU"), ("mba", "mBA"), ("boundary_f", "bnd F"), ("boundary_iou", "bnd IoU"), ("edge_f", "edge F"))

# What the paper reports for the term (without -> with InverseForm), printed beside the table.
PAPER = {"HRNet-18-IF, Cityscapes val mIoU": [77.0, 77.6],
         "HRNet-16-Slim, Cityscapes val mIoU": [76.1, 77.8],
         "OCRNet-48, Cityscapes val mIoU": [86.0, 86.3],
         "HMS-OCRNet-48, Cityscapes val mIoU": [86.7, 87.0],
         "HRNet-18, NYU-Depth-v2 mIoU (Table 1)": [33.18, 34.79],
         "HRNet-18, NYU-Depth-v2 mBA (Table 1)": [37.46, 40.72]}


def check_config(cfg: "AblationExperimentConfig") -> None:
    if not cfg.model.has_edge:
        raise UserError("the ablation compares edge-head objectives: set model.has_edge=true")
    if cfg.method != "segmentation":
        raise UserError(f"the ablation compares objectives of method segmentation, not {cfg.method!r}")
    needs_term = any(v in ("inverseform", "geodesic") for v in cfg.ablation.variants)
    if needs_term and cfg.loss.inv_weight <= 0:
        raise UserError("ablation variants inverseform/geodesic need loss.inv_weight > 0 (the paper: 0.3)")
    if cfg.loss.edge_weight <= 0 and any(v != "ce" for v in cfg.ablation.variants):
        raise UserError("ablation variants other than ce need loss.edge_weight > 0 (the paper: 0.3)")


def variant_config(cfg: "AblationExperimentConfig", variant: str, seed: int,
                   base: Optional[str] = None) -> ExperimentConfig:
    """The config of one run: the ablation's (without its ``ablation`` section), with the
    variant's loss switches and the seed; fine-tuning the weights of ``base`` (a checkpoint)
    at the fine-tune learning rate when given."""
    overrides = list(VARIANTS[variant][1]) + [f"train.seed={seed}",
                                               f"output_dir={os.path.join(cfg.output_dir, variant, f'seed{seed}')}"]
    if base is not None:
        a = cfg.ablation
        overrides += [f"model.init_checkpoint={base}", f"optim.warmup_iters={a.finetune_warmup_iters}"]
        overrides += [f"optim.lr={a.finetune_lr}"] if a.finetune_lr is not None else []
    data = {k: v for k, v in config_to_dict(cfg).items() if k != "ablation"}
    return build_dataclass(ExperimentConfig, apply_overrides(data, overrides))


def base_config(cfg: "AblationExperimentConfig") -> ExperimentConfig:
    """The base model's config: the ``joint`` objective, ``base_seed``, ``base_epochs``, in
    BASE_DIR/joint-<hash of the settings that shape its weights>; the same settings find the
    same folder, so a finished base is trained once and reused by later ablations."""
    a = cfg.ablation
    sub = variant_config(cfg, "joint", a.base_seed)
    sub.train.epochs = a.base_epochs
    sub.train.max_iters = None
    return cached_base(sub, a.base_dir, "joint")


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
    for name, by_metric in effects(results).items():  # each variant's effect, paired by seed
        lines.append("")
        for key, title in METRICS:
            if key in by_metric:
                diffs = by_metric[key]["per_seed"]
                lines.append(f"{name} - joint, {title:<7}: {paired_difference(diffs).describe()} "
                             f"(per seed: {', '.join(f'{100 * d:+.2f}' for d in diffs)})")
    lines.append("")
    lines.append("paper, without -> with InverseForm: " + "; ".join(
        f"{k} {v[0]} -> {v[1]}" if v[0] else f"{k} +{v[1]}" for k, v in PAPER.items()))
    return "\n".join(lines)


def effects(results: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Each variant minus ``joint``, paired by seed, per metric: the per-seed differences, their
    mean and its 95 % paired t interval."""
    if "joint" not in results:
        return {}
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    b = results["joint"]["per_seed"]
    for name in (n for n in results if n != "joint"):
        a = results[name]["per_seed"]
        for key, _ in METRICS:
            diffs = [a[s][key] - b[s][key] for s in b if s in a and a[s][key] is not None and b[s][key] is not None]
            if diffs:
                out.setdefault(name, {})[key] = {**paired_difference(diffs).as_dict(), "per_seed": diffs}
    return out


@torch.no_grad()
def figure_rows(net: torch.nn.Module, samples: List[Dict[str, Any]], device: torch.device,
                amp_dtype: Optional[torch.dtype], table: ClassTable) -> Tuple[np.ndarray, np.ndarray]:
    """Predicted colours (K x H x W x 3, ``table``'s) and edge probabilities (K x H x W, uint8) of ``net``."""
    was_training = net.training
    net.eval()
    images = to_device_images(torch.stack([s["image"] for s in samples]), device)
    with autocast(device, amp_dtype):
        out = net(images)
    pred = out["pred"].float().argmax(1).cpu().numpy()
    edge = out["edge_prob"][:, 0].float().cpu().numpy() if "edge_prob" in out else np.zeros(pred.shape, np.float32)
    net.train(was_training)
    return np.stack([table.colorize(p) for p in pred]), np.stack([edge_image(e) for e in edge])


def compose_figure(samples: List[Dict[str, Any]], rows: Dict[str, Tuple[np.ndarray, np.ndarray]],
                   titles: Dict[str, str], table: ClassTable, width: int = 256) -> np.ndarray:
    """One row per variant (prediction, edge map for each image), under a row of the images with
    their ground truth and edge targets; RGB uint8."""
    def fit(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        img = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
        return cv2.resize(img, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)

    top, gt = [], []
    for s in samples:
        top += [labelled(fit(denormalize(s["image"])), s["name"][:28]),
                labelled(fit(table.colorize(s["label"].numpy())), "ground truth")]
        target = fit(edge_image(s["edge"][0].numpy()))
        gt += [labelled(target, "edge target"), np.zeros_like(target)]
    lines = [np.concatenate(top, 1), np.concatenate(gt, 1)]
    for name, (colors, edges) in rows.items():
        tiles = []
        for k in range(len(samples)):
            tiles += [labelled(fit(colors[k]), titles[name]), labelled(fit(edges[k]), "edge map")]
        lines.append(np.concatenate(tiles, 1))
    return np.concatenate(lines, 0)


@dataclasses.dataclass
class AblationExperimentConfig(ExperimentConfig):
    """The ablation's config: a segmentation run's, and the ``ablation`` section."""
    ablation: AblationConfig = dataclasses.field(default_factory=AblationConfig)


OUTPUTS = Outputs(marks=("ablation.json", "ablation.png") + tuple(f"{v}/seed*" for v in ABLATION_VARIANTS),
                  companions=("tensorboard", "config.yaml"))


def _figure_from_checkpoints(cfg: AblationExperimentConfig, variants: List[str], seed: int,
                             samples: List[Dict[str, Any]], device: torch.device, table: ClassTable
                             ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    rows = {}
    for name in variants:
        sub = variant_config(cfg, name, seed)
        net = build_model(sub)
        load_weights(net, os.path.join(sub.output_dir, "last.pth"))
        place_model(net, device)
        rows[name] = figure_rows(net, samples, device, None, table)
    return rows


def _train_runs(cfg: AblationExperimentConfig, ctx: dist.DistContext, options: RunOptions,
                todo: List[Tuple[str, int, ExperimentConfig]], parallel: bool) -> None:
    a = cfg.ablation
    method = get_method(cfg.method)
    if any(name in ("inverseform", "geodesic") for name, _, _ in todo) and method.prepare is not None:
        method.prepare(cfg, ctx, RunOptions())  # the regressor, once, before the runs that share it; all threads
    if a.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(a.cpu_threads)
    if parallel and todo:
        run_children([ChildRun(f"{name}, seed {seed}", sub) for name, seed, sub in todo], a.processes,
                     a.cpu_threads, bool(options.resume), what="ablation run")
        return
    for k, (name, seed, sub) in enumerate(todo, 1):
        log.info("ablation run %d/%d: %s, seed %d -> %s", k, len(todo), name, seed, sub.output_dir)
        run_single(method, sub, ctx, run_options(options))


def _collect(cfg: AblationExperimentConfig, runs: List[Tuple[str, int, ExperimentConfig]]) -> Dict[str, Any]:
    results: Dict[str, Any] = {name: {"title": VARIANTS[name][0], "overrides": list(VARIANTS[name][1]),
                                      "per_seed": {}} for name in cfg.ablation.variants}
    for name, seed, sub in runs:
        path = os.path.join(sub.output_dir, "metrics.json")
        if not os.path.isfile(path):
            raise UserError(f"ablation run {sub.output_dir} has no metrics.json: it did not finish; "
                            "continue with --resume")
        with open(path) as f:
            metrics = json.load(f)
        results[name]["per_seed"][seed] = {key: metrics.get(key) for key in
                                           [k for k, _ in METRICS] + ["train_seconds_per_iteration", "edge_f_threshold"]}
    for name in cfg.ablation.variants:
        results[name].update(summarise(results[name]["per_seed"]))
    return results


def run_ablation(cfg: AblationExperimentConfig, ctx: dist.DistContext, options: RunOptions = RunOptions()
                 ) -> Dict[str, Any]:
    """Train every (variant, seed), then print the table and write ablation.json and the figure."""
    check_config(cfg)
    with comparison_dir(cfg.output_dir, OUTPUTS, options):
        return _run_ablation(cfg, ctx, options)


def _run_ablation(cfg: AblationExperimentConfig, ctx: dist.DistContext, options: RunOptions) -> Dict[str, Any]:
    a = cfg.ablation
    base = ensure_base(base_config(cfg), ctx, "ablation") if a.mode == "finetune" else None
    runs = [(name, seed, variant_config(cfg, name, seed, base)) for seed in a.seeds for name in a.variants]
    todo = [(name, seed, sub) for name, seed, sub in runs
            if not (options.resume and finished_earlier(sub, "ablation run"))]
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    parallel = use_children(a.processes, ctx.world_size, "ablation.processes")
    _train_runs(cfg, ctx, options, todo, parallel)
    results = _collect(cfg, runs)
    summary = {"variants": results, "seeds": list(a.seeds), "effects_vs_joint": effects(results),
               "mode": a.mode, "base": base,
               "settings": {"arch": cfg.model.arch, "crop_size": list(cfg.data.crop_size),
                            "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                            "max_iters": cfg.train.max_iters,
                            "processes": a.processes if parallel else 1,
                            "cpu_threads": a.cpu_threads, "loss": config_to_dict(cfg.loss),
                            "edge_image_border": cfg.data.edge_image_border},
               "paper": PAPER}
    if ctx.is_main:
        json_path = os.path.join(cfg.output_dir, "ablation.json")
        atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
        if base is not None:
            print(f"every run fine-tunes {base} (joint loss, {a.base_epochs} epochs, seed {a.base_seed})")
        print(ablation_table(results, list(a.seeds)))
        print(f"\nwritten to {json_path}")
        if a.figure_images:
            _write_figure(cfg, ctx)
    return summary


def _write_figure(cfg: AblationExperimentConfig, ctx: dist.DistContext) -> None:
    a = cfg.ablation
    root, _ = dataset_root(cfg.data)
    val = val_dataset(cfg.data, root, max_images=a.figure_images)
    samples = [val[i] for i in range(len(val))]
    table = table_of(val)
    rows = _figure_from_checkpoints(cfg, list(a.variants), a.seeds[0], samples, ctx.device, table)
    picture = compose_figure(samples, rows, {n: VARIANTS[n][0] for n in rows}, table)
    png_path = os.path.join(cfg.output_dir, "ablation.png")
    write_png(png_path, picture)
    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), True)
    writer.add_image("ablation/predictions_and_edges", picture, 0, dataformats="HWC")
    writer.close()
    print(f"figure:       {png_path} (seed {a.seeds[0]}; TensorBoard: tensorboard --logdir "
          f"{os.path.join(cfg.output_dir, 'tensorboard')})")
