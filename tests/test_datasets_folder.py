"""The generic folder dataset (datasets.folder), its class table (datasets.class_table), NYUv2-40 as a
configuration of it (datasets.nyu), scribbles on it, images read without their EXIF orientation,
and the synthetic generator's folder layout.

The main oracle: the synthetic generator writes the same scenes in the Cityscapes layout (label ids)
and in the folder layout (train ids + classes.yaml), so FolderSegmentation must give exactly the
samples Cityscapes gives, for every split, transform, seed and class-uniform epoch."""
import filecmp
import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import datasets.folder as folder
import datasets.synthetic as synthetic
from datasets import (Cityscapes, ClassTable, FolderSegmentation, NYUDepthV2, TrainTransform, nyu40_class_table)
from datasets.cityscapes import read_image
from datasets.edges import edge_target
from datasets.labels import (TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES, colorize, labelid_to_trainid,
                             trainid_to_labelid)
from datasets.scribbles import ScribbleCityscapes, ScribbleFolderSegmentation
from utils.errors import InputError, InvalidInputError, MissingInputError, UnreadableInputError

SAMPLE_KEYS = ("image", "label", "edge")
# data/nyud/classes.txt of shelhamer/fcn.berkeleyvision.org (Gupta et al.'s 40 classes, in order)
NYU40_NAMES = ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
               "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
               "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
               "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub",
               "bag", "otherstructure", "otherfurniture", "otherprop"]


def one_line(err):
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, InputError), text
    return text


def same_samples(a, b, indices=None):
    for i in indices if indices is not None else range(len(a)):
        x, y = a[i], b[i]
        assert x["name"] == y["name"], i
        for key in SAMPLE_KEYS:
            assert torch.equal(x[key], y[key]), (i, key)


@pytest.fixture(scope="module")
def tiny_folder(tiny_cityscapes, tmp_path_factory):
    """The scenes of tiny_cityscapes, written in the folder layout."""
    params = synthetic.read_manifest(tiny_cityscapes)
    root = tmp_path_factory.mktemp("tiny_folder") / "folder"
    return synthetic.generate(str(root), progress=False, layout="folder",
                              **{k: params[k] for k in synthetic.DEFAULTS})


@pytest.fixture
def folder_copy(tiny_folder, tmp_path):
    root = tmp_path / "folder"
    shutil.copytree(tiny_folder, root)
    return str(root)


# ----------------------------------------------------------------------------- class table
def test_nyu40_table_has_the_standard_classes_and_mapping():
    table = nyu40_class_table()
    assert list(table.names) == NYU40_NAMES and table.num_classes == 40
    assert len(set(table.colors)) == 40 and (0, 0, 0) not in table.colors
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    stored[stored > 40] = 0
    expected = np.where(stored == 0, 255, stored.astype(np.int64) - 1)
    assert np.array_equal(table.to_train_ids(stored, "x.png"), expected)
    assert table.to_train_ids(np.array([[255]], np.uint8))[0, 0] == 255  # 255 is always ignore
    with pytest.raises(InvalidInputError, match=r"^lbl/7\.png: values \[41, 300\] are not in the class table"
                                                r".*nyu40\.yaml.*1\.\.40 for classes, 0, 255 ignored"):
        table.to_train_ids(np.array([[1, 41], [300, 0]], np.uint16), "lbl/7.png")


def test_lookup_equals_a_dict_lookup_for_every_dtype():
    table = ClassTable(["a", "b", "c"], None, {10: 0, 11: 1, 500: 2, 3: 255}, unknown_to_ignore=True)
    rng = np.random.default_rng(0)
    values = rng.choice([3, 10, 11, 500, 7, 255, 65535], (9, 13))
    expected = np.vectorize(lambda v: {10: 0, 11: 1, 500: 2}.get(int(v), 255))(values)
    for dtype in (np.uint16, np.int32, np.int64):
        out = table.to_train_ids(values.astype(dtype))
        assert out.dtype == np.uint8 and np.array_equal(out, expected), dtype
    small = rng.choice([3, 10, 11, 7, 255], (9, 13)).astype(np.uint8)
    assert np.array_equal(table.to_train_ids(small), np.vectorize(lambda v: {10: 0, 11: 1}.get(int(v), 255))(small))
    assert table.unknown_values(values.astype(np.int64)) == [7, 65535]
    assert table.to_train_ids(np.array([[-4, 10]]))[0].tolist() == [255, 0]  # negative: unknown, ignored
    assert table.unknown_values(np.array([[-4, 10]])) == [-4]


