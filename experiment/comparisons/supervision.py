"""The paper's comparison for scribbles (Tang et al., ECCV 2018): pCE alone, pCE + DenseCRF and
the same objective on full labels, with the same seed, schedule and scribbles, each an ordinary
run of method ``weak`` in OUTPUT_DIR/<run>; then the table and OUTPUT_DIR/comparison.json
(``pce_miou``, ``densecrf_miou``, ``full_miou``, seconds per iteration of each).  With
``weak.seeds`` the three runs once per seed (OUTPUT_DIR/seed<k>/<run>): each mIoU is then the
mean over the seeds and the DenseCRF - pCE margin comes with its paired 95 % t interval
(``weak.full_every_seed: false``: the full-labels run for the first seed only), and so does the
margin in every other metric the runs report (``densecrf_gain_by_metric``: pixel accuracy,
mean class accuracy, mBA, boundary F, Boundary IoU).  With
``weak.processes`` > 1 (single-process jobs) the runs train at once as child processes, each
with ``weak.cpu_threads`` threads.  ``--resume`` keeps every run that finished with the same
settings, so a longer ``weak.seeds`` trains only the added seeds.  ``weak.mode: finetune`` is
the reference's two-phase recipe: one pCE base model, cached and reused, then every run
fine-tunes it."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from experiment.comparisons import (cached_base, comparison_dir, ensure_base, finished_earlier, run_options,
                                   with_settings)
from experiment.comparisons.children import ChildRun, run_children, use_children
from experiment.errors import UserError
from experiment.methods import RunOptions, get_method, run_single
from experiment.run_dir import Outputs
from utils import dist
from utils.io import atomic_write_text
from utils.stats import paired_difference

log = logging.getLogger("experiment.supervision")

RUNS = (("pce", "pCE"), ("densecrf", "pCE + DenseCRF"), ("full", "full supervision"))
# the metrics of each run whose DenseCRF - pCE margin gets an interval; mIoU (the paper's) first
METRICS = (("miou", "mIoU"), ("pixel_acc", "pixel accuracy"), ("mean_class_acc", "mean class accuracy"),
           ("mba", "mBA"), ("boundary_f", "boundary F"), ("boundary_iou", "Boundary IoU"))
_RUN = {"weak.compare": False, "weak.seeds": [], "weak.mode": "scratch"}
SETTINGS = {
    "pce": {**_RUN, "weak.densecrf.weight": 0.0, "weak.labels": "scribbles"},
    "densecrf": {**_RUN, "weak.labels": "scribbles"},
    "full": {**_RUN, "weak.densecrf.weight": 0.0, "weak.labels": "full"},
}
# Keys that do not shape the pCE base model's weights: the comparison's own (how its runs are
# spread, the fine-tunes') and the DenseCRF's, which the base does not use.
NOT_SHAPING_THE_BASE = ("weak.densecrf.", "weak.full_every_seed", "weak.cpu_threads", "weak.processes",
                    "weak.base_dir", "weak.finetune_lr", "weak.finetune_warmup_iters")
OUTPUTS = Outputs(marks=("comparison.json", "seed*") + tuple(name for name, _ in RUNS), companions=("config.yaml",))
Run = Tuple[int, str]  # (seed, run name)


def run_weak(cfg, ctx: dist.DistContext, options: RunOptions) -> Any:
    """A config of method weak: the comparison when ``weak.compare``, else its one run."""
    if cfg.weak.compare:
        return compare_supervision(cfg, ctx, options)
    return run_single(get_method(cfg.method), cfg, ctx, options)


def compare_supervision(cfg, ctx: dist.DistContext, options: RunOptions) -> Dict[str, Any]:
    """Train the three runs and report them; returns what comparison.json holds."""
    if cfg.weak.densecrf.weight <= 0:
        raise UserError("weak.compare needs weak.densecrf.weight > 0 (the pCE + DenseCRF run)")
    with comparison_dir(cfg.output_dir, OUTPUTS, options):
        return _compare(cfg, ctx, options)


def _compare(cfg, ctx: dist.DistContext, options: RunOptions) -> Dict[str, Any]:
    base = ensure_base(base_config(cfg), ctx, "scribble comparison") if cfg.weak.mode == "finetune" else None
    if cfg.weak.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(cfg.weak.cpu_threads)
    seeds = list(cfg.weak.seeds) or [cfg.train.seed]
    subs = {(seed, name): with_settings(cfg, _run_dir(cfg, seed, name),
                                        {**SETTINGS[name], "train.seed": seed, **_finetune(cfg, base)})
            for seed in seeds for name, _ in RUNS if name != "full" or cfg.weak.full_every_seed or seed == seeds[0]}
    parallel = use_children(cfg.weak.processes, ctx.world_size, "weak.processes")
    kept = [run for run, sub in subs.items() if options.resume and finished_earlier(sub, "comparison run")]
    todo = {run: sub for run, sub in subs.items() if run not in kept}
    results = {run: _run_result(_metrics(subs[run])) for run in kept}
    if todo:
        results.update(_in_children(cfg, todo, options) if parallel else _in_process(todo, ctx, options))
    summary = _summary(cfg, seeds, results)
    summary["settings"]["processes"] = cfg.weak.processes if parallel else 1
    summary["base"] = base
    if ctx.is_main:
        path = os.path.join(cfg.output_dir, "comparison.json")
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        if base is not None:
            w = cfg.weak
            print(f"every run fine-tunes {base} (pCE, {w.base_epochs} epochs, seed {w.base_seed}) for "
                  f"{cfg.train.epochs} epochs at lr {w.finetune_lr or cfg.optim.lr:g}")
        print(comparison_table(summary))
        if parallel and todo:
            print(f"(runs trained {min(cfg.weak.processes, len(todo))} at a time as child processes sharing the "
                  "CPU: s/iteration is each run's share of it)")
        if kept:
            print(f"({len(kept)} runs finished earlier and were kept: their s/iteration is their training loop's)")
        if len(seeds) > 1:
            print("\n" + gain_table(summary))
        print(f"\nDenseCRF - pCE mIoU: {_gain(summary).describe()} (paper, VOC 2012: +3.6 points); written to {path}")
    return summary


def base_config(cfg) -> Any:
    """The two-phase recipe's first phase: the pCE run with ``weak.base_seed`` for
    ``weak.base_epochs``, in WEAK.BASE_DIR/pce-<hash of the settings that shape its weights>."""
    w = cfg.weak
    sub = with_settings(cfg, cfg.output_dir, {**SETTINGS["pce"], "train.seed": w.base_seed,
                                              "train.epochs": w.base_epochs, "train.max_iters": None})
    return cached_base(sub, w.base_dir, "pce", ignore=NOT_SHAPING_THE_BASE)


def _finetune(cfg, base: Optional[str]) -> Dict[str, Any]:
    """The settings that make a run of the comparison fine-tune ``base`` (none without one)."""
    if base is None:
        return {}
    lr = {"optim.lr": cfg.weak.finetune_lr} if cfg.weak.finetune_lr is not None else {}
    return {"model.init_checkpoint": base, "optim.warmup_iters": cfg.weak.finetune_warmup_iters, **lr}


def _run_dir(cfg, seed: int, name: str) -> str:
    if cfg.weak.seeds:
        return os.path.join(cfg.output_dir, f"seed{seed}", name)
    return os.path.join(cfg.output_dir, name)


def _gain(summary: Dict[str, Any], metric: str = "miou"):
    return paired_difference([r[f"densecrf_{metric}"] - r[f"pce_{metric}"] for r in summary["per_seed"].values()])


def _summary(cfg, seeds: List[int], results: Dict[Run, Dict[str, Any]]) -> Dict[str, Any]:
    """The mean mIoU of each run over the seeds it was trained for, each seed's, and the paired
    DenseCRF - pCE margin."""
    metrics = [key for key, _ in METRICS if all(key in result for result in results.values())]
    per_seed = {str(seed): {f"{name}_{key}": results[(seed, name)][key] for name, _ in RUNS
                            if (seed, name) in results for key in metrics} for seed in seeds}
    summary: Dict[str, Any] = {f"{name}_miou": float(np.mean([results[(s, name)]["miou"] for s in seeds
                                                              if (s, name) in results])) for name, _ in RUNS}
    summary.update(per_seed=per_seed, seeds=seeds, full_seeds=[s for s in seeds if (s, "full") in results],
                   runs={name: results[(seeds[0], name)] for name, _ in RUNS} if len(seeds) == 1 else
                   {f"seed{seed}/{name}": results[(seed, name)] for seed, name in sorted(results)})
    gain = _gain(summary)
    summary["densecrf_gain_points"] = 100.0 * gain.mean
    summary["densecrf_gain_ci"] = gain.as_dict(scale=100.0)
    summary["densecrf_gain_by_metric"] = {key: _gain(summary, key).as_dict(scale=100.0) for key in metrics}
    summary["settings"] = {"densecrf_weight": cfg.weak.densecrf.weight, "sigma_rgb": cfg.weak.densecrf.sigma_rgb,
                           "sigma_xy": cfg.weak.densecrf.sigma_xy, "scale": cfg.weak.densecrf.scale,
                           "source": cfg.weak.source, "scribble_fraction": cfg.weak.scribble_fraction,
                           "stroke_width": cfg.weak.stroke_width, "seed": seeds[0] if len(seeds) == 1 else seeds,
                           "mode": cfg.weak.mode}
    if cfg.weak.mode == "finetune":
        summary["settings"].update(base_epochs=cfg.weak.base_epochs, base_seed=cfg.weak.base_seed,
                                   finetune_lr=cfg.weak.finetune_lr or cfg.optim.lr,
                                   finetune_warmup_iters=cfg.weak.finetune_warmup_iters)
    return summary


def _in_children(cfg, subs: Dict[Run, Any], options: RunOptions) -> Dict[Run, Dict[str, Any]]:
    # the DenseCRF runs (the longest) first: with two processes the others share the second
    order = sorted(subs, key=lambda run: (run[1] != "densecrf", run[0]))
    label = {run: dict(RUNS)[run[1]] + (f", seed {run[0]}" if cfg.weak.seeds else "") for run in subs}
    walls = run_children([ChildRun(label[run], subs[run]) for run in order], cfg.weak.processes,
                         cfg.weak.cpu_threads, bool(options.resume), what="comparison run")
    return {run: _run_result(_metrics(sub), walls[label[run]]) for run, sub in subs.items()}


def _in_process(subs: Dict[Run, Any], ctx: dist.DistContext, options: RunOptions) -> Dict[Run, Dict[str, Any]]:
    results = {}
    for run, sub in subs.items():
        log.info("comparison: %s, seed %d -> %s", dict(RUNS)[run[1]], run[0], sub.output_dir)
        started = time.time()
        metrics, _ = run_single(get_method(sub.method), sub, ctx, run_options(options))
        results[run] = _run_result(metrics, time.time() - started)
    return results


def _metrics(sub) -> Dict[str, Any]:
    with open(os.path.join(sub.output_dir, "metrics.json")) as f:
        return json.load(f)


def _run_result(metrics: Dict[str, Any], wall: Optional[float] = None) -> Dict[str, Any]:
    """One run's row: its metrics of :data:`METRICS` (those it reports; mIoU always) and its wall
    time over its iterations (start-up and the final validation included; with child processes,
    the child's whole life).  ``wall`` None: a run kept from an earlier comparison, whose wall
    time is not known here: its training loop's time per iteration, as it recorded it."""
    iterations = int(metrics.get("iteration") or 1)
    row = {"miou": float(metrics["miou"]), "iterations": iterations,
           **{key: float(metrics[key]) for key, _ in METRICS if metrics.get(key) is not None}}
    if wall is None:
        return {**row, "seconds_per_iteration": metrics.get("train_seconds_per_iteration"), "wall_seconds": None,
                "reused": True}
    return {**row, "seconds_per_iteration": wall / iterations, "wall_seconds": wall}


def comparison_table(summary: Dict[str, Any]) -> str:
    """mIoU of each run (the mean over the seeds, with the range) and its wall time per iteration."""
    def sec(v):
        return f"{v:.3f}" if v else "?"

    seeds = summary["seeds"]
    lines = [f"{'supervision':<20} {'mIoU (%)':>9} {'s/iteration':>12}  (wall time of the run / iterations)"
             + (f"; mIoU: mean over seeds {seeds} [min, max]" if len(seeds) > 1 else ""), "-" * 43]
    for name, title in RUNS:
        values = [100 * r[f"{name}_miou"] for r in summary["per_seed"].values() if f"{name}_miou" in r]
        walls = [r["seconds_per_iteration"] for key, r in summary["runs"].items()
                 if key.split("/")[-1] == name and r["seconds_per_iteration"] is not None]
        spread = f"  [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else \
            f"  (seed {summary['full_seeds'][0]} only)" if len(seeds) > 1 else ""
        lines.append(f"{title:<20} {100 * summary[f'{name}_miou']:>9.2f} {sec(np.mean(walls) if walls else None):>12}"
                     f"{spread}")
    return "\n".join(lines)


def gain_table(summary: Dict[str, Any]) -> str:
    """DenseCRF - pCE in every metric of ``densecrf_gain_by_metric``: mean, paired 95 % t interval
    and each seed's margin, in points."""
    seeds = summary["seeds"]
    lines = [f"DenseCRF - pCE, points (paired t over seeds {seeds}):",
             f"{'metric':<20} {'mean':>7}  {'95 % CI':<17} per seed"]
    for key, title in METRICS:
        ci = summary["densecrf_gain_by_metric"].get(key)
        if ci is None:
            continue
        margins = " ".join(f"{100 * (r[f'densecrf_{key}'] - r[f'pce_{key}']):+.2f}"
                           for r in summary["per_seed"].values())
        bounds = f"[{ci['ci_low']:+.2f}, {ci['ci_high']:+.2f}]"
        lines.append(f"{title:<20} {ci['mean']:>+7.2f}  {bounds:<17} {margins}")
    return "\n".join(lines)
