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


def _amp_mode(value: str, key: str) -> str:
    """Normalise an AMP setting (YAML turns a bare `off` into false)."""
    mode = _AMP_ALIASES.get(str(value).lower(), str(value).lower())
    _check(mode in AMP_MODES, f"config key '{key}' must be one of {AMP_MODES}, got {value!r}")
    return mode


COMPILE_MODES = ("off", "on", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                 "eager", "aot_eager")
_COMPILE_ALIASES = {"false": "off", "no": "off", "none": "off", "true": "on", "yes": "on"}


def _compile_mode(value: str, key: str) -> str:
    """Normalise a torch.compile setting (experiment/acceleration.py; YAML turns `on` into true)."""
    mode = _COMPILE_ALIASES.get(str(value).lower(), str(value).lower())
    _check(mode in COMPILE_MODES, f"config key '{key}' must be one of {COMPILE_MODES}, got {value!r}")
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
    dataset_dir: Optional[str] = path_field(None)
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
    # edge targets have it; false keeps only boundaries between labels (README, issue 17).
    edge_image_border: bool = True
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
        _check(0.0 <= self.color_jitter, f"config key 'data.color_jitter' must be >= 0, got {self.color_jitter}")


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
    # logits are averaged at evaluation/inference (experiment/inference.py); None: single scale.
    eval_scales: Optional[List[float]] = None

    def validate(self) -> None:
        _check(self.num_classes >= 1, f"config key 'model.num_classes' must be >= 1, got {self.num_classes}")
        _check(not self.eval_scales or min(self.eval_scales) > 0,
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
    # per process; sum: both multiplied by N, the same balance at any batch (README, issue 17).
    edge_reduction: str = "mean"
    # The frozen InverseForm regressor.  Missing file: the term is left out (with a notice),
    # unless `regressor_config` is set, in which case a regressor is trained first.
    inverseform_path: Optional[str] = path_field("checkpoints/distance_measures_regressor.pth")
    # euclidean: as released (for a trained 4/6/8-parameter net, ||theta_hat - I||_F of the
    # de-normalised parameters); normalised: the L2 norm of the regressor's raw (normalised)
    # output whatever the parameterisation; geodesic: the paper's SO(3) form.
    inverseform_distance: str = "euclidean"
    inverseform_tile_factor: int = 3
    regressor_config: Optional[str] = path_field(None, kind="config")
    # DenseCRF regularized loss (rloss/, weak supervision: the `weak` section).  Published (VOC,
    # 513 x 513 crops): weight 2e-9, sigma_rgb 15, sigma_xy 100 (full-resolution pixels), scale 0.5.
    densecrf_weight: float = 0.0
    densecrf_sigma_rgb: float = 15.0
    densecrf_sigma_xy: float = 100.0
    densecrf_scale: float = 0.5
    densecrf_kernel: str = "permutohedral"   # or "exact" (dense Gaussian, small images; see rloss/filter.py)

    def validate(self) -> None:
        _check(self.edge_reduction in ("mean", "sum"),
               f"config key 'loss.edge_reduction' must be mean or sum, got {self.edge_reduction!r}")
        _check(self.densecrf_weight >= 0, f"config key 'loss.densecrf_weight' must be >= 0, got {self.densecrf_weight}")
        _check(self.densecrf_sigma_rgb > 0 and self.densecrf_sigma_xy > 0 and 0 < self.densecrf_scale <= 1,
               "config keys 'loss.densecrf_sigma_rgb', 'loss.densecrf_sigma_xy' must be > 0 and 'loss.densecrf_scale' "
               f"in (0, 1], got {self.densecrf_sigma_rgb}, {self.densecrf_sigma_xy}, {self.densecrf_scale}")
        _check(self.densecrf_kernel in ("permutohedral", "exact"),
               f"config key 'loss.densecrf_kernel' must be permutohedral or exact, got {self.densecrf_kernel!r}")
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
        _check(self.momentum >= 0, f"config key 'optim.momentum' must be >= 0, got {self.momentum}")
        _check(self.weight_decay >= 0, f"config key 'optim.weight_decay' must be >= 0, got {self.weight_decay}")
        _check(self.poly_power >= 0, f"config key 'optim.poly_power' must be >= 0, got {self.poly_power}")
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
    compile: str = "off"              # torch.compile of the model: off, on, max-autotune, ... (--compile)

    def validate(self) -> None:
        _check(self.epochs >= 1, f"config key 'train.epochs' must be >= 1, got {self.epochs}")
        self.compile = _compile_mode(self.compile, "train.compile")
        _check(self.max_iters is None or self.max_iters >= 1,
               f"config key 'train.max_iters' must be >= 1, got {self.max_iters}")
        _check(self.batch_size >= 1, f"config key 'train.batch_size' must be >= 1, got {self.batch_size}")
        self.amp = _amp_mode(self.amp, "train.amp")
        _check(self.device in ("auto", "cpu", "cuda"),
               f"config key 'train.device' must be auto, cpu or cuda, got {self.device!r}")
        _check(self.log_interval >= 1, f"config key 'train.log_interval' must be >= 1, got {self.log_interval}")
        for name in ("image_interval", "val_interval", "checkpoint_interval"):
            _check(getattr(self, name) >= 0,
                   f"config key 'train.{name}' must be >= 0 (0: off), got {getattr(self, name)}")


@dataclasses.dataclass
class ValConfig:
    batch_size: int = 1
    num_workers: int = 2
    amp: str = "auto"
    dump_predictions: bool = False
    boundary_tolerance: int = 2      # pixels, for the boundary F-score
    num_images_logged: int = 4       # TensorBoard sample images
    max_images: Optional[int] = None  # evaluate only the first N images (quick checks)
    # Test-time inference modes (experiment/inference.py); whole image, no flip by default.
    sliding_window: bool = False     # average the logits of overlapping window_size crops
    window_size: Tuple[int, int] = (1024, 1024)   # H, W
    window_stride: Tuple[int, int] = (768, 768)   # H, W; at most window_size
    flip: bool = False               # average with the horizontally flipped image's prediction
    compile: str = "off"             # torch.compile of the eval forward (validation.py --compile)

    def validate(self) -> None:
        _check(self.batch_size >= 1, f"config key 'val.batch_size' must be >= 1, got {self.batch_size}")
        _check(len(self.window_size) == 2 and min(self.window_size) >= 1,
               f"config key 'val.window_size' must be two positive ints (H, W), got {self.window_size}")
        _check(len(self.window_stride) == 2 and min(self.window_stride) >= 1
               and all(s <= w for s, w in zip(self.window_stride, self.window_size)),
               f"config key 'val.window_stride' must be two positive ints no larger than val.window_size "
               f"{self.window_size}, got {self.window_stride}")
        self.amp = _amp_mode(self.amp, "val.amp")
        self.compile = _compile_mode(self.compile, "val.compile")
        _check(self.boundary_tolerance >= 0,
               f"config key 'val.boundary_tolerance' must be >= 0, got {self.boundary_tolerance}")
        _check(self.num_workers >= 0, f"config key 'val.num_workers' must be >= 0, got {self.num_workers}")
        _check(self.max_images is None or self.max_images >= 1,
               f"config key 'val.max_images' (--max_images) must be >= 1, got {self.max_images}")


@dataclasses.dataclass
class NUSConfig:
    """Learned non-uniform downsampling (experiment/nus.py; Marin et al., ICCV 2019).  ``mode``:
    off (the usual training), uniform (baseline), adaptive (auxiliary net), compare (both)."""
    mode: str = "off"
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
        _check(self.processes >= 1, f"config key 'nus.processes' must be >= 1, got {self.processes}")
        _check(len(set(self.seeds)) == len(self.seeds), f"config key 'nus.seeds' repeats a seed: {self.seeds}")
        _check(self.mode in ("off", "uniform", "adaptive", "compare"),
               f"config key 'nus.mode' must be off, uniform, adaptive or compare, got {self.mode!r}")
        _check(len(self.sampling_size) == 2 and min(self.sampling_size) >= 2,
               f"config key 'nus.sampling_size' must be two ints >= 2, got {self.sampling_size}")
        _check(all(s >= 2 for s in self.compare_sizes), f"config key 'nus.compare_sizes' must be >= 2, got {self.compare_sizes}")
        _check(self.gather in ("nearest", "bilinear"), f"config key 'nus.gather' must be nearest or bilinear, got {self.gather!r}")
        _check(0 < self.alpha <= 1, f"config key 'nus.alpha' must be in (0, 1], got {self.alpha}")
        _check(self.aux_input_size % self.aux_output_stride == 0 and self.aux_input_size // self.aux_output_stride >= 2,
               f"config key 'nus.aux_input_size' ({self.aux_input_size}) must be a multiple of nus.aux_output_stride "
               f"({self.aux_output_stride}) giving a grid of at least 2 x 2")
        _check(self.aux_steps >= 1 and self.aux_batch_size >= 1 and self.aux_lr > 0,
               "config keys 'nus.aux_steps', 'nus.aux_batch_size' must be >= 1 and 'nus.aux_lr' > 0")
        _check(self.val_crop is None or min(self.val_crop) >= 1,
               f"config key 'nus.val_crop' must be two positive ints or null, got {self.val_crop}")


@dataclasses.dataclass
class WeakConfig:
    """Weak supervision with scribbles (experiment/weak.py): partial cross-entropy on the labeled
    pixels plus ``loss.densecrf_weight`` x DenseCRF.  ``source``: ``cityscapes`` draws scribbles from
    the full labels of the (real or synthetic) Cityscapes root; ``voc`` reads PASCAL VOC 2012 with
    the reference's scribbles from ``voc_dir``.  ``labels: full`` trains the same objective on full
    labels (the upper bound).  ``compare: true`` runs pCE, pCE + DenseCRF and full supervision with
    the same seed and schedule and writes OUTPUT_DIR/comparison.json."""
    enabled: bool = False
    source: str = "cityscapes"
    voc_dir: Optional[str] = path_field(None)
    labels: str = "scribbles"
    scribble_seed: int = 0
    scribble_fraction: float = 0.03     # stroke length: about this share of each object's pixels
    stroke_width: int = 3
    min_area: int = 30                  # objects smaller than this get no scribble
    pce_batch_average: bool = False     # the reference divides its pCE once more by the batch size
    compare: bool = False
    # CPU threads of the comparison (None: torch's default).  On a busy small CPU one thread avoids
    # OpenMP threads spinning against other processes (20x faster steps seen on the shared 2-core machine).
    cpu_threads: Optional[int] = None
    # runs of the comparison trained at once as child processes (single-process jobs only; each
    # with cpu_threads threads): 2 on a 2-core CPU runs the three in the time of the two longest
    processes: int = 1

    def validate(self) -> None:
        _check(self.processes >= 1, f"config key 'weak.processes' must be >= 1, got {self.processes}")
        _check(self.source in ("cityscapes", "voc"), f"config key 'weak.source' must be cityscapes or voc, got {self.source!r}")
        _check(self.labels in ("scribbles", "full"), f"config key 'weak.labels' must be scribbles or full, got {self.labels!r}")
        _check(0 < self.scribble_fraction <= 1, f"config key 'weak.scribble_fraction' must be in (0, 1], got {self.scribble_fraction}")
        _check(self.stroke_width >= 1, f"config key 'weak.stroke_width' must be >= 1, got {self.stroke_width}")
        _check(self.min_area >= 1, f"config key 'weak.min_area' must be >= 1, got {self.min_area}")
        _check(self.source != "voc" or bool(self.voc_dir), "config key 'weak.voc_dir' is required with weak.source=voc")
        _check(self.cpu_threads is None or self.cpu_threads >= 1,
               f"config key 'weak.cpu_threads' must be >= 1 or null, got {self.cpu_threads}")


ABLATION_VARIANTS = ("ce", "joint", "inverseform", "geodesic")


@dataclasses.dataclass
class AblationConfig:
    """experiment/ablation.py: which objectives (ce: CE alone; joint: + balanced BCE + edge
    attention; inverseform: joint + the Euclidean InverseForm term; geodesic: joint + the
    geodesic one) and which seeds; every (variant, seed) run uses the rest of the config."""
    variants: List[str] = dataclasses.field(default_factory=lambda: list(ABLATION_VARIANTS))
    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    figure_images: int = 3           # validation images in the side-by-side figure
    processes: int = 1               # runs trained at once as child processes (single-process runs only)
    cpu_threads: Optional[int] = None  # threads per run on a CPU (as weak.cpu_threads)

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in ABLATION_VARIANTS]
        _check(bool(self.variants) and not unknown and len(set(self.variants)) == len(self.variants),
               f"config key 'ablation.variants' must list distinct names among {', '.join(ABLATION_VARIANTS)}, "
               f"got {self.variants}")
        _check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds),
               f"config key 'ablation.seeds' must list distinct seeds, got {self.seeds}")
        _check(self.figure_images >= 0, f"config key 'ablation.figure_images' must be >= 0, got {self.figure_images}")
        _check(self.processes >= 1, f"config key 'ablation.processes' must be >= 1, got {self.processes}")
        _check(self.cpu_threads is None or self.cpu_threads >= 1,
               f"config key 'ablation.cpu_threads' must be >= 1 or null, got {self.cpu_threads}")