def test_cityscapes_table_equals_the_label_module():
    table = ClassTable.cityscapes()
    assert table.names == TRAIN_CLASS_NAMES and table.colors == TRAIN_CLASS_COLORS and table.num_classes == 19
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    assert np.array_equal(table.to_train_ids(every), labelid_to_trainid(every))
    eight = every[:1].astype(np.uint8)
    assert np.array_equal(table.to_train_ids(eight), labelid_to_trainid(eight))
    train_ids = np.r_[np.arange(19), 255].astype(np.uint8).reshape(4, 5)
    assert np.array_equal(table.to_label_ids(train_ids), trainid_to_labelid(train_ids))
    assert np.array_equal(table.colorize(train_ids), colorize(train_ids))
    assert table.unknown_values(np.array([[0, 33, 34, 99]], np.uint8)) == [34, 99]


def test_colorize_and_the_inverse_map():
    table = nyu40_class_table()
    rng = np.random.default_rng(1)
    train_ids = rng.choice(np.r_[np.arange(40), 255], (7, 9)).astype(np.uint8)
    rgb = table.colorize(train_ids)
    assert rgb.shape == (7, 9, 3) and rgb.dtype == np.uint8
    for y, x in np.ndindex(7, 9):
        colour = (0, 0, 0) if train_ids[y, x] == 255 else table.colors[train_ids[y, x]]
        assert tuple(rgb[y, x]) == colour
    stored = table.to_label_ids(train_ids)
    assert np.array_equal(stored, np.where(train_ids == 255, 0, train_ids.astype(np.int64) + 1))
    assert np.array_equal(table.to_train_ids(stored), train_ids)
    with pytest.raises(InvalidInputError, match=r"values \[40, 254\] are not train ids"):
        table.to_label_ids(np.array([[40, 254]]))
    sixteen = ClassTable(["x", "y"], None, {1000: 0, 7: 1})
    assert sixteen.to_label_ids(np.array([[0, 1, 255]])).tolist() == [[1000, 7, 255]]


def test_default_palette_is_fixed_distinct_and_not_black():
    a = ClassTable([f"c{i}" for i in range(60)])
    assert a.colors == ClassTable([f"d{i}" for i in range(60)]).colors
    assert len(set(a.colors)) == 60 and (0, 0, 0) not in a.colors
    assert a.colors[0] == (128, 0, 0)  # VOC's colour of index 1


@pytest.mark.parametrize("table", ["nyu40", "synthetic", "unknown_ignored"])
def test_yaml_round_trip(tmp_path, table):
    original = {"nyu40": nyu40_class_table, "synthetic": synthetic.synthetic_class_table,
                "unknown_ignored": lambda: ClassTable(["a", "b"], [[1, 2, 3], [4, 5, 6]], {4: 0, 9: 1, 0: 255},
                                                      unknown_to_ignore=True)}[table]()
    path = tmp_path / "t.yaml"
    original.write_yaml(path)
    assert ClassTable.from_yaml(path) == original


