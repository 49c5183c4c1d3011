"""Learned non-uniform downsampling near semantic boundaries (Marin et al., ICCV 2019; public code
dmitrii-marin/adaptive-sampling): ``method: nus``.

Two kinds of training run, each an ordinary run of the engine in its own folder:

1. **the auxiliary net** (``aux``): MobileNetV2 x0.25 + DeepLab head on the image resized to
   64 x 64, trained with MSE against the regularised target locations of the label
   (``datasets.nus_targets``, computed in the loader workers);
2. **a segmentation net** (any ``get_net`` arch; the reference's is ``deeplabv3.MobileNetV2``)
   trained in the sampled space (``uniform_<size>``/``adaptive_<size>``): the frozen auxiliary
   net's grid (or the uniform grid) is resized to the sampling size, image and label are
   gathered there on the device, cross-entropy (ignore 255) on the sampled label; validated at
   full resolution after un-sampling (``models.nus.unsample``), on the whole image or its
   central ``nus.val_crop``.

``nus.mode`` (uniform, adaptive or compare) and ``nus.seeds`` choose which runs the config
asks for; experiment/comparisons/sampling.py starts them and reports the comparison.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from datasets.nus_targets import NUSTargets
from experiment.acceleration import evaluation_amp, to_device_images
from experiment.config import ExperimentConfig, require
from experiment.data import dataset_root, eval_loader, train_dataset, train_loader, val_dataset
from experiment.engine import OptimizerSpec, Task
from experiment.errors import UserError
from experiment.methods import Method, register
from experiment.network import read_model_file
from experiment.runtime import autocast
from experiment.schedule import total_iterations
from models import convert_sync_batchnorm, count_flops, get_net
from models.mobilenetv2 import load_imagenet_mobilenetv2
from models.nus import AuxiliaryNet, NUSSegmenter, sample
from utils import dist
from utils.config import path_field
from utils.determinism import cross_entropy
from utils.metrics import boundary_iou_counts_batch, boundary_iou_from_counts, confusion_matrix, scores_from_confusion

log = logging.getLogger("experiment.nus")


@dataclasses.dataclass
class NUSConfig:
    """``mode``: uniform (the baseline), adaptive (the auxiliary net's grid), compare (both)."""
    mode: str = "compare"
    sampling_size: Tuple[int, int] = (192, 192)   # H, W of the image the segmentation net sees
    compare_sizes: List[int] = dataclasses.field(default_factory=list)  # compare: square sizes (empty: sampling_size)
    gather: str = "nearest"                        # nearest (reference) or bilinear
    alpha: float = 0.5                             # target regularisation (datasets.nus_targets)
    target_classes: List[int] = dataclasses.field(default_factory=lambda: list(range(11, 19)))
    aux_input_size: int = 64
    aux_output_stride: int = 8                     # grid of aux_input_size / aux_output_stride
    aux_width: float = 0.25
    aux_steps: int = 30000
    aux_batch_size: int = 32
    aux_lr: float = 0.007
    aux_weight_decay: float = 4.0e-5
    aux_checkpoint: Optional[str] = path_field(None)  # a trained auxiliary net (else trained first)
    seg_output_stride: int = 16                    # deeplabv3.MobileNetV2 only
    val_crop: Optional[Tuple[int, int]] = None     # central crop (H, W) for validation; None: whole image
    seg_width: float = 1.0                         # deeplabv3.MobileNetV2 only: MobileNetV2 width multiplier
    # CPU threads of the run (None: torch's default).  On a busy small CPU one thread avoids
    # OpenMP threads fighting over cores (15x faster MobileNetV2 steps on the shared 2-core machine).
    cpu_threads: Optional[int] = None
    # compare: the whole comparison once per seed (train.seed = each; OUTPUT_DIR/seed<k>), the
    # chart and comparison.json then report the mean over the seeds (empty: train.seed alone)
    seeds: List[int] = dataclasses.field(default_factory=list)
    processes: int = 1  # seeds trained at once as child processes (single-process jobs only)

    def validate(self) -> None:
        require(self.processes >= 1, f"config key 'nus.processes' must be >= 1, got {self.processes}")
        require(len(set(self.seeds)) == len(self.seeds), f"config key 'nus.seeds' repeats a seed: {self.seeds}")
        require(self.mode in ("uniform", "adaptive", "compare"),
               f"config key 'nus.mode' must be uniform, adaptive or compare, got {self.mode!r}")
        require(len(self.sampling_size) == 2 and min(self.sampling_size) >= 2,
               f"config key 'nus.sampling_size' must be two ints >= 2, got {self.sampling_size}")
        require(all(s >= 2 for s in self.compare_sizes), f"config key 'nus.compare_sizes' must be >= 2, got {self.compare_sizes}")
        require(self.gather in ("nearest", "bilinear"), f"config key 'nus.gather' must be nearest or bilinear, got {self.gather!r}")
        require(0 < self.alpha <= 1, f"config key 'nus.alpha' must be in (0, 1], got {self.alpha}")
        require(self.aux_input_size % self.aux_output_stride == 0 and self.aux_input_size // self.aux_output_stride >= 2,
               f"config key 'nus.aux_input_size' ({self.aux_input_size}) must be a multiple of nus.aux_output_stride "
               f"({self.aux_output_stride}) giving a grid of at least 2 x 2")
        require(self.aux_steps >= 1 and self.aux_batch_size >= 1 and self.aux_lr > 0,
               "config keys 'nus.aux_steps', 'nus.aux_batch_size' must be >= 1 and 'nus.aux_lr' > 0")
        require(self.val_crop is None or min(self.val_crop) >= 1,
               f"config key 'nus.val_crop' must be two positive ints or null, got {self.val_crop}")




@dataclasses.dataclass
class NUSExperimentConfig(ExperimentConfig):
    method: str = "nus"
    nus: NUSConfig = dataclasses.field(default_factory=NUSConfig)


def comparison_sizes(cfg: NUSExperimentConfig) -> List[Tuple[int, int]]:
    """The sampling sizes the config's runs use: ``nus.compare_sizes`` (compare), else ``nus.sampling_size``."""
    if cfg.nus.mode == "compare" and cfg.nus.compare_sizes:
        return [(s, s) for s in cfg.nus.compare_sizes]
    return [tuple(cfg.nus.sampling_size)]


# ----------------------------------------------------------------------------- models
def build_aux_net(cfg: NUSExperimentConfig) -> AuxiliaryNet:
    return AuxiliaryNet(cfg.nus.aux_input_size, cfg.nus.aux_width, cfg.nus.aux_output_stride)


def build_seg_net(cfg: NUSExperimentConfig) -> torch.nn.Module:
    """``model.arch`` without edge head (the NUS objective is cross-entropy alone)."""
    options = {"output_stride": cfg.nus.seg_output_stride, "width": cfg.nus.seg_width} \
        if cfg.model.arch == "deeplabv3.MobileNetV2" else {}
    net = get_net(cfg.model.arch, num_classes=cfg.model.num_classes, has_edge=False,
                  hrnet_base=cfg.model.hrnet_base, **options)
    if cfg.model.pretrained_backbone:
        if cfg.model.arch != "deeplabv3.MobileNetV2":
            raise UserError("config key 'model.pretrained_backbone' with method nus is supported for arch "
                            f"deeplabv3.MobileNetV2 (an ImageNet MobileNetV2 in torchvision's layout), not {cfg.model.arch}")
        report = load_imagenet_mobilenetv2(net.backbone, cfg.model.pretrained_backbone)
        log.info("ImageNet MobileNetV2 %s: %d tensors loaded, skipped %s", cfg.model.pretrained_backbone,
                 report["loaded"], report["skipped"])
    return net


def load_aux_net(cfg: NUSExperimentConfig, path: str) -> AuxiliaryNet:
    net = build_aux_net(cfg)
    state = read_model_file(path, "config key 'nus.aux_checkpoint': file")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not an auxiliary net for nus.aux_input_size {cfg.nus.aux_input_size}, "
                        f"aux_width {cfg.nus.aux_width}, aux_output_stride {cfg.nus.aux_output_stride}: "
                        f"{str(exc).splitlines()[0]}") from exc
    return net