@dataclasses.dataclass
class ExperimentConfig:
    output_dir: str = path_field("runs/default")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    val: ValConfig = dataclasses.field(default_factory=ValConfig)
    # `key=value` overrides applied when the run will be on CUDA, before the command line's:
    # batches sized for a GPU (configs/synthetic.yaml).  The CPU run ignores them.
    cuda_overrides: List[str] = dataclasses.field(default_factory=list)
    nus: NUSConfig = dataclasses.field(default_factory=NUSConfig)
    weak: WeakConfig = dataclasses.field(default_factory=WeakConfig)
    ablation: AblationConfig = dataclasses.field(default_factory=AblationConfig)


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
    output_dir: str = path_field("runs/regressor")
    # The regressor file (released weight format) and its metadata JSON (same stem).
    output_path: str = path_field("checkpoints/regressor.pth")
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(crop_size=(1024, 2048),
                                                                             class_uniform_fraction=0.0))
    model: RegressorModelConfig = dataclasses.field(default_factory=RegressorModelConfig)
    ranges: WarpRangesConfig = dataclasses.field(default_factory=WarpRangesConfig)
    tiles: TileConfig = dataclasses.field(default_factory=TileConfig)
    train: RegressorTrainConfig = dataclasses.field(default_factory=RegressorTrainConfig)
    cuda_overrides: List[str] = dataclasses.field(default_factory=list)  # as ExperimentConfig's