BAD_TABLES = [
    ("names: [a, b, a]", r"key 'names': 'a' appears twice \(entries 0 and 2\)"),
    ("names: a", r"key 'names' must be a non-empty list"),
    ("names: [a, '']", r"key 'names', entry 1 is ''"),
    ("colors: [[1, 2, 3]]", r"key 'names' is missing"),
    ("names: [a, b]\ncolors: [[1, 2, 3]]", r"key 'colors' has 1 entries but 'names' has 2"),
    ("names: [a, b]\ncolors: [[1, 2, 3], [1, 2]]",
     r"key 'colors', entry 1 is \[1, 2\]; expected 3 integers in 0\.\.255"),
    ("names: [a]\ncolors: [[1, 2, 256]]", r"key 'colors', entry 0 is \[1, 2, 256\]"),
    ("names: [a]\ncolors: [[1, 2.5, 3]]", r"key 'colors', entry 0"),
    ("names: [a, b]\nlabel_ids: [1]", r"key 'label_ids' has 1 entries but 'names' has 2"),
    ("names: [a, b]\nlabel_ids: [3, 3]", r"label id 3 is listed twice \(label_ids entry 0 and label_ids entry 1\)"),
    ("names: [a, b]\nlabel_ids: [1, 2]\nignore_label_ids: [2]", r"label id 2 is listed twice"),
    ("names: [a, b]\nlabel_ids: [1, 255]", r"key 'label_ids', entry 1 is 255, which always means ignore"),
    ("names: [a]\nlabel_ids: [70000]", r"key 'label_ids', entry 0 is 70000; expected an integer in 0\.\.65535"),
    ("names: [a]\nignore_label_ids: [x]", r"key 'ignore_label_ids', entry 0 is 'x'"),
    ("names: [a]\nunknown_label_ids: maybe", r"key 'unknown_label_ids' must be one of \('error', 'ignore'\)"),
    ("names: [a]\ncolours: [[1, 2, 3]]", r"unknown key 'colours'"),
    ("- a\n- b", r"expected a mapping with the key 'names'"),
    ("names: [a\n", r"not valid YAML \(line \d\)"),
]


@pytest.mark.parametrize("text,message", BAD_TABLES)
def test_bad_tables_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInputError) as err:
        ClassTable.from_yaml(path)
    assert re.search(message, one_line(err)) and one_line(err).startswith(f"class table {path}" if "YAML" in message
                                                                          else str(path))


def test_missing_table_and_bad_constructor_arguments(tmp_path):
    with pytest.raises(MissingInputError, match=r"class table .*nowhere\.yaml not found"):
        ClassTable.from_yaml(tmp_path / "nowhere.yaml")
    with pytest.raises(InvalidInputError, match="class 1 has no label value"):
        ClassTable(["a", "b"], None, {0: 0})
    with pytest.raises(InvalidInputError, match="label value 5 maps to 7"):
        ClassTable(["a", "b"], None, {5: 7, 0: 0, 1: 1})
    with pytest.raises(InvalidInputError, match="ignore_index must be in 2..255"):
        ClassTable(["a", "b"], ignore_index=1)


# ----------------------------------------------------------------------------- the folder dataset
def test_folder_layout_gives_the_samples_cityscapes_gives(tiny_cityscapes, tiny_folder):
    for split in ("train", "val", "test"):
        ours, theirs = FolderSegmentation(tiny_folder, split), Cityscapes(tiny_cityscapes, split)
        assert ours.has_labels == (split != "test") and ours.num_classes == 19 and ours.layout_used == "folders"
        assert [item[0] for item in ours.items] == [item[0] for item in theirs.items]
        same_samples(ours, theirs)
    transform = TrainTransform(crop_size=(40, 56), color_jitter=dict(brightness=0.3))
    ours, theirs = (FolderSegmentation(tiny_folder, "train", transform, seed=4),
                    Cityscapes(tiny_cityscapes, "train", transform, seed=4))
    for epoch in (0, 3):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        same_samples(ours, theirs)
    val = FolderSegmentation(tiny_folder, "val")
    sample = val[1]
    assert np.array_equal(sample["edge"][0].numpy(), edge_target(sample["label"].numpy().astype(np.uint8)))
    assert np.array_equal(val.load_label(1), sample["label"].numpy())


