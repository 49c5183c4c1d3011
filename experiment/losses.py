"""The training objective wired from a :class:`~experiment.config.LossConfig`: the joint
edge/segmentation loss of inverseform/ applied to every output a model returns."""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from experiment.common import UserError
from experiment.config import LossConfig
from experiment.paths import missing_file_message
from inverseform import InverseFormLoss, JointEdgeSegLoss
from utils import dist

log = logging.getLogger("experiment")


def load_inverseform(cfg: LossConfig, device: torch.device, required: bool = False) -> Optional[InverseFormLoss]:
    """The frozen InverseForm term from ``cfg.inverseform_path``; None (with one notice) if the
    file is absent, unless ``required``."""
    path = cfg.inverseform_path
    if not path or not os.path.isfile(path):
        if required:
            raise UserError(missing_file_message("InverseForm regressor", path))
        if dist.is_main_process():  # one notice per run
            log.warning("%s: the InverseForm term is left out (put the released distance_measures_regressor.pth "
                        "there, or train one with experiment/train_inverseform.py)",
                        missing_file_message("InverseForm regressor", path))
        return None
    module = InverseFormLoss(path, tile_factor=cfg.inverseform_tile_factor, distance=cfg.inverseform_distance,
                             check_inputs=False)
    log.info("InverseForm term: %s (%s tiles of %d px, %s distance)", path,
             module.regressor.parameterisation, module.regressor.tile_size, cfg.inverseform_distance)
    return module.to(device)


def joint_loss(cfg: LossConfig, num_classes: int, inverseform: Optional[InverseFormLoss]) -> JointEdgeSegLoss:
    return JointEdgeSegLoss(num_classes=num_classes, ignore_index=255, seg_weight=cfg.seg_weight,
                            edge_weight=cfg.edge_weight, att_weight=cfg.att_weight, inv_weight=cfg.inv_weight,
                            inverseform=inverseform, attention_threshold=cfg.attention_threshold,
                            check_inputs=False, edge_reduction=cfg.edge_reduction)


class SegmentationObjective(nn.Module):
    """Total loss over a model's training outputs, as the reference combines them:

    * main: joint(pred, edge)
    * aux: ``aux_weight`` x joint(aux, edge_aux)   (OCR/aux head; HMS: joint aux)
    * HMS: ``mscale_weight`` x [joint(pred_05x, edge_aux) + joint(pred_10x, edge)]

    Returns the total and a flat dict of detached components for logging (the main loss's
    terms under their own names, each auxiliary total under ``aux`` / ``mscale``).
    """

    def __init__(self, cfg: LossConfig, num_classes: int, inverseform: Optional[InverseFormLoss]):
        super().__init__()
        self.cfg = cfg
        self.joint = joint_loss(cfg, num_classes, inverseform)

    def forward(self, outputs: Dict[str, torch.Tensor], label: torch.Tensor, edge: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        has_edge = "edge" in outputs
        main, parts = self.joint(outputs["pred"], outputs.get("edge"), label, edge if has_edge else None)
        components = dict(parts)
        total = main
        if self.cfg.aux_weight and "aux" in outputs:
            aux, _ = self.joint(outputs["aux"], outputs.get("edge_aux"), label, edge if has_edge else None)
            components["aux"] = aux.detach()
            total = total + self.cfg.aux_weight * aux
        if self.cfg.mscale_weight and "pred_05x" in outputs:
            lo, _ = self.joint(outputs["pred_05x"], outputs.get("edge_aux"), label, edge if has_edge else None)
            hi, _ = self.joint(outputs["pred_10x"], outputs.get("edge"), label, edge if has_edge else None)
            components["mscale"] = (lo + hi).detach()
            total = total + self.cfg.mscale_weight * (lo + hi)
        return total, components
