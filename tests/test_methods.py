"""Methods as plug-ins: the registry, and a method of one small file outside the project that gets
every guarantee of the engine (run-directory claim, exact resume, checkpoints, validation) through
the ordinary training command."""
import json
import textwrap

import pytest
import torch

from experiment.checkpoints import load_training_checkpoint
from experiment.errors import UserError
from experiment.methods import get_method, method_name, method_names, train
from experiment.run_config import load_run_config
from utils.config import ConfigError

PLAIN_CE = textwrap.dedent('''
    """Plain cross-entropy, no edge terms: a method in one file."""
    import torch
    import torch.nn.functional as F

    from experiment.config import ExperimentConfig
    from experiment.data import dataset_root, train_dataset, val_dataset
    from experiment.methods import Method, register
    from experiment.methods.segmentation import segmentation_task


    class PlainCE(torch.nn.Module):
        def forward(self, outputs, label, edge):
            loss = F.cross_entropy(outputs["pred"].float(), label, ignore_index=255)
            return loss, {"ce": loss.detach()}


    def build(cfg, ctx):
        root, _ = dataset_root(cfg.data)
        train = train_dataset(cfg.data, root, seed=cfg.train.seed)
        val = val_dataset(cfg.data, root, max_images=cfg.val.max_images)
        return segmentation_task(cfg, ctx, train, val, lambda net: PlainCE(), root)


    register(Method("plain_ce_method", ExperimentConfig, build=build))
''')


def test_built_in_methods_are_registered_and_chosen_by_the_config():
    assert {"segmentation", "weak", "nus", "regressor"} <= set(method_names())
    assert method_name({}) == "segmentation"
    assert method_name({"method": "regressor"}) == "regressor"
    assert method_name({"nus": {"mode": "compare"}}) == "nus" and method_name({"nus": {"mode": "off"}}) == "segmentation"
    assert method_name({"weak": {"enabled": True}}) == "weak"
    with pytest.raises(ConfigError, match="unknown method 'nope'.*segmentation"):
        get_method("nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such.module'"):
        get_method("no_such.module")


def test_older_configs_load_into_the_new_sections(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("weak: {enabled: true, labels: full}\nloss: {densecrf_weight: 1.0e-5, densecrf_sigma_xy: 10}\n"
                   "nus: {mode: off}\nablation: {seeds: [0]}\n")
    cfg = load_run_config([str(old)])
    assert cfg.method == "weak" and cfg.weak.labels == "full"
    assert (cfg.weak.densecrf.weight, cfg.weak.densecrf.sigma_xy) == (1.0e-5, 10.0)
    assert not hasattr(cfg.loss, "densecrf_weight") and not hasattr(cfg, "nus")
    plain = tmp_path / "plain.yaml"
    plain.write_text("loss: {densecrf_weight: 0.0}\nnus: {mode: off}\nweak: {enabled: false}\n")
    assert type(load_run_config([str(plain)])).__name__ == "ExperimentConfig"
    plain.write_text("loss: {densecrf_weight: 0.5}\n")
    with pytest.raises(ConfigError, match="loss.densecrf_weight belong to the DenseCRF loss of method weak"):
        load_run_config([str(plain)])


def test_a_method_in_one_small_file_gets_every_guarantee(tiny_cityscapes, tmp_path, ctx, monkeypatch):
    (tmp_path / "plain_ce_method.py").write_text(PLAIN_CE)
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["method=plain_ce_method", f"data.dataset_dir={tiny_cityscapes}", "data.crop_size=[64,128]",
                 "data.class_uniform_fraction=0.0", "data.num_workers=0", "model.arch=lighthrnet.HRNet16",
                 "model.has_edge=false", "train.epochs=2", "train.max_iters=4", "train.batch_size=2",
                 "train.log_interval=1", "train.device=cpu", "train.amp=off", "val.batch_size=2",
                 "val.num_workers=0"]

    def config(out):
        return load_run_config([], overrides + [f"output_dir={out}"])

    metrics, net = train(config(tmp_path / "straight"), ctx)
    assert 0 <= metrics["miou"] <= 1 and "val_loss" not in metrics
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4] and "ce" in log[0]
    for name in ("last.pth", "best.pth", "metrics.json", "config.yaml", "metrics_iter0000003.json"):
        assert (tmp_path / "straight" / name).is_file(), name
    with pytest.raises(UserError, match="already holds the outputs of an earlier run"):
        train(config(tmp_path / "straight"), ctx)
    assert train(config(tmp_path / "resumed"), ctx, stop_after=2)[0] == {}
    _, resumed = train(config(tmp_path / "resumed"), ctx, resume=True)
    a, b = net.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_training_checkpoint(str(tmp_path / "resumed" / "last.pth"))["iteration"] == 4