def test_class_uniform_sampling_matches_cityscapes(tiny_cityscapes, folder_copy, tmp_path):
    city = tmp_path / "city"
    shutil.copytree(tiny_cityscapes, city)
    transform = TrainTransform(crop_size=(24, 32))
    kwargs = dict(class_uniform_fraction=0.5, class_uniform_tile=48, seed=2, progress=False)
    ours, theirs = FolderSegmentation(folder_copy, "train", transform, **kwargs), Cityscapes(str(city), "train",
                                                                                            transform, **kwargs)
    assert all(np.array_equal(ours.centroids[c], theirs.centroids[c]) for c in range(19))
    for epoch in range(3):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        infos = [ours.sample_info(i) for i in range(len(ours))]
        assert infos == [theirs.sample_info(i) for i in range(len(theirs))]
        uniform = [i for i, info in enumerate(infos) if info[2] >= 0]
        assert len(uniform) == 3
        same_samples(ours, theirs, uniform)
        assert all((ours[i]["label"] == infos[i][2]).any() for i in uniform)


def test_centroid_cache_is_reused_and_keyed_by_the_class_table(folder_copy, monkeypatch, tmp_path):
    kwargs = dict(class_uniform_fraction=0.5, class_uniform_tile=64, progress=False)
    first = FolderSegmentation(folder_copy, "val", **kwargs)
    cache = os.path.join(folder_copy, "class_centroids_val_tile64.json")
    payload = json.load(open(cache))
    assert payload["num_classes"] == 19 and payload["num_images"] == 4

    def fail(*args):
        raise AssertionError("centroids recomputed although cached")
    monkeypatch.setattr(folder, "_centroid_job", fail)
    again = FolderSegmentation(folder_copy, "val", **kwargs)
    assert all(np.array_equal(again.centroids[c], first.centroids[c]) for c in range(19))
    monkeypatch.undo()
    # another table over the same files: class 0 and 1 swapped
    names = list(TRAIN_CLASS_NAMES)
    swapped = ClassTable(names, None, {**{i: i for i in range(19)}, 0: 1, 1: 0})
    other = FolderSegmentation(folder_copy, "val", class_table=swapped, **kwargs)
    assert json.load(open(cache))["key"] != payload["key"]
    assert np.array_equal(other.centroids[0], first.centroids[1]) and np.array_equal(other.centroids[1],
                                                                                      first.centroids[0])
    serial = FolderSegmentation(folder_copy, "val", centroid_workers=0, cache_dir=str(tmp_path), **kwargs)
    os.remove(cache)
    pooled = FolderSegmentation(folder_copy, "val", centroid_workers=2, **kwargs)
    assert all(np.array_equal(serial.centroids[c], pooled.centroids[c]) for c in range(19))


def test_cityscapes_read_through_folder_options(tiny_cityscapes):
    ours = FolderSegmentation(tiny_cityscapes, "val", class_table=ClassTable.cityscapes(), image_dir="leftImg8bit",
                              label_dir="gtFine", image_suffix="_leftImg8bit.png", label_suffix="_gtFine_labelIds.png")
    same_samples(ours, Cityscapes(tiny_cityscapes, "val"))


def write_list(root, split, lines):
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def relative_pairs(dataset):
    return [(os.path.relpath(img, dataset.root), os.path.relpath(lbl, dataset.root) if lbl else None)
            for _, img, lbl in dataset.items]


def test_list_file_layout_equals_the_folders(folder_copy):
    by_folders = {split: FolderSegmentation(folder_copy, split) for split in ("train", "val", "test")}
    pairs = relative_pairs(by_folders["val"])[::-1]  # a list keeps its own order
    write_list(folder_copy, "val", ["# image label", ""] + [f"{img}\t{lbl}" for img, lbl in pairs])
    write_list(folder_copy, "test", [img for img, _ in relative_pairs(by_folders["test"])])
    val = FolderSegmentation(folder_copy, "val")
    assert val.layout_used == "list" and relative_pairs(val) == pairs
    for i in range(4):
        a, b = val[i], by_folders["val"][3 - i]
        assert a["name"] == b["name"] and all(torch.equal(a[k], b[k]) for k in SAMPLE_KEYS)
    test = FolderSegmentation(folder_copy, "test")
    assert test.layout_used == "list" and not test.has_labels
    same_samples(test, by_folders["test"])
    # spaces separate the two paths as well; layout='folders' ignores the list
    write_list(folder_copy, "val", [f"{img}   {lbl}" for img, lbl in pairs])
    assert relative_pairs(FolderSegmentation(folder_copy, "val", layout="list")) == pairs
    assert FolderSegmentation(folder_copy, "val", layout="folders").layout_used == "folders"


