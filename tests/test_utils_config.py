"""utils.config: YAML merge, overrides, type checking, unknown keys, saving."""
import argparse
import dataclasses
from typing import List, Optional, Tuple

import pytest
import yaml

from utils.config import (ConfigError, add_config_arguments, build_dataclass, config_to_dict, load_config,
                          path_field, save_config)


@dataclasses.dataclass
class Optim:
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False


@dataclasses.dataclass
class Data:
    root: Optional[str] = None
    crop_size: Tuple[int, int] = (512, 1024)
    scales: List[float] = dataclasses.field(default_factory=lambda: [1.0])


@dataclasses.dataclass
class Root:
    name: str = "run"
    epochs: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)
    data: Data = dataclasses.field(default_factory=Data)


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_when_nothing_given():
    cfg = load_config(Root)
    assert cfg == Root()


def test_files_merge_in_order_and_nested_keys_survive(tmp_path):
    a = write(tmp_path / "a.yaml", {"epochs": 3, "optim": {"lr": 0.1, "momentum": 0.5}})
    b = write(tmp_path / "b.yaml", {"optim": {"lr": 0.2}, "data": {"crop_size": [64, 128]}})
    cfg = load_config(Root, [a, b])
    assert cfg.epochs == 3
    assert cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.5  # merged, not replaced
    assert cfg.data.crop_size == (64, 128) and isinstance(cfg.data.crop_size, tuple)


def test_base_inheritance_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", {"epochs": 7, "name": "base"})
    child = write(tmp_path / "sub" / "child.yaml", {"_base_": "../base.yaml", "name": "child"})
    cfg = load_config(Root, [child])
    assert (cfg.epochs, cfg.name) == (7, "child")


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(Root, [tmp_path / "a.yaml"])


def test_overrides_win_and_are_typed(tmp_path):
    a = write(tmp_path / "a.yaml", {"optim": {"lr": 0.1}})
    cfg = load_config(Root, [a], ["optim.lr=1e-4", "optim.nesterov=true", "data.scales=[0.5, 1.0, 2]",
                                 "data.root=/x/y", "epochs=5"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.nesterov is True
    assert cfg.data.scales == [0.5, 1.0, 2.0]
    assert cfg.data.root == "/x/y" and cfg.epochs == 5


def test_comma_separated_list_override():
    cfg = load_config(Root, [], ["data.crop_size=32,64"])
    assert cfg.data.crop_size == (32, 64)


@pytest.mark.parametrize("override, key, expected", [
    ("epochs=ten", "epochs", "int"),
    ("epochs=1.5", "epochs", "int"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("optim.nesterov=maybe", "optim.nesterov", "bool"),
    ("data.crop_size=[1, 2, 3]", "data.crop_size", "2 values"),
    ("data.scales=[1, x]", "data.scales[1]", "float"),
    ("optim=3", "optim", "mapping"),
])
def test_wrong_types_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(Root, [], [override])
    assert f"'{key}'" in str(err.value) and expected in str(err.value)


def test_unknown_keys_are_rejected_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean 'lr'"):
        load_config(Root, [], ["optim.lrr=0.1"])
    bad = write(tmp_path / "bad.yaml", {"dataa": {}})
    with pytest.raises(ConfigError, match=r"unknown config key 'dataa'"):
        load_config(Root, [bad])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(Root, [tmp_path / "missing.yaml"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(Root, [tmp_path / "list.yaml"])
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(Root, [tmp_path / "broken.yaml"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(Root, [], ["epochs"])


def test_validate_hook_runs():
    @dataclasses.dataclass
    class Checked:
        size: int = 1

        def validate(self):
            if self.size <= 0:
                raise ConfigError(f"config key 'size' must be positive, got {self.size}")

    assert build_dataclass(Checked, {"size": 2}).size == 2
    with pytest.raises(ConfigError, match="must be positive"):
        build_dataclass(Checked, {"size": 0})


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Root, [], ["optim.lr=0.5", "data.crop_size=[8, 16]", "name=x"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(Root, [tmp_path / "out" / "config.yaml"]) == cfg
    assert config_to_dict(cfg)["data"]["crop_size"] == [8, 16]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


@dataclasses.dataclass
class Paths:
    out: Optional[str] = path_field(None)
    other: Optional[str] = path_field(None, kind="config")


def test_saved_config_holds_relative_shell_paths_as_absolute_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Paths, [], ["out=runs/x", "other=configs/a.yaml"])
    assert cfg.out == "runs/x"  # shell input: relative to the current directory
    save_config(cfg, tmp_path / "runs" / "x" / "config.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a child process or a later --config reads it from another folder
    again = load_config(Paths, [tmp_path / "runs" / "x" / "config.yaml"])
    assert again.out == str(tmp_path / "runs" / "x") and again.other == str(tmp_path / "configs" / "a.yaml")


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", "a.yaml", "--config", "b.yaml", "--opt", "x=1", "y=2", "--opt", "z=3"])
    assert args.config == ["a.yaml", "b.yaml"]
    assert args.opt == ["x=1", "y=2", "z=3"]
