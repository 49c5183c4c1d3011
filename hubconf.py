"""torch.hub entry points: one per released architecture, each with optional weights.

    import torch
    net = torch.hub.load("path/to/this/repo", "hrnet18_if", source="local", weights="exported/hrnet18_if")
    net = torch.hub.load("path/to/this/repo", "hrnet16_slim", source="local", weights="checkpoints/hr16s_4k_slim.pth")

``weights``: a model folder (``tools/export.py --format safetensors``, ``models.save_pretrained``)
or a ``.pth`` (released, or written by this project's training), loaded strictly; weights of
another architecture are refused.  ``has_edge`` and ``num_classes`` come from the weights when
left out (``has_edge=False`` drops an edge head); without weights the network is freshly
initialised (19 classes, no edge head unless ``has_edge=True``).  The network comes back in eval
mode; ``net(images)`` takes N x 3 x H x W RGB in [0, 1] normalised with the ImageNet mean/std and
returns a dict (``pred``: logits; with an edge head ``edge_prob``).
"""
import os
import sys

dependencies = ["torch"]

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _models():
    """This repository's ``models`` package (torch.hub puts the repository first on sys.path);
    refused when a module of the same name from elsewhere is already imported."""
    for name in ("models", "utils"):
        origin = getattr(sys.modules.get(name), "__file__", None)
        if origin and not os.path.abspath(origin).startswith(_ROOT + os.sep):
            raise ImportError(f"hubconf: a module named {name!r} from {origin} is already imported; load this "
                              "repository's models in a fresh process (or before that module)")
    import models
    return models


def _load(arch, hrnet_base, weights, **kwargs):
    return _models().pretrained_net(arch, weights, hrnet_base=hrnet_base, **kwargs)


def hrnet18_if(weights=None, **kwargs):
    """HRNet-18-IF: Aux-HRNet on the HRNet-W18 trunk (``ocrnet.AuxHRNet``, hrnet_base 18).
    kwargs: ``has_edge``, ``num_classes``, ``device``."""
    return _load("ocrnet.AuxHRNet", 18, weights, **kwargs)


def hrnet16_slim(weights=None, **kwargs):
    """HRNet-16-Slim (``lighthrnet.HRNet16``, hrnet_base 16).  kwargs: ``has_edge``,
    ``num_classes``, ``device``."""
    return _load("lighthrnet.HRNet16", 16, weights, **kwargs)


def ocrnet48_if(weights=None, **kwargs):
    """OCRNet-48 with InverseForm (``ocrnet.HRNet``, hrnet_base 48).  kwargs: ``has_edge``,
    ``num_classes``, ``device``."""
    return _load("ocrnet.HRNet", 48, weights, **kwargs)


def hms_ocrnet48_if(weights=None, **kwargs):
    """HMS-OCRNet-48 with InverseForm (``ocrnet.HRNet_Mscale``, hrnet_base 48; its evaluation
    scales come from a model folder's config).  kwargs: ``has_edge``, ``num_classes``, ``device``."""
    return _load("ocrnet.HRNet_Mscale", 48, weights, **kwargs)