def test_folder_errors_are_one_line_and_name_the_file(folder_copy, tmp_path):
    with pytest.raises(MissingInputError) as err:
        FolderSegmentation(str(tmp_path / "nowhere"), "train", class_table=ClassTable(["a"]))
    assert "nowhere" in one_line(err) and "does not exist" in one_line(err)
    with pytest.raises(MissingInputError) as err:
        FolderSegmentation(str(tmp_path), "train")
    assert re.search(r"no class table: .*classes\.yaml does not exist", one_line(err))
    with pytest.raises(MissingInputError) as err:
        FolderSegmentation(folder_copy, "training")
    assert re.search(r"split 'training' not found: .*images/training is missing; expected <root>/images/training/",
                     one_line(err))
    with pytest.raises(InvalidInputError, match="layout must be one of"):
        FolderSegmentation(folder_copy, "val", layout="mmseg")
    with pytest.raises(InvalidInputError, match="split must be a plain folder or file name"):
        FolderSegmentation(folder_copy, "../val")
    with pytest.raises(InvalidInputError, match="class-uniform sampling needs labels; the test split has none"):
        FolderSegmentation(folder_copy, "test", class_uniform_fraction=0.5)
    with pytest.raises(MissingInputError) as err:
        FolderSegmentation(folder_copy, "test", has_labels=True)
    assert re.search(r"labels for split 'test' not found: .*labels/test is missing", one_line(err))

    # an image without its label; labels missing for a split other than test
    label = os.path.join(folder_copy, "labels", "val", "lindau", "lindau_000000_000019.png")
    os.rename(label, label + ".moved")
    with pytest.raises(MissingInputError) as err:
        FolderSegmentation(folder_copy, "val")
    assert re.search(r"val: 1 image\(s\) without a label file: .*images/val/lindau/lindau_000000_000019\.png has no "
                     r"label file .*labels/val/lindau/lindau_000000_000019\.png$", one_line(err))
    os.rename(label + ".moved", label)
    shutil.move(os.path.join(folder_copy, "labels", "train"), str(tmp_path / "train_labels"))
    with pytest.raises(MissingInputError) as err:
        FolderSegmentation(folder_copy, "train")
    assert "only a split named 'test' may come without labels" in one_line(err)
    assert not FolderSegmentation(folder_copy, "train", has_labels=False).has_labels

    # an empty split; two images of one name
    os.makedirs(os.path.join(folder_copy, "images", "empty", "sub"))
    os.makedirs(os.path.join(folder_copy, "labels", "empty"))
    with pytest.raises(MissingInputError, match=r"split 'empty': .*images/empty holds no images"):
        FolderSegmentation(folder_copy, "empty")
    for kind in ("images", "labels"):
        shutil.copy(os.path.join(folder_copy, kind, "val", "lindau", "lindau_000000_000019.png"),
                    os.path.join(folder_copy, kind, "val", "frankfurt"))
    with pytest.raises(InvalidInputError) as err:
        FolderSegmentation(folder_copy, "val")
    assert re.search(r"two images named 'lindau_000000_000019': .*frankfurt/lindau_000000_000019\.png and "
                     r".*lindau/lindau_000000_000019\.png", one_line(err))


