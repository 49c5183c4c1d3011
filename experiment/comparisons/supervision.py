"""The paper's comparison for scribbles (Tang et al., ECCV 2018): pCE alone, pCE + DenseCRF and
the same objective on full labels, with the same seed, schedule and scribbles, each an ordinary
run of method ``weak`` in OUTPUT_DIR/<run>; then the table and OUTPUT_DIR/comparison.json
(``pce_miou``, ``densecrf_miou``, ``full_miou``, seconds per iteration of each).  With
``weak.processes`` > 1 (single-process jobs) the runs train at once as child processes, each
with ``weak.cpu_threads`` threads."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict

import torch

from experiment.comparisons import comparison_dir, run_options, with_settings
from experiment.comparisons.children import ChildRun, run_children, use_children
from experiment.errors import UserError
from experiment.methods import RunOptions, get_method, run_single
from experiment.run_dir import Outputs
from utils import dist
from utils.io import atomic_write_text

log = logging.getLogger("experiment.supervision")

RUNS = (("pce", "pCE"), ("densecrf", "pCE + DenseCRF"), ("full", "full supervision"))
SETTINGS = {
    "pce": {"weak.densecrf.weight": 0.0, "weak.labels": "scribbles", "weak.compare": False},
    "densecrf": {"weak.labels": "scribbles", "weak.compare": False},
    "full": {"weak.densecrf.weight": 0.0, "weak.labels": "full", "weak.compare": False},
}
OUTPUTS = Outputs(marks=("comparison.json",) + tuple(name for name, _ in RUNS), companions=("config.yaml",))


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
    if cfg.weak.cpu_threads and ctx.device.type == "cpu":
        torch.set_num_threads(cfg.weak.cpu_threads)
    subs = {name: with_settings(cfg, os.path.join(cfg.output_dir, name), SETTINGS[name]) for name, _ in RUNS}
    parallel = use_children(cfg.weak.processes, ctx.world_size, "weak.processes")
    results = _in_children(cfg, subs, options) if parallel else _in_process(subs, ctx, options)
    summary = {
        "pce_miou": results["pce"]["miou"], "densecrf_miou": results["densecrf"]["miou"],
        "full_miou": results["full"]["miou"],
        "densecrf_gain_points": 100.0 * (results["densecrf"]["miou"] - results["pce"]["miou"]),
        "runs": results,
        "settings": {"densecrf_weight": cfg.weak.densecrf.weight, "sigma_rgb": cfg.weak.densecrf.sigma_rgb,
                     "sigma_xy": cfg.weak.densecrf.sigma_xy, "scale": cfg.weak.densecrf.scale,
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


def _in_children(cfg, subs: Dict[str, Any], options: RunOptions) -> Dict[str, Any]:
    # the DenseCRF run (the longest) first: with two processes the other two share the second
    order = ["densecrf"] + [name for name, _ in RUNS if name != "densecrf"]
    walls = run_children([ChildRun(dict(RUNS)[name], subs[name]) for name in order], cfg.weak.processes,
                         cfg.weak.cpu_threads, bool(options.resume), what="comparison run")
    results = {}
    for name, title in RUNS:
        with open(os.path.join(subs[name].output_dir, "metrics.json")) as f:
            results[name] = _run_result(json.load(f), walls[title])
    return results


def _in_process(subs: Dict[str, Any], ctx: dist.DistContext, options: RunOptions) -> Dict[str, Any]:
    results = {}
    for name, title in RUNS:
        sub = subs[name]
        log.info("comparison: %s -> %s", title, sub.output_dir)
        started = time.time()
        metrics, _ = run_single(get_method(sub.method), sub, ctx, run_options(options))
        results[name] = _run_result(metrics, time.time() - started)
    return results


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
