"""Training/validation transforms: geometry keeps image, label and edge aligned."""
import cv2
import numpy as np
import pytest

from datasets.edges import edge_target
from datasets.labels import colorize, labelid_to_trainid
from datasets.synthetic import render_scene
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, ValTransform

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


def denormalize(image_tensor):
    img = image_tensor.numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(np.round(img * 255), 0, 255).astype(np.int32)


def painted_scene(seed=0, height=96, width=160):
    """A label map and an image drawn from it (each pixel the colour of its class)."""
    _, label_ids = render_scene(np.random.default_rng(seed), height, width)
    label = labelid_to_trainid(label_ids)
    label[label == 255] = 0  # make every pixel a real class, so the pad is recognisable
    return colorize(label), label


def interior(label):
    """Pixels whose 3x3 neighbourhood has a single label value (the outer ring of the crop
    is excluded: its bilinear footprint reaches source pixels outside the crop)."""
    lo = cv2.erode(label, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    hi = cv2.dilate(label, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    same = lo == hi
    same[[0, -1], :] = False
    same[:, [0, -1]] = False
    return same


def block_scene(seed=0, height=96, width=160):
    """Random classes on a grid of rectangles 5..12 pixels wide.  Axis-aligned blocks keep
    bilinear (image) and nearest (label) sampling consistent at every scale: if the labels
    sampled around a pixel agree, every source pixel in between has that label too."""
    rng = np.random.default_rng(seed)
    ys = np.cumsum(rng.integers(5, 13, height))
    xs = np.cumsum(rng.integers(5, 13, width))
    grid = rng.integers(0, 19, (height, width)).astype(np.uint8)
    rows = np.searchsorted(ys, np.arange(height), side="right")
    cols = np.searchsorted(xs, np.arange(width), side="right")
    label = grid[rows][:, cols]
    return colorize(label), np.ascontiguousarray(label)


def test_image_label_edge_stay_aligned_through_scale_crop_flip():
    image, label = block_scene()
    transform = TrainTransform(crop_size=(72, 120), scale_range=(0.5, 2.0), flip=True)
    pad_color = np.round(MEAN * 255).astype(np.int32)
    palette = colorize(np.arange(256, dtype=np.uint8)[None, :])[0].astype(np.int32)
    seen_flip = seen_pad = 0
    for seed in range(30):
        out = transform(image, label, rng=np.random.default_rng(seed))
        img, lab = denormalize(out["image"]), out["label"].numpy().astype(np.uint8)
        assert img.shape == (72, 120, 3) and lab.shape == (72, 120)
        assert out["edge"].shape == (1, 72, 120)
        assert np.array_equal(out["edge"][0].numpy().astype(np.uint8), edge_target(lab, 2))
        inside = interior(lab)
        classes = inside & (lab != 255)
        assert classes.sum() > 100
        assert np.abs(img[classes] - palette[lab[classes]]).max() <= 2
        pad = inside & (lab == 255)
        if pad.any():
            seen_pad += 1
            assert np.abs(img[pad] - pad_color).max() <= 1
        seen_flip += int(_was_flipped(transform, image, label, seed, lab))
    assert seen_pad > 0 and 0 < seen_flip < 30


def test_scene_keeps_its_orientation():
    image, label = painted_scene()
    transform = TrainTransform(crop_size=(80, 140), scale_range=(0.5, 1.0), flip=True)
    rows = np.arange(80)[:, None].repeat(140, 1)
    checked = 0
    for seed in range(20):
        lab = transform(image, label, rng=np.random.default_rng(seed))["label"].numpy()
        if (lab == 10).any() and (lab == 0).any():  # sky above road
            assert rows[lab == 10].mean() < rows[lab == 0].mean()
            checked += 1
    assert checked > 5


def _was_flipped(transform, image, label, seed, lab):
    no_flip = TrainTransform(crop_size=transform.crop_size, scale_range=transform.scale_range, flip=False)
    plain = no_flip(image, label, rng=np.random.default_rng(seed))["label"].numpy().astype(np.uint8)
    if np.array_equal(plain, lab):
        return False
    assert np.array_equal(plain[:, ::-1], lab)
    return True


def test_unit_scale_crop_is_an_exact_slice():
    image, label = painted_scene(seed=1)
    image = (np.random.default_rng(0).random(image.shape) * 255).astype(np.uint8)
    transform = TrainTransform(crop_size=(40, 64), scale_range=(1.0, 1.0), flip=False)
    for seed in range(5):
        out = transform(image, label, rng=np.random.default_rng(seed))
        lab = out["label"].numpy().astype(np.uint8)
        img = denormalize(out["image"])
        matches = [(y, x) for y in range(96 - 40 + 1) for x in range(160 - 64 + 1)
                   if np.array_equal(image[y:y + 40, x:x + 64], img)]
        assert len(matches) == 1
        y, x = matches[0]
        assert np.array_equal(label[y:y + 40, x:x + 64], lab)


def test_scale_changes_object_size():
    image, label = painted_scene(seed=2)
    small = TrainTransform(crop_size=(200, 300), scale_range=(0.5, 0.5), flip=False)
    big = TrainTransform(crop_size=(150, 300), scale_range=(2.0, 2.0), flip=False)
    lab_small = small(image, label, rng=np.random.default_rng(0))["label"].numpy()
    lab_big = big(image, label, rng=np.random.default_rng(0))["label"].numpy()
    assert abs((lab_small != 255).sum() - 48 * 80) <= 1  # whole image at half size, padded
    assert (lab_big != 255).sum() == 150 * 300          # crop inside the doubled image


def test_crop_around_center_contains_the_pixel_class_even_if_thin():
    rng = np.random.default_rng(0)
    label = np.zeros((120, 200), np.uint8)
    label[:, 77] = 5                       # a one-pixel pole
    label[33, 150] = 6                     # a single pixel
    image = colorize(label)
    transform = TrainTransform(crop_size=(32, 48), scale_range=(0.5, 2.0))
    for seed in range(60):
        for center, cls in (((77, int(rng.integers(120))), 5), ((150, 33), 6)):
            out = transform(image, label, rng=np.random.default_rng(seed), center=center)
            assert (out["label"] == cls).any(), (seed, center)
    with pytest.raises(ValueError, match="outside"):
        transform(image, label, rng=np.random.default_rng(0), center=(200, 0))


def test_deterministic_for_a_generator_state_and_needs_one():
    image, label = painted_scene(seed=3)
    transform = TrainTransform(crop_size=(48, 48), color_jitter=dict(brightness=0.4, contrast=0.4,
                               saturation=0.4, hue=0.1), blur_prob=0.5)
    a = transform(image, label, rng=np.random.default_rng(5))
    b = transform(image, label, rng=np.random.default_rng(5))
    c = transform(image, label, rng=np.random.default_rng(6))
    for key in ("image", "label", "edge"):
        assert a[key].equal(b[key])
    assert not a["image"].equal(c["image"])
    with pytest.raises(ValueError, match="Generator"):
        transform(image, label)


def test_photometric_changes_only_the_image():
    image, label = painted_scene(seed=4)
    base = TrainTransform(crop_size=(64, 96), flip=False)
    jitter = TrainTransform(crop_size=(64, 96), flip=False, blur_prob=1.0,
                            color_jitter=dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2))
    a = base(image, label, rng=np.random.default_rng(1))
    b = jitter(image, label, rng=np.random.default_rng(1))
    assert a["label"].equal(b["label"]) and a["edge"].equal(b["edge"])
    assert (a["image"] - b["image"]).abs().mean() > 0.05


def test_test_split_without_label_gives_ignore_and_no_edges():
    image, _ = painted_scene(seed=5)
    out = TrainTransform(crop_size=(40, 40))(image, None, rng=np.random.default_rng(0))
    assert (out["label"] == 255).all() and out["edge"].sum() == 0
    val = ValTransform()(image, None)
    assert val["label"].shape == image.shape[:2] and (val["label"] == 255).all()


def test_val_transform_only_normalises():
    image, label = painted_scene(seed=6)
    out = ValTransform()(image, label)
    expected = (image.astype(np.float32) / 255.0 - MEAN) / STD
    assert np.allclose(out["image"].numpy().transpose(1, 2, 0), expected, atol=1e-5)
    assert out["image"].dtype.is_floating_point and out["label"].dtype == __import__("torch").int64
    assert np.array_equal(out["label"].numpy(), label)
    assert np.array_equal(out["edge"][0].numpy(), edge_target(label).astype(np.float32))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=(0, 10))
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="color_jitter"):
        TrainTransform(color_jitter=dict(gamma=0.1))
    with pytest.raises(ValueError, match="uint8 RGB"):
        ValTransform()(np.zeros((4, 4), np.uint8), None)
    with pytest.raises(ValueError, match="sizes differ"):
        ValTransform()(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_label_crop_matches_the_full_transform(seed):
    """The label-only path (used to train the InverseForm regressor) crops exactly what the
    full transform crops from the same generator state, colour jitter and blur included."""
    image, label = painted_scene(seed)
    t = TrainTransform(crop_size=(48, 80), scale_range=(0.5, 1.5), color_jitter={"brightness": 0.3}, blur_prob=0.5)
    full = t(image, label, rng=np.random.default_rng(seed))
    lab, edge = t.label_crop(label, np.random.default_rng(seed))
    assert lab.shape == edge.shape == (48, 80) and lab.dtype == edge.dtype == np.uint8
    assert np.array_equal(lab, full["label"].numpy())
    assert np.array_equal(edge, full["edge"][0].numpy().astype(np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        t.label_crop(label.astype(np.int32), np.random.default_rng(0))
