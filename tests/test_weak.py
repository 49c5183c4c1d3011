"""Weak supervision: scribbles drawn from full labels, the roi the transform carries, PASCAL VOC in
the reference's layout, the pCE + DenseCRF objective, and training/comparison end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.stats
import torch

from datasets import TrainTransform, ValTransform
from datasets.scribbles import ScribbleCityscapes, draw_scribbles, labeled_fraction
from datasets.voc import VOCSegmentation, voc_colormap
from experiment.errors import UserError
from utils.config import ConfigError
from experiment.comparisons.supervision import base_config, compare_supervision
from experiment.methods import RunOptions
from experiment.methods.weak import WeakObjective, check_config, partial_cross_entropy
from experiment.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- scribbles
def blocks_label():
    label = np.full((60, 80), 255, np.uint8)
    label[:30, :40] = 0
    label[:30, 40:] = 1
    label[30:, :] = 2
    label[40:50, 10:30] = 3       # an object inside class 2
    label[0:4, 0:4] = 4           # too small for a scribble (16 px < min_area)
    return label


def test_scribbles_are_inside_objects_and_deterministic():
    label = blocks_label()
    a = draw_scribbles(label, np.random.default_rng(0), fraction=0.05, width=3, min_area=30)
    b = draw_scribbles(label, np.random.default_rng(0), fraction=0.05, width=3, min_area=30)
    c = draw_scribbles(label, np.random.default_rng(1), fraction=0.05, width=3, min_area=30)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    labeled = a != 255
    assert np.array_equal(a[labeled], label[labeled])              # scribbles copy the full label
    assert set(np.unique(a[labeled])) == {0, 1, 2, 3}              # every large object, not the tiny one
    # strokes keep one pixel away from the region's border
    for cls in (0, 1, 2, 3):
        inside = cv2.erode((label == cls).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert not (labeled & (label == cls) & ~inside).any()
    assert 0.01 < labeled_fraction(a) < 0.15


def test_synthetic_scribbles_label_a_small_share(tiny_cityscapes):
    """A few percent of the pixels (about 3 % at the synthetic dataset's 256 x 512; more on these
    64 x 128 images, where strokes cannot be shorter than they are wide)."""
    ds = ScribbleCityscapes(tiny_cityscapes, "train", scribble_seed=0, precompute=True)
    fractions = [labeled_fraction(ds.load_label(i)) for i in range(len(ds))]
    assert 0.015 < np.mean(fractions) < 0.1
    again = ScribbleCityscapes(tiny_cityscapes, "train", scribble_seed=0)       # drawn on demand: the same
    assert all(np.array_equal(ds.load_label(i), again.load_label(i)) for i in range(len(ds)))
    full = ds.full_label(0)
    scribble = ds.load_label(0)
    assert np.array_equal(scribble[scribble != 255], full[scribble != 255])


def test_scribble_samples_from_kept_decoded_images_are_the_same(tiny_cityscapes):
    """The scribble training split kept in memory (experiment.data.keep_decoded_if_small): the
    same crops, scribbles and roi, and its arrays cannot be written."""
    transform = TrainTransform(crop_size=(48, 64), scale_range=(0.5, 1.5), with_roi=True)
    read, kept = (ScribbleCityscapes(tiny_cityscapes, "train", transform, scribble_seed=0, precompute=True)
                  for _ in range(2))
    assert kept.keep_decoded(1 << 30) > 0
    for epoch in range(2):
        read.set_epoch(epoch)
        kept.set_epoch(epoch)
        for i in range(len(read)):
            a, b = read[i], kept[i]
            assert all(torch.equal(a[key], b[key]) for key in ("image", "label", "edge", "roi"))
    assert not kept.read_item(0)[1].flags.writeable


# ----------------------------------------------------------------------------- roi
def test_transform_roi_marks_padding_and_follows_the_flip():
    image = np.full((40, 60, 3), 120, np.uint8)
    label = np.zeros((40, 60), np.uint8)
    t = TrainTransform(crop_size=(64, 96), scale_range=(1.0, 1.0), flip=True, with_roi=True)
    for seed in range(6):
        sample = t(image, label, rng=np.random.default_rng(seed))
        roi, lab = sample["roi"], sample["label"]
        assert roi.dtype == torch.float32 and roi.shape == (64, 96)
        assert roi.sum() == 40 * 60                                  # the image, exactly once
        assert torch.equal(roi == 0, lab == 255)                     # padding, and only padding
    plain = TrainTransform(crop_size=(64, 96), scale_range=(1.0, 1.0))(image, label, rng=np.random.default_rng(0))
    assert set(plain) == {"image", "label", "edge"}                   # default outputs unchanged
    val = ValTransform(with_roi=True)(image, label)
    assert torch.equal(val["roi"], torch.ones(40, 60))


def test_roi_of_a_scribble_label_is_not_the_unlabeled_mask():
    image = np.full((40, 60, 3), 90, np.uint8)
    scribble = np.full((40, 60), 255, np.uint8)
    scribble[20, 10:50] = 3
    sample = TrainTransform(crop_size=(48, 80), scale_range=(1.0, 1.0), flip=False, with_roi=True)(
        image, scribble, rng=np.random.default_rng(0))
    assert (sample["label"] == 255).sum() > (sample["roi"] == 0).sum() > 0


# ----------------------------------------------------------------------------- VOC
def make_voc(root, palette_labels=False):
    ids = ["2007_000001", "2007_000002"]
    for sub in ("JPEGImages", "SegmentationClassAug", "pascal_2012_scribble", "ImageSets/SegmentationAug"):
        os.makedirs(root / sub, exist_ok=True)
    cmap = voc_colormap()
    for i, name in enumerate(ids):
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.full((30, 40, 3), 60 * i, np.uint8))
        full = np.zeros((30, 40), np.uint8)
        full[10:20, 10:30] = 15
        full[0, :] = 255
        scribble = np.full((30, 40), 255, np.uint8)
        scribble[15, 12:28] = 15
        scribble[25, 5:35] = 0
        if palette_labels:   # a colour image of the palette, as VOC's SegmentationClass ships
            colours = cmap.copy()
            colours[255] = (224, 224, 192)
            full = cv2.cvtColor(colours[full], cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(root / "SegmentationClassAug" / f"{name}.png"), full)
        cv2.imwrite(str(root / "pascal_2012_scribble" / f"{name}.png"), scribble)
    for split in ("train", "val"):
        (root / "ImageSets" / "SegmentationAug" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return ids


@pytest.mark.parametrize("palette", [False, True])
def test_voc_layout_scribbles_and_full_labels(tmp_path, palette):
    make_voc(tmp_path, palette_labels=palette)
    scrib = VOCSegmentation(str(tmp_path), "train", labels="scribble",
                            transform=TrainTransform(crop_size=(32, 48), scale_range=(1.0, 1.0), with_roi=True))
    sample = scrib[0]
    assert set(sample) == {"image", "label", "edge", "roi", "name"} and sample["name"] == "2007_000001"
    assert set(torch.unique(sample["label"]).tolist()) <= {0, 15, 255}
    full = VOCSegmentation(str(tmp_path), "val", labels="full")
    label = full.load_label(0)
    assert label[15, 15] == 15 and label[5, 5] == 0 and (label[0] == 255).all()


def test_voc_missing_files_are_named(tmp_path):
    ids = make_voc(tmp_path)
    os.remove(tmp_path / "pascal_2012_scribble" / f"{ids[1]}.png")
    with pytest.raises(FileNotFoundError, match=f"{ids[1]}.png"):
        VOCSegmentation(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="SegmentationAug/test.txt"):
        VOCSegmentation(str(tmp_path), "test")


# ----------------------------------------------------------------------------- objective
def weak_config(**extra):
    opts = {"weak.enabled": "true", "model.has_edge": "false", "loss.densecrf_weight": 1e-3,
            "loss.densecrf_sigma_xy": 20}
    opts.update(extra)
    return load_run_config([], [f"{k}={v}" for k, v in opts.items()])


def test_partial_cross_entropy_is_the_mean_over_labeled_pixels():
    logits = torch.randn(2, 4, 6, 8)
    label = torch.full((2, 6, 8), 255)
    label[0, 1, 2], label[1, 3, 4], label[1, 5, 7] = 1, 2, 3
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[b:b + 1, :, y, x], label[b:b + 1, y, x])
                            for b, y, x in ((0, 1, 2), (1, 3, 4), (1, 5, 7))]).mean()
    torch.testing.assert_close(partial_cross_entropy(logits, label), expected)
    torch.testing.assert_close(partial_cross_entropy(logits, label, batch_average=True), expected / 2)
    none = partial_cross_entropy(logits, torch.full((2, 6, 8), 255))
    assert none.item() == 0 and torch.isfinite(none)


def test_weak_objective_adds_the_densecrf_term():
    cfg = weak_config()
    objective = WeakObjective(cfg.loss, cfg.weak, 19)
    logits = torch.randn(2, 19, 16, 24, requires_grad=True)
    label = torch.full((2, 16, 24), 255)
    label[:, 8, 4:20] = 5
    image = torch.randn(2, 3, 16, 24)
    roi = torch.ones(2, 16, 24)
    total, parts = objective({"pred": logits}, label, None, image=image, roi=roi)
    assert set(parts) == {"pce", "densecrf"} and parts["densecrf"] < 0
    torch.testing.assert_close(total.detach(), parts["pce"] + parts["densecrf"])
    total.backward()
    # the DenseCRF term reaches unlabeled pixels, which pCE alone never does
    assert logits.grad[:, :, 0].abs().sum() > 0
    zero = weak_config(**{"loss.densecrf_weight": 0})
    pce_only = WeakObjective(zero.loss, zero.weak, 19)
    assert set(pce_only({"pred": logits}, label, None)[1]) == {"pce"}


def test_scribbles_refuse_edge_and_inverseform_terms():
    with pytest.raises(UserError, match="need full labels"):
        check_config(weak_config(**{"model.has_edge": "true"}))
    check_config(weak_config(**{"model.has_edge": "true", "weak.labels": "full"}))


# ----------------------------------------------------------------------------- training
def tiny_comparison(root, out) -> dict:
    """The options of a scribble comparison of one-iteration runs on the tiny dataset."""
    return {"output_dir": out, "data.dataset_dir": root, "data.crop_size": "[64, 128]",
            "data.class_uniform_fraction": 0.0, "data.num_workers": 0, "model.arch": "lighthrnet.HRNet16",
            "train.max_iters": 1, "train.batch_size": 2, "train.image_interval": 0, "train.val_interval": 0,
            "train.device": "cpu", "train.amp": "off", "val.batch_size": 1, "val.num_workers": 0, "val.max_images": 1,
            "weak.compare": "true", "weak.min_area": 10}


def test_comparison_trains_three_runs_and_writes_comparison_json(tiny_cityscapes, tmp_path, ctx):
    opts = {"output_dir": tmp_path / "cmp", "data.dataset_dir": tiny_cityscapes, "data.crop_size": "[64, 128]",
            "data.scale_range": "[0.75, 1.0]", "data.class_uniform_fraction": 0.0, "data.num_workers": 0,
            "model.arch": "lighthrnet.HRNet16", "train.max_iters": 1, "train.batch_size": 2,
            "train.log_interval": 1, "train.image_interval": 0, "train.val_interval": 0, "train.device": "cpu",
            "train.amp": "off", "val.batch_size": 1, "val.num_workers": 0, "val.max_images": 1,
            "weak.compare": "true", "weak.min_area": 10}
    cfg = weak_config(**opts)
    summary = compare_supervision(cfg, ctx, RunOptions())
    written = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert written["pce_miou"] == summary["pce_miou"]
    for key in ("pce_miou", "densecrf_miou", "full_miou"):
        assert 0 <= written[key] <= 1
    for name in ("pce", "densecrf", "full"):
        assert written["runs"][name]["seconds_per_iteration"] > 0
        log = [json.loads(line) for line in (tmp_path / "cmp" / name / "train_log.jsonl").read_text().splitlines()]
        assert ("densecrf" in log[-1]) == (name == "densecrf") and "pce" in log[-1]


def test_comparison_over_seeds_in_two_child_processes_equals_the_serial_one(tiny_cityscapes, tmp_path, ctx, capsys):
    opts = {"data.dataset_dir": tiny_cityscapes, "data.crop_size": "[64, 128]", "data.class_uniform_fraction": 0.0,
            "data.num_workers": 0, "model.arch": "lighthrnet.HRNet16", "train.max_iters": 1, "train.batch_size": 2,
            "train.image_interval": 0, "train.val_interval": 0, "train.device": "cpu", "train.amp": "off",
            "val.batch_size": 1, "val.num_workers": 0, "val.max_images": 2, "weak.compare": "true",
            "weak.min_area": 10, "weak.cpu_threads": 1, "weak.seeds": "[0, 1]"}
    threads = torch.get_num_threads()
    try:
        serial = compare_supervision(weak_config(output_dir=tmp_path / "serial", **opts), ctx, RunOptions())
        parallel = compare_supervision(weak_config(output_dir=tmp_path / "parallel", **{**opts, "weak.processes": 2}), ctx,
                                       RunOptions())
    finally:
        torch.set_num_threads(threads)
    for key in ("pce_miou", "densecrf_miou", "full_miou"):
        assert parallel[key] == pytest.approx(serial[key], abs=1e-6)
    for name in ("pce", "densecrf", "full"):
        runs = [json.loads((tmp_path / "parallel" / f"seed{seed}" / name / "metrics.json").read_text()) for seed in (0, 1)]
        assert (tmp_path / "parallel" / "seed1" / name / "console.txt").stat().st_size > 0
        assert parallel["runs"][f"seed1/{name}"]["seconds_per_iteration"] > 0
        assert parallel[f"{name}_miou"] == pytest.approx((runs[0]["miou"] + runs[1]["miou"]) / 2)
        assert [parallel["per_seed"][s][f"{name}_miou"] for s in "01"] == [r["miou"] for r in runs]
    assert json.loads((tmp_path / "parallel" / "comparison.json").read_text())["full_miou"] == parallel["full_miou"]
    gains = [100 * (parallel["per_seed"][s]["densecrf_miou"] - parallel["per_seed"][s]["pce_miou"]) for s in "01"]
    interval = scipy.stats.ttest_1samp(gains, 0.0).confidence_interval(0.95)
    ci = parallel["densecrf_gain_ci"]
    assert (ci["ci_low"], ci["ci_high"]) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert ci["sd"] == pytest.approx(float(np.std(gains, ddof=1)))  # in points, as the bounds
    # the same interval for every metric the runs report, from their own metrics.json
    by_metric = parallel["densecrf_gain_by_metric"]
    assert set(by_metric) == {"miou", "pixel_acc", "mean_class_acc", "mba", "boundary_f", "boundary_iou"}
    assert by_metric["miou"] == ci
    for key in by_metric:
        runs = {(seed, name): json.loads((tmp_path / "parallel" / f"seed{seed}" / name / "metrics.json").read_text())
                for seed in (0, 1) for name in ("pce", "densecrf")}
        margins = [100 * (runs[(seed, "densecrf")][key] - runs[(seed, "pce")][key]) for seed in (0, 1)]
        assert by_metric[key]["mean"] == pytest.approx(float(np.mean(margins)))
        if np.std(margins) > 0:
            interval = scipy.stats.ttest_1samp(margins, 0.0).confidence_interval(0.95)
            assert (by_metric[key]["ci_low"], by_metric[key]["ci_high"]) == \
                (pytest.approx(interval.low), pytest.approx(interval.high))
    out = capsys.readouterr().out
    assert "(paired t, 2 seeds)" in out
    table = out[out.index("DenseCRF - pCE, points"):]
    mba = next(line for line in table.splitlines() if line.startswith("mBA "))
    assert f"{by_metric['mba']['mean']:+.2f}" in mba and f"[{by_metric['mba']['ci_low']:+.2f}," in mba


def test_comparison_over_seeds_trains_full_labels_for_the_first_seed_only_when_asked(tiny_cityscapes, tmp_path, ctx,
                                                                                      capsys):
    opts = {**tiny_comparison(tiny_cityscapes, tmp_path / "cmp"), "weak.seeds": "[3, 4]",
            "weak.full_every_seed": "false"}
    summary = compare_supervision(weak_config(**opts), ctx, RunOptions())
    trained = sorted(str(p.parent.relative_to(tmp_path / "cmp")) for p in (tmp_path / "cmp").glob("seed*/*/metrics.json"))
    assert trained == ["seed3/densecrf", "seed3/full", "seed3/pce", "seed4/densecrf", "seed4/pce"]
    full = json.loads((tmp_path / "cmp" / "seed3" / "full" / "metrics.json").read_text())["miou"]
    assert summary["full_miou"] == full and summary["full_seeds"] == [3]
    assert "full_miou" not in summary["per_seed"]["4"] and set(summary["runs"]) == set(trained)
    pce = [json.loads((tmp_path / "cmp" / f"seed{s}" / "pce" / "metrics.json").read_text())["miou"] for s in (3, 4)]
    assert summary["pce_miou"] == pytest.approx(sum(pce) / 2)
    assert "(seed 3 only)" in capsys.readouterr().out


def test_resumed_comparison_keeps_finished_runs_and_trains_only_the_added_seeds(tiny_cityscapes, tmp_path, ctx):
    """More seeds later: --resume with a longer weak.seeds trains the new seeds only; the finished
    runs keep their files and their measured time, and a finished run is never reported under
    settings it was not trained with."""
    opts = {**tiny_comparison(tiny_cityscapes, tmp_path / "cmp"), "weak.seeds": "[0]"}
    first = compare_supervision(weak_config(**opts), ctx, RunOptions())
    seed0 = {name: (tmp_path / "cmp" / "seed0" / name) for name in ("pce", "densecrf", "full")}
    before = {name: ((d / "metrics.json").read_bytes(), (d / "last.pth").stat().st_mtime_ns)
              for name, d in seed0.items()}
    summary = compare_supervision(weak_config(**{**opts, "weak.seeds": "[0, 1]"}), ctx, RunOptions(resume="auto"))
    for name, d in seed0.items():
        assert ((d / "metrics.json").read_bytes(), (d / "last.pth").stat().st_mtime_ns) == before[name]
        assert summary["runs"][f"seed0/{name}"]["reused"] is True
    for name in ("pce", "densecrf"):
        measured = json.loads((seed0[name] / "metrics.json").read_text())["train_seconds_per_iteration"]
        assert summary["runs"][f"seed0/{name}"]["seconds_per_iteration"] == measured
        assert (tmp_path / "cmp" / "seed1" / name / "metrics.json").is_file()
        assert "reused" not in summary["runs"][f"seed1/{name}"]
    assert summary["per_seed"]["0"] == first["per_seed"]["0"] and summary["seeds"] == [0, 1]
    # other validation settings: the same weights are validated again, not kept
    summary = compare_supervision(weak_config(**{**opts, "weak.seeds": "[0, 1]", "val.max_images": 2}), ctx,
                                  RunOptions(resume="auto"))
    assert not any(run.get("reused") for run in summary["runs"].values())
    assert json.loads((seed0["pce"] / "metrics.json").read_text())["num_images"] == 2
    assert (seed0["pce"] / "last.pth").stat().st_mtime_ns == before["pce"][1]
    with pytest.raises(UserError, match=r"seed0/pce was trained with other settings \(optim.lr"):
        compare_supervision(weak_config(**{**opts, "optim.lr": 0.5}), ctx, RunOptions(resume="auto"))


def test_the_two_phase_base_is_named_by_what_shapes_its_weights(tmp_path):
    def base(*extra):
        return base_config(load_run_config([str(ROOT / "configs" / "synthetic_scribbles_two_phase.yaml")],
                                           [f"weak.base_dir={tmp_path}", *extra]))

    first = base()
    assert (first.weak.densecrf.weight, first.weak.labels, first.train.seed, first.train.epochs) == (0, "scribbles", 0, 40)
    assert Path(first.output_dir).parent == tmp_path and Path(first.output_dir).name.startswith("pce-")
    for same in ("output_dir=elsewhere", "weak.densecrf.weight=0.5", "weak.densecrf.sigma_xy=3", "weak.seeds=[7]",
                 "weak.processes=1", "weak.cpu_threads=2", "weak.finetune_lr=0.5", "train.epochs=3",
                 "weak.full_every_seed=true", "val.max_images=2"):
        assert base(same).output_dir == first.output_dir, same
    for change in ("optim.lr=0.5", "weak.base_seed=1", "weak.base_epochs=2", "weak.scribble_seed=1",
                   "data.crop_size=[64,128]", "train.batch_size=4"):
        assert base(change).output_dir != first.output_dir, change


def test_two_phase_mode_is_refused_outside_the_comparison():
    with pytest.raises(ConfigError, match="'weak.mode' finetune is the comparison's"):
        weak_config(**{"weak.mode": "finetune"})
    with pytest.raises(ConfigError, match="'weak.mode' must be scratch or finetune, got 'twice'"):
        weak_config(**{"weak.mode": "twice", "weak.compare": "true"})


def test_two_phase_comparison_fine_tunes_one_cached_pce_base(tiny_cityscapes, tmp_path, ctx, capsys):
    """weak.mode finetune: one pCE base, trained once and reused; every run of every seed is a
    plain run of method weak initialised from it at the fine-tune learning rate."""
    from experiment.methods import train

    bases = tmp_path / "bases"
    opts = {**tiny_comparison(tiny_cityscapes, tmp_path / "cmp"), "weak.seeds": "[0, 1]",
            "weak.full_every_seed": "false", "weak.mode": "finetune", "weak.base_dir": bases, "weak.base_epochs": 1,
            "weak.base_seed": 5, "weak.finetune_lr": 0.002}
    summary = compare_supervision(weak_config(**opts), ctx, RunOptions())
    [folder] = list(bases.iterdir())
    base = str(folder / "last.pth")
    assert summary["base"] == base and summary["settings"]["mode"] == "finetune"
    base_run = json.loads((folder / "metrics.json").read_text())
    assert base_run["iteration"] > 1  # the base's epoch, not the fine-tunes' one iteration
    assert f"every run fine-tunes {base} (pCE, 1 epochs, seed 5)" in capsys.readouterr().out
    for run in ("seed0/pce", "seed0/densecrf", "seed0/full", "seed1/pce", "seed1/densecrf"):
        assert summary["runs"][run]["iterations"] == 1, run
    # a fine-tune is exactly a plain run initialised from the base at the fine-tune learning rate
    plain = weak_config(**{**opts, "output_dir": tmp_path / "plain", "weak.compare": "false", "weak.seeds": "[]",
                           "weak.mode": "scratch", "train.seed": 1, "model.init_checkpoint": base,
                           "optim.lr": 0.002, "optim.warmup_iters": 0})
    metrics, _ = train(plain, ctx)
    assert summary["per_seed"]["1"]["densecrf_miou"] == metrics["miou"]
    assert summary["per_seed"]["1"]["densecrf_mba"] == metrics["mba"]
    # another comparison with other DenseCRF settings reuses the base; another base schedule does not
    stamp = os.stat(base).st_mtime_ns
    again = compare_supervision(weak_config(**{**opts, "output_dir": tmp_path / "cmp2", "weak.seeds": "[1]",
                                               "loss.densecrf_weight": 2e-3}), ctx, RunOptions())
    assert again["base"] == base and os.stat(base).st_mtime_ns == stamp and len(list(bases.iterdir())) == 1
    assert again["per_seed"]["1"]["pce_miou"] == summary["per_seed"]["1"]["pce_miou"]
    other = compare_supervision(weak_config(**{**opts, "output_dir": tmp_path / "cmp3", "weak.seeds": "[1]",
                                               "weak.base_epochs": 2}), ctx, RunOptions())
    assert other["base"] != base and len(list(bases.iterdir())) == 2


def test_resumed_two_phase_comparison_refuses_fine_tunes_of_another_base(tiny_cityscapes, tmp_path, ctx):
    """A setting that shapes only the base (here its warmup: the fine-tunes set their own) gives a
    new base; the finished fine-tunes of the old one must not be kept as if they were its."""
    opts = {**tiny_comparison(tiny_cityscapes, tmp_path / "cmp"), "weak.seeds": "[0]", "weak.mode": "finetune",
            "weak.base_dir": tmp_path / "bases", "weak.base_epochs": 1, "weak.finetune_lr": 0.002,
            "optim.warmup_iters": 1}
    first = compare_supervision(weak_config(**opts), ctx, RunOptions())
    with pytest.raises(UserError, match=r"seed0/pce was trained with other settings \(model.init_checkpoint"):
        compare_supervision(weak_config(**{**opts, "optim.warmup_iters": 0}), ctx, RunOptions(resume="auto"))
    assert len(list((tmp_path / "bases").iterdir())) == 2 and first["base"].startswith(str(tmp_path / "bases"))


def test_training_on_voc_scribbles(tmp_path, ctx):
    from experiment.methods import train

    make_voc(tmp_path / "voc")
    cfg = weak_config(**{"output_dir": tmp_path / "run", "weak.source": "voc", "weak.voc_dir": tmp_path / "voc",
                         "model.num_classes": 21, "model.arch": "lighthrnet.HRNet16", "data.crop_size": "[32, 48]",
                         "data.num_workers": 0, "train.max_iters": 2, "train.batch_size": 2, "train.device": "cpu",
                         "train.amp": "off", "train.image_interval": 0, "val.num_workers": 0})
    metrics, _ = train(cfg, ctx)
    assert metrics["num_images"] == 2 and len(metrics["per_class_iou"]) == 21


def test_train_command_refuses_edges_with_scribbles(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiment.train", "--config", "configs/synthetic_scribbles.yaml",
                          "--output_dir", str(tmp_path / "x"), "--opt", "model.has_edge=true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "need full labels" in out.stderr + out.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's demo: configs/synthetic_scribbles.yaml end to end (seeds 0-2: pCE and
    pCE + DenseCRF each, full labels for seed 0; four single-thread child processes), run once for
    the tests below.  Measured DenseCRF - pCE per seed: +3.72, +2.01, +1.15 mIoU points on an AMD
    EPYC (earlier code), +3.20, +2.02, +1.99 on an Intel Xeon (docs/rloss.md); means +2.29 and
    +2.41.  The bounds leave the smallest seed 1.15 points and the mean 1.29 points."""
    out = tmp_path_factory.mktemp("scribble_demo") / "demo"
    subprocess.run([sys.executable, "-m", "experiment.train", "--config", "configs/synthetic_scribbles.yaml",
                    "--output_dir", str(out)], cwd=ROOT, check=True, timeout=3600)
    return json.loads((out / "comparison.json").read_text())