def test_list_file_errors(folder_copy):
    write_list(folder_copy, "val", ["images/val/lindau/lindau_000000_000019.png labels/val/lindau/nothing.png",
                                    "images/val/none.png labels/val/frankfurt/frankfurt_000000_000019.png"])
    with pytest.raises(MissingInputError) as err:
        FolderSegmentation(folder_copy, "val")
    text = one_line(err)
    assert "2 missing file(s) in" in text and "val.txt" in text
    assert re.search(r"line 1: image .*lindau_000000_000019\.png has no label file "
                     r".*labels/val/lindau/nothing\.png", text)
    assert re.search(r"line 2: label .*frankfurt_000000_000019\.png has no image \(.*images/val/none\.png does not "
                     r"exist\)", text)
    write_list(folder_copy, "val", ["a.png b.png c.png"])
    with pytest.raises(InvalidInputError, match=r"val\.txt line 1: expected 'image_path label_path', got 3 fields"):
        FolderSegmentation(folder_copy, "val")
    pair = "images/val/lindau/lindau_000000_000019.png labels/val/lindau/lindau_000000_000019.png"
    write_list(folder_copy, "val", [pair, "images/val/lindau/lindau_000001_000019.png"])
    with pytest.raises(InvalidInputError, match=r"val\.txt line 2 names only an image \(images/val/lindau/lindau_0000"):
        FolderSegmentation(folder_copy, "val")
    write_list(folder_copy, "val", ["images/val/lindau/lindau_000000_000019.png"])
    with pytest.raises(MissingInputError,
                       match=r"labels for split 'val' not found: .*val\.txt line 1 names only an image"):
        FolderSegmentation(folder_copy, "val")
    write_list(folder_copy, "val", ["# nothing here", ""])
    with pytest.raises(MissingInputError, match=r"split 'val': list file .*val\.txt names no images"):
        FolderSegmentation(folder_copy, "val")
    with pytest.raises(MissingInputError, match=r"list file .*other\.txt not found"):
        FolderSegmentation(folder_copy, "val", list_file="other.txt")


def test_errors_found_when_reading(folder_copy):
    ds = FolderSegmentation(folder_copy, "train")
    name, image_path, label_path = ds.items[1]
    original = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    bad = original.copy()
    bad[3, 4], bad[5, 6] = 19, 200
    cv2.imwrite(label_path, bad)
    with pytest.raises(InvalidInputError) as err:
        ds[1]
    assert re.search(re.escape(label_path) + r": values \[19, 200\] are not in the class table .*classes\.yaml "
                     r"\(label values 0\.\.18 for classes, 255 ignored\)", one_line(err))
    cv2.imwrite(label_path, original[:32])
    with pytest.raises(InvalidInputError) as err:
        ds[1]
    assert re.search(r"image .*\.png is 128x64 but its label .*\.png is 128x32", one_line(err))
    cv2.imwrite(label_path, np.dstack([original] * 3))
    with pytest.raises(InvalidInputError, match=re.escape(label_path) + " has 3 channels; expected a single-channel"):
        ds.load_label(1)
    cv2.imwrite(label_path, original)
    data = open(image_path, "rb").read()
    with open(image_path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UnreadableInputError) as err:
        ds[1]
    assert re.search(re.escape(image_path) + ": unreadable, truncated", one_line(err))
    os.remove(image_path)
    with pytest.raises(MissingInputError, match="image file not found: " + re.escape(image_path)):
        ds[1]


def test_unknown_values_may_be_ignored_by_the_table(folder_copy):
    table = ClassTable.from_dict({"names": list(TRAIN_CLASS_NAMES), "unknown_label_ids": "ignore"})
    ds = FolderSegmentation(folder_copy, "val", class_table=table)
    label_path = ds.items[0][2]
    stored = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    stored[:5, :5] = 77
    cv2.imwrite(label_path, stored)
    assert (ds.load_label(0)[:5, :5] == 255).all()
    assert np.array_equal(ds.load_label(0)[5:], stored[5:])


