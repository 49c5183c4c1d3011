"""Training and validation transforms (OpenCV + numpy; no torchvision, no PIL).

A transform is a callable ``t(image, label, rng=None, center=None) -> dict`` with

* ``image``: H x W x 3 uint8 RGB, ``label``: H x W uint8 train ids (255 = ignore) or
  None (test split: no labels);
* ``rng``: a ``numpy.random.Generator`` that supplies *all* randomness, so a sample is a
  pure function of (image, label, rng state); the dataset derives it from
  (seed, epoch, index), see :mod:`datasets.cityscapes`;
* ``center``: optional (x, y) source pixel that the training crop must contain (class-
  uniform sampling);

returning ``{'image': float32 3 x h x w normalised, 'label': int64 h x w, 'edge': float32
1 x h x w in {0, 1}}``.  The edge target is computed from the final label, after every
geometric transform.  With ``with_roi=True`` the dict also holds ``'roi'``: float32 h x w,
1 where the output shows the image and 0 on padding.  Weak supervision needs it because the
label pads with 255, the same value as "unlabeled" in partial labels (scribbles).
"""
import math

import cv2
import numpy as np
import torch

from .edges import edge_target
from .labels import IGNORE_INDEX

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TrainTransform", "ValTransform", "normalize_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


def normalize_image(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """H x W x 3 uint8 RGB -> 3 x H x W float32 tensor, (x / 255 - mean) / std."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    offset = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    out = image.astype(np.float32)
    out *= scale
    out -= offset
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _check_image(image, label):
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"transform expects an H x W x 3 uint8 RGB image, got "
                         f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}")
    if label is not None:
        if not isinstance(label, np.ndarray) or label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(f"transform expects an H x W uint8 train-id label, got "
                             f"{getattr(label, 'shape', type(label))} {getattr(label, 'dtype', '')}")
        if label.shape != image.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")


def _finish(image, label, mean, std, edge_radius, ignore_index, edge_image_border=True):
    """Normalise and convert; a missing label becomes all-ignore with no edges."""
    if label is None:
        label = np.full(image.shape[:2], ignore_index, dtype=np.uint8)
        edge = np.zeros(image.shape[:2], dtype=np.uint8)
    else:
        edge = edge_target(label, edge_radius, image_border=edge_image_border)
    return {
        "image": normalize_image(image, mean, std),
        "label": torch.from_numpy(label.astype(np.int64)),
        "edge": torch.from_numpy(edge).to(torch.float32).unsqueeze(0),
    }


class ValTransform:
    """Validation/test: no geometry, only normalisation, at full resolution."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, edge_radius=2, ignore_index=IGNORE_INDEX,
                 with_roi=False, edge_image_border=True):
        self.mean, self.std = tuple(mean), tuple(std)
        self.edge_radius = edge_radius
        self.edge_image_border = edge_image_border
        self.ignore_index = ignore_index
        self.with_roi = with_roi

    def __call__(self, image, label, rng=None, center=None):
        _check_image(image, label)
        sample = _finish(image, label, self.mean, self.std, self.edge_radius, self.ignore_index,
                         self.edge_image_border)
        if self.with_roi:
            sample["roi"] = torch.ones(image.shape[:2], dtype=torch.float32)
        return sample

    def __repr__(self):
        return f"ValTransform(edge_radius={self.edge_radius})"


