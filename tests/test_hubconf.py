"""hubconf.py: torch.hub.load(<this repository>, ENTRY, source="local", weights=...) offline, one
entry point per architecture; a model folder or a .pth loads strictly and exactly; weights of
another architecture are refused naming both."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import models
from datasets import TRAIN_CLASS_COLORS, TRAIN_CLASS_NAMES
from synthetic_weights import assert_same_outputs, outputs, synthetic_state_dict
from utils.errors import InvalidInputError

ROOT = Path(__file__).resolve().parents[1]
CITYSCAPES = {"class_names": list(TRAIN_CLASS_NAMES), "class_colors": [list(c) for c in TRAIN_CLASS_COLORS]}
ENTRIES = {"hrnet18_if": ("ocrnet.AuxHRNet", 18), "hrnet16_slim": ("lighthrnet.HRNet16", 16),
           "ocrnet48_if": ("ocrnet.HRNet", 48), "hms_ocrnet48_if": ("ocrnet.HRNet_Mscale", 48)}


def hub_load(entry, **kwargs):
    return torch.hub.load(str(ROOT), entry, source="local", **kwargs)


def seeded_net(arch, has_edge=True, base=None):
    net = models.get_net(arch, has_edge=has_edge, hrnet_base=base)
    net.load_state_dict(synthetic_state_dict(net.state_dict(), 11))
    return net.eval()


def load_hubconf(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    return hubconf


def test_one_entry_point_per_architecture():
    hubconf = load_hubconf("hubconf_under_test")
    listed = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert listed == set(ENTRIES)  # what torch.hub.list shows
    assert hubconf.dependencies == ["torch"]


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_each_entry_point_builds_its_architecture(entry):
    net = hub_load(entry)
    assert (net.arch, net.hrnet_base) == ENTRIES[entry] and not net.training and not net.has_edge
    assert net.num_classes == 19


def test_the_model_card_names_the_entry_points_of_hubconf():
    spec = importlib.util.spec_from_file_location("export_tool_for_hub", ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert {entry: (arch, base) for arch, (entry, base) in tool.HUB_ENTRIES.items()} == ENTRIES


def test_a_model_folder_loads_exactly(tmp_path):
    net = seeded_net("ocrnet.AuxHRNet", has_edge=True)
    models.save_pretrained(net, tmp_path / "hrnet18", CITYSCAPES)
    loaded = hub_load("hrnet18_if", weights=str(tmp_path / "hrnet18"))
    assert loaded.has_edge and not loaded.training
    assert_same_outputs(outputs(net), outputs(loaded))
    without_edge = hub_load("hrnet18_if", weights=str(tmp_path / "hrnet18"), has_edge=False)
    assert set(outputs(without_edge)) == {"pred"}
    assert torch.equal(outputs(without_edge)["pred"], outputs(net)["pred"])


def test_a_released_pth_loads_exactly(tmp_path):
    net = seeded_net("lighthrnet.HRNet16", has_edge=True)
    path = tmp_path / "hr16s_4k_slim.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = hub_load("hrnet16_slim", weights=str(path))
    assert loaded.has_edge  # the file holds an edge head
    assert_same_outputs(outputs(net), outputs(loaded))


def test_weights_of_another_architecture_are_refused_naming_both(tmp_path):
    models.save_pretrained(seeded_net("lighthrnet.HRNet16", has_edge=False), tmp_path / "hr16s", CITYSCAPES)
    with pytest.raises(InvalidInputError) as info:
        hub_load("hrnet18_if", weights=str(tmp_path / "hr16s"))
    assert "lighthrnet.HRNet16" in str(info.value) and "ocrnet.AuxHRNet" in str(info.value)
    assert str(tmp_path / "hr16s" / "config.json") in str(info.value)
    models.save_pretrained(seeded_net("ocrnet.AuxHRNet", has_edge=False, base=16), tmp_path / "aux16", CITYSCAPES)
    with pytest.raises(InvalidInputError, match="hrnet_base 16, not 18"):
        hub_load("hrnet18_if", weights=str(tmp_path / "aux16"))


def test_a_foreign_models_module_is_named(monkeypatch):
    hubconf = load_hubconf("hubconf_foreign")
    foreign = types.ModuleType("models")
    foreign.__file__ = "/elsewhere/site-packages/models/__init__.py"
    monkeypatch.setitem(sys.modules, "models", foreign)
    with pytest.raises(ImportError, match="'models' from /elsewhere/site-packages"):
        hubconf.hrnet16_slim()
