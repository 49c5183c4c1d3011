"""Weakly-supervised training from scribbles (Tang et al., ECCV 2018): partial cross-entropy on
the labeled pixels plus the DenseCRF regularized loss of rloss/ on every pixel inside the roi
(``method: weak``).

Scribbles are drawn from the full labels of the dataset of ``data`` (Cityscapes, real or synthetic,
or a folder dataset with its class table), or read from PASCAL VOC 2012 with the reference's scribbles; validation is on full labels.  ``weak.compare``
runs the paper's comparison instead (experiment/comparisons/supervision.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from datasets import IGNORE_INDEX, TrainTransform, ValTransform
from experiment.config import ExperimentConfig, LossConfig, require
from experiment.data import color_jitter, dataset_root, keep_decoded_if_small, labelled_images
from experiment.engine import Task
from experiment.errors import UserError
from experiment.methods import Method, RunOptions, register
from experiment.joint_loss import joint_loss
from experiment.methods.segmentation import check_num_classes, segmentation_task
from experiment.pictures import unnormalize
from rloss import DenseCRFLoss
from utils import dist
from utils.config import path_field
from utils.determinism import cross_entropy, interpolate_bilinear


@dataclasses.dataclass
class DenseCRFConfig:
    """The DenseCRF regularized loss (rloss/).  Published (VOC, 513 x 513 crops): weight 2e-9,
    sigma_rgb 15, sigma_xy 100 (full-resolution pixels), scale 0.5."""
    weight: float = 0.0
    sigma_rgb: float = 15.0
    sigma_xy: float = 100.0
    scale: float = 0.5
    kernel: str = "permutohedral"   # or "exact" (dense Gaussian, small images; see rloss/filter.py)

    def validate(self) -> None:
        require(self.weight >= 0, f"config key 'weak.densecrf.weight' must be >= 0, got {self.weight}")
        require(self.sigma_rgb > 0 and self.sigma_xy > 0 and 0 < self.scale <= 1,
               "config keys 'weak.densecrf.sigma_rgb', 'weak.densecrf.sigma_xy' must be > 0 and "
               f"'weak.densecrf.scale' in (0, 1], got {self.sigma_rgb}, {self.sigma_xy}, {self.scale}")
        require(self.kernel in ("permutohedral", "exact"),
               f"config key 'weak.densecrf.kernel' must be permutohedral or exact, got {self.kernel!r}")


@dataclasses.dataclass
class WeakConfig:
    """Partial cross-entropy on the labeled pixels plus ``densecrf.weight`` x DenseCRF.
    ``source``: ``cityscapes`` draws scribbles from the full labels of the dataset ``data``
    names (``data.dataset``: Cityscapes, real or synthetic, or a folder dataset); ``voc`` reads
    PASCAL VOC 2012 with the reference's scribbles from ``voc_dir``.  ``labels: full`` trains the same objective on full labels (the upper bound).
    ``compare: true`` runs pCE, pCE + DenseCRF and full supervision with the same seed and
    schedule and writes OUTPUT_DIR/comparison.json."""
    source: str = "cityscapes"
    voc_dir: Optional[str] = path_field(None)
    labels: str = "scribbles"
    scribble_seed: int = 0
    scribble_fraction: float = 0.03     # stroke length: about this share of each object's pixels
    stroke_width: int = 3
    min_area: int = 30                  # objects smaller than this get no scribble
    pce_batch_average: bool = False     # the reference divides its pCE once more by the batch size
    densecrf: DenseCRFConfig = dataclasses.field(default_factory=DenseCRFConfig)
    compare: bool = False
    # the comparison once per seed (OUTPUT_DIR/seed<k>/<run>), then the mean DenseCRF - pCE margin
    # with its paired 95 % interval; empty: once, with train.seed
    seeds: List[int] = dataclasses.field(default_factory=list)
    # with seeds: the full-labels run (the upper bound; the DenseCRF - pCE margin does not use it)
    # for every seed, or only for the first
    full_every_seed: bool = True
    # CPU threads of the comparison (None: torch's default).  On a busy small CPU one thread avoids
    # OpenMP threads spinning against other processes.
    cpu_threads: Optional[int] = None
    # runs of the comparison trained at once as child processes (single-process jobs only; each
    # with cpu_threads threads): 2 on a 2-core CPU runs the three in the time of the two longest
    processes: int = 1
    # scratch: every run of the comparison from the initialisation.  finetune: the reference's
    # two-phase recipe (meng-tang/rloss, its Caffe scripts: pCE first, then fine-tuned with the
    # regularized loss): one pCE base model (base_seed, base_epochs; cached in base_dir, named by
    # the hash of the settings that shape its weights), then every run of every seed fine-tunes
    # it for train.epochs at finetune_lr (None: optim.lr)
    mode: str = "scratch"
    base_epochs: int = 40
    base_seed: int = 0
    base_dir: str = path_field("runs/scribble_bases")
    finetune_lr: Optional[float] = None
    finetune_warmup_iters: int = 0

    def validate(self) -> None:
        require(self.processes >= 1, f"config key 'weak.processes' must be >= 1, got {self.processes}")
        require(len(set(self.seeds)) == len(self.seeds), f"config key 'weak.seeds' must list distinct seeds, got {self.seeds}")
        require(self.source in ("cityscapes", "voc"), f"config key 'weak.source' must be cityscapes or voc, got {self.source!r}")
        require(self.labels in ("scribbles", "full"), f"config key 'weak.labels' must be scribbles or full, got {self.labels!r}")
        require(0 < self.scribble_fraction <= 1, f"config key 'weak.scribble_fraction' must be in (0, 1], got {self.scribble_fraction}")
        require(self.stroke_width >= 1, f"config key 'weak.stroke_width' must be >= 1, got {self.stroke_width}")
        require(self.min_area >= 1, f"config key 'weak.min_area' must be >= 1, got {self.min_area}")
        require(self.source != "voc" or bool(self.voc_dir), "config key 'weak.voc_dir' is required with weak.source=voc")
        require(self.cpu_threads is None or self.cpu_threads >= 1,
               f"config key 'weak.cpu_threads' must be >= 1 or null, got {self.cpu_threads}")
        require(self.mode in ("scratch", "finetune"), f"config key 'weak.mode' must be scratch or finetune, got {self.mode!r}")
        require(self.mode == "scratch" or self.compare,
                "config key 'weak.mode' finetune is the comparison's two-phase recipe: set weak.compare=true "
                "(a single run fine-tunes a checkpoint with model.init_checkpoint)")
        require(self.base_epochs >= 1, f"config key 'weak.base_epochs' must be >= 1, got {self.base_epochs}")
        require(self.finetune_lr is None or self.finetune_lr > 0,
                f"config key 'weak.finetune_lr' must be > 0 or null, got {self.finetune_lr}")
        require(self.finetune_warmup_iters >= 0,
                f"config key 'weak.finetune_warmup_iters' must be >= 0, got {self.finetune_warmup_iters}")


@dataclasses.dataclass
class WeakExperimentConfig(ExperimentConfig):
    method: str = "weak"
    weak: WeakConfig = dataclasses.field(default_factory=WeakConfig)


def check_config(cfg: WeakExperimentConfig) -> None:
    """Edge and InverseForm terms need boundaries of full labels: refused with scribbles."""
    if cfg.weak.labels == "scribbles" and cfg.model.has_edge and (
            cfg.loss.edge_weight > 0 or cfg.loss.att_weight > 0 or cfg.loss.inv_weight > 0):
        raise UserError("weak supervision with scribbles: the edge and InverseForm terms need full labels; set "
                        "model.has_edge=false (or loss.edge_weight=0 loss.att_weight=0 loss.inv_weight=0)")


# ----------------------------------------------------------------------------- data
def scribble_datasets(cfg: WeakExperimentConfig) -> Tuple[str, bool, Any, Any]:
    """(root, is_synthetic, train dataset with roi, val dataset with full labels)."""
    check_config(cfg)
    d, w = cfg.data, cfg.weak
    transform = TrainTransform(crop_size=d.crop_size, scale_range=d.scale_range, flip=d.flip,
                               color_jitter=color_jitter(d.color_jitter), blur_prob=d.blur_prob,
                               edge_radius=d.edge_radius, with_roi=True)
    if w.source == "voc":
        return _voc_datasets(cfg, transform)
    root, synthetic = dataset_root(d)
    scribbles = None if w.labels == "full" else dict(
        scribble_seed=w.scribble_seed, scribble_fraction=w.scribble_fraction, stroke_width=w.stroke_width,
        min_area=w.min_area, precompute=synthetic)
    train = keep_decoded_if_small(labelled_images(d, root, d.train_split, transform, seed=cfg.train.seed,
                                                  class_uniform_fraction=d.class_uniform_fraction,
                                                  scribbles=scribbles))
    val = labelled_images(d, root, d.val_split, ValTransform(edge_radius=d.edge_radius))
    if cfg.val.max_images:
        val = torch.utils.data.Subset(val, range(min(cfg.val.max_images, len(val))))
    return root, synthetic, train, val


def _voc_datasets(cfg: WeakExperimentConfig, transform: TrainTransform) -> Tuple[str, bool, Any, Any]:
    from datasets.voc import VOC_NUM_CLASSES, VOCSegmentation

    d, w = cfg.data, cfg.weak
    if cfg.model.num_classes != VOC_NUM_CLASSES:
        raise UserError(f"config key 'model.num_classes' is {cfg.model.num_classes} but PASCAL VOC has "
                        f"{VOC_NUM_CLASSES} classes; set model.num_classes={VOC_NUM_CLASSES}")
    labels = "scribble" if w.labels == "scribbles" else "full"
    try:
        train = VOCSegmentation(w.voc_dir, d.train_split, labels=labels, transform=transform, seed=cfg.train.seed)
        val = VOCSegmentation(w.voc_dir, d.val_split, labels="full", transform=ValTransform(edge_radius=d.edge_radius))
    except FileNotFoundError as exc:
        raise UserError(f"weak.voc_dir: {exc}") from exc
    if cfg.val.max_images:
        val = torch.utils.data.Subset(val, range(min(cfg.val.max_images, len(val))))
    return w.voc_dir, False, train, val


# ----------------------------------------------------------------------------- objective
def partial_cross_entropy(logits: torch.Tensor, label: torch.Tensor, batch_average: bool = False) -> torch.Tensor:
    """Cross-entropy averaged over the labeled pixels (label != 255) of the batch; 0 when there is
    none (no NaN).  ``batch_average`` divides once more by the batch size, as the reference does."""
    logits = logits.float()
    if logits.shape[-2:] != label.shape[-2:]:
        logits = interpolate_bilinear(logits, size=label.shape[-2:], align_corners=False)
    total = cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = total / (label != IGNORE_INDEX).sum().clamp(min=1)
    return loss / label.shape[0] if batch_average else loss


class WeakObjective(nn.Module):
    """pCE on every segmentation output (aux outputs x ``loss.aux_weight``) plus
    ``weak.densecrf.weight`` x DenseCRF on the main output's softmax at input resolution.
    Called like the segmentation objective with the network input and the roi as keywords;
    ``joint`` is the usual joint loss, for the validation loss on full labels."""

    def __init__(self, loss: LossConfig, weak: WeakConfig, num_classes: int):
        super().__init__()
        self.loss_cfg, self.weak = loss, weak
        self.joint = joint_loss(loss, num_classes, None)
        crf = weak.densecrf
        self.densecrf = DenseCRFLoss(crf.weight, crf.sigma_rgb, crf.sigma_xy, crf.scale, kernel=crf.kernel) \
            if crf.weight > 0 else None

    def forward(self, outputs: Dict[str, torch.Tensor], label: torch.Tensor, edge: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None, roi: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        avg = self.weak.pce_batch_average
        pce = partial_cross_entropy(outputs["pred"], label, avg)
        total = self.loss_cfg.seg_weight * pce
        components = {"pce": pce.detach()}
        if self.loss_cfg.aux_weight and "aux" in outputs:
            aux = partial_cross_entropy(outputs["aux"], label, avg)
            components["aux"] = aux.detach()
            total = total + self.loss_cfg.aux_weight * aux
        if self.loss_cfg.mscale_weight and "pred_05x" in outputs:
            ms = partial_cross_entropy(outputs["pred_05x"], label, avg) + \
                partial_cross_entropy(outputs["pred_10x"], label, avg)
            components["mscale"] = ms.detach()
            total = total + self.loss_cfg.mscale_weight * ms
        if self.densecrf is not None:
            if image is None or roi is None:
                raise ValueError("WeakObjective: the DenseCRF term needs image= and roi=")
            logits = outputs["pred"].float()
            if logits.shape[-2:] != label.shape[-2:]:
                logits = interpolate_bilinear(logits, size=label.shape[-2:], align_corners=False)
            crf = self.densecrf(unnormalize(image) * 255.0, torch.softmax(logits, 1), roi.float())
            components["densecrf"] = crf.detach()
            total = total + crf
        return total, components


# ----------------------------------------------------------------------------- the method
def prepare(cfg: WeakExperimentConfig, ctx: dist.DistContext, options: RunOptions) -> None:
    if cfg.weak.source != "voc":
        dataset_root(cfg.data)


def build_task(cfg: WeakExperimentConfig, ctx: dist.DistContext) -> Task:
    root, synthetic, train_data, val_data = scribble_datasets(cfg)
    if cfg.weak.source != "voc":  # VOC's 21 classes are checked where it is read
        check_num_classes(cfg, root, train_data.class_table.num_classes)

    def objective(net):
        return WeakObjective(cfg.loss, cfg.weak, cfg.model.num_classes).to(ctx.device)

    return segmentation_task(cfg, ctx, train_data, val_data, objective,
                             "the synthetic dataset" if synthetic else root,
                             describe=f"; {cfg.weak.labels} labels, DenseCRF weight {cfg.weak.densecrf.weight:g}")


register(Method("weak", WeakExperimentConfig, build=build_task, prepare=prepare,
                run="experiment.comparisons.supervision:run_weak",
                summary="scribbles: partial cross-entropy + the DenseCRF regularized loss"))