def test_scribbles_on_the_folder_dataset_equal_those_on_cityscapes(tiny_cityscapes, tiny_folder):
    ours = ScribbleFolderSegmentation(tiny_folder, "train", scribble_seed=3)
    theirs = ScribbleCityscapes(tiny_cityscapes, "train", scribble_seed=3, precompute=True)
    for i in range(len(ours)):
        assert np.array_equal(ours.load_label(i), theirs.load_label(i))
        assert np.array_equal(ours.full_label(i), theirs.full_label(i))
    assert (ours.load_label(0) != 255).mean() < 0.2 and repr(ours).startswith("ScribbleFolderSegmentation(")
    with pytest.raises(InvalidInputError, match="ScribbleFolderSegmentation: split 'test' has no labels"):
        ScribbleFolderSegmentation(tiny_folder, "test")


# ----------------------------------------------------------------------------- EXIF orientation
@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_images_are_read_without_their_exif_orientation(tmp_path, extension):
    """An image tagged 'rotate 90' stays as stored, on its label (which carries no tag)."""
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (250, 10, 10)
    rgb[:6] = (10, 250, 10)
    exif = Image.Exif()
    exif[0x0112] = 6
    os.makedirs(tmp_path / "images" / "val")
    os.makedirs(tmp_path / "labels" / "val")
    path = str(tmp_path / "images" / "val" / f"a.{extension}")
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), **({"quality": 100} if extension == "jpg" else {}))
    cv2.imwrite(str(tmp_path / "labels" / "val" / "a.png"), np.zeros((20, 30), np.uint8))
    assert Image.open(path).getexif()[0x0112] == 6
    assert cv2.imread(path).shape == (30, 20, 3)  # what a plain imread would give
    image = read_image(path)                      # Cityscapes' reader
    stored = np.asarray(Image.open(path).convert("RGB"))  # PIL decodes without turning
    assert image.shape == stored.shape == (20, 30, 3)
    assert np.abs(image.astype(int) - stored).max() <= (0 if extension == "png" else 8)
    sample = FolderSegmentation(str(tmp_path), "val", class_table=ClassTable(["a"]))[0]
    assert sample["image"].shape == (3, 20, 30) and sample["label"].shape == (20, 30)


