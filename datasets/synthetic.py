"""A synthetic Cityscapes: street scenes in the official layout, naming and label ids.

Why: every command of the project must run (and be tested) without the real dataset,
which needs a login to download.  The scenes are simple but *learnable*: a street in
perspective (sky, buildings with windows, sidewalks, road with lane marks, trees, grass,
walls, fences, poles carrying signs and lights, cars, trucks, buses, a tram on rails,
people, riders on bicycles and motorcycles), each class with its own colour family and
texture, plus noise.  Every one of the 19 train classes appears in every labelled image
(the generator checks and re-draws a scene otherwise), and the label images use real
label ids including void ones (ego vehicle, rectification border, static, dynamic,
ground, parking, rail track, guard rail, polegroup, trailer, ...).

Determinism: image ``i`` of a split depends only on ``(seed, split, i)`` (its own numpy
Generator) and files are written with ``cv2.imwrite``; the same arguments give
byte-identical files, and a larger ``--train`` only appends images.

Test split: like the official release, ``--test K`` writes images and
``*_gtFine_labelIds.png`` files that carry no classes, only the void frame (unlabeled,
ego vehicle, rectification border); the dataset never reads test labels.

Folder layout (``layout="folder"``, ``--layout folder``): the same scenes as the generic layout
of :class:`datasets.folder.FolderSegmentation`, for trying your own data's path end to end::

    <root>/images/<split>/<city>/<name>.png      the images (byte-identical to the Cityscapes layout's)
    <root>/labels/<split>/<city>/<name>.png      train ids 0..18, 255 = void (no labels for test)
    <root>/classes.yaml                          the class table (Cityscapes' 19 names and colours)
    <root>/colors/<split>/<city>/<name>.png      with --color: the labels in colour

Command line::

    python -m datasets.synthetic --out data/synthetic_cityscapes --train 100 --val 20
    python -m datasets.synthetic --out data/synthetic_folder --layout folder
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

import cv2
import numpy as np

from utils.errors import ExistingOutputError, InputError, InvalidInputError, UnreadableInputError
from utils.io import current_umask

from .class_table import CLASS_TABLE_NAME, ClassTable
from .labels import NUM_CLASSES, TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES, labelid_to_trainid, colorize

__all__ = [
    "DEFAULTS", "TRAIN_CITIES", "VAL_CITIES", "TEST_CITIES", "MANIFEST_NAME",
    "GENERATOR_VERSION", "LAYOUTS", "generate", "ensure_synthetic", "render_scene", "sample_name",
    "synthetic_class_table", "main",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic.json"
DEFAULTS = dict(train=100, val=20, test=10, height=256, width=512, seed=0, color=False)
LAYOUTS = ("cityscapes", "folder")  # the first is the default; only other layouts are named in the manifest
MIN_HEIGHT, MIN_WIDTH = 64, 128  # below this thin classes (poles, signs) cannot all show

# The official city names of each split.
TRAIN_CITIES = ("aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt",
                "hamburg", "hanover", "jena", "krefeld", "monchengladbach", "strasbourg",
                "stuttgart", "tubingen", "ulm", "weimar", "zurich")
VAL_CITIES = ("frankfurt", "lindau", "munster")
TEST_CITIES = ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich")
_SPLIT_CITIES = {"train": TRAIN_CITIES, "val": VAL_CITIES, "test": TEST_CITIES}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# Label ids used below (see datasets/labels.py).
UNLABELED, EGO, BORDER, STATIC, DYNAMIC, GROUND = 0, 1, 2, 4, 5, 6
ROAD, SIDEWALK, PARKING, RAIL = 7, 8, 9, 10
BUILDING, WALL, FENCE, GUARD_RAIL = 11, 12, 13, 14
POLE, POLEGROUP, LIGHT, SIGN = 17, 18, 19, 20
VEGETATION, TERRAIN, SKY = 21, 22, 23
PERSON, RIDER, CAR, TRUCK, BUS, TRAILER, TRAIN, MOTORCYCLE, BICYCLE = 24, 25, 26, 27, 28, 30, 31, 32, 33


def sample_name(split, index):
    """Cityscapes-style base name ``{city}_{seq:06d}_{frame:06d}`` of image ``index``."""
    cities = _SPLIT_CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_{19:06d}"


# ----------------------------------------------------------------------------------------
# Scene rendering
# ----------------------------------------------------------------------------------------
class _Material:
    """How one region is painted: its label id, base colour (RGB) and texture."""
    __slots__ = ("label_id", "color", "texture", "strength")

    def __init__(self, label_id, color, texture="noise", strength=1.0):
        self.label_id = label_id
        self.color = np.asarray(color, dtype=np.float32)
        self.texture = texture
        self.strength = strength


class _Scene:
    """Draws regions into a material map; the label map and image are derived from it.

    Geometry: a pinhole camera looking down a straight street.  A ground point at row
    ``y`` (below the horizon ``yh``) is ``(y - yh) / cam_h`` pixels per metre, and a point
    ``u`` metres to the right of the street axis is at ``x = vx + u * scale(y)``.
    """
    _SHIFT = 4  # sub-pixel bits for cv2 drawing
    _ONE = 1 << _SHIFT

    def __init__(self, rng, height, width):
        self.rng, self.H, self.W = rng, height, width
        self.mat = np.zeros((height, width), dtype=np.uint8)
        self.materials = [_Material(UNLABELED, (0, 0, 0))]
        self.yh = height * rng.uniform(0.36, 0.46)             # horizon row
        self.vx = width * rng.uniform(0.42, 0.58)              # vanishing point column
        self.road_half = rng.uniform(3.5, 5.0)                 # metres
        # camera height chosen so that the road spans 55-80% of the width at the bottom
        span = rng.uniform(0.55, 0.8) * width
        self.cam_h = (height - self.yh) * 2 * self.road_half / span

    # -- geometry helpers -----------------------------------------------------------------
    def scale(self, y):
        return max(y - self.yh, 1e-3) / self.cam_h

    def ground_x(self, u, y):
        return self.vx + u * self.scale(y)

    def row_at(self, depth):
        """Row for a relative depth in (0, 1]: 0 at the horizon, 1 at the bottom."""
        return self.yh + depth * (self.H - self.yh)

    # -- materials and drawing ------------------------------------------------------------
    def material(self, label_id, color, texture="noise", strength=1.0, jitter=12.0):
        color = np.clip(np.asarray(color, np.float32) + self.rng.normal(0, jitter, 3), 0, 255)
        self.materials.append(_Material(label_id, color, texture, strength))
        if len(self.materials) > 255:
            raise RuntimeError("too many materials in one synthetic scene")
        return len(self.materials) - 1

    def _pts(self, points):
        return [np.round(np.asarray(points, np.float64) * self._ONE).astype(np.int32)]

    def poly(self, points, mat):
        cv2.fillPoly(self.mat, self._pts(points), int(mat), cv2.LINE_8, self._SHIFT)

    def rect(self, x0, y0, x1, y1, mat):
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], mat)

    def circle(self, cx, cy, radius, mat, thickness=-1):
        cv2.circle(self.mat, (int(round(cx * self._ONE)), int(round(cy * self._ONE))),
                   int(round(max(radius, 0.5) * self._ONE)), int(mat),
                   thickness if thickness < 0 else max(1, int(round(thickness))),
                   cv2.LINE_8, self._SHIFT)

    def ellipse(self, cx, cy, ax, ay, mat, angle=0.0):
        cv2.ellipse(self.mat, (int(round(cx * self._ONE)), int(round(cy * self._ONE))),
                    (int(round(max(ax, 0.5) * self._ONE)), int(round(max(ay, 0.5) * self._ONE))),
                    angle, 0, 360, int(mat), -1, cv2.LINE_8, self._SHIFT)

    def line(self, x0, y0, x1, y1, mat, thickness=1.0):
        cv2.line(self.mat, (int(round(x0 * self._ONE)), int(round(y0 * self._ONE))),
                 (int(round(x1 * self._ONE)), int(round(y1 * self._ONE))), int(mat),
                 max(1, int(round(thickness))), cv2.LINE_8, self._SHIFT)

    def ground_quad(self, u0, u1, y0, y1, mat):
        """Ground region between lateral positions u0 < u1 and rows y0 < y1."""
        self.poly([(self.ground_x(u0, y0), y0), (self.ground_x(u1, y0), y0),
                   (self.ground_x(u1, y1), y1), (self.ground_x(u0, y1), y1)], mat)

    def side_plane(self, u, y_far, y_near, h_bottom, h_top, mat):
        """Vertical plane parallel to the street at lateral u, between two ground rows,
        from h_bottom to h_top metres above ground (facades, buses, walls...)."""
        xf, xn = self.ground_x(u, y_far), self.ground_x(u, y_near)
        sf, sn = self.scale(y_far), self.scale(y_near)
        pts = [(xf, y_far - h_bottom * sf), (xf, y_far - h_top * sf),
               (xn, y_near - h_top * sn), (xn, y_near - h_bottom * sn)]
        self.poly(pts, mat)
        return pts

    # -- rendering ------------------------------------------------------------------------
    def label_ids(self):
        lut = np.zeros(256, np.uint8)
        for index, material in enumerate(self.materials):
            lut[index] = material.label_id
        return lut[self.mat]

    def render(self):
        """Paint the image (RGB uint8) from the material map."""
        H, W, rng = self.H, self.W, self.rng
        low = cv2.resize(rng.standard_normal((max(2, H // 16), max(2, W // 16))).astype(np.float32),
                         (W, H), interpolation=cv2.INTER_CUBIC)
        mid = cv2.resize(rng.standard_normal((max(2, H // 4), max(2, W // 4))).astype(np.float32),
                         (W, H), interpolation=cv2.INTER_LINEAR)
        fine = rng.standard_normal((H, W)).astype(np.float32)
        flat = self.mat.ravel()
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=len(self.materials))
        starts = np.concatenate([[0], np.cumsum(counts)])
        image = np.zeros((H * W, 3), np.float32)
        low_f, mid_f, fine_f = low.ravel(), mid.ravel(), fine.ravel()
        for index, material in enumerate(self.materials):
            if counts[index] == 0:
                continue
            idx = order[starts[index]:starts[index + 1]]
            ys = (idx // W).astype(np.float32)
            xs = (idx % W).astype(np.float32)
            image[idx] = self._texture(material, idx, xs, ys, low_f, mid_f, fine_f)
        image = image.reshape(H, W, 3)
        # global illumination, colour cast and sensor noise
        image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 6, 3).astype(np.float32)
        image += rng.standard_normal((H, W, 3), dtype=np.float32) * 4.0
        image = cv2.GaussianBlur(image, (3, 3), 0.6)
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    def _texture(self, m, idx, xs, ys, low, mid, fine):
        base, s = m.color[None, :], m.strength
        kind = m.texture
        if kind == "sky":
            t = np.clip(ys / max(self.yh, 1.0), 0, 1)[:, None]
            col = base * (1 - 0.35 * t) + np.array([225, 232, 240], np.float32) * 0.35 * t
            cloud = np.clip(low[idx] - 0.6, 0, None)[:, None] * 90
            return col + cloud
        if kind == "blotch":  # vegetation: strong leafy light/shadow
            g = 1 + 0.28 * s * mid[idx] + 0.12 * s * fine[idx]
            return base * g[:, None]
        if kind == "tiles":  # sidewalk slabs in perspective
            depth = np.maximum(ys - self.yh, 1.0)
            u = (xs - self.vx) * self.cam_h / depth
            z = (self.H - self.yh) / depth * 6.0
            grout = (np.mod(u, 0.8) < 0.08) | (np.mod(z, 0.8) < 0.08)
            g = 1 + 0.05 * fine[idx] - 0.22 * grout
            return base * g[:, None]
        if kind == "bricks":
            period = max(2.0, self.H / 80.0)
            mortar = np.mod(ys, period) < 1.0
            g = 1 + 0.06 * fine[idx] - 0.18 * mortar
            return base * g[:, None]
        if kind == "lattice":
            period = max(3.0, self.H / 40.0)
            wire = (np.mod(xs + ys, period) < 1.0) | (np.mod(xs - ys, period) < 1.0)
            g = 0.75 + 0.5 * wire + 0.05 * fine[idx]
            return base * g[:, None]
        if kind == "metal":  # vehicles: smooth, glossy
            g = 1 + 0.06 * low[idx] + 0.03 * fine[idx]
            return base * g[:, None]
        if kind == "grass":
            g = 1 + 0.12 * s * mid[idx] + 0.10 * fine[idx]
            return base * g[:, None]
        # default "noise": asphalt, concrete, clothes...
        g = 1 + 0.05 * s * low[idx] + 0.06 * s * fine[idx]
        return base * g[:, None]


def _build_street(scene):
    """Lay out one street scene into ``scene`` (material map only)."""
    rng, H, W = scene.rng, scene.H, scene.W
    yh = scene.yh
    y_far = yh + max(1.0, 0.02 * (H - yh))
    y_bottom = H + 2.0
    R = scene.road_half

    # Lateral layout (metres from the street axis, left negative).
    verge_l = rng.uniform(0.0, 1.2)
    verge_r = rng.uniform(0.6, 1.5)
    side_l = rng.uniform(2.0, 3.5)
    side_r = rng.uniform(2.0, 3.5)
    strip_l = rng.uniform(1.0, 3.0)  # terrain/vegetation strip in front of buildings
    strip_r = rng.uniform(1.0, 3.0)
    sw_l0, sw_l1 = -R - verge_l - side_l, -R - verge_l
    sw_r0, sw_r1 = R + verge_r, R + verge_r + side_r
    bld_l, bld_r = sw_l0 - strip_l, sw_r1 + strip_r

    # Sky: everything above the horizon (buildings are drawn over it).
    scene.rect(-1, -1, W + 1, yh + 1, scene.material(SKY, (95, 150, 215), "sky", jitter=10))

    # Ground everywhere below the horizon starts as terrain (grass).
    grass = scene.material(TERRAIN, (140, 175, 85), "grass")
    scene.rect(-1, yh, W + 1, H + 1, grass)

    # Buildings: facade segments along both sides plus one closing the street.
    def facades(u):
        y = y_far
        while y < y_bottom:
            depth_len = rng.uniform(0.12, 0.35) * (H - yh)
            y_next = min(y_bottom, y + depth_len * (0.5 + (y - yh) / (H - yh)))
            height_m = rng.uniform(6.0, 16.0)
            tone = rng.uniform(0.8, 1.15)
            palette = [(150, 100, 80), (180, 145, 100), (135, 105, 90), (170, 120, 105)]
            color = np.array(palette[rng.integers(len(palette))]) * tone
            body = scene.material(BUILDING, color, "noise", strength=1.5)
            pts = scene.side_plane(u, y, y_next, -0.2, height_m, body)
            window = scene.material(BUILDING, (45, 55, 75), "metal", jitter=8)
            _windows(scene, pts, window, rng, height_m)
            y = y_next
    facades(bld_l)
    facades(bld_r)
    end_h = rng.uniform(6, 14)
    s_far = scene.scale(y_far)
    x0, x1 = scene.ground_x(bld_l, y_far), scene.ground_x(bld_r, y_far)
    end_wall = scene.material(BUILDING, (150, 115, 95), "noise", strength=1.5)
    scene.rect(x0, y_far - end_h * s_far, x1, y_far + 0.5, end_wall)

    # Terrain strips are the base grass; add a patch of bare ground (void) sometimes.
    if rng.random() < 0.5:
        y0 = scene.row_at(rng.uniform(0.15, 0.5))
        scene.ground_quad(bld_l + 0.2, sw_l0 - 0.3, y0, y0 + 0.15 * (H - yh),
                          scene.material(GROUND, (120, 95, 70)))

    # Sidewalks, road, lane marks.
    walk_color = (175, 160, 165)
    scene.ground_quad(sw_l0, sw_l1, y_far, y_bottom, scene.material(SIDEWALK, walk_color, "tiles"))
    scene.ground_quad(sw_r0, sw_r1, y_far, y_bottom, scene.material(SIDEWALK, walk_color, "tiles"))
    scene.ground_quad(-R, R, y_far, y_bottom, scene.material(ROAD, (85, 80, 88), "noise", 1.3))
    mark = scene.material(ROAD, (215, 215, 205), jitter=5)
    # dashed centre line: 1.5 m dashes every 4 m of forward distance (rows ~ 1 / distance)
    for z in np.arange(rng.uniform(1.0, 3.0), 60.0, 4.0):
        y0, y1 = scene.row_at(2.0 / (z + 1.5)), scene.row_at(2.0 / z)
        if y0 < H + 1:
            scene.ground_quad(-0.08, 0.08, y0, min(y1, H + 1.0), mark)
    # parking strip on one side, rail track for the tram in the middle of the left lane
    if rng.random() < 0.6:
        y0 = scene.row_at(rng.uniform(0.1, 0.4))
        scene.ground_quad(R - 2.0, R, y0, y0 + 0.25 * (H - yh), scene.material(PARKING, (120, 110, 115)))
    tram_u = -R / 2
    scene.ground_quad(tram_u - 0.8, tram_u + 0.8, y_far, scene.row_at(rng.uniform(0.25, 0.45)),
                      scene.material(RAIL, (110, 100, 95), "bricks"))

    # Objects are collected and drawn far to near (painter's algorithm).
    objects = []

    def add(y, fn, *args):
        objects.append((y, len(objects), fn, args))

    # Mandatory set, so that every train class is present in every image.
    add(scene.row_at(rng.uniform(0.12, 0.22)), _tram, tram_u)
    add(scene.row_at(rng.uniform(0.25, 0.5)), _bus, R - 1.4)
    add(scene.row_at(rng.uniform(0.25, 0.5)), _truck, rng.uniform(-R + 1.4, -0.8))
    add(scene.row_at(rng.uniform(0.35, 0.65)), _car, rng.uniform(0.8, R - 1.2))
    add(scene.row_at(rng.uniform(0.4, 0.7)), _cyclist, rng.uniform(-R + 0.6, R - 0.6))
    add(scene.row_at(rng.uniform(0.35, 0.6)), _motorcycle, rng.uniform(-R + 0.8, R - 0.8), True)
    add(scene.row_at(rng.uniform(0.4, 0.75)), _person, rng.uniform(sw_r0 + 0.4, sw_r1 - 0.4))
    add(scene.row_at(rng.uniform(0.4, 0.75)), _person, rng.uniform(sw_l0 + 0.4, sw_l1 - 0.4))
    add(scene.row_at(rng.uniform(0.35, 0.6)), _pole, sw_r0 + 0.3, "light")
    add(scene.row_at(rng.uniform(0.35, 0.6)), _pole, sw_l1 - 0.3, "sign")
    add(scene.row_at(rng.uniform(0.2, 0.45)), _tree, sw_l0 - strip_l / 2)
    add(scene.row_at(rng.uniform(0.2, 0.45)), _tree, sw_r1 + strip_r / 2)
    add(scene.row_at(rng.uniform(0.3, 0.55)), _wall, bld_r + 0.1 - min(1.0, strip_r / 2))
    add(scene.row_at(rng.uniform(0.3, 0.6)), _fence, sw_l0 - 0.2)
    # Extras for variety.
    for _ in range(rng.integers(0, 3)):
        add(scene.row_at(rng.uniform(0.15, 0.9)), _car, rng.uniform(-R + 1.0, R - 1.0))
    for _ in range(rng.integers(0, 3)):
        side = rng.random() < 0.5
        u = rng.uniform(sw_l0 + 0.4, sw_l1 - 0.4) if side else rng.uniform(sw_r0 + 0.4, sw_r1 - 0.4)
        add(scene.row_at(rng.uniform(0.2, 0.95)), _person, u)
    for _ in range(rng.integers(0, 3)):
        u = sw_l1 - 0.3 if rng.random() < 0.5 else sw_r0 + 0.3
        add(scene.row_at(rng.uniform(0.15, 0.9)), _pole, u, ["plain", "sign", "light"][rng.integers(3)])
    for _ in range(rng.integers(0, 2)):
        add(scene.row_at(rng.uniform(0.15, 0.6)), _tree, sw_r1 + strip_r / 2)
    if rng.random() < 0.5:
        add(scene.row_at(rng.uniform(0.3, 0.8)), _bicycle, rng.uniform(sw_r0 + 0.5, sw_r1 - 0.5))
    if rng.random() < 0.7:
        add(scene.row_at(rng.uniform(0.3, 0.8)), _box, rng.uniform(sw_r0 + 0.3, sw_r1 - 0.3), STATIC)
    if rng.random() < 0.5:
        add(scene.row_at(rng.uniform(0.3, 0.8)), _box, rng.uniform(sw_l0 + 0.3, sw_l1 - 0.3), DYNAMIC)
    if rng.random() < 0.3:
        add(scene.row_at(rng.uniform(0.2, 0.6)), _polegroup, sw_r0 + 0.4)
    if rng.random() < 0.3:
        add(scene.row_at(rng.uniform(0.2, 0.5)), _guard_rail, -R + 0.1)
    if rng.random() < 0.25:
        add(scene.row_at(rng.uniform(0.2, 0.5)), _trailer, rng.uniform(-R + 1.2, R - 1.2))
    for y, _, fn, args in sorted(objects, key=lambda item: (item[0], item[1])):
        fn(scene, y, *args)

    _ego_and_border(scene)


def _windows(scene, pts, window, rng, height_m):
    """Grid of windows on a facade quad (bilinear placement)."""
    (xa_b, ya_b), (xa_t, ya_t), (xb_t, yb_t), (xb_b, yb_b) = pts
    cols = max(1, int(rng.integers(2, 7)))
    rows = max(1, int(height_m / 3.2))
    for i in range(cols):
        p0, p1 = (i + 0.25) / cols, (i + 0.75) / cols
        for j in range(rows):
            t0, t1 = (j + 0.3) / rows, (j + 0.75) / rows
            quad = []
            for p, t in ((p0, t0), (p0, t1), (p1, t1), (p1, t0)):
                xb, yb = xa_b + p * (xb_b - xa_b), ya_b + p * (yb_b - ya_b)
                xt, yt = xa_t + p * (xb_t - xa_t), ya_t + p * (yb_t - ya_t)
                quad.append((xb + t * (xt - xb), yb + t * (yt - yb)))
            scene.poly(quad, window)


def _upright_box(scene, u, y, width_m, h0, h1, mat):
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    scene.rect(x - width_m * s / 2, y - h1 * s, x + width_m * s / 2, y - h0 * s, mat)


def _wheels(scene, u, y, half_track, radius_m, mat):
    s = scene.scale(y)
    for side in (-1, 1):
        x = scene.ground_x(u + side * half_track, y)
        scene.rect(x - 0.13 * s, y - 2 * radius_m * s, x + 0.13 * s, y, mat)


def _car(scene, y, u):
    rng = scene.rng
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    body = scene.material(CAR, (35, 65, 175), "metal", jitter=25)
    dark = scene.material(CAR, (25, 25, 30), jitter=5)
    glass = scene.material(CAR, (60, 75, 95), "metal", jitter=8)
    light = scene.material(CAR, (200, 30, 30), jitter=10)
    w = rng.uniform(1.7, 1.9)
    _wheels(scene, u, y, w / 2 - 0.2, 0.32, dark)
    scene.rect(x - w * s / 2, y - 1.0 * s, x + w * s / 2, y - 0.25 * s, body)
    scene.poly([(x - w * s / 2 + 0.1 * s, y - 1.0 * s), (x - w * s / 2 + 0.35 * s, y - 1.5 * s),
                (x + w * s / 2 - 0.35 * s, y - 1.5 * s), (x + w * s / 2 - 0.1 * s, y - 1.0 * s)], body)
    scene.poly([(x - w * s / 2 + 0.25 * s, y - 1.02 * s), (x - w * s / 2 + 0.42 * s, y - 1.42 * s),
                (x + w * s / 2 - 0.42 * s, y - 1.42 * s), (x + w * s / 2 - 0.25 * s, y - 1.02 * s)], glass)
    for side in (-1, 1):
        cx = x + side * (w / 2 - 0.2) * s
        scene.rect(cx - 0.12 * s, y - 0.85 * s, cx + 0.12 * s, y - 0.7 * s, light)


def _truck(scene, y, u):
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    box = scene.material(TRUCK, (190, 190, 180), "metal", jitter=15)
    frame = scene.material(TRUCK, (30, 35, 60), jitter=8)
    dark = scene.material(TRUCK, (20, 20, 22), jitter=4)
    _wheels(scene, u, y, 0.95, 0.5, dark)
    scene.rect(x - 1.25 * s, y - 1.2 * s, x + 1.25 * s, y - 0.6 * s, frame)
    scene.rect(x - 1.25 * s, y - 3.6 * s, x + 1.25 * s, y - 1.2 * s, box)
    scene.rect(x - 1.1 * s, y - 3.4 * s, x + 1.1 * s, y - 3.3 * s, frame)


def _bus(scene, y, u):
    H = scene.H
    y_far = max(scene.yh + 1.5, y - scene.rng.uniform(0.08, 0.18) * (H - scene.yh))
    body = scene.material(BUS, (20, 120, 135), "metal", jitter=15)
    glass = scene.material(BUS, (35, 50, 60), jitter=6)
    pts = scene.side_plane(u, y_far, y, 0.3, 3.2, body)
    scene.side_plane(u, y_far, y, 1.6, 2.7, glass)
    # rear face of the bus, towards the camera
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    scene.rect(x, y - 3.2 * s, x + 2.5 * s, y - 0.3 * s, body)
    scene.rect(x + 0.25 * s, y - 2.8 * s, x + 2.25 * s, y - 1.7 * s, glass)
    return pts


def _tram(scene, y, u):
    H = scene.H
    y_far = max(scene.yh + 1.0, y - scene.rng.uniform(0.05, 0.1) * (H - scene.yh))
    body = scene.material(TRAIN, (200, 215, 210), "metal", jitter=12)
    band = scene.material(TRAIN, (30, 90, 100), jitter=8)
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    scene.side_plane(u + 1.2, y_far, y, 0.3, 3.5, body)
    scene.rect(x - 1.3 * s, y - 3.5 * s, x + 1.3 * s, y - 0.3 * s, body)
    scene.rect(x - 1.1 * s, y - 3.0 * s, x + 1.1 * s, y - 1.9 * s, band)
    scene.rect(x - 1.3 * s, y - 1.2 * s, x + 1.3 * s, y - 0.9 * s, band)


def _person(scene, y, u):
    rng = scene.rng
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    h = rng.uniform(1.6, 1.9)
    shirt = scene.material(PERSON, (175, 35, 70), jitter=25)
    legs = scene.material(PERSON, (45, 40, 60), jitter=10)
    skin = scene.material(PERSON, (215, 170, 140), jitter=10)
    leg_w = max(1.0, 0.14 * s)
    scene.line(x - 0.1 * s, y - 0.9 * s, x - 0.12 * s, y, legs, leg_w)
    scene.line(x + 0.1 * s, y - 0.9 * s, x + 0.12 * s, y, legs, leg_w)
    scene.ellipse(x, y - (0.9 + (h - 1.15) / 2) * s, 0.22 * s, (h - 1.05) / 2 * s, shirt)
    scene.circle(x, y - (h - 0.12) * s, max(0.6, 0.12 * s), skin)


def _bike_frame(scene, y, u, mat_wheel, mat_frame, radius_m, thick_m):
    """Side view two-wheeler; returns the saddle position (x, y)."""
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    r = radius_m * s
    t = max(1.0, thick_m * s)
    xa, xb = x - 0.55 * s, x + 0.55 * s
    scene.circle(xa, y - r, r, mat_wheel, t)
    scene.circle(xb, y - r, r, mat_wheel, t)
    seat = (x - 0.15 * s, y - 0.95 * s)
    bar = (xb - 0.1 * s, y - 1.05 * s)
    for p, q in ((( xa, y - r), seat), (seat, (x + 0.1 * s, y - r)), ((x + 0.1 * s, y - r), (xb, y - r)),
                 (seat, bar), (bar, (xb, y - r)), ((xa, y - r), (x + 0.1 * s, y - r))):
        scene.line(p[0], p[1], q[0], q[1], mat_frame, t)
    return seat, s


def _rider_on(scene, seat, s, jacket_color):
    x, y = seat
    jacket = scene.material(RIDER, jacket_color, jitter=20)
    skin = scene.material(RIDER, (210, 165, 135), jitter=8)
    pants = scene.material(RIDER, (50, 45, 40), jitter=8)
    scene.line(x, y, x + 0.35 * s, y + 0.45 * s, pants, max(1.0, 0.14 * s))
    scene.ellipse(x + 0.1 * s, y - 0.35 * s, 0.18 * s, 0.38 * s, jacket, angle=15)
    scene.circle(x + 0.2 * s, y - 0.85 * s, max(0.6, 0.12 * s), skin)


def _bicycle(scene, y, u):
    frame = scene.material(BICYCLE, (150, 25, 45), jitter=15)
    return _bike_frame(scene, y, u, frame, frame, 0.34, 0.05)


def _cyclist(scene, y, u):
    seat, s = _bicycle(scene, y, u)
    _rider_on(scene, seat, s, (235, 125, 35))


def _motorcycle(scene, y, u, with_rider=False):
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    wheel = scene.material(MOTORCYCLE, (25, 25, 35), jitter=5)
    body = scene.material(MOTORCYCLE, (110, 50, 210), "metal", jitter=20)
    seat, _ = _bike_frame(scene, y, u, wheel, body, 0.32, 0.1)
    scene.ellipse(x, y - 0.6 * s, 0.5 * s, 0.22 * s, body)
    if with_rider:
        _rider_on(scene, seat, s, (240, 190, 40))


def _pole(scene, y, u, kind):
    rng = scene.rng
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    h = rng.uniform(3.5, 4.5)
    pole = scene.material(POLE, (140, 140, 145), jitter=10)
    scene.rect(x - max(0.5, 0.07 * s), y - h * s, x + max(0.5, 0.07 * s), y, pole)
    if kind == "sign":
        shape = rng.integers(3)
        r = max(1.5, 0.35 * s)
        cy = y - (h - 0.4) * s
        if shape == 0:
            scene.circle(x, cy, r, scene.material(SIGN, (215, 30, 35), jitter=10))
            scene.circle(x, cy, r * 0.65, scene.material(SIGN, (235, 235, 230), jitter=5))
        elif shape == 1:
            scene.rect(x - r, cy - r, x + r, cy + r, scene.material(SIGN, (30, 80, 190), jitter=10))
        else:
            scene.poly([(x, cy - r * 1.2), (x + r * 1.2, cy), (x, cy + r * 1.2), (x - r * 1.2, cy)],
                       scene.material(SIGN, (240, 200, 20), jitter=10))
    elif kind == "light":
        w, hh = max(1.5, 0.2 * s), max(3.0, 0.5 * s)
        top = y - h * s
        scene.rect(x - w, top, x + w, top + 2 * hh, scene.material(LIGHT, (210, 165, 40), jitter=10))
        lamp = [(225, 40, 30), (240, 200, 40), (40, 220, 90)][rng.integers(3)]
        k = rng.integers(3)
        scene.circle(x, top + (k + 0.5) * 2 * hh / 3, max(0.6, w * 0.6), scene.material(LIGHT, lamp, jitter=10))


def _polegroup(scene, y, u):
    s = scene.scale(y)
    group = scene.material(POLEGROUP, (140, 140, 145), jitter=10)
    for k in range(3):
        x = scene.ground_x(u, y) + (k - 1) * 0.25 * s
        scene.rect(x - max(0.5, 0.05 * s), y - 3.0 * s, x + max(0.5, 0.05 * s), y, group)


def _tree(scene, y, u):
    rng = scene.rng
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    trunk = scene.material(VEGETATION, (90, 70, 45), jitter=10)
    leaves = scene.material(VEGETATION, (70, 125, 45), "blotch", jitter=15)
    scene.rect(x - 0.15 * s, y - 3.0 * s, x + 0.15 * s, y, trunk)
    r = rng.uniform(1.4, 2.6)
    for _ in range(4):
        scene.ellipse(x + rng.normal(0, 0.5) * s, y - (3.2 + r * 0.6 + rng.normal(0, 0.4)) * s,
                      r * rng.uniform(0.7, 1.0) * s, r * rng.uniform(0.6, 0.9) * s, leaves)
    # a low hedge beside the trunk
    scene.ellipse(x + 0.8 * s, y - 0.4 * s, 0.9 * s, 0.45 * s, leaves)


def _wall(scene, y, u):
    H = scene.H
    y_far = max(scene.yh + 1.0, y - scene.rng.uniform(0.1, 0.25) * (H - scene.yh))
    scene.side_plane(u, y_far, y, 0.0, scene.rng.uniform(1.0, 1.8),
                     scene.material(WALL, (190, 192, 205), "bricks"))


def _fence(scene, y, u):
    H = scene.H
    y_far = max(scene.yh + 1.0, y - scene.rng.uniform(0.1, 0.25) * (H - scene.yh))
    scene.side_plane(u, y_far, y, 0.0, scene.rng.uniform(1.2, 1.8),
                     scene.material(FENCE, (125, 95, 135), "lattice"))


def _guard_rail(scene, y, u):
    H = scene.H
    y_far = max(scene.yh + 1.0, y - 0.2 * (H - scene.yh))
    scene.side_plane(u, y_far, y, 0.45, 0.8, scene.material(GUARD_RAIL, (185, 185, 190), "metal"))


def _box(scene, y, u, label_id):
    color = (95, 100, 80) if label_id == STATIC else (150, 90, 40)
    _upright_box(scene, u, y, 0.6, 0.0, 1.0, scene.material(label_id, color, jitter=10))


def _trailer(scene, y, u):
    s = scene.scale(y)
    x = scene.ground_x(u, y)
    scene.rect(x - 1.0 * s, y - 1.4 * s, x + 1.0 * s, y - 0.3 * s,
               scene.material(TRAILER, (160, 150, 130), "metal", jitter=10))


def _ego_and_border(scene):
    """Void frame of every Cityscapes image: the ego car's hood and the border left
    by rectification."""
    rng, H, W = scene.rng, scene.H, scene.W
    hood = scene.material(EGO, (35, 35, 40), "metal", jitter=5)
    scene.ellipse(W * rng.uniform(0.45, 0.55), H + H * 0.02, W * 0.6, H * rng.uniform(0.07, 0.1), hood)
    border = scene.material(BORDER, (10, 10, 10), jitter=2)
    b = max(1.0, W * 0.003)
    scene.rect(-1, -1, b - 1, H + 1, border)
    scene.rect(W - b, -1, W + 1, H + 1, border)
    scene.rect(-1, H - b, W + 1, H + 1, border)


def render_scene(rng, height, width, labelled=True, max_attempts=30):
    """Render one scene: (RGB uint8 image, label-id uint8 map).

    A labelled scene is redrawn (with fresh random choices) until every one of the 19
    train classes is visible; an unlabelled (test-split) scene keeps only the void frame
    in its label map.
    """
    if height < MIN_HEIGHT or width < MIN_WIDTH:
        raise InvalidInputError(f"synthetic scenes need height >= {MIN_HEIGHT} and width >= {MIN_WIDTH} "
                                f"(got {height} x {width}) so that every class stays visible")
    for _ in range(max_attempts):
        scene = _Scene(rng, height, width)
        _build_street(scene)
        label = scene.label_ids()
        present = np.unique(labelid_to_trainid(label))
        if (present[present < NUM_CLASSES].size == NUM_CLASSES) or not labelled:
            break
    else:
        raise RuntimeError(f"could not fit all {NUM_CLASSES} classes into a {height} x {width} scene")
    image = scene.render()
    if not labelled:
        label = np.where(np.isin(label, (EGO, BORDER)), label, UNLABELED).astype(np.uint8)
    return image, label


# ----------------------------------------------------------------------------------------
# Dataset files
# ----------------------------------------------------------------------------------------
def _write_png(path, array):
    if not cv2.imwrite(path, array):
        raise UnreadableInputError(f"could not write {path} (full disk or no permission?)")


def _write_sample(root, split, index, seed, height, width, color, layout=LAYOUTS[0]):
    city, name = sample_name(split, index)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))
    image, label = render_scene(rng, height, width, labelled=(split != "test"))
    if layout == "folder":
        _write_folder_sample(root, split, city, name, image, label, color)
        return
    img_dir = os.path.join(root, "leftImg8bit", split, city)
    gt_dir = os.path.join(root, "gtFine", split, city)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    _write_png(os.path.join(img_dir, f"{name}_leftImg8bit.png"), image[:, :, ::-1])
    _write_png(os.path.join(gt_dir, f"{name}_gtFine_labelIds.png"), label)
    if color:
        rgb = colorize(labelid_to_trainid(label))
        _write_png(os.path.join(gt_dir, f"{name}_gtFine_color.png"), rgb[:, :, ::-1])


def _write_folder_sample(root, split, city, name, image, label, color):
    """One scene in the folder layout: the image, its train ids (not for test), its colours."""
    folders = {kind: os.path.join(root, kind, split, city) for kind in ("images", "labels", "colors")}
    os.makedirs(folders["images"], exist_ok=True)
    _write_png(os.path.join(folders["images"], f"{name}.png"), image[:, :, ::-1])
    if split == "test":
        return
    train_ids = labelid_to_trainid(label)
    os.makedirs(folders["labels"], exist_ok=True)
    _write_png(os.path.join(folders["labels"], f"{name}.png"), train_ids)
    if color:
        os.makedirs(folders["colors"], exist_ok=True)
        _write_png(os.path.join(folders["colors"], f"{name}.png"), colorize(train_ids)[:, :, ::-1])


def synthetic_class_table():
    """The folder layout's class table: the 19 train classes stored as their train ids."""
    return ClassTable(TRAIN_CLASS_NAMES, TRAIN_CLASS_COLORS, source="datasets.synthetic")


