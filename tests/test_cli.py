"""The command line as a user meets it: configs by name and relative paths that do not
depend on the current directory, checkpoints that describe their model to validation, missing
released files that say where to get them, and the field's flag conventions."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from experiment import paths
from experiment import infer as infer_script
from experiment import train as train_script
from experiment import train_inverseform as regressor_script
from experiment import validation as validation_script
from experiment.errors import UserError
from experiment.config import ExperimentConfig
from experiment.methods.regressor import RegressorConfig
from experiment.methods.segmentation import regressor_config_for
from experiment.run_config import load_run_config
from utils.config import ConfigError, load_config, path_field, path_keys, project_root

ROOT = Path(__file__).resolve().parents[1]


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- config paths
def test_relative_paths_resolve_against_the_project_of_the_config(tmp_path, monkeypatch):
    project = tmp_path / "project"
    write(project / "configs" / "base.yaml", {"output_dir": "runs/base", "data": {"synthetic_dir": "data/syn"}})
    write(project / "configs" / "regressor.yaml", {})
    child = write(project / "configs" / "child.yaml", {
        "_base_": "base.yaml", "loss": {"inverseform_path": "checkpoints/r.pth", "regressor_config": "regressor.yaml"},
        "model": {"init_checkpoint": "~/weights.pth", "pretrained_backbone": str(tmp_path / "abs.pth")}})
    monkeypatch.chdir(tmp_path)  # anywhere but the project
    cfg = load_config(ExperimentConfig, [child], ["data.dataset_dir=cityscapes"])
    assert cfg.output_dir == str(project / "runs" / "base")                      # from the base file
    assert cfg.data.synthetic_dir == str(project / "data" / "syn")
    assert cfg.loss.inverseform_path == str(project / "checkpoints" / "r.pth")
    assert cfg.loss.regressor_config == str(project / "configs" / "regressor.yaml")  # beside the file
    assert cfg.model.init_checkpoint == os.path.expanduser("~/weights.pth")
    assert cfg.model.pretrained_backbone == str(tmp_path / "abs.pth")
    assert cfg.data.dataset_dir == "cityscapes"                                  # --opt: shell input, as typed


def test_a_config_outside_a_configs_folder_resolves_beside_itself(tmp_path):
    cfg = load_config(RegressorConfig, [write(tmp_path / "exp" / "mine.yaml", {"output_path": "out/r.pth"})])
    assert project_root(tmp_path / "exp" / "mine.yaml") == tmp_path / "exp"
    assert cfg.output_path == str(tmp_path / "exp" / "out" / "r.pth")
    # the schema's relative defaults join the same project; an --opt value stays as typed
    assert cfg.output_dir == str(tmp_path / "exp" / "runs" / "regressor")
    assert cfg.data.synthetic_dir == str(tmp_path / "exp" / "data" / "synthetic_cityscapes")
    cfg = load_config(RegressorConfig, [tmp_path / "exp" / "mine.yaml"], ["output_dir=here"])
    assert cfg.output_dir == "here"
    assert load_config(RegressorConfig).output_dir == "runs/regressor"  # no config file: the current directory


def test_regressor_config_named_relative_to_the_project_still_works(tmp_path):
    project = tmp_path / "p"
    write(project / "configs" / "reg.yaml", {})
    cfg = load_config(ExperimentConfig, [write(project / "configs" / "seg.yaml",
                                               {"loss": {"regressor_config": "configs/reg.yaml"}})])
    assert cfg.loss.regressor_config == str(project / "configs" / "reg.yaml")


def test_every_path_like_field_is_declared_a_path():
    """A new *_dir / *_path / *_checkpoint / *_config field must use path_field, or it would
    silently depend on the current directory again."""
    import dataclasses

    import experiment.config as schema

    suffixes = ("_dir", "_path", "_checkpoint", "_backbone", "_config")
    for cls in vars(schema).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.name.endswith(suffixes):
                    assert "path_kind" in f.metadata, f"{cls.__name__}.{f.name} is not a path_field"
    assert path_keys(ExperimentConfig)[("loss", "regressor_config")] == "config"
    with pytest.raises(ValueError, match="kind"):
        path_field(None, kind="other")


def test_shipped_config_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("synthetic", "synthetic.yaml", "configs/synthetic.yaml", str(ROOT / "configs" / "synthetic.yaml")):
        cfg = load_run_config([spec])
        assert cfg.output_dir == str(ROOT / "runs" / "synthetic")
        assert cfg.data.synthetic_dir == str(ROOT / "data" / "synthetic_cityscapes")
    # the regressor it trains on a fresh machine: its config found, on the same dataset, nothing in the cwd
    reg = regressor_config_for(cfg)
    assert reg.output_path == cfg.loss.inverseform_path == str(ROOT / "checkpoints" / "synthetic_regressor.pth")
    assert reg.data.synthetic_dir == cfg.data.synthetic_dir and reg.data.synthetic == cfg.data.synthetic
    assert reg.output_dir == str(ROOT / "runs" / "synthetic_regressor")
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_cwd_wins_over_a_shipped_name_and_unknown_names_are_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "synthetic.yaml", {"output_dir": "mine"})
    assert paths.find_config("synthetic.yaml") == tmp_path / "synthetic.yaml"
    assert paths.find_config("synthetic") == paths.CONFIG_DIR / "synthetic.yaml"
    with pytest.raises(ConfigError, match=r"'nope' not found.*one of: .*\bsynthetic, .*synthetic_regressor"):
        paths.find_config("nope")


# ----------------------------------------------------------------------------- released files
def test_release_url_and_file_names_match_the_checkpoints_readme():
    readme = (ROOT / "checkpoints" / "README.md").read_text()
    assert paths.RELEASE_URL in readme
    listed = set(re.findall(r"^\| `([^`]+\.pth)` \|", readme, flags=re.M))
    assert listed == set(paths.RELEASED_FILES)


def test_missing_released_file_names_its_url_others_do_not():
    text = paths.missing_file_message("model file", "checkpoints/hr16s_4k_slim.pth")
    assert text.startswith("model file checkpoints/hr16s_4k_slim.pth does not exist; it is a released file")
    assert paths.RELEASE_URL in text
    assert paths.missing_file_message("model file", "runs/x/best.pth") == "model file runs/x/best.pth does not exist"


def test_train_refuses_a_missing_init_checkpoint_before_starting(tmp_path):
    args = train_script.build_parser().parse_args(
        ["--config", "synthetic", "--opt", f"model.init_checkpoint={tmp_path / 'hrnet18_IF_checkpoint.pth'}"])
    with pytest.raises(UserError, match=r"model.init_checkpoint .* does not exist; .*" + re.escape(paths.RELEASE_URL)):
        train_script.config_from_args(args)


# ----------------------------------------------------------------------------- flags
PARSERS = {
    "train": train_script.build_parser,
    "validation": validation_script.build_parser,
    "train_inverseform": regressor_script.build_parser,
    "infer": infer_script.build_parser,
}


def synthetic_parser():
    import argparse

    from datasets import synthetic

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            synthetic.main([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


@pytest.mark.parametrize("name", [*PARSERS, "synthetic"])
def test_every_flag_has_help(name):
    import argparse

    parser = synthetic_parser() if name == "synthetic" else PARSERS[name]()
    missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not missing, missing
    assert all(a.help for a in parser._actions if a.help != argparse.SUPPRESS)


@pytest.mark.parametrize("name, required", [("train", "--config"), ("validation", "--model_path"),
                                            ("synthetic", "--out")])
def test_required_flags_are_marked_and_enforced(name, required, capsys):
    parser = synthetic_parser() if name == "synthetic" else PARSERS[name]()
    help_text = parser.format_help()
    section = help_text.split("required arguments:")[1]
    assert section.lstrip().startswith(required)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([])
    assert exit_info.value.code == 2
    assert f"the following arguments are required: {required}" in capsys.readouterr().err


@pytest.mark.parametrize("name, schema", [("train", ExperimentConfig), ("validation", ExperimentConfig),
                                          ("train_inverseform", RegressorConfig)])
def test_opt_help_suggests_only_real_keys(name, schema):
    parser = PARSERS[name]()
    opt = next(a for a in parser._actions if "--opt" in a.option_strings)
    examples = re.findall(r"([\w.]+=\S+)", opt.help)
    assert examples
    load_config(schema, [], examples)  # an unknown key would raise ConfigError


def test_train_flags_of_the_field(tmp_path):
    argv = ["--config", "synthetic", "--output-dir", str(tmp_path / "o"), "--dataset-dir", str(tmp_path),
            "--amp", "--seed", "7", "--deterministic"]
    args = train_script.build_parser().parse_args(argv)
    cfg = train_script.config_from_args(args)
    assert cfg.output_dir == str(tmp_path / "o") and cfg.data.dataset_dir == str(tmp_path)
    assert cfg.train.amp == "bf16" and cfg.train.seed == 7 and cfg.train.deterministic is True
    args = train_script.build_parser().parse_args(["--config", "synthetic", "--amp", "off", "--deterministic", "false"])
    cfg = train_script.config_from_args(args)
    assert cfg.train.amp == "off" and cfg.train.deterministic is False and cfg.train.seed == 0


def test_regressor_and_validation_flags_of_the_field(tmp_path):
    args = regressor_script.build_parser().parse_args(["--amp", "--seed", "3", "--output-dir", str(tmp_path)])
    cfg = regressor_script.config_from_args(args)
    assert cfg.train.amp == "bf16" and cfg.train.seed == 3 and cfg.output_dir == str(tmp_path)
    args = validation_script.build_parser().parse_args(["--model-path", "x.pth", "--amp"])
    assert args.model_path == "x.pth" and args.amp == "on"


# ----------------------------------------------------------------------------- checkpoints describe themselves
@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A checkpoint as train.py writes it (weights plus the model's description)."""
    import models
    from synthetic_weights import synthetic_state_dict

    net = models.get_net("lighthrnet.HRNet16", has_edge=True)
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    # edge targets unlike the defaults (radius 2, with the image-border line), as a run's stored config has them
    config = {"data": {"edge_radius": 3, "edge_image_border": False}}
    torch.save({"state_dict": synthetic_state_dict(net.state_dict(), seed=1), "arch": "lighthrnet.HRNet16",
                "hrnet_base": 16, "has_edge": True, "num_classes": 19, "iteration": 3, "config": config}, path)
    released = path.parent / "released.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, released)
    return path, released


