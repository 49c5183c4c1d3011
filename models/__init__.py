"""Segmentation models of the InverseForm codebase: HRNetV2 trunks, Aux-HRNet,
HRNet-16-Slim, OCRNet and HMS-OCRNet, with optional edge heads.

Plain ``nn.Module``s that return dicts of tensors; no loss, no dataset, no global
config.  Start with :func:`get_net` (its docstring specifies the outputs).
"""
from .checkpoint import (CheckpointMismatchError, LoadReport, load_checkpoint,
                         load_pretrained_backbone)
from .factory import ARCHS, get_net
from .helpers import convert_sync_batchnorm, count_flops, count_parameters
from .hrnetv2 import TRUNK_CONFIGS, HRNetV2, TrunkConfig, hrnetv2
from .lighthrnet import LightHRNet
from .pretrained import from_pretrained, pretrained_net, save_pretrained
from .syncbn import DistributedBatchNorm2d
from .ocrnet import DEFAULT_EVAL_SCALES, AuxHRNet, MscaleOCRNet, OCRNet

__all__ = [
    "ARCHS", "AuxHRNet", "CheckpointMismatchError", "DEFAULT_EVAL_SCALES", "DistributedBatchNorm2d", "HRNetV2",
    "LightHRNet", "LoadReport", "MscaleOCRNet", "OCRNet", "TRUNK_CONFIGS", "TrunkConfig",
    "convert_sync_batchnorm", "count_flops", "count_parameters", "from_pretrained", "get_net", "hrnetv2",
    "load_checkpoint", "load_pretrained_backbone", "pretrained_net", "save_pretrained",
]
