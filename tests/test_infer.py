"""experiment/infer.py: a folder of mixed images (sizes, JPEG/PNG, grayscale, RGBA, a corrupt file) gives
labelIds / color / overlay / edge PNGs at each image's own size, equal to the model's prediction; failures
are named and make the exit status non-zero; lists, folder structure, batching and sharding."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from datasets import TRAIN_CLASS_COLORS, labelid_to_trainid, trainid_to_labelid
from datasets.transforms import normalize_image
from experiment.errors import UserError
from experiment.infer import SizeBatcher, check_unique_outputs, find_images, read_rgb, shard
from synthetic_weights import synthetic_state_dict

ROOT = Path(__file__).resolve().parents[1]
ARCH = "lighthrnet.HRNet16"


def run_cli(args, nproc=1, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1" if nproc > 1 else env.get("OMP_NUM_THREADS", "2")
    if nproc == 1:
        cmd = [sys.executable, "-m", "experiment.infer"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "experiment" / "infer.py")]
    return subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def edge_net():
    net = models.get_net(ARCH, has_edge=True)
    net.load_state_dict(synthetic_state_dict(net.state_dict(), seed=11))
    return net.eval()


@pytest.fixture(scope="module")
def checkpoint(edge_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hr16s_edge.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in edge_net.state_dict().items()}}, path)
    return path


def smooth_image(h, w, channels, seed):
    """A smooth random picture (upsampled noise), so that predictions vary over the image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), channels), dtype=np.uint8)
    out = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return out if channels > 1 else out[..., None].reshape(h, w)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "photos"
    (root / "city" / "big").mkdir(parents=True)
    cv2.imwrite(str(root / "street.jpg"), smooth_image(333, 517, 3, 0), [cv2.IMWRITE_JPEG_QUALITY, 95])
    cv2.imwrite(str(root / "city" / "big" / "frame.png"), smooth_image(1024, 2048, 3, 1))
    cv2.imwrite(str(root / "city" / "gray.png"), smooth_image(96, 160, 1, 2))
    cv2.imwrite(str(root / "city" / "rgba.png"), smooth_image(96, 160, 4, 3))
    cv2.imwrite(str(root / "city" / "rgba_twin.png"), smooth_image(96, 160, 4, 4))  # batched with rgba.png
    cv2.imwrite(str(root / "city" / "strip.png"), smooth_image(1, 40, 3, 5))  # readable, too thin for the net
    (root / "city" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "notes.txt").write_text("not an image; ignored in a folder\n")
    return root


READABLE = {"street": (333, 517), "city/big/frame": (1024, 2048), "city/gray": (96, 160), "city/rgba": (96, 160),
            "city/rgba_twin": (96, 160)}