class TrainTransform:
    """Random scale -> pad -> random crop -> horizontal flip -> colour jitter / blur.

    Scale, pad and crop are one affine warp per array (bilinear for the image, nearest
    neighbour for the label), evaluated only on the output crop: the image is padded
    with the mean colour and the label with ``ignore_index`` wherever the crop leaves the
    scaled image.  This is the same as resizing the whole image and cropping, at the
    cost of the crop only.

    Args:
        crop_size: (h, w) of the output, an int for a square, or None for the input size.
        scale_range: (min, max) of the uniform random scale factor.
        flip: random horizontal flip with probability 0.5.
        color_jitter: None or a dict with any of brightness, contrast, saturation (factor
            drawn from [max(0, 1 - v), 1 + v]) and hue (shift drawn from [-v, v], v <= 0.5,
            in fractions of the hue circle), applied in a random order.
        blur_prob: probability of a Gaussian blur with sigma in [0.15, 1.3].
        edge_radius: radius of the edge target (see :func:`datasets.edges.edge_target`).
        edge_image_border: whether the crop's border is an edge where a class touches it
            (the reference's definition; see :func:`datasets.edges.edge_target`).

    With ``center=(x, y)`` (a source pixel) the crop is placed at a random position that
    contains that pixel - as HMS's class-uniform crops do - and the warp maps the pixel
    exactly onto an output pixel, so the label there is the source label there: the
    chosen class is in the crop at every scale, even for one-pixel structures.
    """

    def __init__(self, crop_size=(1024, 1024), scale_range=(0.5, 2.0), flip=True, color_jitter=None,
                 blur_prob=0.0, ignore_index=IGNORE_INDEX, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 edge_radius=2, with_roi=False, edge_image_border=True):
        if crop_size is not None:
            if isinstance(crop_size, int):
                crop_size = (crop_size, crop_size)
            crop_size = tuple(int(v) for v in crop_size)
            if len(crop_size) != 2 or min(crop_size) <= 0:
                raise ValueError(f"TrainTransform: crop_size must be (h, w) > 0, got {crop_size}")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"TrainTransform: scale_range must satisfy 0 < min <= max, got {scale_range}")
        if color_jitter is not None:
            unknown = set(color_jitter) - set(_JITTER_KEYS)
            if unknown:
                raise ValueError(f"TrainTransform: unknown color_jitter keys {sorted(unknown)}; "
                                 f"expected some of {_JITTER_KEYS}")
            if not 0 <= color_jitter.get("hue", 0) <= 0.5:
                raise ValueError("TrainTransform: color_jitter['hue'] must be in [0, 0.5]")
        if not 0.0 <= blur_prob <= 1.0:
            raise ValueError(f"TrainTransform: blur_prob must be in [0, 1], got {blur_prob}")
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"TrainTransform: ignore_index must fit in uint8, got {ignore_index}")
        self.crop_size = crop_size
        self.scale_range = (lo, hi)
        self.flip = flip
        self.color_jitter = dict(color_jitter) if color_jitter else None
        self.blur_prob = blur_prob
        self.ignore_index = ignore_index
        self.mean, self.std = tuple(mean), tuple(std)
        self.edge_radius = edge_radius
        self.edge_image_border = edge_image_border
        self.with_roi = with_roi
        self._pad_color = tuple(float(round(255.0 * m)) for m in self.mean)

    def __repr__(self):
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"flip={self.flip}, color_jitter={self.color_jitter}, blur_prob={self.blur_prob}, "
                f"edge_radius={self.edge_radius})")

    # -- geometry -------------------------------------------------------------------------
    @staticmethod
    def _axis(rng, src_len, scaled_len, out_len, center):
        """Source coordinate of output pixel 0 along one axis, and the per-pixel step."""
        step = src_len / scaled_len           # source pixels per output pixel
        lo, hi = min(0, scaled_len - out_len), max(0, scaled_len - out_len)
        if center is None:
            start = int(rng.integers(lo, hi + 1))   # crop offset in the scaled image
            # pixel centres: output i <-> scaled (start + i) <-> source (start + i + .5) * step - .5
            return (start + 0.5) * step - 0.5, step
        c_scaled = (center + 0.5) / step - 0.5
        first = max(0, math.ceil(c_scaled - hi))
        last = min(out_len - 1, math.floor(c_scaled - lo))
        if first > last:  # only through rounding at the very edge
            first = last = min(max(int(round(c_scaled - (lo + hi) / 2)), 0), out_len - 1)
        at = int(rng.integers(first, last + 1))     # output pixel that shows `center`
        return center - at * step, step

    def _geometry(self, image, label, rng, center, with_roi=False):
        """Scale, pad, crop and flip ``image`` and ``label`` alike; either may be None (not
        both): the random draws are the same, so a label-only call crops what a full call would.
        Returns (image, label, roi): roi (uint8, 1 = inside the source image, 0 = padding, warped
        exactly as the label) when ``with_roi``, else None."""
        h, w = (image if image is not None else label).shape[:2]
        out_h, out_w = self.crop_size if self.crop_size is not None else (h, w)
        scale = rng.uniform(*self.scale_range)
        scaled_h, scaled_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        cx, cy = (None, None) if center is None else center
        if center is not None and not (0 <= cx < w and 0 <= cy < h):
            raise ValueError(f"TrainTransform: center {center} lies outside the {w} x {h} image")
        x0, step_x = self._axis(rng, w, scaled_w, out_w, cx)
        y0, step_y = self._axis(rng, h, scaled_h, out_h, cy)
        matrix = np.array([[step_x, 0.0, x0], [0.0, step_y, y0]], dtype=np.float64)
        flags = cv2.WARP_INVERSE_MAP
        if image is not None:
            image = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR | flags,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=self._pad_color)
        if label is not None:
            label = cv2.warpAffine(label, matrix, (out_w, out_h), flags=cv2.INTER_NEAREST | flags,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=float(self.ignore_index))
        roi = None
        if with_roi:
            roi = cv2.warpAffine(np.ones((h, w), np.uint8), matrix, (out_w, out_h), flags=cv2.INTER_NEAREST | flags,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        if self.flip and rng.random() < 0.5:
            image = cv2.flip(image, 1) if image is not None else None
            label = cv2.flip(label, 1) if label is not None else None
            roi = cv2.flip(roi, 1) if roi is not None else None
        return image, label, roi

    def label_crop(self, label, rng, center=None):
        """The label and edge target (H x W uint8 each) of the crop that ``__call__`` would make
        with the same ``rng``, without touching an image: for consumers of boundaries alone
        (training an InverseForm regressor)."""
        if rng is None:
            raise ValueError("TrainTransform.label_crop needs an explicit numpy Generator")
        if label is None or label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(f"TrainTransform.label_crop: label must be an H x W uint8 array, got "
                             f"{None if label is None else (label.shape, label.dtype)}")
        _, label, _ = self._geometry(None, label, rng, center)
        return label, edge_target(label, self.edge_radius, image_border=self.edge_image_border)

    # -- photometric ----------------------------------------------------------------------
    def _jitter(self, image, rng):
        cj = self.color_jitter
        img = image.astype(np.float32)
        for op in rng.permutation(len(_JITTER_KEYS)):
            key = _JITTER_KEYS[op]
            amount = float(cj.get(key, 0.0))
            if amount <= 0:
                continue
            if key == "hue":
                shift = rng.uniform(-amount, amount)
                hsv = cv2.cvtColor(np.clip(img + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)
                hue = hsv[:, :, 0].astype(np.int16) + int(round(shift * 256))
                hsv[:, :, 0] = np.mod(hue, 256).astype(np.uint8)
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
                continue
            factor = rng.uniform(max(0.0, 1 - amount), 1 + amount)
            if key == "brightness":
                img *= factor
            else:
                gray = cv2.cvtColor(np.clip(img, 0, 255), cv2.COLOR_RGB2GRAY)
                if key == "contrast":
                    img = (img - gray.mean()) * factor + gray.mean()
                else:  # saturation
                    img = (img - gray[:, :, None]) * factor + gray[:, :, None]
            img = np.clip(img, 0, 255)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    def __call__(self, image, label, rng=None, center=None):
        if rng is None:
            raise ValueError("TrainTransform needs an explicit numpy Generator: "
                             "t(image, label, rng=np.random.default_rng(seed))")
        _check_image(image, label)
        image, label, roi = self._geometry(image, label, rng, center, with_roi=self.with_roi)
        if self.color_jitter:
            image = self._jitter(image, rng)
        if self.blur_prob > 0 and rng.random() < self.blur_prob:
            image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.15, 1.3))
        sample = _finish(image, label, self.mean, self.std, self.edge_radius, self.ignore_index,
                         self.edge_image_border)
        if roi is not None:
            sample["roi"] = torch.from_numpy(roi).to(torch.float32)
        return sample
