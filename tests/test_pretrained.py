"""models.save_pretrained / from_pretrained: a model folder (safetensors weights, config.json, a
model card) rebuilds the network exactly, without running any pickle; malformed folders are one
line naming the file; nothing is replaced without overwrite, nothing is left half-written.
OCRNet-48 and HMS-OCRNet-48 (slow to build and run on a CPU) are marked slow."""
import json
import pickle
import shutil

import pytest
import torch

import models
import models.pretrained as pretrained
from datasets import IMAGENET_MEAN, IMAGENET_STD, TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES
from synthetic_weights import assert_same_outputs, outputs, synthetic_state_dict
from utils.errors import InvalidInputError, MissingInputError, UnreadableInputError

CITYSCAPES = {"class_names": list(TRAIN_CLASS_NAMES), "class_colors": [list(c) for c in TRAIN_CLASS_COLORS]}


def seeded_net(arch, has_edge=True, base=None, seed=3, **options):
    net = models.get_net(arch, has_edge=has_edge, hrnet_base=base, **options)
    net.load_state_dict(synthetic_state_dict(net.state_dict(), seed))
    return net.eval()


@pytest.fixture(scope="module")
def hr16_folder(tmp_path_factory):
    """A model folder of HRNet-16-Slim without edge head, to copy and damage."""
    folder = tmp_path_factory.mktemp("pretrained") / "hr16s"
    pretrained.save_pretrained(seeded_net("lighthrnet.HRNet16", has_edge=False), folder, CITYSCAPES)
    return folder


