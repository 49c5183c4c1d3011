"""The edge-map F-score (device counts = the numpy oracle), edge targets without the
image border, and the ablation (variant configs, summary, a tiny end-to-end run)."""
import json
import os
from pathlib import Path
import math

import cv2
import numpy as np
import pytest
import torch

from datasets.edges import edge_target, edge_target_reference
from experiment.comparisons.ablation import (VARIANTS, AblationExperimentConfig, ablation_table, base_config,
                                            run_ablation, summarise, variant_config)
from experiment.methods import RunOptions
from experiment.errors import UserError
from utils.config import load_config
from utils.metrics import EDGE_THRESHOLDS, edge_f_counts, edge_f_counts_batch, edge_f_from_counts


# ----------------------------------------------------------------------------- edge F-score
def _blobs(rng, shape, classes=6):
    """A label map of random rectangles (boundaries in every direction)."""
    label = np.zeros(shape, np.uint8)
    for _ in range(8):
        y0, x0 = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        label[y0:y0 + rng.integers(3, shape[0] // 2), x0:x0 + rng.integers(3, shape[1] // 2)] = rng.integers(1, classes)
    return label


@pytest.mark.parametrize("tolerance", [1, 2, 3])
def test_edge_f_counts_batch_equals_the_thresholded_oracle(tolerance):
    rng = np.random.default_rng(tolerance)
    targets = np.stack([edge_target(_blobs(rng, (37, 53))) for _ in range(4)]).astype(np.float32)
    # noisy, blurred versions of the targets: probabilities with every kind of error
    probs = np.stack([np.clip(cv2.GaussianBlur(t, (0, 0), 1.5) + 0.3 * rng.random(t.shape), 0, 1)
                      for t in targets]).astype(np.float32)
    oracle = sum(edge_f_counts(probs[i], targets[i], tolerance=tolerance) for i in range(len(probs)))
    batch = edge_f_counts_batch(torch.from_numpy(probs), torch.from_numpy(targets), tolerance=tolerance)
    assert batch.dtype == torch.int64 and batch.shape == (len(EDGE_THRESHOLDS), 4)
    assert oracle[:, 1].max() > oracle[:, 1].min() > 0  # the thresholds matter on these maps
    np.testing.assert_array_equal(batch.numpy(), oracle)


def test_edge_f_perfect_empty_and_shifted_predictions():
    rng = np.random.default_rng(0)
    target = edge_target(_blobs(rng, (64, 96))).astype(np.float32)
    perfect = edge_f_from_counts(edge_f_counts_batch(torch.tensor(target)[None], torch.tensor(target)[None]).numpy())
    assert perfect["edge_f"] == 1.0 and perfect["edge_precision"] == 1.0 and perfect["edge_recall"] == 1.0
    empty = edge_f_from_counts(edge_f_counts_batch(torch.zeros(1, 64, 96), torch.tensor(target)[None]).numpy())
    assert empty["edge_f"] == 0.0
    # a band moved by more than the tolerance loses, one moved within it does not
    near = np.roll(target, 2, axis=1)
    far = np.roll(target, 6, axis=1)
    f_near = edge_f_from_counts(edge_f_counts_batch(torch.tensor(near)[None], torch.tensor(target)[None]).numpy())
    f_far = edge_f_from_counts(edge_f_counts_batch(torch.tensor(far)[None], torch.tensor(target)[None]).numpy())
    assert f_near["edge_f"] > 0.95 > f_far["edge_f"]


def test_edge_f_ods_picks_the_best_shared_threshold():
    target = np.zeros((40, 40), np.float32)
    target[:, 18:22] = 1
    prob = np.full((40, 40), 0.3, np.float32)  # everything at 0.3: precision 0.1 below it
    prob[:, 18:22] = 0.7                        # the edges at 0.7: perfect above 0.3
    out = edge_f_from_counts(edge_f_counts_batch(torch.tensor(prob)[None], torch.tensor(target)[None]).numpy())
    assert out["edge_f"] == 1.0 and 0.3 < out["edge_f_threshold"] <= 0.7


# ----------------------------------------------------------------------------- edge targets, border
def test_edge_targets_without_the_image_border():
    label = np.full((30, 40), 5, np.uint8)  # one class everywhere: the reference marks the border
    with_border = edge_target(label)
    assert with_border[0].all() and with_border[:, -1].all() and not with_border[10:20, 10:30].any()
    np.testing.assert_array_equal(with_border, edge_target_reference(label))
    assert not edge_target(label, image_border=False).any()
    # a boundary between two labels is the same either way, also where it meets the border
    label[:, 20:] = 7
    inner = edge_target(label, image_border=False)
    assert inner[:, 18:22].all() and not inner[:, :17].any() and not inner[:, 23:].any()
    np.testing.assert_array_equal(inner[3:-3, 3:-3], edge_target(label)[3:-3, 3:-3])  # away from the border


def test_train_transform_passes_the_border_choice(tiny_cityscapes):
    from datasets import Cityscapes, TrainTransform

    label = Cityscapes(tiny_cityscapes, "train", progress=False).load_label(0)
    for border in (True, False):
        t = TrainTransform(crop_size=(32, 64), scale_range=(1.0, 1.0), edge_image_border=border)
        lab, edge = t.label_crop(label, np.random.default_rng(0))
        np.testing.assert_array_equal(edge, edge_target(lab, 2, image_border=border))


# ----------------------------------------------------------------------------- the ablation
def _config(root, out, regressor, *extra):
    return load_config(AblationExperimentConfig, [], [
        f"output_dir={out}", f"data.dataset_dir={root}", "data.crop_size=[64,128]", "data.scale_range=[1.0,1.0]",
        "data.class_uniform_fraction=0.0", "data.num_workers=0", "model.arch=lighthrnet.HRNet16",
        "model.has_edge=true", f"loss.inverseform_path={regressor}", "loss.inverseform_tile_factor=1",
        "optim.lr=0.01", "optim.warmup_iters=1", "train.epochs=1", "train.max_iters=2", "train.batch_size=2",
        "train.log_interval=1", "train.image_interval=0", "train.val_interval=0", "train.device=cpu",
        "val.batch_size=2", "val.num_workers=0", "val.max_images=2", "ablation.mode=scratch",
        f"ablation.base_dir={Path(out) / 'bases'}", *extra])


def test_variant_configs_switch_only_the_loss_terms(tmp_path):
    cfg = load_config(AblationExperimentConfig, [], [f"output_dir={tmp_path}"])
    runs = {name: variant_config(cfg, name, 7) for name in VARIANTS}
    assert (runs["ce"].loss.edge_weight, runs["ce"].loss.att_weight, runs["ce"].loss.inv_weight) == (0, 0, 0)
    assert runs["joint"].loss.inv_weight == 0 and runs["joint"].loss.edge_weight == cfg.loss.edge_weight
    assert runs["inverseform"].loss.inv_weight == cfg.loss.inv_weight
    assert runs["inverseform"].loss.inverseform_distance == "euclidean"
    assert runs["geodesic"].loss.inverseform_distance == "geodesic"
    for name, run in runs.items():
        assert run.train.seed == 7 and run.output_dir == str(tmp_path / name / "seed7")
        assert run.optim == cfg.optim and run.data == cfg.data and run.model == cfg.model


def test_summary_and_table():
    per_seed = {0: {"miou": 0.5, "mba": 0.4, "boundary_f": 0.3, "boundary_iou": 0.25, "edge_f": 0.2,
                    "train_seconds_per_iteration": 1.0},
                1: {"miou": 0.7, "mba": 0.6, "boundary_f": 0.5, "boundary_iou": 0.35, "edge_f": float("nan"),
                    "train_seconds_per_iteration": 3.0}}
    s = summarise(per_seed)
    assert math.isclose(s["mean"]["miou"], 0.6) and math.isclose(s["std"]["miou"], math.sqrt(0.02))
    assert s["mean"]["edge_f"] == 0.2 and s["std"]["edge_f"] == 0.0  # a NaN seed is left out
    results = {"joint": {"title": "CE + BCE + att", "per_seed": per_seed, **s},
               "inverseform": {"title": "+ InverseForm", "per_seed": per_seed, **s}}
    table = ablation_table(results, [0, 1])
    assert "60.00 +- 14.14" in table and "inverseform - joint, mIoU   : +0.00 points, 95 % CI [+0.00, +0.00]" in table
    assert "bnd IoU" in table.splitlines()[1] and "30.00 +- 7.07" in table


def test_ablation_refuses_a_model_without_edge_head(tiny_cityscapes, regressor, tmp_path, ctx):
    cfg = _config(tiny_cityscapes, tmp_path, regressor, "model.has_edge=false")
    with pytest.raises(UserError, match="has_edge"):
        run_ablation(cfg, ctx)


def test_tiny_ablation_writes_table_json_and_figure(tiny_cityscapes, regressor, tmp_path, ctx, capsys):
    """Two variants x two seeds, trained two at a time as child processes."""
    cfg = _config(tiny_cityscapes, tmp_path, regressor, "ablation.variants=[ce,inverseform]", "ablation.seeds=[0,1]",
                  "ablation.figure_images=2", "ablation.processes=2", "ablation.cpu_threads=1")
    summary = run_ablation(cfg, ctx)
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert set(saved["variants"]) == {"ce", "inverseform"} and saved["seeds"] == [0, 1]
    for name in ("ce", "inverseform"):
        per_seed = saved["variants"][name]["per_seed"]
        assert set(per_seed) == {"0", "1"}
        for seed in (0, 1):
            run = json.loads((tmp_path / name / f"seed{seed}" / "metrics.json").read_text())
            assert per_seed[str(seed)]["miou"] == run["miou"] and 0 <= run["edge_f"] <= 1
            assert per_seed[str(seed)]["boundary_iou"] == run["boundary_iou"]
            assert run["train_seconds_per_iteration"] > 0
        assert saved["variants"][name]["mean"]["miou"] == pytest.approx(np.mean([per_seed[s]["miou"] for s in "01"]))
    # the two seeds are different runs, the two variants different objectives
    def scores(name, seed):  # the metrics alone: the timing fields differ between any two runs
        return {k: saved["variants"][name]["per_seed"][seed][k] for k in ("miou", "mba", "boundary_f", "boundary_iou", "edge_f")}

    assert scores("ce", "0") != scores("ce", "1")
    assert scores("ce", "0") != scores("inverseform", "0")
    picture = cv2.imread(str(tmp_path / "ablation.png"))
    # rows: images + ground truth, edge targets, one per variant; columns: 2 images x 2 tiles of 256 x 128
    assert picture.shape == (4 * 128, 2 * 2 * 256, 3)
    assert summary["variants"]["ce"]["title"] in capsys.readouterr().out
    # --resume keeps finished runs: nothing is trained again, the same summary comes back
    stamp = (tmp_path / "ce" / "seed1" / "last.pth").stat().st_mtime_ns
    again = run_ablation(cfg, ctx, RunOptions(resume=True))
    assert again["variants"]["inverseform"]["mean"] == summary["variants"]["inverseform"]["mean"]
    assert (tmp_path / "ce" / "seed1" / "last.pth").stat().st_mtime_ns == stamp
    # without --resume or --overwrite a finished run directory is refused, naming it
    with pytest.raises(UserError, match="seed0"):
        run_ablation(cfg, ctx)


def test_ablation_in_process_matches_a_plain_training_run(tiny_cityscapes, regressor, tmp_path, ctx):
    """One run in this process: its metrics are those of experiment.train with the variant's settings."""
    from experiment.methods import train

    cfg = _config(tiny_cityscapes, tmp_path / "abl", regressor, "ablation.variants=[joint]", "ablation.seeds=[3]",
                  "ablation.figure_images=1")
    summary = run_ablation(cfg, ctx)
    plain = _config(tiny_cityscapes, tmp_path / "plain", regressor, "loss.inv_weight=0", "train.seed=3")
    metrics, _ = train(plain, ctx)
    assert summary["variants"]["joint"]["per_seed"][3]["miou"] == metrics["miou"]
    assert summary["variants"]["joint"]["per_seed"][3]["edge_f"] == metrics["edge_f"]
    assert (tmp_path / "abl" / "ablation.png").is_file()


@pytest.mark.parametrize("border", [True, False])
def test_the_main_jobs_regressor_is_trained_on_its_own_edge_definition(tmp_path, border):
    from pathlib import Path

    from experiment.methods.segmentation import regressor_config_for

    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"
    cfg = load_config(AblationExperimentConfig, [config], [f"data.edge_image_border={border}",
                                                   f"loss.inverseform_path={tmp_path / 'r.pth'}"])
    assert regressor_config_for(cfg).data.edge_image_border is border


def test_a_failing_child_run_is_reported_with_its_own_error(tiny_cityscapes, regressor, tmp_path, ctx):
    cfg = _config(tmp_path / "no_such_dataset", tmp_path / "abl", regressor, "ablation.variants=[ce]",
                  "ablation.seeds=[0]", "ablation.figure_images=0", "ablation.processes=2")
    with pytest.raises(UserError) as err:
        run_ablation(cfg, ctx)
    message = str(err.value)
    assert "ce/seed0 failed" in message and "no_such_dataset" in message and "console.txt" in message


# ----------------------------------------------------------------------------- fine-tuning mode
def test_the_base_is_named_by_what_shapes_its_weights(tmp_path):
    def base(*extra):
        return base_config(load_config(AblationExperimentConfig, [], [f"output_dir={tmp_path / 'a'}", *extra]))

    first = base()
    assert first.loss.inv_weight == 0 and first.train.seed == 0 and first.train.epochs == 60
    assert base(f"output_dir={tmp_path / 'b'}", "data.num_workers=0", "train.log_interval=1",
                "val.batch_size=4", "ablation.seeds=[5]").output_dir == first.output_dir
    for change in ("train.batch_size=4", "optim.lr=0.5", "ablation.base_seed=1", "ablation.base_epochs=2",
                   "loss.edge_weight=0.5"):
        assert base(change).output_dir != first.output_dir, change


def test_finetuning_runs_start_from_one_cached_base_and_report_paired_intervals(tiny_cityscapes, regressor,
                                                                                tmp_path, ctx, capsys):
    from experiment.methods import train

    bases = tmp_path / "bases"
    options = ("ablation.mode=finetune", f"ablation.base_dir={bases}", "ablation.base_epochs=1",
               "ablation.finetune_lr=0.002", "ablation.variants=[joint,inverseform]", "ablation.seeds=[0,1]",
               "ablation.figure_images=0")
    summary = run_ablation(_config(tiny_cityscapes, tmp_path / "abl", regressor, *options), ctx)
    [folder] = list(bases.iterdir())
    base = str(folder / "last.pth")
    assert summary["mode"] == "finetune" and summary["base"] == base
    # a fine-tune is exactly a plain run initialised from the base at the fine-tune learning rate
    plain = _config(tiny_cityscapes, tmp_path / "plain", regressor, "loss.inv_weight=0", "train.seed=1",
                    f"model.init_checkpoint={base}", "optim.lr=0.002", "optim.warmup_iters=0")
    metrics, _ = train(plain, ctx)
    assert summary["variants"]["joint"]["per_seed"][1]["miou"] == metrics["miou"]
    effect = summary["effects_vs_joint"]["inverseform"]["miou"]
    per_seed = summary["variants"]
    diffs = [per_seed["inverseform"]["per_seed"][s]["miou"] - per_seed["joint"]["per_seed"][s]["miou"] for s in (0, 1)]
    assert effect["per_seed"] == diffs and effect["mean"] == pytest.approx(np.mean(diffs))
    assert effect["ci_low"] <= effect["mean"] <= effect["ci_high"] and effect["interval"] == "paired t"
    assert "inverseform - joint, mIoU" in capsys.readouterr().out
    # a second ablation with the same settings reuses the base instead of training it again
    stamp = os.stat(base).st_mtime_ns
    again = run_ablation(_config(tiny_cityscapes, tmp_path / "abl2", regressor, *options), ctx)
    assert again["base"] == base and os.stat(base).st_mtime_ns == stamp and len(list(bases.iterdir())) == 1
    assert again["effects_vs_joint"] == summary["effects_vs_joint"]  # the same base, the same fine-tunes


def test_on_cuda_the_ablation_keeps_its_own_fine_tuning_length():
    """The ablation config inherits the main job's; the main job's CUDA recipe (its epochs and
    batch) must not replace the fine-tunes' 10 epochs of 8 crops or the base's length."""
    from experiment.run_config import load_run_config

    cpu, gpu = (load_run_config(["configs/synthetic_ablation.yaml"], [], schema=AblationExperimentConfig, cuda=cuda)
                for cuda in (False, True))
    assert (gpu.train.epochs, gpu.train.batch_size, gpu.ablation.base_epochs) == \
        (cpu.train.epochs, cpu.train.batch_size, cpu.ablation.base_epochs) == (10, 8, 60)
