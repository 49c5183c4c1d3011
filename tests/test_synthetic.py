"""The synthetic Cityscapes: official layout and ids, determinism, every class, learnable."""
import filecmp
import json
import os
import re

import cv2
import numpy as np
import pytest

import datasets.synthetic as synthetic
from datasets import resolve_root
from datasets.labels import labelid_to_trainid

OFFICIAL_CITIES = {
    "train": {"aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg",
              "hanover", "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen",
              "ulm", "weimar", "zurich"},
    "val": {"frankfurt", "lindau", "munster"},
    "test": {"berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich"},
}


@pytest.fixture(scope="module")
def official():
    """The official label table (cityscapesscripts, the test extra): the tests that compare with it
    skip without it, the others run."""
    labels = pytest.importorskip("cityscapesscripts.helpers.labels").labels
    return {"valid": {lb.id for lb in labels if lb.id >= 0},
            "void": {lb.id for lb in labels if lb.category == "void" and lb.id >= 0},
            "train_id_of": {lb.id: lb.trainId for lb in labels if lb.id >= 0}}


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def label_files(root, split):
    return [f for f in all_files(root) if f.startswith(f"gtFine/{split}/") and f.endswith("_labelIds.png")]


def official_train_ids(path, official):
    ids = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    lut = np.full(256, 255, np.int64)
    for lid, tid in official["train_id_of"].items():
        lut[lid] = tid
    return ids, lut[ids]


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """The embedded default, produced the way every command gets it: resolve_root() with
    no dataset configured generates the default-size synthetic dataset."""
    root = tmp_path_factory.mktemp("default") / "synthetic_cityscapes"
    saved = {k: os.environ.pop(k, None) for k in ("CITYSCAPES_DATASET", "INVERSEFORM_SYNTHETIC_DIR")}
    os.environ["INVERSEFORM_SYNTHETIC_DIR"] = str(root)
    try:
        resolved, is_synthetic = resolve_root()
    finally:
        os.environ.pop("INVERSEFORM_SYNTHETIC_DIR")
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    assert is_synthetic and resolved == str(root)
    return resolved


def test_same_seed_gives_byte_identical_files(tmp_path):
    kwargs = dict(train=3, val=2, test=1, height=64, width=128, seed=11, color=True, progress=False)
    a = synthetic.generate(str(tmp_path / "a"), **kwargs)
    b = synthetic.generate(str(tmp_path / "b"), **kwargs)
    files = all_files(a)
    assert files == all_files(b) and len(files) == 2 * 6 + 6 + 1  # image + labelIds + color, manifest
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    c = synthetic.generate(str(tmp_path / "c"), **dict(kwargs, seed=12))
    images = [f for f in files if f.startswith("leftImg8bit/")]
    assert len(filecmp.cmpfiles(a, c, images, shallow=False)[1]) == len(images)
    # a larger dataset only appends: image i depends on (seed, split, i) alone
    d = synthetic.generate(str(tmp_path / "d"), **dict(kwargs, train=4))
    assert not filecmp.cmpfiles(a, d, [f for f in files if f.endswith(".png")], shallow=False)[1]


def test_names_and_ids_follow_cityscapes_conventions(tiny_cityscapes, official):
    files = all_files(tiny_cityscapes)
    counts = {"train": 0, "val": 0, "test": 0}
    for rel in files:
        if rel == synthetic.MANIFEST_NAME:
            continue
        m = re.fullmatch(r"(leftImg8bit|gtFine)/(train|val|test)/([a-z]+)/\3_(\d{6})_(\d{6})_"
                         r"(leftImg8bit|gtFine_labelIds)\.png", rel)
        assert m, rel
        kind, split, city, _, _, suffix = m.groups()
        assert city in OFFICIAL_CITIES[split], rel
        assert (kind == "leftImg8bit") == (suffix == "leftImg8bit"), rel
        if kind == "leftImg8bit":
            counts[split] += 1
            label = rel.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            assert label in files, f"{rel} has no label file"
            image = cv2.imread(os.path.join(tiny_cityscapes, rel), cv2.IMREAD_UNCHANGED)
            assert image.shape == (64, 128, 3) and image.dtype == np.uint8
    assert counts == {"train": 6, "val": 4, "test": 2}
    void_seen = set()
    for split in ("train", "val"):
        for rel in label_files(tiny_cityscapes, split):
            ids, _ = official_train_ids(os.path.join(tiny_cityscapes, rel), official)
            assert ids.shape == (64, 128) and ids.dtype == np.uint8
            values = set(np.unique(ids).tolist())
            assert values <= official["valid"], (rel, values - official["valid"])
            assert {1, 2} <= values  # ego vehicle and rectification border in every frame
            void_seen |= values & official["void"]
    assert len(void_seen) >= 4, void_seen
    for rel in label_files(tiny_cityscapes, "test"):  # test labels: only the void frame
        ids = cv2.imread(os.path.join(tiny_cityscapes, rel), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(ids).tolist()) <= {0, 1, 2}
    manifest = json.load(open(os.path.join(tiny_cityscapes, synthetic.MANIFEST_NAME)))
    assert (manifest["train"], manifest["val"], manifest["height"], manifest["width"]) == (6, 4, 64, 128)


