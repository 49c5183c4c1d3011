"""Data for boundary-aware segmentation: Cityscapes (real or synthetic), your own data in a folder
layout with a class table (NYU-Depth-v2 as one configuration), transforms, edge targets and
samplers.  Knows no model and no loss.

Heavy submodules (torch-based) load on first use, so ``python -m datasets.synthetic``
and the label helpers stay quick to import.
"""
import importlib

from .edges import edge_target
from .labels import (IGNORE_INDEX, NUM_CLASSES, TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES, colorize,
                     labelid_to_trainid, trainid_to_labelid)
from .root import resolve_root

_LAZY = {
    "Cityscapes": "cityscapes",
    "SegmentationDataset": "segmentation_dataset",
    "ClassTable": "class_table",
    "FolderSegmentation": "folder",
    "NYUDepthV2": "nyu",
    "nyu40_class_table": "nyu",
    "TrainTransform": "transforms",
    "ValTransform": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "DistributedTrainSampler": "samplers",
    "DistributedEvalSampler": "samplers",
    "ensure_synthetic": "synthetic",
    "generate_synthetic": "synthetic",
    "ScribbleCityscapes": "scribbles",
    "ScribbleFolderSegmentation": "scribbles",
    "ScribbleLabels": "scribbles",
    "draw_scribbles": "scribbles",
    "VOCSegmentation": "voc",
    "VOC_NUM_CLASSES": "voc",
}

__all__ = ["edge_target", "IGNORE_INDEX", "NUM_CLASSES", "TRAIN_CLASS_COLORS", "TRAIN_CLASS_NAMES",
           "colorize", "labelid_to_trainid", "trainid_to_labelid", "resolve_root", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, "generate" if name == "generate_synthetic" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
