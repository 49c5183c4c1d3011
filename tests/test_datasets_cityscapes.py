"""The Cityscapes dataset over the official layout (exercised on the synthetic one)."""
import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest
import torch

import datasets.cityscapes as cs
from datasets import Cityscapes, TrainTransform, resolve_root
from datasets.edges import edge_target



@pytest.fixture(scope="module")
def official():
    """The official label table (cityscapesscripts, the test extra): the tests that compare with it
    skip without it, the others run."""
    return pytest.importorskip("cityscapesscripts.helpers.labels")


@pytest.fixture
def tiny_copy(tiny_cityscapes, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(tiny_cityscapes, root)
    return str(root)


def official_train_ids(path, official):
    ids = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    lut = np.full(256, 255, np.int64)
    for lb in official.labels:
        if lb.id >= 0:
            lut[lb.id] = lb.trainId
    return lut[ids]


def test_val_samples_format_and_content(tiny_cityscapes, official):
    ds = Cityscapes(tiny_cityscapes, "val")
    assert len(ds) == 4
    names = set()
    for i in range(len(ds)):
        sample = ds[i]
        assert set(sample) == {"image", "label", "edge", "name"}
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 64, 128)
        assert sample["label"].dtype == torch.int64 and sample["label"].shape == (64, 128)
        assert sample["edge"].dtype == torch.float32 and sample["edge"].shape == (1, 64, 128)
        assert re.fullmatch(r"(frankfurt|lindau|munster)_\d{6}_\d{6}", sample["name"])
        names.add(sample["name"])
        city = sample["name"].split("_")[0]
        label_path = os.path.join(tiny_cityscapes, "gtFine", "val", city, sample["name"] + "_gtFine_labelIds.png")
        image_path = os.path.join(tiny_cityscapes, "leftImg8bit", "val", city, sample["name"] + "_leftImg8bit.png")
        assert np.array_equal(sample["label"].numpy(), official_train_ids(label_path, official))
        rgb = cv2.imread(image_path)[:, :, ::-1].astype(np.float32) / 255
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        assert np.allclose(sample["image"].numpy().transpose(1, 2, 0), (rgb - mean) / std, atol=1e-5)
        assert np.array_equal(sample["edge"][0].numpy(), edge_target(sample["label"].numpy().astype(np.uint8)))
    assert len(names) == 4


def test_test_split_has_no_labels(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "test")
    sample = ds[0]
    assert (sample["label"] == 255).all() and sample["edge"].sum() == 0
    assert sample["label"].shape == sample["image"].shape[1:]
    with pytest.raises(ValueError, match="test split has none"):
        Cityscapes(tiny_cityscapes, "test", class_uniform_fraction=0.5)


