"""Pictures a run writes: images back from the network's input, error and edge maps, labelled
tiles for figures, and PNG files written whole or not at all (prediction dumps included)."""
from __future__ import annotations

import errno
import os
from typing import Optional

import cv2
import numpy as np
import torch

from datasets import IMAGENET_MEAN, IMAGENET_STD, ClassTable
from utils.errors import UnreadableInputError
from utils.io import atomic_write_bytes


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W network inputs (ImageNet-normalised) back to float RGB in [0, 1] (not
    clipped), on their device."""
    images = images.detach().float()  # per channel with Python scalars: no host-to-device copy
    return torch.stack([images[:, c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)], 1)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """3 x H x W normalised tensor -> H x W x 3 uint8 RGB."""
    rgb = unnormalize(image.cpu()[None])[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return (rgb * 255 + 0.5).astype(np.uint8)


def error_map(pred: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Grey where right, red where wrong, black where the ground truth is void."""
    out = np.full(label.shape + (3,), 128, np.uint8)
    out[(pred != label) & (label != ignore_index)] = (255, 0, 0)
    out[label == ignore_index] = 0
    return out


def edge_image(prob: np.ndarray) -> np.ndarray:
    """Edge probability in [0, 1] -> uint8 grey; an array already in uint8 is taken as is."""
    if prob.dtype == np.uint8:
        return prob
    return (np.clip(prob, 0, 1) * 255 + 0.5).astype(np.uint8)


def edge_u8(prob: torch.Tensor) -> torch.Tensor:
    """:func:`edge_image` on the device (a quarter of the bytes to copy to the host)."""
    return (prob.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def labelled(tile: np.ndarray, text: str) -> np.ndarray:
    """``tile`` (uint8 RGB) with ``text`` in its top-left corner, white on a dark outline."""
    tile = np.ascontiguousarray(tile)
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def write_png(path: str, array: np.ndarray) -> None:
    """Write an RGB or single-channel uint8 PNG (cv2 stores BGR) whole or not at all: encoded in
    memory, written and synced through a temporary file, its size checked before it replaces
    ``path``.  A full disk is an error naming the path, never an empty PNG."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"could not encode {path} as PNG (array {array.shape}, {array.dtype})")
    data = encoded.tobytes()
    atomic_write_bytes(path, data)
    if os.path.getsize(path) != len(data):
        raise UnreadableInputError(errno.EIO, f"cannot write {path}: {os.path.getsize(path)} of {len(data)} bytes "
                                              "reached the disk")


class PredictionDumper:
    """``OUTPUT_DIR/predictions/{color,labelIds,edges}/<name>_*.png``: colours and stored label
    ids of ``class_table`` (default Cityscapes, whose labelIds folder is what the official
    evaluator's CITYSCAPES_RESULTS should point at)."""

    def __init__(self, root: str, with_edges: bool, class_table: Optional[ClassTable] = None):
        self.table = class_table or ClassTable.cityscapes()
        self.dirs = {"color": os.path.join(root, "color"), "labelIds": os.path.join(root, "labelIds")}
        if with_edges:
            self.dirs["edges"] = os.path.join(root, "edges")
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)

    def __call__(self, name: str, pred: np.ndarray, edge_prob: Optional[np.ndarray]) -> None:
        write_png(os.path.join(self.dirs["color"], f"{name}_color.png"), self.table.colorize(pred))
        write_png(os.path.join(self.dirs["labelIds"], f"{name}_labelIds.png"), self.table.to_label_ids(pred))
        if edge_prob is not None and "edges" in self.dirs:
            write_png(os.path.join(self.dirs["edges"], f"{name}_edge.png"), edge_image(edge_prob))