def _params(train, val, test, height, width, seed, color, layout=LAYOUTS[0]):
    params = dict(generator="datasets.synthetic", version=GENERATOR_VERSION, train=int(train),
                  val=int(val), test=int(test), height=int(height), width=int(width),
                  seed=int(seed), color=bool(color))
    if layout != LAYOUTS[0]:
        params["layout"] = layout
    return params


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise InvalidInputError(f"synthetic: layout must be one of {LAYOUTS}, got {layout!r}")


def _generate_into(root, params, progress):
    from tqdm import tqdm

    layout = params.get("layout", LAYOUTS[0])
    jobs = [(split, i) for split in ("train", "val", "test") for i in range(params[split])]
    with tqdm(total=len(jobs), desc="synthetic cityscapes", unit="img", disable=not progress,
              leave=False) as bar:
        for split, index in jobs:
            _write_sample(root, split, index, params["seed"], params["height"], params["width"],
                          params["color"], layout)
            bar.update(1)
    if layout == "folder":
        synthetic_class_table().write_yaml(os.path.join(root, CLASS_TABLE_NAME))
    with open(os.path.join(root, MANIFEST_NAME), "w") as f:
        json.dump(params, f, indent=2, sort_keys=True)
        f.write("\n")


def generate(out_dir, train=DEFAULTS["train"], val=DEFAULTS["val"], test=DEFAULTS["test"],
             height=DEFAULTS["height"], width=DEFAULTS["width"], seed=DEFAULTS["seed"],
             color=DEFAULTS["color"], overwrite=False, progress=True, layout=LAYOUTS[0]):
    """Write a synthetic dataset to ``out_dir`` atomically and return its path.

    The files are produced in a temporary directory beside ``out_dir`` and moved into
    place at the end, so an interrupted run leaves nothing half-written.  An existing
    ``out_dir`` is an error unless ``overwrite``.  ``layout``: 'cityscapes' (the official
    layout and label ids) or 'folder' (module docstring).
    """
    _check_layout(layout)
    for key, value in (("train", train), ("val", val), ("test", test), ("seed", seed)):
        if int(value) < 0:
            raise InvalidInputError(f"synthetic: {key} must be >= 0, got {value}")
    if height < MIN_HEIGHT or width < MIN_WIDTH:
        raise InvalidInputError(f"synthetic: height must be >= {MIN_HEIGHT} and width >= {MIN_WIDTH}, "
                                f"got {height} x {width}")
    params = _params(train, val, test, height, width, seed, color, layout)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ExistingOutputError(f"synthetic: {out_dir} already exists (use overwrite=True / --overwrite "
                                  f"to replace it)")
    if os.path.exists(out_dir) and read_manifest(out_dir) is None:
        raise ExistingOutputError(f"synthetic: {out_dir} exists and is not a dataset this generator made (no "
                                  f"{MANIFEST_NAME}): it is never replaced; choose another --out")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the dataset is for everyone the umask allows
    try:
        _generate_into(tmp, params, progress)
        if os.path.exists(out_dir) and not overwrite:
            raise ExistingOutputError(f"synthetic: {out_dir} appeared while generating")
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "data"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(root):
    """The generation parameters stored in ``root``, or None when there is no manifest."""
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_synthetic(root, train=DEFAULTS["train"], val=DEFAULTS["val"], test=DEFAULTS["test"],
                     height=DEFAULTS["height"], width=DEFAULTS["width"], seed=DEFAULTS["seed"],
                     color=DEFAULTS["color"], progress=True, layout=LAYOUTS[0]):
    """Return ``root``, generating the synthetic dataset there first if it is absent.

    An existing root made with other parameters (or not made by this generator) is an
    error that says what differs, never silently reused.  Safe against concurrent callers
    (e.g. several ranks): each generates privately and the first to finish wins.
    """
    _check_layout(layout)
    root = os.path.abspath(root)
    wanted = _params(train, val, test, height, width, seed, color, layout)
    if not os.path.exists(root):
        log.info("synthetic Cityscapes not found at %s; generating it (%d train, %d val, %d test, "
                 "%dx%d, seed %d)", root, train, val, test, height, width, seed)
        try:
            generate(root, overwrite=False, progress=progress, layout=layout,
                     **{k: wanted[k] for k in DEFAULTS})
        except FileExistsError:
            pass  # somebody else generated it meanwhile; check it below
        except OSError as err:
            if not os.path.exists(os.path.join(root, MANIFEST_NAME)):
                raise
            log.debug("concurrent generation finished first (%s)", err)
    found = read_manifest(root)
    if found is None:
        raise ExistingOutputError(f"{root} exists but holds no {MANIFEST_NAME}: it was not made by "
                                  f"datasets.synthetic (or generation was interrupted). Remove it or "
                                  f"point the synthetic root elsewhere.")
    wanted = dict(wanted, layout=layout)
    found = dict(found, layout=found.get("layout", LAYOUTS[0]))
    diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: found {a!r}, wanted {b!r}" for k, (a, b) in sorted(diff.items()))
        raise InvalidInputError(f"synthetic dataset at {root} was generated with different parameters "
                                f"({text}). Delete it to regenerate, or ask for the parameters it has.")
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="inverseform-synthetic",
        description="Write a synthetic dataset in the exact Cityscapes layout "
                    "(leftImg8bit/, gtFine/ *_gtFine_labelIds.png with real label ids), or with "
                    "--layout folder in the generic folder layout (images/, labels/ with train ids, "
                    "classes.yaml).")
    parser.add_argument_group("required arguments").add_argument("--out", required=True,
                                                                 help="output root directory")
    parser.add_argument("--train", type=int, default=DEFAULTS["train"], help="train images")
    parser.add_argument("--val", type=int, default=DEFAULTS["val"], help="val images")
    parser.add_argument("--test", type=int, default=DEFAULTS["test"],
                        help="test images (their label files hold only void ids, as in Cityscapes)")
    parser.add_argument("--height", type=int, default=DEFAULTS["height"],
                        help=f"image height in pixels (default {DEFAULTS['height']})")
    parser.add_argument("--width", type=int, default=DEFAULTS["width"],
                        help=f"image width in pixels (default {DEFAULTS['width']})")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="random seed: the same seed and sizes give byte-identical files")
    parser.add_argument("--color", action="store_true",
                        help="also write the labels in colour (*_gtFine_color.png; colors/ in the folder layout)")
    parser.add_argument("--layout", choices=LAYOUTS, default=LAYOUTS[0],
                        help="cityscapes (default): the official layout; folder: images/<split>/, "
                             "labels/<split>/ (train ids) and classes.yaml, for datasets.FolderSegmentation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    kwargs = dict(train=args.train, val=args.val, test=args.test, height=args.height,
                  width=args.width, seed=args.seed, color=args.color, progress=not args.quiet,
                  layout=args.layout)
    try:
        if args.overwrite or not os.path.exists(args.out):
            root = generate(args.out, overwrite=args.overwrite, **kwargs)
            layout = "" if args.layout == LAYOUTS[0] else f" ({args.layout} layout)"
            print(f"wrote synthetic Cityscapes{layout} to {root}")
        else:
            root = ensure_synthetic(args.out, **kwargs)
            print(f"{root} already holds this synthetic dataset; nothing to do")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