ROUND_TRIPS = [("lighthrnet.HRNet16", None, True), ("ocrnet.AuxHRNet", 18, True), ("ocrnet.AuxHRNet", 18, False),
               pytest.param("ocrnet.HRNet", 48, True, marks=pytest.mark.slow),
               pytest.param("ocrnet.HRNet_Mscale", 48, True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch,base,has_edge", ROUND_TRIPS)
def test_a_model_folder_rebuilds_the_network_exactly(tmp_path, arch, base, has_edge):
    net = seeded_net(arch, has_edge, base)
    folder = tmp_path / "model"
    assert models.save_pretrained(net, folder, CITYSCAPES, card="# card\n") == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left beside it
    loaded = models.from_pretrained(folder)
    assert type(loaded) is type(net) and not loaded.training
    assert_same_outputs(outputs(net), outputs(loaded))
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ("arch", "hrnet_base", "has_edge", "num_classes")} == {
        "arch": arch, "hrnet_base": net.hrnet_base, "has_edge": has_edge, "num_classes": 19}
    assert config["format_version"] == pretrained.FORMAT_VERSION
    assert config["class_names"] == list(TRAIN_CLASS_NAMES) and config["class_colors"][0] == [128, 64, 128]
    assert (folder / "README.md").read_text() == "# card\n"
    assert loaded.pretrained_config == config


def test_the_normalisation_is_the_one_the_models_are_trained_with(hr16_folder):
    config = json.loads((hr16_folder / "config.json").read_text())
    assert config["normalisation"]["mean"] == list(IMAGENET_MEAN)
    assert config["normalisation"]["std"] == list(IMAGENET_STD)
    assert not (hr16_folder / "README.md").exists()  # no card given


def test_hms_keeps_its_scales(tmp_path):
    net = seeded_net("ocrnet.HRNet_Mscale", True, 16, scales=(0.5, 1.0))
    models.save_pretrained(net, tmp_path / "hms", CITYSCAPES)
    loaded = models.from_pretrained(tmp_path / "hms")
    assert loaded.scales == (0.5, 1.0) and loaded.lo_scale == net.lo_scale
    assert_same_outputs(outputs(net), outputs(loaded))


def test_loading_runs_no_pickle(hr16_folder, monkeypatch, tmp_path):
    expected = outputs(models.from_pretrained(hr16_folder))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle ran")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for target, name in [(pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")]:
        monkeypatch.setattr(target, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    torch.save({"x": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(AssertionError, match="pickle ran"):  # the traps catch a pickle-based load
        torch.load(tmp_path / "x.pth", weights_only=True)
    assert_same_outputs(outputs(models.from_pretrained(hr16_folder)), expected)


def set_colour(config):
    config["class_colors"][0] = [0, 0, 300]


CONFIG_EDITS = {
    "a missing key": lambda c: c.pop("class_names"),
    "a wrong type": lambda c: c.update(has_edge="yes"),
    "too few class names": lambda c: c["class_names"].pop(),
    "a newer format": lambda c: c.update(format_version=99),
    "an unknown arch": lambda c: c.update(arch="unet.UNet"),
    "a bad colour": set_colour,
    "a bad normalisation": lambda c: c.update(normalisation={"mean": [0.5], "std": [1, 1, 1]}),
}
FILE_DAMAGE = {
    "config not JSON": lambda cfg, w: cfg.write_text('{"arch": "lighthrnet.HRNet16",'),
    "config not an object": lambda cfg, w: cfg.write_text("[1, 2]"),
    "no config.json": lambda cfg, w: cfg.unlink(),
    "no model.safetensors": lambda cfg, w: w.unlink(),
    "empty weights": lambda cfg, w: w.write_bytes(b""),
    "truncated weights": lambda cfg, w: w.write_bytes(w.read_bytes()[:5000]),
    "weights that are not safetensors": lambda cfg, w: torch.save({"w": torch.zeros(2)}, w),  # a zip of pickles
}


def damage(folder, how):
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if how in CONFIG_EDITS:
        config = json.loads(config_path.read_text())
        CONFIG_EDITS[how](config)
        config_path.write_text(json.dumps(config))
    else:
        FILE_DAMAGE[how](config_path, weights_path)


MALFORMED = {
    "a missing key": (InvalidInputError, "config.json", "missing key(s) class_names"),
    "a wrong type": (InvalidInputError, "config.json", "key 'has_edge' is 'yes', expected true or false"),
    "too few class names": (InvalidInputError, "config.json", "18 entries, expected one per class"),
    "a newer format": (InvalidInputError, "config.json", "format_version 99 is newer"),
    "an unknown arch": (InvalidInputError, "config.json", "unknown arch 'unet.UNet'"),
    "a bad colour": (InvalidInputError, "config.json", "key 'class_colors'"),
    "a bad normalisation": (InvalidInputError, "config.json", "key 'normalisation'"),
    "config not JSON": (InvalidInputError, "config.json", "is not valid JSON"),
    "config not an object": (InvalidInputError, "config.json", "expected a JSON object, found list"),
    "no config.json": (MissingInputError, "hr16s", "has no config.json"),
    "no model.safetensors": (MissingInputError, "hr16s", "has no model.safetensors"),
    "empty weights": (UnreadableInputError, "model.safetensors", "expected a safetensors file"),
    "truncated weights": (UnreadableInputError, "model.safetensors", "expected a safetensors file"),
    "weights that are not safetensors": (UnreadableInputError, "model.safetensors", "expected a safetensors file"),
}


@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_a_malformed_folder_is_one_line_naming_the_file(hr16_folder, tmp_path, how):
    folder = tmp_path / "hr16s"
    shutil.copytree(hr16_folder, folder)
    damage(folder, how)
    kind, file_name, expected = MALFORMED[how]
    with pytest.raises(kind) as info:
        models.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message and expected in message, message
    assert str(folder / file_name if file_name != "hr16s" else folder) in message


def test_a_missing_folder_or_a_file_is_named(tmp_path):
    with pytest.raises(MissingInputError, match=f"model folder {tmp_path / 'nowhere'} does not exist"):
        models.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "model.pth").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="is not a model folder"):
        models.from_pretrained(tmp_path / "model.pth")


def test_weights_of_another_model_do_not_load(hr16_folder, tmp_path):
    folder = tmp_path / "hr16s"
    shutil.copytree(hr16_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_classes=2, class_names=["a", "b"], class_colors=[[0, 0, 0], [1, 1, 1]])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.CheckpointMismatchError, match="model.safetensors does not match"):
        models.from_pretrained(folder)