@pytest.fixture(scope="module")
def folder_run(mixed_folder, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer_out")
    proc = run_cli(["--model_path", checkpoint, "--arch", ARCH, "--has_edge", "True", "--input", mixed_folder,
                    "--output_dir", out, "--batch_size", 2, "--num_workers", 1])
    return out, proc


def test_folder_writes_every_readable_image_at_its_own_size(folder_run):
    out, proc = folder_run
    for stem, size in READABLE.items():
        for suffix in ("_labelIds.png", "_color.png", "_overlay.png", "_edge.png"):
            image = cv2.imread(str(out / f"{stem}{suffix}"), cv2.IMREAD_UNCHANGED)
            assert image is not None, f"{stem}{suffix} missing\n{proc.stdout}{proc.stderr}"
            assert image.shape[:2] == size, (stem, suffix)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert len(names) == 4 * len(READABLE) and not any(
        "broken" in n or "strip" in n or ".tmp" in n for n in names)


def test_unreadable_image_is_named_and_the_exit_status_is_non_zero(folder_run, mixed_folder):
    out, proc = folder_run
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    broken = str(mixed_folder / "city" / "broken.png")
    assert f"cannot read image {broken}" in text
    assert "2 of 7 images could not be read or segmented" in text and text.count("cannot read image") == 1
    assert f"cannot segment image {mixed_folder / 'city' / 'strip.png'} (1x40)" in text
    assert "grayscale, converted to RGB" in text and "RGBA, alpha channel dropped" in text
    assert "images/s" in proc.stdout


def test_label_ids_are_the_models_prediction(folder_run, mixed_folder, edge_net):
    out, _ = folder_run
    rgb = cv2.cvtColor(cv2.imread(str(mixed_folder / "street.jpg")), cv2.COLOR_BGR2RGB)
    with torch.no_grad():
        logits = edge_net(normalize_image(rgb)[None])["pred"]
    expected = logits.argmax(1)[0].numpy().astype(np.uint8)
    label_ids = cv2.imread(str(out / "street_labelIds.png"), cv2.IMREAD_UNCHANGED)
    assert label_ids.dtype == np.uint8 and set(np.unique(label_ids)) <= set(trainid_to_labelid(np.arange(19)))
    assert len(np.unique(label_ids)) > 1  # a varied prediction, not a constant image
    agree = (labelid_to_trainid(label_ids) == expected).mean()
    assert agree > 0.999, agree  # thread counts may flip a near-tie, nothing more


def test_color_and_overlay_follow_the_label_ids(folder_run, mixed_folder):
    out, _ = folder_run
    label_ids = cv2.imread(str(out / "city" / "gray_labelIds.png"), cv2.IMREAD_UNCHANGED)
    color = cv2.cvtColor(cv2.imread(str(out / "city" / "gray_color.png")), cv2.COLOR_BGR2RGB)
    palette = np.asarray(TRAIN_CLASS_COLORS, np.uint8)
    np.testing.assert_array_equal(color, palette[labelid_to_trainid(label_ids)])
    gray = cv2.imread(str(mixed_folder / "city" / "gray.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.cvtColor(cv2.imread(str(out / "city" / "gray_overlay.png")), cv2.COLOR_BGR2RGB)
    blend = 0.5 * color.astype(np.float64) + 0.5 * gray[..., None].astype(np.float64)
    assert np.abs(overlay - blend).max() <= 1.0


def test_list_file_with_a_missing_entry_and_tta_options(mixed_folder, checkpoint, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images to segment\n{mixed_folder / 'city' / 'gray.png'}\n"
                       f"{os.path.relpath(mixed_folder / 'city' / 'rgba.png', tmp_path)}\n\n"
                       f"{mixed_folder / 'city' / 'missing.jpg'}  # gone\n")
    out = tmp_path / "out"
    proc = run_cli(["--model_path", checkpoint, "--arch", ARCH, "--has_edge", "False", "--input", listing,
                    "--output_dir", out, "--num_workers", 0, "--flip", "--sliding_window", "--window_size", "96,160",
                    "--window_stride", "64"])
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert f"cannot read image {mixed_folder / 'city' / 'missing.jpg'}: file not found" in text
    assert "1 of 3 images could not be read or segmented" in text
    assert "sliding window 96x160 stride 64x64, horizontal flip" in text
    # Relative structure below the listed images' common folder; no edge head, no edge PNG.
    assert sorted(p.name for p in out.glob("*.png")) == [
        "gray_color.png", "gray_labelIds.png", "gray_overlay.png", "rgba_color.png", "rgba_labelIds.png",
        "rgba_overlay.png"]


def test_bad_inputs_fail_before_writing(checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(["--model_path", checkpoint, "--arch", ARCH, "--input", tmp_path / "nope", "--output_dir", out])
    assert proc.returncode != 0 and f"--input {tmp_path / 'nope'} does not exist" in proc.stderr
    assert not list(out.rglob("*.png"))


# ----------------------------------------------------------------------------- in-process units
def test_find_images_walks_folders_and_refuses_what_is_not_an_image(mixed_folder, tmp_path):
    found = find_images(str(mixed_folder))
    assert [rel for _, rel in found] == ["city/big/frame.png", "city/broken.png", "city/gray.png", "city/rgba.png",
                                         "city/rgba_twin.png", "city/strip.png", "street.jpg"]
    assert find_images(str(mixed_folder / "street.jpg")) == [(str(mixed_folder / "street.jpg"), "street.jpg")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no PNG/JPEG"):
        find_images(str(tmp_path / "empty"))
    (tmp_path / "bad.txt").write_text("a.png\nreadme.md\n")
    with pytest.raises(UserError, match="line 2: 'readme.md' is not"):
        find_images(str(tmp_path / "bad.txt"))
    with pytest.raises(UserError, match="would both write"):
        check_unique_outputs([("/x/a.png", "a.png"), ("/x/a.jpg", "a.jpg")])


def test_read_rgb_converts_16_bit_grayscale(tmp_path):
    path = str(tmp_path / "deep.png")
    cv2.imwrite(path, np.full((4, 5), 65535, np.uint16))
    rgb, notice = read_rgb(path)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8 and (rgb == 255).all()
    assert notice == "16-bit, scaled to 8-bit; grayscale, converted to RGB"


def test_size_batcher_groups_same_size_images_in_any_order():
    batcher = SizeBatcher(batch_size=2)
    item = lambda i, h: {"i": i, "image": torch.zeros(3, h, 8)}  # noqa: E731
    batches = []
    for i, h in enumerate([4, 6, 4, 6, 6, 5]):
        batches += batcher.add(item(i, h))
    batches += batcher.flush()
    assert [[x["i"] for x in b] for b in batches] == [[0, 2], [1, 3], [4], [5]]
    assert all(len({tuple(x["image"].shape) for x in b}) == 1 for b in batches)
    # Bounded: never more than 4 x batch_size images held back.
    many = SizeBatcher(batch_size=2)
    for i in range(40):
        many.add(item(i, 4 + i))
        assert sum(len(g) for g in many.pending.values()) < 8


def test_shards_cover_every_image_once():
    items = list(range(11))
    for world in (1, 2, 3, 8, 16):
        parts = [shard(items, r, world) for r in range(world)]
        assert sum(parts, []) == items


@pytest.mark.slow
def test_two_processes_write_the_same_outputs(mixed_folder, checkpoint, folder_run, tmp_path):
    out1, _ = folder_run
    proc = run_cli(["--model_path", checkpoint, "--arch", ARCH, "--has_edge", "True", "--input", mixed_folder,
                    "--output_dir", tmp_path, "--batch_size", 2, "--num_workers", 0], nproc=2)
    assert proc.returncode == 1 and proc.stderr.count("2 of 7 images could not be read or segmented") == 2, proc.stderr
    for a in sorted(out1.rglob("*_labelIds.png")):
        b = tmp_path / a.relative_to(out1)
        agree = (cv2.imread(str(a), cv2.IMREAD_UNCHANGED) == cv2.imread(str(b), cv2.IMREAD_UNCHANGED)).mean()
        assert agree > 0.999, a
