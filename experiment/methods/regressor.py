"""The inverse-transformation network (InverseForm's regressor) trained on a dataset's own
boundaries: ``method: regressor``.

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
  identical boundaries must map to zero.  Each tile may be paired with several warps in a
  step (``tiles.warps_per_tile``): a pair costs a warp and the net's forward and backward, a
  crop also its decoding, scaling and edge extraction.
* The net trains on tiles minus their mean pixel (``train.centre_inputs``; :class:`CentredInputs`),
  which its first layer learns from far faster than from 0/1 maps; the offset is folded into
  fc.0's bias, so the saved file takes raw tiles like the released one.
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
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from datasets import SegmentationDataset, TrainTransform
from experiment.config import DataConfig, RunConfig, check_tile_grid, require
from experiment.data import KEEP_DECODED_BYTES, dataset_root, labelled_images, train_loader
from experiment.engine import OptimizerSpec, Task
from experiment.errors import UserError
from experiment.methods import Method, RunOptions, get_method, register, run_single
from experiment.runtime import autocast, human_time, on_main_first, resolve_amp
from inverseform import InverseNet, ParamNormaliser, params_to_matrix, sample_deviations, save_regressor, warp
from inverseform.tiling import image_to_tiles, resize_for_tiling
from inverseform.warps import KIND_COMPONENTS, KIND_NUM_PARAMS
from utils import dist
from utils.config import config_to_dict, path_field
from utils.io import atomic_write_json

log = logging.getLogger("experiment.regressor")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass
class WarpRangesConfig:
    """Half-widths of the uniform transforms paired with each tile (inverseform.warps):
    scale (relative), shift (normalised tile coordinates, 1.0 = half a tile), rotation
    (degrees), shear, perspective.  A kind uses only the components it can express."""
    scale: float = 0.1
    shift: float = 0.1
    rotation: float = 0.0
    shear: float = 0.0
    perspective: float = 0.0


@dataclasses.dataclass
class RegressorModelConfig:
    parameterisation: str = "scale_shift"   # scale_shift (4, released layout), affine (6), homography (8)
    tile_size: int = 224
    hidden: Tuple[int, int] = (1000, 32)

    def validate(self) -> None:
        require(self.parameterisation in ("shift", "scale_shift", "affine", "homography"),
               "config key 'model.parameterisation' must be shift, scale_shift, affine or homography, "
               f"got {self.parameterisation!r}")
        require(self.tile_size >= 8, f"config key 'model.tile_size' must be >= 8, got {self.tile_size}")


@dataclasses.dataclass
class TileConfig:
    """How boundary tiles are cut: as InverseFormLoss sees them during segmentation training.
    Edge targets of training crops (``data.crop_size``) are resized bilinearly to
    (tile_factor * T) x (2 * tile_factor * T), or (rows * T) x (cols * T) with ``tile_grid``
    (= the segmentation config's loss.inverseform_tile_grid), and cut into T x T tiles."""
    tile_factor: int = 3
    tile_grid: Optional[List[int]] = None
    min_edge_fraction: float = 0.01   # tiles with less boundary than this are 'empty'
    empty_keep: float = 0.1           # share of empty tiles kept, as identity pairs
    identity_fraction: float = 0.2    # share of pairs left untransformed (target 0)
    warps_per_tile: int = 1           # pairs per tile and step, each with its own warp: a pair costs less than a crop

    def validate(self) -> None:
        require(self.tile_factor >= 1, f"config key 'tiles.tile_factor' must be >= 1, got {self.tile_factor}")
        require(self.tile_grid is None or check_tile_grid(self.tile_grid),
                f"config key 'tiles.tile_grid' must be null or two positive ints [rows, cols], got {self.tile_grid!r}")
        require(self.warps_per_tile >= 1, f"config key 'tiles.warps_per_tile' must be >= 1, got {self.warps_per_tile}")
        for name in ("min_edge_fraction", "empty_keep", "identity_fraction"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"config key 'tiles.{name}' must be in [0, 1], got {value}")


@dataclasses.dataclass
class RegressorTrainConfig(RunConfig):
    steps: int = 20000
    images_per_batch: int = 8        # crops per process and step; each gives up to 2 * tile_factor^2 tiles
    lr: float = 1e-4
    weight_decay: float = 0.0
    log_interval: int = 20
    image_interval: int = 0
    val_interval: int = 0
    checkpoint_interval: int = 500
    eval_images: int = 200           # held-out crops (val split) for the report
    eval_batch: int = 256
    centre_inputs: bool = True       # train on tiles minus their mean pixel, folded into fc.0's bias when saved

    def validate(self) -> None:
        require(self.steps >= 1, f"config key 'train.steps' must be >= 1, got {self.steps}")
        require(self.images_per_batch >= 1, f"config key 'train.images_per_batch' must be >= 1, got {self.images_per_batch}")
        require(self.lr > 0, f"config key 'train.lr' must be > 0, got {self.lr}")
        super().validate()


@dataclasses.dataclass
class RegressorConfig:
    output_dir: str = path_field("runs/regressor")
    method: str = "regressor"
    # The regressor file (released weight format) and its metadata JSON (same stem).
    output_path: str = path_field("checkpoints/regressor.pth")
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(crop_size=(1024, 2048),
                                                                             class_uniform_fraction=0.0))
    model: RegressorModelConfig = dataclasses.field(default_factory=RegressorModelConfig)
    ranges: WarpRangesConfig = dataclasses.field(default_factory=WarpRangesConfig)
    tiles: TileConfig = dataclasses.field(default_factory=TileConfig)
    train: RegressorTrainConfig = dataclasses.field(default_factory=RegressorTrainConfig)
    cuda_overrides: List[str] = dataclasses.field(default_factory=list)  # as ExperimentConfig's


