"""experiment/train.py: exact resume, identical weights across gloo ranks, a checkpoint write
killed half-way, bf16 autocast on CPU, a non-finite loss, and the shipped configs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiment.comparisons.ablation import AblationExperimentConfig
from experiment.config import ExperimentConfig
from experiment.run_config import load_run_config
from experiment.checkpoints import load_training_checkpoint
from experiment.errors import NonFiniteLossError
from experiment.methods import train
from utils import dist
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"


def overrides(root, out, regressor, **extra):
    base = {
        "output_dir": out, "data.dataset_dir": root, "data.crop_size": "[64, 128]",
        "data.scale_range": "[0.75, 1.0]", "data.class_uniform_fraction": 0.0, "data.num_workers": 0,
        "model.arch": "lighthrnet.HRNet16", "model.has_edge": "true", "loss.inverseform_path": regressor,
        "loss.inverseform_tile_factor": 1, "optim.lr": 0.01, "optim.warmup_iters": 2, "train.epochs": 2,
        "train.max_iters": 6, "train.batch_size": 2, "train.log_interval": 1, "train.image_interval": 3,
        "train.val_interval": 1, "train.checkpoint_interval": 0, "train.device": "cpu", "train.amp": "off",
        "val.batch_size": 2, "val.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(*args, **kwargs):
    return load_config(ExperimentConfig, [], overrides(*args, **kwargs))


def history(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def test_resume_matches_an_uninterrupted_run(tiny_cityscapes, regressor, tmp_path, ctx):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    m_straight, net_straight = train(config(tiny_cityscapes, straight, regressor), ctx)
    metrics, _ = train(config(tiny_cityscapes, resumed, regressor), ctx, stop_after=3)
    assert metrics == {}
    assert load_training_checkpoint(str(resumed / "last.pth"))["iteration"] == 3
    m_resumed, net_resumed = train(config(tiny_cityscapes, resumed, regressor), ctx, resume=True)
    a, b = net_straight.state_dict(), net_resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    h1, h2 = history(straight), history(resumed)
    assert [r["iteration"] for r in h1] == [r["iteration"] for r in h2] == [1, 2, 3, 4, 5, 6]
    assert h1 == h2  # every loss component and learning rate, iteration by iteration
    assert {"total", "seg", "edge_bce", "edge_att", "inverseform", "aux"} <= set(h1[0])
    assert m_straight["miou"] == m_resumed["miou"]
    saved = json.loads((straight / "metrics.json").read_text())
    assert 0 <= saved["miou"] <= 1 and 0 <= saved["majority_class_miou"] <= 1
    for name in ("last.pth", "best.pth", "config.yaml"):
        assert (straight / name).is_file()
    assert (straight / "predictions" / "labelIds").is_dir()
    # the epoch-end validation ran too (epoch 1 of 2: 3 iterations of batch 2 over 6 images)
    assert (straight / "metrics_iter0000003.json").is_file()


def test_two_process_gloo_ranks_hold_identical_weights(tiny_cityscapes, regressor, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in dist.ENV_KEYS}
    env["OMP_NUM_THREADS"] = "1"
    ov = overrides(tiny_cityscapes, tmp_path / "run", regressor, **{"train.max_iters": 3, "train.batch_size": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPTS / "train_ranks.py"), str(tmp_path), json.dumps(ov)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    last = load_training_checkpoint(str(tmp_path / "run" / "last.pth"))
    assert last["iteration"] == 3 and len(last["rng"]) == 2
    assert all(torch.equal(w0[k], v) for k, v in last["state_dict"].items())
    m0, m1 = (json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1 and m0["num_images"] == 4


def test_killed_checkpoint_write_leaves_previous_checkpoint(tiny_cityscapes, regressor, tmp_path, ctx):
    out = tmp_path / "run"
    ov = overrides(tiny_cityscapes, out, regressor, **{"train.checkpoint_interval": 1})
    proc = subprocess.run([sys.executable, str(SCRIPTS / "kill_during_save.py"), json.dumps(ov)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = load_training_checkpoint(str(out / "last.pth"))  # the first checkpoint, whole
    assert state["iteration"] == 1
    assert list(out.glob(".last.pth.*.tmp"))  # the half-written temporary, never the checkpoint
    metrics, _ = train(config(tiny_cityscapes, out, regressor, **{"train.checkpoint_interval": 1}), ctx,
                       resume=True, stop_after=2)
    assert not list(out.glob(".last.pth.*.tmp"))
    assert load_training_checkpoint(str(out / "last.pth"))["iteration"] == 2
    # the killed run had logged iteration 2 past its checkpoint: logged once, by the resumed run
    assert [r["iteration"] for r in history(out)] == [1, 2]


def test_bf16_autocast_on_cpu(tiny_cityscapes, regressor, tmp_path, ctx):
    metrics, _ = train(config(tiny_cityscapes, tmp_path, regressor, **{"train.amp": "bf16", "train.max_iters": 2,
                                                                        "val.amp": "bf16"}), ctx)
    assert all(math.isfinite(r["total"]) for r in history(tmp_path))
    assert 0 <= metrics["miou"] <= 1 and math.isfinite(metrics["val_loss"])


def test_non_finite_loss_stops_with_its_component(tiny_cityscapes, regressor, tmp_path, ctx, monkeypatch):
    from experiment.methods import segmentation as losses

    real_forward, calls = losses.SegmentationObjective.forward, {"n": 0}

    def poisoned(self, outputs, label, edge):
        total, parts = real_forward(self, outputs, label, edge)
        calls["n"] += 1
        if calls["n"] == 3:  # iteration index 2
            parts = dict(parts, inverseform=torch.tensor(float("nan")))
            total = total + parts["inverseform"]
        return total, parts

    monkeypatch.setattr(losses.SegmentationObjective, "forward", poisoned)
    cfg = config(tiny_cityscapes, tmp_path, regressor, **{"train.checkpoint_interval": 1})
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 .*inverseform = nan.*last checkpoint"):
        train(cfg, ctx)
    state = load_training_checkpoint(str(tmp_path / "last.pth"))
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_regressor_is_trained_when_missing(tiny_cityscapes, tmp_path, ctx):
    reg_cfg = tmp_path / "regressor.yaml"
    reg_cfg.write_text(
        "data: {crop_size: [64, 128], scale_range: [0.75, 1.0], num_workers: 0}\n"
        "model: {tile_size: 32, hidden: [64, 16]}\n"
        f"output_dir: {tmp_path / 'regressor_run'}\n"
        "tiles: {tile_factor: 1}\n"
        "train: {steps: 4, images_per_batch: 2, log_interval: 2, eval_images: 4}\n")
    target = tmp_path / "made" / "regressor.pth"
    cfg = config(tiny_cityscapes, tmp_path / "seg", target,
                 **{"loss.regressor_config": reg_cfg, "train.max_iters": 2})
    train(cfg, ctx)
    assert target.is_file() and target.with_suffix(".json").is_file()
    assert "inverseform" in history(tmp_path / "seg")[0]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    path = ROOT / "configs" / name
    cfg = load_run_config([path], schema=AblationExperimentConfig if "ablation" in name else None)
    if isinstance(cfg, ExperimentConfig):
        import models

        models.get_net(cfg.model.arch, hrnet_base=cfg.model.hrnet_base, has_edge=cfg.model.has_edge)


def test_fine_tuning_and_imagenet_backbone_initialise_the_model(tiny_cityscapes, regressor, tmp_path, ctx):
    """model.init_checkpoint (a released-format file) and model.pretrained_backbone (the HRNet
    authors' ImageNet format: trunk keys without 'backbone.', plus a classifier) reach the network."""
    import models
    from synthetic_weights import synthetic_state_dict

    donor = models.get_net("lighthrnet.HRNet16", has_edge=True)
    weights = synthetic_state_dict(donor.state_dict(), seed=3)
    released = tmp_path / "released.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, released)
    imagenet = tmp_path / "imagenet.pth"
    trunk = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    torch.save({**trunk, "classifier.weight": torch.zeros(1000, 2048), "classifier.bias": torch.zeros(1000)}, imagenet)
    conv = "backbone.stage4.0.branches.3.0.conv1.weight"

    for key, path, expected in (("model.init_checkpoint", released, ("hrhead.last_layer.0.weight", conv)),
                                ("model.pretrained_backbone", imagenet, (conv,))):
        out = tmp_path / key
        _, net = train(config(tiny_cityscapes, out, regressor, **{key: path, "optim.lr": 1e-9, "train.max_iters": 1,
                                                                   "optim.weight_decay": 0.0}), ctx)
        for name in expected:  # one step of lr 1e-9 away from the file's values, far from a fresh init
            torch.testing.assert_close(net.state_dict()[name], weights[name], rtol=0, atol=1e-6)
            assert not torch.allclose(donor.state_dict()[name], weights[name], atol=1e-3)


def test_training_the_regressor_first_does_not_change_the_run(tiny_cityscapes, regressor, tmp_path, ctx, monkeypatch):
    """On a fresh checkout the main job trains its regressor in the same process before the
    segmentation run; a second run finds the file.  Both must train the same network: the
    regressor's draws from the global generators may not leak into the model's initialisation
    or the data order."""
    import experiment.methods.segmentation as train_module

    plain_metrics, plain = train(config(tiny_cityscapes, tmp_path / "plain", regressor, **{"train.max_iters": 2}), ctx)

    def regressor_training_stand_in(cfg, ctx):  # what training a regressor does to the generators
        import random

        import numpy as np
        torch.rand(1000), np.random.rand(10), random.random()

    monkeypatch.setattr(train_module, "ensure_regressor", regressor_training_stand_in)
    fresh_metrics, fresh = train(config(tiny_cityscapes, tmp_path / "fresh", regressor, **{"train.max_iters": 2}), ctx)
    a, b = plain.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert history(tmp_path / "plain") == history(tmp_path / "fresh")