# ----------------------------------------------------------------------------- NYU-Depth-v2
def write_nyu(root, train_ids=(2, 3, 5, 7), test_ids=(1, 4, 6), size=(48, 64)):
    """A small NYUv2-40 in the SA-Gate layout; the label of frame i is a pattern of values 0..40."""
    os.makedirs(os.path.join(root, "RGB"))
    os.makedirs(os.path.join(root, "Label"))
    rng = np.random.default_rng(0)
    for i in train_ids + test_ids:
        cv2.imwrite(os.path.join(root, "RGB", f"{i}.jpg"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        label = ((np.arange(size[0])[:, None] // 8 * 7 + np.arange(size[1])[None] // 8 + i) % 41).astype(np.uint8)
        cv2.imwrite(os.path.join(root, "Label", f"{i}.png"), label)
    for split, ids in (("train", train_ids), ("test", test_ids)):
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("".join(f"RGB/{i}.jpg\tLabel/{i}.png\n" for i in ids))


def test_nyu_depth_v2_in_the_sa_gate_layout(tmp_path):
    root = str(tmp_path / "NYUDepthv2")
    write_nyu(root)
    train, test = NYUDepthV2(root, "train"), NYUDepthV2(root, "test")
    assert [n for n, _, _ in train.items] == ["2", "3", "5", "7"] and [n for n, _, _ in test.items] == ["1", "4", "6"]
    assert train.num_classes == 40 and test.has_labels
    for ds in (train, test):
        for i, (name, _, label_path) in enumerate(ds.items):
            stored = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
            expected = np.where(stored == 0, 255, stored.astype(np.int64) - 1)
            sample = ds[i]
            assert np.array_equal(sample["label"].numpy(), expected) and sample["image"].shape == (3, 48, 64)
    uniform = NYUDepthV2(root, "train", TrainTransform(crop_size=(32, 32)), class_uniform_fraction=0.5,
                         class_uniform_tile=24, progress=False)
    classes = {info[2] for info in (uniform.sample_info(i) for i in range(4))} - {-1}
    assert len(classes) == 2 and all(len(uniform.centroids[c]) for c in range(40))
    with pytest.raises(InvalidInputError,
                       match=r"NYUDepthV2: unknown split 'val'; expected one of \('train', 'test'\)"):
        NYUDepthV2(root, "val")
    label = cv2.imread(os.path.join(root, "Label", "4.png"), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 41
    cv2.imwrite(os.path.join(root, "Label", "4.png"), label)
    with pytest.raises(InvalidInputError, match=r"Label/4\.png: values \[41\] are not in the class table"):
        test[1]
    with open(os.path.join(root, "test.txt"), "w") as f:   # DFormer's one-column lists are refused
        f.write("RGB/1.jpg\nRGB/4.jpg\n")
    with pytest.raises(MissingInputError, match=r"NYUDepthV2 labels for split 'test' not found: .*test\.txt line 1 "
                                                r"names only an image"):
        NYUDepthV2(root, "test")


# ----------------------------------------------------------------------------- the synthetic folder layout
def test_synthetic_folder_layout_holds_the_same_scenes(tiny_cityscapes, tiny_folder):
    files = sorted(os.path.relpath(os.path.join(d, f), tiny_folder) for d, _, fs in os.walk(tiny_folder) for f in fs)
    assert "classes.yaml" in files and "synthetic.json" in files
    assert not any(f.startswith("labels/test") for f in files) and not any(f.startswith("colors/") for f in files)
    assert ClassTable.from_yaml(os.path.join(tiny_folder, "classes.yaml")) == synthetic.synthetic_class_table()
    images = [f for f in files if f.startswith("images/")]
    assert len(images) == 12
    for rel in images:
        split, city, name = rel.split("/")[1:]
        stem = name[:-len(".png")]
        cityscapes_image = os.path.join(tiny_cityscapes, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png")
        assert filecmp.cmp(os.path.join(tiny_folder, rel), cityscapes_image, shallow=False)
        if split != "test":
            ids = cv2.imread(os.path.join(tiny_cityscapes, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"),
                             cv2.IMREAD_UNCHANGED)
            train_ids = cv2.imread(os.path.join(tiny_folder, "labels", split, city, name), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(train_ids, labelid_to_trainid(ids))
    manifest = json.load(open(os.path.join(tiny_folder, "synthetic.json")))
    assert manifest["layout"] == "folder"
    assert "layout" not in json.load(open(os.path.join(tiny_cityscapes, "synthetic.json")))


def test_synthetic_folder_layout_command_line_and_reuse(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--out", out, "--train", "1", "--val", "1", "--test", "0", "--height", "64", "--width", "128",
            "--quiet", "--layout", "folder", "--color"]
    assert synthetic.main(args) == 0
    assert "folder layout" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["classes.yaml", "colors", "images", "labels", "synthetic.json"]
    colours = cv2.imread(os.path.join(out, "colors", "train", "aachen", "aachen_000000_000019.png"))[:, :, ::-1]
    train_ids = cv2.imread(os.path.join(out, "labels", "train", "aachen", "aachen_000000_000019.png"),
                           cv2.IMREAD_UNCHANGED)
    assert np.array_equal(colours, colorize(train_ids))
    kwargs = dict(train=1, val=1, test=0, height=64, width=128, seed=0, color=True, progress=False)
    assert synthetic.ensure_synthetic(out, layout="folder", **kwargs) == out
    with pytest.raises(ValueError, match="layout: found 'folder', wanted 'cityscapes'"):
        synthetic.ensure_synthetic(out, **kwargs)
    with pytest.raises(ValueError, match="layout must be one of"):
        synthetic.generate(str(tmp_path / "x"), layout="mmseg")
    assert len(FolderSegmentation(out, "train")) == 1
