"""The settings of a segmentation experiment, as typed dataclasses.

A run reads them once (``configs/*.yaml`` + ``--opt key=value`` overrides, see
``utils.config``) and passes the resulting object explicitly; nothing here is
global.  Every field has the default of the reference/paper recipe where one
exists; the YAML files under ``configs/`` cite the source of each value.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from utils.config import ConfigError, path_field

AMP_MODES = ("auto", "off", "fp16", "bf16")
_AMP_ALIASES = {"false": "off", "no": "off", "none": "off", "on": "bf16", "true": "bf16", "yes": "bf16"}


def normalise_amp_mode(value: str, key: str) -> str:
    """Normalise an AMP setting (YAML turns a bare `off` into false)."""
    mode = _AMP_ALIASES.get(str(value).lower(), str(value).lower())
    require(mode in AMP_MODES, f"config key '{key}' must be one of {AMP_MODES}, got {value!r}")
    return mode


COMPILE_MODES = ("off", "on", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                 "eager", "aot_eager")
_COMPILE_ALIASES = {"false": "off", "no": "off", "none": "off", "true": "on", "yes": "on"}


def normalise_compile_mode(value: str, key: str) -> str:
    """Normalise a torch.compile setting (YAML turns `on` into true)."""
    mode = _COMPILE_ALIASES.get(str(value).lower(), str(value).lower())
    require(mode in COMPILE_MODES, f"config key '{key}' must be one of {COMPILE_MODES}, got {value!r}")
    return mode


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass
class SyntheticConfig:
    """Size of the synthetic Cityscapes made when no dataset root is given."""
    train: int = 100
    val: int = 20
    test: int = 10
    height: int = 256
    width: int = 512
    seed: int = 0


DATASETS = ("cityscapes", "folder", "nyu")


def check_tile_grid(grid) -> bool:
    """Whether ``grid`` is [rows, cols] of positive ints (an InverseForm tile grid)."""
    return isinstance(grid, (list, tuple)) and len(grid) == 2 and all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
FOLDER_LAYOUTS = ("auto", "folders", "list")


@dataclasses.dataclass
class DataConfig:
    # What reads dataset_dir: cityscapes (the official layout), folder (your own images and label
    # PNGs: images/<split>/ + labels/<split>/ or a <split>.txt list of pairs, with a class table;
    # datasets/folder.py) or nyu (NYU-Depth-v2, 40 classes; datasets/nyu.py).
    dataset: str = "cityscapes"
    # Root of the dataset.  None: $CITYSCAPES_DATASET (cityscapes), else the synthetic dataset,
    # written in the layout `dataset` reads.
    dataset_dir: Optional[str] = path_field(None)
    # folder: the class table (names, colours, stored label id -> train id); None: <root>/classes.yaml
    class_table: Optional[str] = path_field(None)
    layout: str = "auto"              # folder: auto (a <split>.txt list when there is one), folders, list
    image_folder: str = "images"      # folder: the folders below the root (relative to it)
    label_folder: str = "labels"
    label_suffix: str = ".png"        # folder: what follows the image's name in its label's file name
    synthetic_dir: str = path_field("data/synthetic_cityscapes")
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    train_split: str = "train"
    val_split: str = "val"
    crop_size: Tuple[int, int] = (1024, 1024)
    scale_range: Tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    color_jitter: float = 0.0        # brightness/contrast/saturation strength; 0 disables
    blur_prob: float = 0.0           # probability of a Gaussian blur of the image
    class_uniform_fraction: float = 0.5
    edge_radius: int = 2
    # Whether the image (crop) border is an edge of the classes touching it, as the reference's
    # edge targets have it; false keeps only boundaries between labels.
    edge_image_border: bool = True
    num_workers: int = 4

    def validate(self) -> None:
        require(self.dataset in DATASETS, f"config key 'data.dataset' must be one of {', '.join(DATASETS)}, "
                                          f"got {self.dataset!r}")
        require(self.layout in FOLDER_LAYOUTS, f"config key 'data.layout' must be one of {', '.join(FOLDER_LAYOUTS)}, "
                                               f"got {self.layout!r}")
        require(len(self.crop_size) == 2 and min(self.crop_size) > 0,
               f"config key 'data.crop_size' must be two positive ints, got {self.crop_size}")
        lo, hi = self.scale_range
        require(0 < lo <= hi, f"config key 'data.scale_range' must satisfy 0 < min <= max, got {self.scale_range}")
        require(0.0 <= self.class_uniform_fraction <= 1.0,
               f"config key 'data.class_uniform_fraction' must be in [0, 1], got {self.class_uniform_fraction}")
        require(0.0 <= self.blur_prob <= 1.0, f"config key 'data.blur_prob' must be in [0, 1], got {self.blur_prob}")
        require(self.edge_radius >= 1, f"config key 'data.edge_radius' must be >= 1, got {self.edge_radius}")
        require(self.num_workers >= 0, f"config key 'data.num_workers' must be >= 0, got {self.num_workers}")
        require(0.0 <= self.color_jitter, f"config key 'data.color_jitter' must be >= 0, got {self.color_jitter}")


@dataclasses.dataclass
class ModelConfig:
    arch: str = "ocrnet.AuxHRNet"
    hrnet_base: Optional[int] = None     # None: the arch's own trunk width
    has_edge: bool = True
    num_classes: int = 19
    pretrained_backbone: Optional[str] = path_field(None)  # ImageNet HRNet file (HRNet authors' format)
    init_checkpoint: Optional[str] = path_field(None)      # fine-tune from a released/earlier checkpoint
    sync_bn: bool = True                        # SyncBatchNorm when more than one process
    # HMS: its hierarchical attention scales (None: the model's default).  Other archs: scales whose
    # logits are averaged at evaluation/inference (experiment/tta.py); None: single scale.
    eval_scales: Optional[List[float]] = None

    def validate(self) -> None:
        require(self.num_classes >= 1, f"config key 'model.num_classes' must be >= 1, got {self.num_classes}")
        require(not self.eval_scales or min(self.eval_scales) > 0,
               f"config key 'model.eval_scales' must be positive, got {self.eval_scales}")


@dataclasses.dataclass
class LossConfig:
    seg_weight: float = 1.0
    edge_weight: float = 0.3
    att_weight: float = 0.1
    inv_weight: float = 0.3
    aux_weight: float = 0.4        # OCR/aux-head outputs add this times the same joint loss
    mscale_weight: float = 0.05    # HMS: extra supervision of each scale's own prediction
    attention_threshold: float = 0.8
    # mean (the reference): balanced BCE and InverseForm averaged over a process's batch while the
    # cross-entropies are summed over its images, so the edge terms weigh 1/N as much with N images
    # per process; sum: both multiplied by N, the same balance at any batch.
    edge_reduction: str = "mean"
    # The frozen InverseForm regressor.  Missing file: the term is left out (with a notice),
    # unless `regressor_config` is set, in which case a regressor is trained first.
    inverseform_path: Optional[str] = path_field("checkpoints/distance_measures_regressor.pth")
    # euclidean: as released (for a trained 4/6/8-parameter net, ||theta_hat - I||_F of the
    # de-normalised parameters); normalised: the L2 norm of the regressor's raw (normalised)
    # output whatever the parameterisation; geodesic: the paper's SO(3) form.
    inverseform_distance: str = "euclidean"
    inverseform_tile_factor: int = 3
    # (rows, cols) of tiles instead of tile_factor x 2 tile_factor, for crops that are not 1:2
    inverseform_tile_grid: Optional[List[int]] = None
    regressor_config: Optional[str] = path_field(None, kind="config")

    def validate(self) -> None:
        require(self.inverseform_tile_grid is None or check_tile_grid(self.inverseform_tile_grid),
                f"config key 'loss.inverseform_tile_grid' must be null or two positive ints [rows, cols], got "
                f"{self.inverseform_tile_grid!r}")
        require(self.edge_reduction in ("mean", "sum"),
               f"config key 'loss.edge_reduction' must be mean or sum, got {self.edge_reduction!r}")
        require(self.inverseform_distance in ("euclidean", "normalised", "geodesic"),
               "config key 'loss.inverseform_distance' must be euclidean, normalised or geodesic, "
               f"got {self.inverseform_distance!r}")
        for name in ("seg_weight", "edge_weight", "att_weight", "inv_weight", "aux_weight", "mscale_weight"):
            require(getattr(self, name) >= 0, f"config key 'loss.{name}' must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass
class OptimConfig:
    optimizer: str = "sgd"        # sgd (the reference's) | adamw (momentum and nesterov unused)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 0.1   # the learning rate starts at lr * warmup_factor

    def validate(self) -> None:
        require(self.optimizer in ("sgd", "adamw"),
                f"config key 'optim.optimizer' must be sgd or adamw, got {self.optimizer!r}")
        require(self.lr > 0, f"config key 'optim.lr' must be > 0, got {self.lr}")
        require(self.momentum >= 0, f"config key 'optim.momentum' must be >= 0, got {self.momentum}")
        require(self.weight_decay >= 0, f"config key 'optim.weight_decay' must be >= 0, got {self.weight_decay}")
        require(self.poly_power >= 0, f"config key 'optim.poly_power' must be >= 0, got {self.poly_power}")
        require(self.warmup_iters >= 0, f"config key 'optim.warmup_iters' must be >= 0, got {self.warmup_iters}")
        require(0 < self.warmup_factor <= 1, f"config key 'optim.warmup_factor' must be in (0, 1], got {self.warmup_factor}")


@dataclasses.dataclass
class RunConfig:
    """The ``train`` settings the training engine reads of every run (experiment/engine.py);
    each method's ``train`` section extends it with its schedule."""
    amp: str = "auto"                 # auto: bf16 on CUDA, off on CPU
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    log_interval: int = 10            # iterations between logged losses (TensorBoard, train_log.jsonl)
    image_interval: int = 200         # iterations between TensorBoard sample images (0: none)
    val_interval: int = 1             # epochs between validations (0: only at the end)
    checkpoint_interval: int = 0      # iterations between `last` checkpoints (0: the method's default)
    compile: str = "off"              # torch.compile of the model: off, on, max-autotune, ... (--compile)
    # seconds a stop signal may take to end the run with a checkpoint; then (or at a second
    # signal) the process exits without one (a rank stuck in a collective never gets there)
    stop_timeout: float = 120.0
    # auto: continue OUTPUT_DIR/last.pth when it exists, start anew when the directory holds no run
    # (--resume auto): one command line for the first launch and every restart
    resume: str = "off"

    def validate(self) -> None:
        require(self.resume in ("off", "auto"), f"config key 'train.resume' must be off or auto, got {self.resume!r}")
        self.compile = normalise_compile_mode(self.compile, "train.compile")
        require(self.stop_timeout > 0, f"config key 'train.stop_timeout' must be > 0, got {self.stop_timeout}")
        self.amp = normalise_amp_mode(self.amp, "train.amp")
        require(self.device in ("auto", "cpu", "cuda"),
               f"config key 'train.device' must be auto, cpu or cuda, got {self.device!r}")
        require(self.log_interval >= 1, f"config key 'train.log_interval' must be >= 1, got {self.log_interval}")
        for name in ("image_interval", "val_interval", "checkpoint_interval"):
            require(getattr(self, name) >= 0,
                   f"config key 'train.{name}' must be >= 0 (0: off), got {getattr(self, name)}")