def validation_config(*argv):
    return validation_script.config_from_args(validation_script.build_parser().parse_args([str(a) for a in argv]))


def test_validation_reads_the_model_from_the_checkpoint(training_checkpoint):
    path, released = training_checkpoint
    cfg = validation_config("--model_path", path)
    assert (cfg.model.arch, cfg.model.hrnet_base, cfg.model.has_edge, cfg.model.num_classes) == \
        ("lighthrnet.HRNet16", 16, True, 19)
    # agreeing flags are fine; has_edge False on an edge checkpoint drops the head, as documented
    cfg = validation_config("--model_path", path, "--arch", "lighthrnet.HRNet16", "--has_edge", "False")
    assert cfg.model.arch == "lighthrnet.HRNet16" and cfg.model.has_edge is False
    # released files store nothing: the reference's defaults and flags apply
    assert validation_config("--model_path", released).model.arch == "ocrnet.AuxHRNet"
    assert validation_config("--model_path", released, "--arch", "lighthrnet.HRNet16").model.hrnet_base is None


def test_validation_defines_edge_targets_as_the_checkpoint_was_trained(training_checkpoint):
    path, released = training_checkpoint
    defaults = ExperimentConfig().data
    assert (defaults.edge_radius, defaults.edge_image_border) == (2, True)
    cfg = validation_config("--model_path", path)
    assert (cfg.data.edge_radius, cfg.data.edge_image_border) == (3, False)
    # a value the user gives wins: scoring against other targets is a legitimate question
    cfg = validation_config("--model_path", path, "--opt", "data.edge_image_border=true")
    assert (cfg.data.edge_radius, cfg.data.edge_image_border) == (3, True)
    # released files store no config: the defaults (or the user's) apply
    cfg = validation_config("--model_path", released)
    assert (cfg.data.edge_radius, cfg.data.edge_image_border) == (2, True)


