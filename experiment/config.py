"""The settings of a segmentation experiment, as typed dataclasses.

A run reads them once (``configs/*.yaml`` + ``--opt key=value`` overrides, see
``utils.config``) and passes the resulting object explicitly; nothing here is
global.  Every field has the default of the reference/paper recipe where one
exists; the YAML files under ``configs/`` cite the source of each value.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from utils.config import ConfigError

AMP_MODES = ("auto", "off", "fp16", "bf16")
_AMP_ALIASES = {"false": "off", "no": "off", "none": "off", "on": "bf16", "true": "bf16", "yes": "bf16"}


def _amp_mode(value: str, key: str) -> str:
    """Normalise an AMP setting (YAML turns a bare `off` into false)."""
    mode = _AMP_ALIASES.get(str(value).lower(), str(value).lower())
    _check(mode in AMP_MODES, f"config key '{key}' must be one of {AMP_MODES}, got {value!r}")
    return mode


def _check(condition: bool, message: str) -> None:
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


@dataclasses.dataclass
class DataConfig:
    # Root of a Cityscapes tree.  None: $CITYSCAPES_DATASET, else the synthetic dataset.
    dataset_dir: Optional[str] = None
    synthetic_dir: str = "data/synthetic_cityscapes"
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
    num_workers: int = 4

    def validate(self) -> None:
        _check(len(self.crop_size) == 2 and min(self.crop_size) > 0,
               f"config key 'data.crop_size' must be two positive ints, got {self.crop_size}")
        lo, hi = self.scale_range
        _check(0 < lo <= hi, f"config key 'data.scale_range' must satisfy 0 < min <= max, got {self.scale_range}")
        _check(0.0 <= self.class_uniform_fraction <= 1.0,
               f"config key 'data.class_uniform_fraction' must be in [0, 1], got {self.class_uniform_fraction}")
        _check(0.0 <= self.blur_prob <= 1.0, f"config key 'data.blur_prob' must be in [0, 1], got {self.blur_prob}")
        _check(self.edge_radius >= 1, f"config key 'data.edge_radius' must be >= 1, got {self.edge_radius}")
        _check(self.num_workers >= 0, f"config key 'data.num_workers' must be >= 0, got {self.num_workers}")


@dataclasses.dataclass
class ModelConfig:
    arch: str = "ocrnet.AuxHRNet"
    hrnet_base: Optional[int] = None     # None: the arch's own trunk width
    has_edge: bool = True
    num_classes: int = 19
    pretrained_backbone: Optional[str] = None  # ImageNet HRNet file (HRNet authors' format)
    init_checkpoint: Optional[str] = None      # fine-tune from a released/earlier checkpoint
    sync_bn: bool = True                        # SyncBatchNorm when more than one process
    eval_scales: Optional[List[float]] = None   # HMS hierarchical inference scales; None: model default


@dataclasses.dataclass
class LossConfig:
    seg_weight: float = 1.0
    edge_weight: float = 0.3
    att_weight: float = 0.1
    inv_weight: float = 0.3
    aux_weight: float = 0.4        # OCR/aux-head outputs add this times the same joint loss
    mscale_weight: float = 0.05    # HMS: extra supervision of each scale's own prediction
    attention_threshold: float = 0.8
    # The frozen InverseForm regressor.  Missing file: the term is left out (with a notice),
    # unless `regressor_config` is set, in which case a regressor is trained first.
    inverseform_path: Optional[str] = "checkpoints/distance_measures_regressor.pth"
    # euclidean: as released (for a trained 4/6/8-parameter net, ||theta_hat - I||_F of the
    # de-normalised parameters); normalised: the L2 norm of the regressor's raw (normalised)
    # output whatever the parameterisation; geodesic: the paper's SO(3) form.
    inverseform_distance: str = "euclidean"
    inverseform_tile_factor: int = 3
    regressor_config: Optional[str] = None

    def validate(self) -> None:
        _check(self.inverseform_distance in ("euclidean", "normalised", "geodesic"),
               "config key 'loss.inverseform_distance' must be euclidean, normalised or geodesic, "
               f"got {self.inverseform_distance!r}")
        for name in ("seg_weight", "edge_weight", "att_weight", "inv_weight", "aux_weight", "mscale_weight"):
            _check(getattr(self, name) >= 0, f"config key 'loss.{name}' must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 0.1   # the learning rate starts at lr * warmup_factor

    def validate(self) -> None:
        _check(self.lr > 0, f"config key 'optim.lr' must be > 0, got {self.lr}")
        _check(self.warmup_iters >= 0, f"config key 'optim.warmup_iters' must be >= 0, got {self.warmup_iters}")
        _check(0 < self.warmup_factor <= 1, f"config key 'optim.warmup_factor' must be in (0, 1], got {self.warmup_factor}")


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 484
    max_iters: Optional[int] = None   # stop after this many iterations (the schedule spans them)
    batch_size: int = 2               # per process
    amp: str = "auto"                 # auto: bf16 on CUDA, off on CPU
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    log_interval: int = 10            # iterations between TensorBoard scalar writes
    image_interval: int = 200         # iterations between TensorBoard sample images
    val_interval: int = 1             # epochs between validations (0: only at the end)
    checkpoint_interval: int = 0      # iterations between `last` checkpoints (0: every epoch)

    def validate(self) -> None:
        _check(self.epochs >= 1, f"config key 'train.epochs' must be >= 1, got {self.epochs}")
        _check(self.max_iters is None or self.max_iters >= 1,
               f"config key 'train.max_iters' must be >= 1, got {self.max_iters}")
        _check(self.batch_size >= 1, f"config key 'train.batch_size' must be >= 1, got {self.batch_size}")
        self.amp = _amp_mode(self.amp, "train.amp")
        _check(self.device in ("auto", "cpu", "cuda"),
               f"config key 'train.device' must be auto, cpu or cuda, got {self.device!r}")


@dataclasses.dataclass
class ValConfig:
    batch_size: int = 1
    num_workers: int = 2
    amp: str = "auto"
    dump_predictions: bool = False
    boundary_tolerance: int = 2      # pixels, for the boundary F-score
    num_images_logged: int = 4       # TensorBoard sample images
    max_images: Optional[int] = None  # evaluate only the first N images (quick checks)

    def validate(self) -> None:
        _check(self.batch_size >= 1, f"config key 'val.batch_size' must be >= 1, got {self.batch_size}")
        self.amp = _amp_mode(self.amp, "val.amp")
        _check(self.boundary_tolerance >= 0,
               f"config key 'val.boundary_tolerance' must be >= 0, got {self.boundary_tolerance}")


@dataclasses.dataclass
class ExperimentConfig:
    output_dir: str = "runs/default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val: ValConfig = dataclasses.field(default_factory=ValConfig)


# ----------------------------------------------------------------------------- regressor training
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
        _check(self.parameterisation in ("shift", "scale_shift", "affine", "homography"),
               "config key 'model.parameterisation' must be shift, scale_shift, affine or homography, "
               f"got {self.parameterisation!r}")
        _check(self.tile_size >= 8, f"config key 'model.tile_size' must be >= 8, got {self.tile_size}")


@dataclasses.dataclass
class TileConfig:
    """How boundary tiles are cut: as InverseFormLoss sees them during segmentation training.
    Edge targets of training crops (``data.crop_size``) are resized bilinearly to
    (tile_factor * T) x (2 * tile_factor * T) and cut into T x T tiles."""
    tile_factor: int = 3
    min_edge_fraction: float = 0.01   # tiles with less boundary than this are 'empty'
    empty_keep: float = 0.1           # share of empty tiles kept, as identity pairs
    identity_fraction: float = 0.2    # share of pairs left untransformed (target 0)

    def validate(self) -> None:
        _check(self.tile_factor >= 1, f"config key 'tiles.tile_factor' must be >= 1, got {self.tile_factor}")
        for name in ("min_edge_fraction", "empty_keep", "identity_fraction"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"config key 'tiles.{name}' must be in [0, 1], got {value}")


@dataclasses.dataclass
class RegressorTrainConfig:
    steps: int = 20000
    images_per_batch: int = 8        # crops per process and step; each gives up to 2 * tile_factor^2 tiles
    lr: float = 1e-4
    weight_decay: float = 0.0
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    log_interval: int = 20
    checkpoint_interval: int = 500
    eval_images: int = 200           # held-out crops (val split) for the report
    eval_batch: int = 256

    def validate(self) -> None:
        _check(self.steps >= 1, f"config key 'train.steps' must be >= 1, got {self.steps}")
        _check(self.images_per_batch >= 1, f"config key 'train.images_per_batch' must be >= 1, got {self.images_per_batch}")
        _check(self.lr > 0, f"config key 'train.lr' must be > 0, got {self.lr}")
        self.amp = _amp_mode(self.amp, "train.amp")


@dataclasses.dataclass
class RegressorConfig:
    output_dir: str = "runs/regressor"
    # The regressor file (released weight format) and its metadata JSON (same stem).
    output_path: str = "checkpoints/regressor.pth"
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(crop_size=(1024, 2048),
                                                                             class_uniform_fraction=0.0))
    model: RegressorModelConfig = dataclasses.field(default_factory=RegressorModelConfig)
    ranges: WarpRangesConfig = dataclasses.field(default_factory=WarpRangesConfig)
    tiles: TileConfig = dataclasses.field(default_factory=TileConfig)
    train: RegressorTrainConfig = dataclasses.field(default_factory=RegressorTrainConfig)