# ----------------------------------------------------------------------------- tiles
class EdgeTiles(Dataset):
    """Boundary tiles of training crops, as InverseFormLoss sees them.

    Item ``i`` is ``{'tiles': K x 1 x T x T float, 'empty': K bool}`` for the K tiles of a
    random crop of image ``i`` that are kept (all non-empty ones, a seeded ``empty_keep`` share
    of the rest).  Only label maps are read (no image decoding), and they are kept in memory
    when the split is small (at most ``cache_bytes``), since this loader feeds a network far
    cheaper than a segmentation model.  Sample ``i`` of epoch ``e`` is seeded by (seed, e, i).
    """

    def __init__(self, labels: SegmentationDataset, transform: TrainTransform, tile_size: int,
                 grid: Tuple[int, int], min_edge_fraction: float, empty_keep: float, seed: int,
                 cache_bytes: int = KEEP_DECODED_BYTES):
        self.labels = labels
        self.transform = transform
        self.tile_size = tile_size
        self.resized = (grid[0] * tile_size, grid[1] * tile_size)
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


def tile_dataset(cfg: "RegressorConfig", root: str, split: str, seed: int) -> EdgeTiles:
    transform = TrainTransform(crop_size=cfg.data.crop_size, scale_range=cfg.data.scale_range, flip=cfg.data.flip,
                               edge_radius=cfg.data.edge_radius, edge_image_border=cfg.data.edge_image_border)
    labels = labelled_images(cfg.data, root, split, progress=False)
    grid = tuple(cfg.tiles.tile_grid) if cfg.tiles.tile_grid else (cfg.tiles.tile_factor, 2 * cfg.tiles.tile_factor)
    return EdgeTiles(labels, transform, cfg.model.tile_size, grid, cfg.tiles.min_edge_fraction,
                     cfg.tiles.empty_keep, seed)


def ranges_of(cfg: RegressorConfig) -> Dict[str, float]:
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