def model_flops(cfg: NUSExperimentConfig, sizes: List[Tuple[int, int]]) -> Dict[str, Any]:
    """FLOPs (2 per multiply-add; the reference's chart counts multiply-adds, half of these) of the
    auxiliary net at its input size and of the segmentation net at each sampling size."""
    aux = count_flops(build_aux_net(cfg), (1, 3, cfg.nus.aux_input_size, cfg.nus.aux_input_size))
    seg = {f"{h}x{w}": count_flops(build_seg_net(cfg), (1, 3, h, w)) for h, w in sizes}
    return {"aux": aux, "seg": seg}


def _sync_bn(net: torch.nn.Module, cfg: NUSExperimentConfig, ctx: dist.DistContext) -> torch.nn.Module:
    return convert_sync_batchnorm(net, ctx.device.type) if ctx.world_size > 1 and cfg.model.sync_bn else net


# ----------------------------------------------------------------------------- the auxiliary net
def build_aux_task(cfg: NUSExperimentConfig, ctx: dist.DistContext) -> Task:
    """MSE of the auxiliary net's grid to the regularised targets.  Its metrics are the FLOPs of
    every net of the comparison, counted before the auxiliary net is built: counting builds
    those nets, which draws from the global generator that the auxiliary net's initialisation
    then continues."""
    flops = model_flops(cfg, comparison_sizes(cfg))
    root, _ = dataset_root(cfg.data)
    nus, device = cfg.nus, ctx.device
    grid = nus.aux_input_size // nus.aux_output_stride
    data = NUSTargets(train_dataset(cfg.data, root, seed=cfg.train.seed), size=(grid, grid), alpha=nus.alpha,
                      target_classes=nus.target_classes)
    loader = train_loader(data, nus.aux_batch_size, cfg.data.num_workers, cfg.train.seed)
    net = _sync_bn(build_aux_net(cfg), cfg, ctx)

    def step(model, batch, info):
        images = to_device_images(batch["image"], device)
        target = batch["locations"].to(device, non_blocking=True)
        with info.amp():
            loss = F.mse_loss(model(images).float(), target)
        return loss, {}, None

    return Task(model=net, loader=loader, step=step, total=nus.aux_steps, samples_per_batch=nus.aux_batch_size,
                optimizer=OptimizerSpec.from_config(cfg.optim, lr=nus.aux_lr, weight_decay=nus.aux_weight_decay),
                checkpoint_interval=cfg.train.checkpoint_interval or max(1, nus.aux_steps // 4),
                evaluate=lambda *args: {"flops": flops}, name="aux",
                describe=f"auxiliary net: {grid} x {grid} grid from {nus.aux_input_size} x {nus.aux_input_size} "
                         f"inputs, batch {nus.aux_batch_size} (targets: classes {nus.target_classes}, "
                         f"alpha {nus.alpha:.2f})",
                resume_may_change=RESUME_MAY_CHANGE)


# ----------------------------------------------------------------------------- a segmentation net
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
    """mIoU and Boundary IoU (its default band) at full resolution (or on the central ``crop``)
    after un-sampling; identical on every rank."""
    net.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    biou = torch.zeros(num_classes, 2, dtype=torch.long, device=device)
    images_seen = torch.zeros((), dtype=torch.long, device=device)
    for batch in tqdm(loader, desc=desc, unit="img", disable=not dist.is_main_process(), leave=False):
        images = central_crop(to_device_images(batch["image"], device), crop)
        labels = central_crop(batch["label"].to(device, non_blocking=True), crop)
        with autocast(device, amp_dtype):
            pred = net(images)["pred"]
        conf += confusion_matrix(pred.argmax(1), labels, num_classes)
        biou += boundary_iou_counts_batch(pred.argmax(1), labels, num_classes)
        images_seen += images.shape[0]
    dist.all_reduce(conf)
    dist.all_reduce(biou)
    dist.all_reduce(images_seen)
    scores = scores_from_confusion(conf.cpu().numpy())
    scores.update(boundary_iou_from_counts(biou))
    scores["num_images"] = int(images_seen)
    return scores


def seg_task_builder(aux: Optional[AuxiliaryNet], size: Tuple[int, int]):
    """The build function of a segmentation run at sampling ``size`` on the grid of ``aux`` (a
    trained auxiliary net) or, with None, the uniform grid."""
    mode = "adaptive" if aux is not None else "uniform"

    def build(cfg: NUSExperimentConfig, ctx: dist.DistContext) -> Task:
        root, _ = dataset_root(cfg.data)
        device = ctx.device
        data = train_dataset(cfg.data, root, seed=cfg.train.seed)
        loader = train_loader(data, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed)
        total = total_iterations(loader, cfg.train.epochs, cfg.train.max_iters)
        net = NUSSegmenter(_sync_bn(build_seg_net(cfg), cfg, ctx), aux, size, cfg.nus.gather)
        val_loader = eval_loader(val_dataset(cfg.data, root, max_images=cfg.val.max_images), cfg.val.batch_size,
                                 cfg.val.num_workers)

        def step(model, batch, info):
            images = to_device_images(batch["image"], device)
            labels = batch["label"].to(device, non_blocking=True)
            with info.amp():
                out = model(images)
                loss = cross_entropy(out["sampled_pred"].float(), sample(labels, out["locations"]), ignore_index=255)
            return loss, {}, out

        def run_evaluation(eval_model, iteration, final, writer):
            return evaluate_nus(eval_model, val_loader, device, cfg.model.num_classes, cfg.nus.val_crop,
                                evaluation_amp(cfg, device), desc=f"validation {mode} {size[0]}x{size[1]}")

        # Seg nets with outputs the NUS loss does not use (HRNet 'aux' heads) leave parameters without gradient.
        return Task(model=net, loader=loader, step=step, total=total, samples_per_batch=cfg.train.batch_size,
                    optimizer=OptimizerSpec.from_config(cfg.optim), evaluate=run_evaluation,
                    checkpoint_interval=cfg.train.checkpoint_interval or max(1, total // 4),
                    find_unused_parameters=cfg.model.arch != "deeplabv3.MobileNetV2",
                    name=f"{mode}_{size[0]}x{size[1]}",
                    describe=f"{mode}: {cfg.model.arch} on {size[0]} x {size[1]} samples, batch {cfg.train.batch_size}",
                    resume_may_change=RESUME_MAY_CHANGE)

    return build


RESUME_MAY_CHANGE = {"nus.cpu_threads": "CPU threads only", "nus.processes": "how many seeds train at once",
                     "nus.seeds": "which seeds the comparison runs (each run has its own)"}


register(Method("nus", NUSExperimentConfig, run="experiment.comparisons.sampling:run_nus",
                summary="learned non-uniform downsampling near semantic boundaries"))