def test_training_samples_are_deterministic_per_seed_epoch_index(tiny_cityscapes):
    transform = TrainTransform(crop_size=(48, 48), color_jitter=dict(brightness=0.3))
    a = Cityscapes(tiny_cityscapes, "train", transform, seed=3)
    b = Cityscapes(tiny_cityscapes, "train", transform, seed=3)
    assert a[2]["image"].equal(b[2]["image"]) and a[2]["label"].equal(b[2]["label"])
    a.set_epoch(1)
    assert not a[2]["image"].equal(b[2]["image"])
    # through DataLoader workers: same samples as direct indexing
    loader = torch.utils.data.DataLoader(b, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    direct = torch.stack([b[i]["image"] for i in range(len(b))])
    assert torch.equal(torch.cat([batch["image"] for batch in batches]), direct)
    assert [n for batch in batches for n in batch["name"]] == [b[i]["name"] for i in range(len(b))]


def samples(dataset, epochs=(0, 1, 2)):
    out = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out.extend(dataset[i] for i in range(len(dataset)))
    return out


def test_kept_decoded_images_give_the_same_samples_and_cannot_be_changed(tiny_copy):
    # every augmentation that touches the arrays: rescale, flip, jitter, blur, class-centred crops
    transform = TrainTransform(crop_size=(40, 56), scale_range=(0.5, 2.0), color_jitter=dict(brightness=0.3,
                               contrast=0.3, saturation=0.3, hue=0.1), blur_prob=0.5)
    make = lambda: Cityscapes(tiny_copy, "train", transform, class_uniform_fraction=0.5, class_uniform_tile=48,
                              seed=2, progress=False)
    read, kept = make(), make()
    nbytes = kept.keep_decoded(1 << 30)
    image, label = read.read_item(0)
    assert nbytes == len(kept.items) * (image.nbytes + label.nbytes)
    for a, b in zip(samples(read), samples(kept)):
        assert a["name"] == b["name"]
        assert all(torch.equal(a[key], b[key]) for key in ("image", "label", "edge"))
    image, label = kept.read_item(1)
    with pytest.raises(ValueError, match="read-only"):
        image[0, 0, 0] = 7
    with pytest.raises(ValueError, match="read-only"):
        label[0, 0] = 7
    # through forked DataLoader workers: the same samples
    kept.set_epoch(0)
    loader = torch.utils.data.DataLoader(kept, batch_size=2, num_workers=2, shuffle=False)
    direct = torch.stack([kept[i]["image"] for i in range(len(kept))])
    assert torch.equal(torch.cat([batch["image"] for batch in loader]), direct)


def test_a_split_larger_than_the_budget_is_not_kept(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "train", TrainTransform(crop_size=(32, 32)))
    image, label = ds.read_item(0)
    one = image.nbytes + label.nbytes
    assert ds.keep_decoded(one * len(ds.items) - 1) == 0
    assert ds.read_item(0)[0].flags.writeable  # still read from its file
    assert ds.keep_decoded(one * len(ds.items)) == one * len(ds.items)
    assert not ds.read_item(0)[0].flags.writeable


def test_the_test_split_keeps_images_without_labels(tiny_cityscapes):
    ds = Cityscapes(tiny_cityscapes, "test")
    first = ds[0]
    assert ds.keep_decoded(1 << 30) == len(ds.items) * ds.read_item(0)[0].nbytes
    assert ds.read_item(0)[1] is None
    assert torch.equal(ds[0]["image"], first["image"]) and (ds[0]["label"] == 255).all()


def test_errors_name_the_problem(tiny_copy, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*leftImg8bit/train/<city>"):
        Cityscapes(missing, "train")
    shutil.rmtree(os.path.join(tiny_copy, "leftImg8bit", "val"))
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found.*leftImg8bit/val is missing"):
        Cityscapes(tiny_copy, "val")
    with pytest.raises(ValueError, match="unknown split"):
        Cityscapes(tiny_copy, "training")
    with pytest.raises(ValueError, match="edge_radius=3"):
        Cityscapes(tiny_copy, "train", TrainTransform(crop_size=32, edge_radius=3))

    # an image without its label file
    label_dir = os.path.join(tiny_copy, "gtFine", "train", "bochum")
    label_file = os.listdir(label_dir)[0]
    os.rename(os.path.join(label_dir, label_file), os.path.join(tmp_path, label_file))
    with pytest.raises(FileNotFoundError, match=r"without a label file.*bochum_000000_000019_leftImg8bit\.png "
                                                r"has no label file .*bochum_000000_000019_gtFine_labelIds\.png"):
        Cityscapes(tiny_copy, "train")
    os.rename(os.path.join(tmp_path, label_file), os.path.join(label_dir, label_file))

    ds = Cityscapes(tiny_copy, "train")
    # truncated image / label
    name, image_path, label_path = ds.items[1]
    data = open(image_path, "rb").read()
    with open(image_path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(OSError, match=re.escape(image_path) + ".*truncated"):
        ds[1]
    with open(image_path, "wb") as f:
        f.write(data)
    with open(label_path, "wb") as f:
        f.write(b"not a png")
    ds2 = Cityscapes(tiny_copy, "train")
    with pytest.raises(OSError, match=re.escape(label_path)):
        ds2[1]
    # label of the wrong kind (3 channels) and of the wrong size
    _, _, other_label = ds.items[2]
    cv2.imwrite(other_label, np.zeros((64, 128, 3), np.uint8))
    with pytest.raises(ValueError, match=re.escape(other_label) + ".*single-channel"):
        ds[2]
    cv2.imwrite(other_label, np.zeros((32, 128), np.uint8))
    with pytest.raises(ValueError, match="but its label"):
        ds[2]


def test_label_ids_outside_the_table_are_reported_once_per_file_and_ignored(tiny_copy):
    ds = Cityscapes(tiny_copy, "val")
    _, _, label_path = ds.items[0]
    ids = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    ids[10:20, 10:20] = 99
    ids[30, 30] = 34
    cv2.imwrite(label_path, ids)
    with pytest.warns(RuntimeWarning, match=re.escape(label_path) + r".*\[34, 99\].*ignore"):
        sample = ds[0]
    assert (sample["label"][10:20, 10:20] == 255).all() and sample["label"][30, 30] == 255
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0]  # the same file again: no second report
        ds[1]  # a clean file: nothing


def test_class_uniform_crops_contain_their_class_and_epochs_agree_across_ranks(tiny_copy):
    transform = TrainTransform(crop_size=(24, 32), scale_range=(0.5, 2.0))
    rank0 = Cityscapes(tiny_copy, "train", transform, class_uniform_fraction=0.5, class_uniform_tile=48,
                       seed=1, progress=False)
    rank1 = Cityscapes(tiny_copy, "train", transform, class_uniform_fraction=0.5, class_uniform_tile=48,
                       seed=1, progress=False)
    assert all(len(rank0.centroids[c]) > 0 for c in range(19))
    for epoch in range(4):
        rank0.set_epoch(epoch)
        rank1.set_epoch(epoch)
        infos = [rank0.sample_info(i) for i in range(len(rank0))]
        assert infos == [rank1.sample_info(i) for i in range(len(rank1))]
        uniform = [info for info in infos if info[2] >= 0]
        assert len(uniform) == 3  # round(6 * 0.5)
        assert len({info[2] for info in uniform}) == 3  # spread over distinct classes
        for i, (image_index, center, cls) in enumerate(infos):
            if cls < 0:
                continue
            sample = rank0[i]
            assert (sample["label"] == cls).any(), (epoch, i, cls)
            assert sample["name"] == rank0.items[image_index][0]
    rank0.set_epoch(0)
    first = [rank0.sample_info(i) for i in range(len(rank0))]
    rank0.set_epoch(1)
    assert first != [rank0.sample_info(i) for i in range(len(rank0))]


def test_centroids_are_pixels_of_their_class(tiny_cityscapes, official):
    ds = Cityscapes(tiny_cityscapes, "val")  # no caching side effects
    for name, _, label_path in ds.items:
        train_ids = official_train_ids(label_path, official)
        found = cs.compute_image_centroids(label_path, tile=40)
        assert {c for c, _, _ in found} == set(np.unique(train_ids)) - {255}
        for cls, x, y in found:
            assert train_ids[y, x] == cls


def test_centroid_cache_is_written_reused_and_invalidated(tiny_copy, monkeypatch):
    ds = Cityscapes(tiny_copy, "train", class_uniform_fraction=0.5, class_uniform_tile=64, progress=False)
    cache = os.path.join(tiny_copy, "class_centroids_train_tile64.json")
    payload = json.load(open(cache))
    assert payload["num_images"] == 6 and payload["tile"] == 64 and len(payload["label_files"]) == 6

    def fail(*args, **kwargs):
        raise AssertionError("centroids recomputed although cached")
    monkeypatch.setattr(cs, "compute_image_centroids", fail)
    again = Cityscapes(tiny_copy, "train", class_uniform_fraction=0.5, class_uniform_tile=64, progress=False)
    for c in range(19):
        assert np.array_equal(again.centroids[c], ds.centroids[c])
    monkeypatch.undo()

    # a label file changes: the cache no longer matches and is rebuilt
    _, _, label_path = ds.items[0]
    ids = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
    ids[:8, :8] = 24  # person in the corner
    cv2.imwrite(label_path, ids)
    os.utime(label_path, ns=(1, 1))
    rebuilt = Cityscapes(tiny_copy, "train", class_uniform_fraction=0.5, class_uniform_tile=64, progress=False)
    assert json.load(open(cache))["key"] != payload["key"]

    def rows_of_image0(centroids):
        return sorted((c, int(x), int(y)) for c in range(19) for i, x, y in centroids[c] if i == 0)
    assert rows_of_image0(rebuilt.centroids) == sorted(cs.compute_image_centroids(label_path, 64))
    assert rows_of_image0(rebuilt.centroids) != rows_of_image0(ds.centroids)


def test_centroid_cache_goes_to_cache_dir_when_root_is_read_only(tiny_copy, tmp_path, monkeypatch):
    real_write = cs._atomic_write_json

    def read_only_root(path, payload):
        if os.path.dirname(path) == tiny_copy:
            raise PermissionError(f"read-only: {path}")
        real_write(path, payload)
    monkeypatch.setattr(cs, "_atomic_write_json", read_only_root)
    cache_dir = tmp_path / "cache"
    ds = Cityscapes(tiny_copy, "train", class_uniform_fraction=0.5, class_uniform_tile=64,
                    cache_dir=str(cache_dir), progress=False)
    files = os.listdir(cache_dir)
    assert len(files) == 1 and files[0].endswith("class_centroids_train_tile64.json")
    assert not os.path.exists(os.path.join(tiny_copy, "class_centroids_train_tile64.json"))
    monkeypatch.setattr(cs, "compute_image_centroids", lambda *a: (_ for _ in ()).throw(AssertionError))
    again = Cityscapes(tiny_copy, "train", class_uniform_fraction=0.5, class_uniform_tile=64,
                       cache_dir=str(cache_dir), progress=False)
    assert all(np.array_equal(again.centroids[c], ds.centroids[c]) for c in range(19))


def test_parallel_centroid_workers_match_in_process(tiny_copy, tmp_path):
    serial = Cityscapes(tiny_copy, "val", class_uniform_fraction=0.5, class_uniform_tile=32,
                        centroid_workers=0, cache_dir=str(tmp_path), progress=False)
    os.remove(os.path.join(tiny_copy, "class_centroids_val_tile32.json"))
    pooled = Cityscapes(tiny_copy, "val", class_uniform_fraction=0.5, class_uniform_tile=32,
                        centroid_workers=2, progress=False)
    assert all(np.array_equal(serial.centroids[c], pooled.centroids[c]) for c in range(19))


def test_resolve_root_precedence(tiny_cityscapes, tmp_path, monkeypatch):
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)
    monkeypatch.delenv("INVERSEFORM_SYNTHETIC_DIR", raising=False)
    assert resolve_root(dataset_dir=tiny_cityscapes) == (os.path.abspath(tiny_cityscapes), False)
    monkeypatch.setenv("CITYSCAPES_DATASET", tiny_cityscapes)
    assert resolve_root() == (os.path.abspath(tiny_cityscapes), False)
    other = tmp_path / "explicit"
    other.mkdir()
    assert resolve_root(dataset_dir=str(other)) == (str(other), False)  # explicit beats env
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CITYSCAPES_DATASET"):
        resolve_root()
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        resolve_root(dataset_dir=str(tmp_path / "missing"))