# ----------------------------------------------------------------------------- centred inputs
class CentredInputs(nn.Module):
    """``net`` trained on tiles minus a constant ``offset``, their mean pixel.

    Boundary tiles are 0/1 maps whose mean pixel is far from 0 (about 0.2 on the synthetic
    street scenes), and an MLP's first layer learns slowly from inputs so far off centre: every
    weight's gradient carries the same common component.  fc.0 is linear, so
    W (x - c) + b = W x + (b - c W 1): :meth:`folded` is an ``InverseNet`` of the released layout
    that takes raw tiles and computes the same function; it is what is evaluated and saved."""

    def __init__(self, net: InverseNet, offset: float):
        super().__init__()
        self.net = net
        self.register_buffer("offset", torch.tensor(float(offset)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.net(x1 - self.offset, x2 - self.offset)

    def folded(self) -> InverseNet:
        net = copy.deepcopy(self.net)
        with torch.no_grad():
            net.fc[0].bias -= self.offset * net.fc[0].weight.sum(dim=1)
        return net


def mean_tile_pixel(data: EdgeTiles, crops: int = 64) -> float:
    """Mean pixel of the kept tiles of the first ``crops`` crops of epoch 0 (0 when none is kept)."""
    tiles = [data[i]["tiles"] for i in range(min(crops, len(data)))]
    tiles = torch.cat(tiles) if tiles else torch.zeros(0)
    return float(tiles.double().mean()) if tiles.numel() else 0.0


def repeat_tiles(tiles: torch.Tensor, empty: torch.Tensor, times: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each tile ``times`` times (then each copy gets its own warp)."""
    return (tiles.repeat(times, 1, 1, 1), empty.repeat(times)) if times > 1 else (tiles, empty)


# ----------------------------------------------------------------------------- evaluation
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def held_out_predictions(net: InverseNet, tiles: torch.Tensor, cfg: RegressorConfig, normaliser: ParamNormaliser,
                         device: torch.device, amp_dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every held-out tile twice, with itself (identity) and with a seeded random warp of itself:
    (output on identity pairs, output on warped pairs, normalised true deviation), each N x P."""
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
    return torch.cat(pred_id), torch.cat(pred_tr), torch.cat(true_tr)


def evaluate_regressor(net: InverseNet, tiles: torch.Tensor, cfg: RegressorConfig, normaliser: ParamNormaliser,
                       device: torch.device, amp_dtype) -> Dict[str, Any]:
    """Distances are the L2 norm of the regressor's normalised output (the training space);
    the true magnitude is the norm of the normalised true deviation."""
    kind = cfg.model.parameterisation
    pred_id, pred_tr, true_tr = held_out_predictions(net, tiles, cfg, normaliser, device, amp_dtype)
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


# ----------------------------------------------------------------------------- the task
def prepare(cfg: RegressorConfig, ctx: dist.DistContext, options: RunOptions) -> None:
    """The dataset, and ``output_path`` free: a regressor written earlier is replaced only with
    ``--overwrite`` (or when this run continues the one that wrote it)."""
    dataset_root(cfg.data)

    def check() -> None:
        if os.path.exists(cfg.output_path) and not options.overwrite and not options.resume:
            raise UserError(f"output_path {cfg.output_path} already holds a regressor; choose another output_path, "
                            "or pass --overwrite to replace it when this run ends (segmentation runs that use it "
                            "then cannot resume: their checkpoints record the file's SHA-256)")

    on_main_first(check)


def build_task(cfg: RegressorConfig, ctx: dist.DistContext) -> Task:
    """Pairs (warped tile, tile) of each step's crops; the loss is the L2 distance between the
    regressor's output and the normalised true deviation."""
    device = ctx.device
    root, synthetic = dataset_root(cfg.data)
    kind, ranges = cfg.model.parameterisation, ranges_of(cfg)
    train_data = tile_dataset(cfg, root, cfg.data.train_split, seed=cfg.train.seed)
    loader = train_loader(train_data, cfg.train.images_per_batch, cfg.data.num_workers, cfg.train.seed,
                          collate_fn=collate_tiles)
    # Normalisation: per-parameter RMS of the deviations the ranges produce (identity stays 0).
    state = {"normaliser": ParamNormaliser.fit(sample_deviations(100_000, kind, ranges, 0.0,
                                                                 torch.Generator().manual_seed(cfg.train.seed)))}
    net = InverseNet(cfg.model.tile_size, KIND_NUM_PARAMS[kind], cfg.model.hidden, parameterisation=kind)
    net.set_normalisation(state["normaliser"])
    model = CentredInputs(net, mean_tile_pixel(train_data) if cfg.train.centre_inputs else 0.0)

    def step(model, batch, info):
        tiles = batch["tiles"].to(device, non_blocking=True)
        empty = batch["empty"].to(device, non_blocking=True)
        if tiles.shape[0] == 0:  # every crop was empty and dropped: one empty identity pair keeps
            tiles = torch.zeros(1, 1, cfg.model.tile_size, cfg.model.tile_size, device=device)  # ranks in step
            empty = torch.ones(1, dtype=torch.bool, device=device)
        tiles, empty = repeat_tiles(tiles, empty, cfg.tiles.warps_per_tile)
        gen = step_generator(cfg.train.seed, ctx.rank, info.iteration, device)
        x1, x2, dev = make_pairs(tiles, empty, kind, ranges, cfg.tiles.identity_fraction, gen)
        target = state["normaliser"].normalise(dev)
        with info.amp():
            pred = model(x1, x2)
        return (pred.float() - target).norm(dim=1).mean(), {}, None

    def load_extra_state(saved: Dict[str, Any]) -> None:
        state["normaliser"] = ParamNormaliser.from_dict(saved["normaliser"])
        net.set_normalisation(state["normaliser"])

    def held_out(eval_model, iteration, final, writer) -> Dict[str, Any]:
        report: Dict[str, Any] = {}
        if dist.is_main_process():
            report = evaluate_regressor(model.folded(), held_out_tiles(cfg, root), cfg, state["normaliser"], device,
                                        resolve_amp(cfg.train.amp, device))
            report["steps"] = cfg.train.steps
        return dist.broadcast_object(report)

    return Task(model=model, loader=loader, step=step, total=cfg.train.steps, samples_per_batch=cfg.train.images_per_batch,
                optimizer=OptimizerSpec(kind="adamw", lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                        poly_power=0.9, warmup_iters=min(200, cfg.train.steps // 10)),
                checkpoint_interval=cfg.train.checkpoint_interval, evaluate=held_out, name="regressor",
                fields={"parameterisation": kind, "tile_size": cfg.model.tile_size},
                extra_state=lambda: {"normaliser": state["normaliser"].to_dict()}, load_extra_state=load_extra_state,
                describe=f"regressor {kind} ({sum(p.numel() for p in net.parameters())} parameters) on "
                         f"{cfg.model.tile_size} tiles of {root} ({'synthetic' if synthetic else 'Cityscapes'}), "
                         f"{cfg.train.images_per_batch} crops per step, {cfg.tiles.warps_per_tile} warp(s) per tile, "
                         f"inputs centred on {float(model.offset):.4f}",
                metrics_line=lambda r: f"Spearman {r['spearman']:.4f}",
                report=saved_report(cfg, model, root, synthetic, ranges), resume_may_change=RESUME_MAY_CHANGE)


RESUME_MAY_CHANGE = {"output_path": "where the regressor file is written at the end",
                     "train.eval_images": "the held-out report only", "train.eval_batch": "evaluation speed only"}


def saved_report(cfg: RegressorConfig, model: CentredInputs, root: str, synthetic: bool, ranges: Dict[str, float]):
    """After the held-out evaluation (rank 0): report.json, the regressor file (raw-tile inputs) and
    its metadata."""
    def report(metrics: Dict[str, Any]) -> None:
        atomic_write_json(os.path.join(cfg.output_dir, "report.json"), metrics)
        metadata = {
            "dataset": root, "synthetic_dataset": synthetic, "steps": cfg.train.steps,
            "crop_size": list(cfg.data.crop_size), "tile_factor": cfg.tiles.tile_factor, "tile_grid": cfg.tiles.tile_grid,
            "edge_image_border": cfg.data.edge_image_border, "ranges": ranges,
            "identity_fraction": cfg.tiles.identity_fraction, "min_edge_fraction": cfg.tiles.min_edge_fraction,
            "warps_per_tile": cfg.tiles.warps_per_tile, "trained_input_offset": float(model.offset),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "report": {k: metrics[k] for k in ("identity_mean_distance", "transformed_mean_distance", "spearman")},
        }
        weights, meta_path = save_regressor(model.folded().cpu(), cfg.output_path, metadata)
        seconds = metrics.get("train_seconds_per_iteration")
        print(format_report(metrics))
        print(f"regressor: {weights}\nmetadata:  {meta_path}\nreport:    {os.path.join(cfg.output_dir, 'report.json')}"
              + (f"\ntrained at {seconds:.3f} s per step ({human_time(seconds * cfg.train.steps)} for "
                 f"{cfg.train.steps} steps)" if seconds else ""))
    return report


def train_regressor(cfg: RegressorConfig, ctx: dist.DistContext, resume: Any = False,
                    stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Train, evaluate and save a regressor; returns the held-out report (on every rank; empty
    when stopped early by ``stop_after``)."""
    metrics, _ = run_single(get_method("regressor"), cfg, ctx, RunOptions(resume=resume, stop_after=stop_after))
    return metrics


register(Method("regressor", RegressorConfig, build=build_task, prepare=prepare,
                summary="InverseForm's inverse-transformation network on a dataset's boundaries"))
