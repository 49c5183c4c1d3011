"""Reliability of the pieces below the scripts: atomic writes keep the umask's mode,
name the file on disk-full and pass a Ctrl-C through; config values must be finite numbers
and intervals sensible; loss inputs are checked as documented."""
import errno
import math
import os
import stat

import pytest
import torch

from experiment.config import ExperimentConfig
from utils.config import ConfigError, load_config
from utils.io import atomic_open, atomic_torch_save, atomic_write_text


# ----------------------------------------------------------------------------- utils.io
def test_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "b.pth")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.pth"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_disk_full_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "last.pth"
    atomic_torch_save({"step": 1}, target)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_torch_save({"step": 2}, target)
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and "No space left" in str(info.value)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_ctrl_c_wrapped_by_a_writer_comes_out_as_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(tmp_path / "x.bin", "wb"):
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:  # what torch.save's C++ writer does with it
                raise RuntimeError("PytorchStreamWriter failed writing file") from exc
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write .*file/sub/x.txt"):
        atomic_write_text(blocker / "sub" / "x.txt", "x")


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.weight_decay=nan", "optim.poly_power=nan",
                                      "optim.momentum=-inf", "loss.inv_weight=.nan", "data.scale_range=[0.5, inf]"])
def test_non_finite_numbers_are_config_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}.*finite"):
        load_config(ExperimentConfig, [], [override])


@pytest.mark.parametrize("override, key", [
    ("train.log_interval=0", "train.log_interval"), ("train.image_interval=-1", "train.image_interval"),
    ("train.val_interval=-1", "train.val_interval"), ("train.checkpoint_interval=-2", "train.checkpoint_interval"),
    ("val.max_images=0", "val.max_images"), ("val.max_images=-3", "val.max_images"),
    ("optim.momentum=-0.1", "optim.momentum"), ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.poly_power=-1", "optim.poly_power"), ("model.num_classes=0", "model.num_classes"),
    ("val.num_workers=-1", "val.num_workers"), ("optim.optimizer=adam", "optim.optimizer")])
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ExperimentConfig, [], [override])


def test_the_optim_section_chooses_the_optimizer():
    from experiment.engine import OptimizerSpec

    params = [torch.nn.Parameter(torch.zeros(2))]
    for name, kind in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        cfg = load_config(ExperimentConfig, [], [f"optim.optimizer={name}", "optim.lr=0.002", "optim.weight_decay=0.01"])
        built = OptimizerSpec.from_config(cfg.optim).build(params)
        assert type(built) is kind
        assert built.defaults["lr"] == 0.002 and built.defaults["weight_decay"] == 0.01


def test_adamw_takes_the_fused_kernel_where_torch_has_one():
    from experiment.engine import OptimizerSpec

    spec = OptimizerSpec(kind="adamw", lr=1e-3)
    assert spec.build([torch.nn.Parameter(torch.zeros(2))]).defaults["fused"] is True
    # parameters on a device the fused kernel does not serve (meta here) get torch's default loop
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert not spec.build([meta]).defaults["fused"]


def test_finite_values_still_pass():
    cfg = load_config(ExperimentConfig, [], ["optim.lr=1e-3", "val.max_images=1", "train.log_interval=1"])
    assert math.isclose(cfg.optim.lr, 1e-3) and cfg.val.max_images == 1