def test_default_size_dataset_has_every_class(default_dataset, official):
    manifest = json.load(open(os.path.join(default_dataset, synthetic.MANIFEST_NAME)))
    assert {k: manifest[k] for k in synthetic.DEFAULTS} == synthetic.DEFAULTS
    assert manifest["train"] >= 100 and manifest["height"] >= 256
    union = set()
    for split in ("train", "val"):
        files = label_files(default_dataset, split)
        assert len(files) == manifest[split]
        for rel in files:
            _, train_ids = official_train_ids(os.path.join(default_dataset, rel), official)
            present = set(np.unique(train_ids).tolist()) - {255}
            assert present == set(range(19)), (rel, set(range(19)) - present)  # every class, every image
            union |= present
    assert union == set(range(19))


def test_every_class_at_the_minimum_size():
    for seed in range(5):
        _, ids = synthetic.render_scene(np.random.default_rng(seed), synthetic.MIN_HEIGHT, synthetic.MIN_WIDTH)
        assert set(np.unique(labelid_to_trainid(ids))) - {255} == set(range(19))
    with pytest.raises(ValueError, match="height"):
        synthetic.render_scene(np.random.default_rng(0), 32, 64)


def test_scenes_are_learnable():
    """A look-up-table classifier on (quantised colour, image row band), fit on 4 scenes and
    tested on 3 others, must beat predicting the majority class by a wide margin; a
    convolutional model, which also sees texture and shape, can only do better."""
    height, width = 128, 256

    def scene(seed):
        image, ids = synthetic.render_scene(np.random.default_rng(100 + seed), height, width)
        q = cv2.blur(image, (3, 3)).astype(np.int64) // 16
        band = (np.arange(height) * 8 // height)[:, None]
        key = ((q[..., 0] * 16 + q[..., 1]) * 16 + q[..., 2]) * 8 + band
        return key.ravel(), labelid_to_trainid(ids).ravel()
    table = np.zeros((16 ** 3 * 8, 19), np.int64)
    for key, target in (scene(s) for s in range(4)):
        keep = target != 255
        np.add.at(table, (key[keep], target[keep]), 1)
    fallback = table.sum(0).argmax()
    predict = np.where(table.sum(1) > 0, table.argmax(1), fallback)
    correct = total = 0
    counts = np.zeros(19)
    for key, target in (scene(s) for s in (10, 11, 12)):
        keep = target != 255
        correct += (predict[key[keep]] == target[keep]).sum()
        total += keep.sum()
        counts += np.bincount(target[keep], minlength=19)
    accuracy, majority = correct / total, counts.max() / total
    assert accuracy > majority + 0.15, (accuracy, majority)


def test_ensure_synthetic_reuses_refuses_and_never_leaves_half_written(tmp_path, monkeypatch):
    kwargs = dict(train=2, val=1, test=0, height=64, width=128, seed=0, progress=False)
    root = str(tmp_path / "data")
    assert synthetic.ensure_synthetic(root, **kwargs) == root
    stamp = os.stat(os.path.join(root, synthetic.MANIFEST_NAME)).st_mtime_ns
    assert synthetic.ensure_synthetic(root, **kwargs) == root  # reused, not rewritten
    assert os.stat(os.path.join(root, synthetic.MANIFEST_NAME)).st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"different parameters \(seed: found 0, wanted 1"):
        synthetic.ensure_synthetic(root, **dict(kwargs, seed=1))
    os.makedirs(tmp_path / "foreign" / "leftImg8bit")
    with pytest.raises(FileExistsError, match="no synthetic.json"):
        synthetic.ensure_synthetic(str(tmp_path / "foreign"), **kwargs)

    # an interrupted generation leaves neither the root nor temporary directories behind
    calls = []
    real = synthetic._write_sample

    def crash_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args)
    monkeypatch.setattr(synthetic, "_write_sample", crash_on_third)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic(str(tmp_path / "interrupted"), **kwargs)
    assert sorted(os.listdir(tmp_path)) == before


def test_command_line(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--out", out, "--train", "1", "--val", "1", "--test", "1", "--height", "64", "--width", "128",
            "--seed", "3", "--quiet"]
    assert synthetic.main(args) == 0
    assert len(all_files(out)) == 7
    assert synthetic.main(args) == 0 and "nothing to do" in capsys.readouterr().out
    assert synthetic.main(args[:-3] + ["--seed", "4", "--quiet"]) == 2
    assert "seed: found 3, wanted 4" in capsys.readouterr().err
