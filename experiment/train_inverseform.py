"""Train the inverse-transformation network (InverseForm's regressor) on a dataset's own boundaries.

The paper (section 3.4) trains it on ground-truth boundary maps of the target dataset:
each tile is paired with a copy warped by a spatial transformer with parameters drawn
near identity, and the network regresses those parameters.  Here:

* Tiles are cut exactly as :class:`inverseform.InverseFormLoss` cuts them during
  segmentation training: the edge target of a random training crop (``data.crop_size``,
  random scale and flip) is resized bilinearly to (f T) x (2 f T) and cut into T x T tiles
  (T = ``model.tile_size``, f = ``tiles.tile_factor``), so the regressor is trained on
  the distribution it will see.
* Each pair is (warped tile, tile); the target is the warp's deviation from identity
  (``scale_shift``: 4 parameters in the released output layout, ``affine``: 6,
  ``homography``: 8), normalised per parameter by statistics this run computes and stores
  (root mean square over the sampling ranges), so the loss ||theta_hat - theta|| weighs
  parameters evenly.  A share of pairs (``tiles.identity_fraction``) is left untransformed:
  identical boundaries must map to zero.
* Mostly-empty tiles (less than ``tiles.min_edge_fraction`` boundary) are down-weighted,
  not dropped: only ``tiles.empty_keep`` of them are kept, and always as identity pairs.
  Why: an empty tile is unchanged by any warp, so no transform can be read from it and the
  only consistent target is "no deviation"; keeping all of them (most of a street scene is
  sky and road) would drown the informative pairs, dropping all would leave the regressor's
  answer on empty tiles - which the loss meets constantly - undefined.

Output: the regressor in the released file format (bare state dict fc.0/fc.2/fc.4, which
InverseFormLoss and ``InverseNet.from_checkpoint`` read directly) at ``output_path`` plus a
JSON metadata file beside it (parameterisation, tile size, normalisation, dataset, steps,
evaluation summary), and ``OUTPUT_DIR/report.json``: on held-out tiles of the val split, the
mean distance of identity pairs and of transformed pairs, the Spearman correlation between
the true transform's magnitude and the predicted distance, and R^2 per parameter.

    torchrun --nproc_per_node=N experiment/train_inverseform.py --config configs/regressor_cityscapes.yaml
    python -m experiment.train_inverseform --config configs/synthetic_regressor.yaml
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script (torchrun experiment/train_inverseform.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets import Cityscapes, TrainTransform
from experiment.common import (SHARED_FLAGS, Rank0Writer, UserError, autocast, flag_overrides, resolve_amp,
                               script_main, script_parser, seed_everything)
from experiment.config import RegressorConfig
from experiment.acceleration import load_config_for_device
from experiment.data import dataset_root, train_loader
from experiment.engine import (History, batch_stream, check_finite, human_time, load_training_checkpoint,
                               poly_with_warmup, rng_state, save_training_checkpoint, set_rng_state)
from inverseform import InverseNet, ParamNormaliser, params_to_matrix, sample_deviations, save_regressor, warp
from inverseform.tiling import image_to_tiles, resize_for_tiling
from utils import dist
from utils.config import config_to_dict, save_config
from utils.io import atomic_write_json

log = logging.getLogger("experiment.train_inverseform")


# ----------------------------------------------------------------------------- tiles
class EdgeTiles(Dataset):
    """Boundary tiles of training crops, as InverseFormLoss sees them.

    Item ``i`` is ``{'tiles': K x 1 x T x T float, 'empty': K bool}`` for the K tiles of a
    random crop of image ``i`` that are kept (all non-empty ones, a seeded ``empty_keep`` share
    of the rest).  Only label maps are read (no image decoding), and they are kept in memory
    when the split is small (at most ``cache_bytes``), since this loader feeds a network far
    cheaper than a segmentation model.  Sample ``i`` of epoch ``e`` is seeded by (seed, e, i).
    """

    def __init__(self, labels: Cityscapes, transform: TrainTransform, tile_size: int, tile_factor: int,
                 min_edge_fraction: float, empty_keep: float, seed: int, cache_bytes: int = 512 << 20):
        self.labels = labels
        self.transform = transform
        self.tile_size = tile_size
        self.resized = (tile_factor * tile_size, 2 * tile_factor * tile_size)
        self.min_edge_fraction = min_edge_fraction
        self.empty_keep = empty_keep
        self.seed = seed
        self.epoch = 0
        self.cache: Optional[List[np.ndarray]] = None
        first = labels.load_label(0)
        if first.size * len(labels.items) <= cache_bytes:
            self.cache = [first] + [labels.load_label(i) for i in range(1, len(labels.items))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels.items)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        label = self.cache[index] if self.cache is not None else self.labels.load_label(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        _, edge = self.transform.label_crop(label, rng)
        edge = torch.from_numpy(edge).float()[None, None]  # 1 x 1 x H x W
        tiles = image_to_tiles(resize_for_tiling(edge, self.resized), self.tile_size)
        empty = tiles.mean(dim=(1, 2, 3)) < self.min_edge_fraction
        keep = ~empty | torch.from_numpy(rng.random(len(tiles)) < self.empty_keep)
        return {"tiles": tiles[keep], "empty": empty[keep]}


def collate_tiles(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {"tiles": torch.cat([it["tiles"] for it in items]), "empty": torch.cat([it["empty"] for it in items])}


def tile_dataset(cfg: RegressorConfig, root: str, split: str, seed: int) -> EdgeTiles:
    transform = TrainTransform(crop_size=cfg.data.crop_size, scale_range=cfg.data.scale_range, flip=cfg.data.flip,
                               edge_radius=cfg.data.edge_radius, edge_image_border=cfg.data.edge_image_border)
    labels = Cityscapes(root, split, edge_radius=cfg.data.edge_radius, progress=False)
    if len(labels) == 0:
        raise UserError(f"split {split!r} of {root} holds no images")
    return EdgeTiles(labels, transform, cfg.model.tile_size, cfg.tiles.tile_factor, cfg.tiles.min_edge_fraction,
                     cfg.tiles.empty_keep, seed)


def ranges_of(cfg: RegressorConfig) -> Dict[str, float]:
    from inverseform.warps import KIND_COMPONENTS

    allowed = KIND_COMPONENTS[cfg.model.parameterisation]
    given = config_to_dict(cfg.ranges)
    extra = {k: v for k, v in given.items() if k not in allowed and v}
    if extra:
        raise UserError(f"config keys {', '.join('ranges.' + k for k in extra)} cannot be expressed by "
                        f"model.parameterisation={cfg.model.parameterisation!r} (it has {list(allowed)}); set them to 0")
    return {k: float(given[k]) for k in allowed}


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, rank, step): warps resume exactly."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


def make_pairs(tiles: torch.Tensor, empty: torch.Tensor, kind: str, ranges: Dict[str, float],
               identity_fraction: float, generator: torch.Generator):
    """(warped tiles, tiles, deviations): empty tiles always get the identity."""
    dev = sample_deviations(tiles.shape[0], kind, ranges, identity_fraction, generator, device=tiles.device)
    dev = dev.masked_fill(empty.unsqueeze(1), 0.0)
    return warp(tiles, params_to_matrix(dev, kind), kind=kind), tiles, dev


# ----------------------------------------------------------------------------- evaluation
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def evaluate(net: InverseNet, tiles: torch.Tensor, cfg: RegressorConfig, normaliser: ParamNormaliser,
             device: torch.device, amp_dtype) -> Dict[str, Any]:
    """Every held-out tile twice: with itself (identity) and with a random warp of itself.

    Distances are the L2 norm of the regressor's normalised output (the training space);
    the true magnitude is the norm of the normalised true deviation.
    """
    net.eval()
    kind = cfg.model.parameterisation
    ranges = ranges_of(cfg)
    gen = step_generator(cfg.train.seed, 1 << 20, 0, device)
    pred_id, pred_tr, true_tr = [], [], []
    for start in range(0, len(tiles), cfg.train.eval_batch):
        x = tiles[start:start + cfg.train.eval_batch].to(device)
        dev = sample_deviations(len(x), kind, ranges, 0.0, gen, device=device)
        warped = warp(x, params_to_matrix(dev, kind), kind=kind)
        with autocast(device, amp_dtype):
            pred_id.append(net(x, x).float().cpu())
            pred_tr.append(net(warped, x).float().cpu())
        true_tr.append(normaliser.normalise(dev.float().cpu()))
    pred_id, pred_tr, true_tr = torch.cat(pred_id), torch.cat(pred_tr), torch.cat(true_tr)
    d_id, d_tr = pred_id.norm(dim=1), pred_tr.norm(dim=1)
    magnitude = true_tr.norm(dim=1)
    # R^2 per parameter over all pairs (identity targets are zeros).
    pred_all, true_all = torch.cat([pred_id, pred_tr]), torch.cat([torch.zeros_like(true_tr), true_tr])
    ss_res = ((pred_all - true_all) ** 2).sum(0)
    ss_tot = ((true_all - true_all.mean(0)) ** 2).sum(0)
    r2 = (1 - ss_res / ss_tot.clamp_min(1e-12)).tolist()
    identity_mean, transformed_mean = float(d_id.mean()), float(d_tr.mean())
    report = {
        "identity_mean_distance": identity_mean,
        "transformed_mean_distance": transformed_mean,
        "identity_to_transformed_ratio": identity_mean / transformed_mean if transformed_mean > 0 else float("nan"),
        "spearman": spearman(magnitude.numpy(), d_tr.numpy()),
        "spearman_with_identity_pairs": spearman(torch.cat([torch.zeros_like(magnitude), magnitude]).numpy(),
                                                 torch.cat([d_id, d_tr]).numpy()),
        "r2_per_param": r2,
        "num_tiles": int(len(tiles)),
        "distance": "L2 norm of the normalised parameters",
        "parameterisation": kind,
    }
    return report


def held_out_tiles(cfg: RegressorConfig, root: str) -> torch.Tensor:
    """Non-empty tiles of ``train.eval_images`` random crops of the val split (fixed seed;
    a small split is cycled with fresh crops, scales and flips)."""
    data = tile_dataset(cfg, root, cfg.data.val_split, seed=cfg.train.seed + 1)
    data.empty_keep = 0.0
    tiles = []
    for k in range(cfg.train.eval_images):
        epoch, index = divmod(k, len(data))
        if index == 0:
            data.set_epoch(epoch)
        tiles.append(data[index]["tiles"])
    tiles = torch.cat(tiles) if tiles else torch.zeros(0)
    if len(tiles) == 0:
        raise UserError(f"no held-out tile of split {cfg.data.val_split!r} has boundary pixels "
                        f"(min_edge_fraction={cfg.tiles.min_edge_fraction})")
    return tiles


def format_report(report: Dict[str, Any]) -> str:
    r2 = ", ".join(f"{v:.3f}" for v in report["r2_per_param"])
    return (f"held-out tiles: {report['num_tiles']}\n"
            f"  identity pairs mean distance     {report['identity_mean_distance']:.4f}\n"
            f"  transformed pairs mean distance  {report['transformed_mean_distance']:.4f}"
            f"  (ratio identity/transformed {report['identity_to_transformed_ratio']:.3f})\n"
            f"  Spearman(|theta|, distance)      {report['spearman']:.4f}\n"
            f"  R^2 per parameter                [{r2}]")


# ----------------------------------------------------------------------------- training
def train_regressor(cfg: RegressorConfig, ctx: dist.DistContext, resume: bool = False,
                    stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Train, evaluate and save a regressor; returns the evaluation report (on every rank).
    ``stop_after``: stop with a checkpoint after that step (continue later with ``resume``)."""
    device = ctx.device
    amp_dtype = resolve_amp(cfg.train.amp, device)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if ctx.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    seed_everything(cfg.train.seed + ctx.rank)
    root, synthetic = dataset_root(cfg.data)
    kind = cfg.model.parameterisation
    ranges = ranges_of(cfg)
    from inverseform.warps import KIND_NUM_PARAMS

    num_params = KIND_NUM_PARAMS[kind]
    train_data = tile_dataset(cfg, root, cfg.data.train_split, seed=cfg.train.seed)
    loader = train_loader(train_data, cfg.train.images_per_batch, cfg.data.num_workers, cfg.train.seed,
                          collate_fn=collate_tiles)

    # Normalisation: per-parameter RMS of the deviations the ranges produce (identity stays 0).
    norm_gen = torch.Generator().manual_seed(cfg.train.seed)
    normaliser = ParamNormaliser.fit(sample_deviations(100_000, kind, ranges, 0.0, norm_gen))

    net = InverseNet(cfg.model.tile_size, num_params, cfg.model.hidden, parameterisation=kind)
    net.set_normalisation(normaliser)
    net.to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.distributed else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total = cfg.train.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_with_warmup(total, 0.9, min(200, total // 10)))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    last_path = os.path.join(cfg.output_dir, "last.pth")
    start = 0
    if resume:
        state = load_training_checkpoint(last_path)
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        normaliser = ParamNormaliser.from_dict(state["normaliser"])
        net.set_normalisation(normaliser)
        set_rng_state(state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0])
        start = int(state["iteration"])
        log.info("resumed from %s at step %d", last_path, start)

    def checkpoint(step: int) -> None:
        rngs = dist.all_gather_object(rng_state())
        if ctx.is_main:
            save_training_checkpoint(last_path, {
                "state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": step,
                "normaliser": normaliser.to_dict(), "rng": rngs, "config": config_to_dict(cfg)})

    writer = Rank0Writer(os.path.join(cfg.output_dir, "tensorboard"), ctx.is_main,
                         purge_step=start + 1 if start else None)
    log.info("regressor %s (%d parameters) on %s tiles of %s (%s), %d steps x %d crops x %d processes",
             kind, sum(p.numel() for p in net.parameters()), cfg.model.tile_size, root,
             "synthetic" if synthetic else "Cityscapes", total, cfg.train.images_per_batch, ctx.world_size)
    stop_at = min(total, stop_after) if stop_after is not None else total
    history = History(os.path.join(cfg.output_dir, "train_log.jsonl"), ctx.is_main, start)
    bar = tqdm(total=total, initial=start, desc="regressor", unit="step", disable=not ctx.is_main,
               dynamic_ncols=True)
    model.train()
    t0, tiles_seen, losses = time.time(), 0, []
    step = start
    for epoch, step, batch in batch_stream(loader, start, stop_at):
        tiles = batch["tiles"].to(device, non_blocking=True)
        empty = batch["empty"].to(device, non_blocking=True)
        if tiles.shape[0] == 0:  # every crop was empty and dropped: one empty identity pair keeps
            tiles = torch.zeros(1, 1, cfg.model.tile_size, cfg.model.tile_size, device=device)  # ranks in step
            empty = torch.ones(1, dtype=torch.bool, device=device)
        gen = step_generator(cfg.train.seed, ctx.rank, step, device)
        x1, x2, dev = make_pairs(tiles, empty, kind, ranges, cfg.tiles.identity_fraction, gen)
        target = normaliser.normalise(dev)
        with autocast(device, amp_dtype):
            pred = model(x1, x2)
        loss = (pred.float() - target).norm(dim=1).mean()
        check_finite({"loss": loss}, step, epoch, last_path)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.detach())
        tiles_seen += tiles.shape[0]
        done = step + 1
        if done % cfg.train.log_interval == 0 or done == stop_at:
            mean_loss = dist.all_reduce(torch.stack(losses).mean().reshape(1), op="mean").item()
            losses.clear()
            rate = tiles_seen * ctx.world_size / max(1e-9, time.time() - t0)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tiles_s=f"{rate:.0f}")
            writer.add_scalar("regressor/loss", mean_loss, done)
            writer.add_scalar("regressor/lr", scheduler.get_last_lr()[0], done)
            writer.add_scalar("regressor/tiles_per_s", rate, done)
            history.write({"iteration": done, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "loss": mean_loss})
        if cfg.train.checkpoint_interval and done % cfg.train.checkpoint_interval == 0 and done < stop_at:
            checkpoint(done)
        bar.update(1)
    bar.close()
    elapsed = time.time() - t0
    if start < stop_at:
        checkpoint(stop_at)
    if stop_at < total:
        log.info("stopped after step %d of %d; continue with --resume", stop_at, total)
        writer.close()
        return {}

    report: Dict[str, Any] = {}
    if ctx.is_main:
        held_out = held_out_tiles(cfg, root)
        report = evaluate(net, held_out, cfg, normaliser, device, amp_dtype)
        report.update(steps=total, train_seconds=round(elapsed, 1))
        atomic_write_json(os.path.join(cfg.output_dir, "report.json"), report)
        writer.add_scalar("eval/identity_mean_distance", report["identity_mean_distance"], total)
        writer.add_scalar("eval/transformed_mean_distance", report["transformed_mean_distance"], total)
        writer.add_scalar("eval/spearman", report["spearman"], total)
        metadata = {
            "dataset": root, "synthetic_dataset": synthetic, "steps": total,
            "crop_size": list(cfg.data.crop_size), "tile_factor": cfg.tiles.tile_factor,
            "edge_image_border": cfg.data.edge_image_border, "ranges": ranges, "identity_fraction": cfg.tiles.identity_fraction,
            "min_edge_fraction": cfg.tiles.min_edge_fraction,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "report": {k: report[k] for k in ("identity_mean_distance", "transformed_mean_distance", "spearman")},
        }
        net.cpu()
        weights, meta_path = save_regressor(net, cfg.output_path, metadata)
        net.to(device)
        print(format_report(report))
        print(f"regressor: {weights}\nmetadata:  {meta_path}\nreport:    {os.path.join(cfg.output_dir, 'report.json')}"
              f"\ntrained {total - start} steps in {human_time(elapsed)}")
    writer.close()
    dist.barrier()
    return dist.broadcast_object(report)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__, "run directory (config, checkpoints, report, TensorBoard)",
                           opt_example="train.lr=0.0003 model.tile_size=64")
    parser.add_argument("--output_path", help="where to write the regressor .pth (+ .json beside it)")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pth")
    parser.add_argument("--stop_after", type=int, help="stop (with a checkpoint) after this step; resume later")
    parser.add_argument("--amp", nargs="?", const="on", choices=("auto", "on", "off", "bf16", "fp16"),
                        help="autocast (train.amp): auto (bf16 on CUDA, off on CPU), on (= bf16; the bare flag), "
                             "off, bf16, fp16")
    parser.add_argument("--seed", type=int, help="random seed (train.seed)")
    return parser


def config_from_args(args: argparse.Namespace) -> RegressorConfig:
    overrides = flag_overrides(args, {**SHARED_FLAGS, "output_path": "output_path", "steps": "train.steps",
                                      "amp": "train.amp", "seed": "train.seed"})
    return load_config_for_device(RegressorConfig, args.config, overrides)  # + cuda_overrides on CUDA


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    script_main(args, config_from_args,
                lambda cfg, ctx: train_regressor(cfg, ctx, resume=args.resume, stop_after=args.stop_after),
                "train_log.txt")


if __name__ == "__main__":
    main()
