"""The joint edge/segmentation loss of a config's ``loss`` section, with the frozen InverseForm
term: what segmentation training optimises and what validation reports as its loss."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from datasets import IGNORE_INDEX
from experiment.config import LossConfig
from experiment.errors import UserError
from experiment.paths import missing_file_message
from inverseform import InverseFormLoss, JointEdgeSegLoss
from utils import dist

log = logging.getLogger("experiment")


def load_inverseform(cfg: LossConfig, device: torch.device, required: bool = False) -> Optional[InverseFormLoss]:
    """The frozen InverseForm term from ``cfg.inverseform_path``; None (with one notice) if the
    file is absent, unless ``required``."""
    path = cfg.inverseform_path
    if not path or not os.path.isfile(path):
        missing = missing_file_message("InverseForm regressor", path) if path else \
            "config key 'loss.inverseform_path' is not set"
        if required:
            raise UserError(missing)
        if dist.is_main_process():  # one notice per run
            log.warning("%s: the InverseForm term is left out (put the released distance_measures_regressor.pth "
                        "there, or train one with experiment/train_inverseform.py)", missing)
        return None
    try:
        module = InverseFormLoss(path, tile_factor=cfg.inverseform_tile_factor, distance=cfg.inverseform_distance,
                                 check_inputs=False, tile_grid=cfg.inverseform_tile_grid)
    except ValueError as exc:  # the regressor file's own checks: unreadable, another layout, stale metadata
        raise UserError(f"config key 'loss.inverseform_path': {str(exc).strip().splitlines()[0]}") from exc
    log.info("InverseForm term: %s (%s tiles of %d px, %s distance)", path,
             module.regressor.parameterisation, module.regressor.tile_size, cfg.inverseform_distance)
    return module.to(device)


def joint_loss(cfg: LossConfig, num_classes: int, inverseform: Optional[InverseFormLoss]) -> JointEdgeSegLoss:
    return JointEdgeSegLoss(num_classes=num_classes, ignore_index=IGNORE_INDEX, seg_weight=cfg.seg_weight,
                            edge_weight=cfg.edge_weight, att_weight=cfg.att_weight, inv_weight=cfg.inv_weight,
                            inverseform=inverseform, attention_threshold=cfg.attention_threshold,
                            check_inputs=False, edge_reduction=cfg.edge_reduction)