@dataclasses.dataclass
class TrainConfig(RunConfig):
    """Epoch-based schedules; ``checkpoint_interval`` 0 checkpoints at every epoch's end."""
    epochs: int = 484
    max_iters: Optional[int] = None   # stop after this many iterations (the schedule spans them)
    batch_size: int = 2               # per process

    def validate(self) -> None:
        require(self.epochs >= 1, f"config key 'train.epochs' must be >= 1, got {self.epochs}")
        require(self.max_iters is None or self.max_iters >= 1,
               f"config key 'train.max_iters' must be >= 1, got {self.max_iters}")
        require(self.batch_size >= 1, f"config key 'train.batch_size' must be >= 1, got {self.batch_size}")
        super().validate()


@dataclasses.dataclass
class ValConfig:
    batch_size: int = 1
    num_workers: int = 2
    amp: str = "auto"
    dump_predictions: bool = False
    boundary_tolerance: int = 2      # pixels, for the boundary F-score
    # Boundary IoU (Cheng et al. 2021): the band is the mask minus its erosion by d pixels,
    # d = round(boundary_iou_dilation * image diagonal), or boundary_iou_pixels when given
    boundary_iou_dilation: float = 0.02
    boundary_iou_pixels: Optional[int] = None
    num_images_logged: int = 4       # TensorBoard sample images
    max_images: Optional[int] = None  # evaluate only the first N images (quick checks)
    # Test-time inference modes (experiment/tta.py); whole image, no flip by default.
    sliding_window: bool = False     # average the logits of overlapping window_size crops
    window_size: Tuple[int, int] = (1024, 1024)   # H, W
    window_stride: Tuple[int, int] = (768, 768)   # H, W; at most window_size
    flip: bool = False               # average with the horizontally flipped image's prediction
    compile: str = "off"             # torch.compile of the eval forward (validation.py --compile)

    def validate(self) -> None:
        require(self.batch_size >= 1, f"config key 'val.batch_size' must be >= 1, got {self.batch_size}")
        require(len(self.window_size) == 2 and min(self.window_size) >= 1,
               f"config key 'val.window_size' must be two positive ints (H, W), got {self.window_size}")
        require(len(self.window_stride) == 2 and min(self.window_stride) >= 1
               and all(s <= w for s, w in zip(self.window_stride, self.window_size)),
               f"config key 'val.window_stride' must be two positive ints no larger than val.window_size "
               f"{self.window_size}, got {self.window_stride}")
        self.amp = normalise_amp_mode(self.amp, "val.amp")
        self.compile = normalise_compile_mode(self.compile, "val.compile")
        require(0 < self.boundary_iou_dilation <= 1 and (self.boundary_iou_pixels is None or
                                                       self.boundary_iou_pixels >= 1),
                "config keys 'val.boundary_iou_dilation' must be in (0, 1] and 'val.boundary_iou_pixels' >= 1, "
                f"got {self.boundary_iou_dilation}, {self.boundary_iou_pixels}")
        require(self.boundary_tolerance >= 0,
               f"config key 'val.boundary_tolerance' must be >= 0, got {self.boundary_tolerance}")
        require(self.num_workers >= 0, f"config key 'val.num_workers' must be >= 0, got {self.num_workers}")
        require(self.max_images is None or self.max_images >= 1,
               f"config key 'val.max_images' (--max_images) must be >= 1, got {self.max_images}")


@dataclasses.dataclass
class ExperimentConfig:
    """A run of a segmentation method: the sections every method shares.  ``method`` names the
    method (experiment/methods/); methods with settings of their own extend this class with
    their section (the ``nus``, ``weak`` sections)."""
    output_dir: str = path_field("runs/default")
    method: str = "segmentation"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val: ValConfig = dataclasses.field(default_factory=ValConfig)
    # `key=value` overrides applied when the run will be on CUDA, before the command line's:
    # batches sized for a GPU (configs/synthetic.yaml).  The CPU run ignores them.
    cuda_overrides: List[str] = dataclasses.field(default_factory=list)