def test_nothing_is_replaced_without_overwrite(tmp_path):
    net = seeded_net("lighthrnet.HRNet16", has_edge=False)
    folder = tmp_path / "model"
    folder.mkdir()
    models.save_pretrained(net, folder, CITYSCAPES)  # an empty folder holds nothing to lose
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match=f"model folder {folder} already exists: pass overwrite=True"):
        models.save_pretrained(net, folder, CITYSCAPES, card="new")
    assert (folder / "notes.txt").read_text() == "mine" and not (folder / "README.md").exists()
    models.save_pretrained(net, folder, CITYSCAPES, card="new", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InvalidInputError, match="already exists"):
        models.save_pretrained(net, a_file, CITYSCAPES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model"]


def test_a_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    net = seeded_net("lighthrnet.HRNet16", has_edge=False)
    old = tmp_path / "old"
    models.save_pretrained(net, old, CITYSCAPES, card="old card")
    real_write = pretrained._write_text

    def failing_write(path, text):
        real_write(path, text[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrained, "_write_text", failing_write)
    with pytest.raises(OSError, match="No space left"):
        models.save_pretrained(net, tmp_path / "new", CITYSCAPES)
    with pytest.raises(OSError, match="No space left"):
        models.save_pretrained(net, old, CITYSCAPES, card="new card", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (old / "README.md").read_text() == "old card"
    models.from_pretrained(old)


def test_a_config_that_contradicts_the_network_is_refused(tmp_path):
    net = seeded_net("lighthrnet.HRNet16", has_edge=False)
    with pytest.raises(InvalidInputError, match="key 'arch' is 'ocrnet.HRNet' but the network has 'lighthrnet"):
        models.save_pretrained(net, tmp_path / "m", {**CITYSCAPES, "arch": "ocrnet.HRNet"})
    with pytest.raises(InvalidInputError, match=r"missing key\(s\) class_names, class_colors"):
        models.save_pretrained(net, tmp_path / "m", {})
    with pytest.raises(InvalidInputError, match="'class_names' has 3 entries"):
        models.save_pretrained(net, tmp_path / "m", {**CITYSCAPES, "class_names": ["a", "b", "c"]})
    assert not list(tmp_path.iterdir())


def test_pretrained_net_loads_a_pth_and_a_folder_of_its_arch(hr16_folder, tmp_path):
    net = seeded_net("lighthrnet.HRNet16", has_edge=True)
    released = tmp_path / "released.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, released)
    from_pth = models.pretrained_net("lighthrnet.HRNet16", released)
    assert from_pth.has_edge and not from_pth.training  # the edge head the file holds
    assert_same_outputs(outputs(net), outputs(from_pth))
    without_edge = models.pretrained_net("lighthrnet.HRNet16", released, has_edge=False)
    assert torch.equal(outputs(without_edge)["pred"], outputs(net)["pred"])
    ours = tmp_path / "ours.pth"
    torch.save({"state_dict": net.state_dict(), "arch": "lighthrnet.HRNet16", "hrnet_base": 16, "has_edge": True,
                "num_classes": 19}, ours)
    with pytest.raises(InvalidInputError, match=f"{ours} names arch lighthrnet.HRNet16, not ocrnet.AuxHRNet"):
        models.pretrained_net("ocrnet.AuxHRNet", ours)
    assert not models.pretrained_net("lighthrnet.HRNet16", hr16_folder).has_edge
    with pytest.raises(MissingInputError, match="do not exist"):
        models.pretrained_net("lighthrnet.HRNet16", tmp_path / "none.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UnreadableInputError, match="empty.pth"):
        models.pretrained_net("lighthrnet.HRNet16", tmp_path / "empty.pth")