def test_validation_accepts_the_config_its_training_run_wrote(training_checkpoint, tmp_path):
    """A run's config.yaml lists every key, hrnet_base: null ("the arch's own") among them: with
    its own checkpoint that is no disagreement."""
    from utils.config import save_config

    path, _ = training_checkpoint
    cfg = ExperimentConfig()
    cfg.model.arch, cfg.model.has_edge = "lighthrnet.HRNet16", True
    save_config(cfg, tmp_path / "config.yaml")
    assert "hrnet_base: null" in (tmp_path / "config.yaml").read_text()
    cfg = validation_config("--config", tmp_path / "config.yaml", "--model_path", path)
    assert (cfg.model.arch, cfg.model.hrnet_base, cfg.model.has_edge) == ("lighthrnet.HRNet16", 16, True)
    # a width the user names is still checked against the checkpoint's
    with pytest.raises(UserError, match="trained with hrnet_base 16"):
        validation_config("--config", tmp_path / "config.yaml", "--model_path", path, "--hrnet_base", "18")


@pytest.mark.parametrize("argv, source", [
    (["--arch", "ocrnet.AuxHRNet"], "--arch"),
    (["--hrnet_base", "18"], "--hrnet_base"),
    (["--opt", "model.num_classes=5"], "--opt model.num_classes"),
    (["--config", "cityscapes_hrnet18_if"], "model.arch of cityscapes_hrnet18_if"),
])
def test_validation_refuses_explicit_settings_that_disagree(training_checkpoint, argv, source):
    path, _ = training_checkpoint
    with pytest.raises(UserError) as info:
        validation_config("--model_path", path, *argv)
    message = str(info.value)
    assert message.startswith(source) and str(path) in message
    key = re.search(r"(arch|hrnet_base|num_classes)", source).group(1)
    stored = {"arch": "lighthrnet.HRNet16", "hrnet_base": 16, "num_classes": 19}[key]
    assert f"trained with {key} {stored!r}" in message


def test_validation_of_a_training_checkpoint_needs_no_architecture_flags(training_checkpoint, tiny_cityscapes,
                                                                           tmp_path):
    path, _ = training_checkpoint
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CITYSCAPES_DATASET")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "experiment.validation", "--model_path", str(path),
                           "--dataset_dir", tiny_cityscapes, "--output_dir", str(tmp_path / "val"),
                           "--num_workers", "0", "--max_images", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert (metrics["arch"], metrics["hrnet_base"], metrics["has_edge"]) == ("lighthrnet.HRNet16", 16, True)