@pytest.mark.slow
def test_demo_densecrf_and_full_labels_improve_on_pce(demo):
    assert demo["densecrf_miou"] > demo["pce_miou"] and demo["full_miou"] > demo["pce_miou"]


@pytest.mark.slow
def test_demo_densecrf_beats_pce_on_every_seed_and_by_a_point_on_average(demo):
    margins = [r["densecrf_miou"] - r["pce_miou"] for r in demo["per_seed"].values()]
    assert len(margins) == 3 and min(margins) > 0
    assert demo["densecrf_gain_points"] >= 1.0


@pytest.fixture(scope="module")
def two_phase_demo(tmp_path_factory):
    """configs/synthetic_scribbles_two_phase.yaml end to end, its pCE base trained here (a fresh
    base_dir).  Measured on an Intel Xeon in three float orders (docs/rloss.md): DenseCRF - pCE
    mIoU +1.64 [+0.99, +2.29], +1.92 [+1.72, +2.12], +1.66 [+1.02, +2.30], per seed +1.48 to
    +2.01; mBA per seed +4.14 to +4.49.  The bounds leave the interval's lower end about a point."""
    root = tmp_path_factory.mktemp("scribble_two_phase")
    subprocess.run([sys.executable, "-m", "experiment.train", "--config", "configs/synthetic_scribbles_two_phase.yaml",
                    "--output_dir", str(root / "demo"), "--opt", f"weak.base_dir={root / 'bases'}"],
                   cwd=ROOT, check=True, timeout=3600)
    return json.loads((root / "demo" / "comparison.json").read_text())


@pytest.mark.slow
def test_two_phase_demo_margin_interval_lies_above_zero(two_phase_demo):
    assert two_phase_demo["seeds"] == [0, 1, 2] and two_phase_demo["base"]
    assert two_phase_demo["densecrf_gain_ci"]["ci_low"] > 0
    runs = two_phase_demo["per_seed"].values()
    assert min(r["densecrf_miou"] - r["pce_miou"] for r in runs) > 0
    assert min(r["densecrf_mba"] - r["pce_mba"] for r in runs) > 0
