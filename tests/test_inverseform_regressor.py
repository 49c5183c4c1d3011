"""inverseform.regressor: the released InverseNet layout, checkpoints and metadata."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from inverseform import InverseFormLoss, InverseNet, ParamNormaliser, create_inverse_net, save_regressor

# The released distance_measures_regressor.pth (NOTES.md / released_state_dicts.json).
RELEASED_SHAPES = {
    "fc.0.weight": (1000, 100352), "fc.0.bias": (1000,),
    "fc.2.weight": (32, 1000), "fc.2.bias": (32,),
    "fc.4.weight": (4, 32), "fc.4.bias": (4,),
}
RELEASED_PARAMS = 100_385_164


def _manual_forward(state, x1, x2):
    """The reference's computation: cat the flattened tiles, Linear-ReLU-Linear-ReLU-Linear."""
    x = torch.cat([x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1)], dim=1)
    x = F.relu(F.linear(x, state["fc.0.weight"], state["fc.0.bias"]))
    x = F.relu(F.linear(x, state["fc.2.weight"], state["fc.2.bias"]))
    return F.linear(x, state["fc.4.weight"], state["fc.4.bias"])


@pytest.fixture(scope="module")
def released_state():
    g = torch.Generator().manual_seed(0)
    return {k: (torch.rand(shape, generator=g) - 0.5) * 0.02 for k, shape in RELEASED_SHAPES.items()}


def test_released_layout_matches_manifest():
    with torch.device("meta"):
        net = create_inverse_net("released")
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == RELEASED_SHAPES          # normalisation buffers are not persistent
    assert sum(p.numel() for p in net.parameters()) == RELEASED_PARAMS
    assert (net.tile_size, net.num_params, net.parameterisation) == (224, 4, "released")
    with torch.device("meta"):
        small = create_inverse_net("small")
    assert small.state_dict()["fc.0.weight"].shape == (1000, 2 * 112 * 112)
    assert small.state_dict()["fc.4.weight"].shape == (2, 32)


def test_released_file_loads_bare_and_gives_the_reference_outputs(released_state, tmp_path):
    path = tmp_path / "distance_measures_regressor.pth"
    torch.save(released_state, path)          # the released file is a bare state dict
    net = InverseNet.from_checkpoint(path)
    assert (net.tile_size, net.num_params, net.hidden, net.parameterisation) == (224, 4, (1000, 32), "released")
    for k, v in released_state.items():
        assert torch.equal(net.state_dict()[k], v)
    g = torch.Generator().manual_seed(1)
    x1 = torch.rand(3, 1, 224, 224, generator=g)
    x2 = (torch.rand(3, 224, 224, generator=g) > 0.9).float()   # N x T x T accepted too
    out = net(x1, x2)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, _manual_forward(released_state, x1, x2), rtol=1e-5, atol=1e-6)
    assert torch.equal(net.param_mean, torch.zeros(4)) and torch.equal(net.param_std, torch.ones(4))


@pytest.mark.parametrize("wrap", ["wrapped", "module", "wrapped+module"])
def test_released_state_dict_variants(released_state, wrap):
    state = {("module." + k if "module" in wrap else k): v for k, v in released_state.items()}
    obj = {"state_dict": state} if "wrapped" in wrap else state
    net = InverseNet.from_checkpoint(obj)
    assert net.tile_size == 224 and net.num_params == 4
    assert torch.equal(net.fc[4].weight, released_state["fc.4.weight"])
    # a copy, not an alias of the caller's tensors
    assert net.fc[0].weight.data_ptr() != released_state["fc.0.weight"].data_ptr()


@pytest.mark.parametrize("wrap", ["bare", "wrapped", "module"])
def test_small_variant_files(tmp_path, wrap):
    torch.manual_seed(2)
    src = InverseNet(112, 2, hidden=(16, 8))
    state = src.state_dict()
    if wrap == "module":
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "small.pth"
    torch.save({"state_dict": state} if wrap == "wrapped" else state, path)
    net = InverseNet.from_checkpoint(str(path))
    assert (net.tile_size, net.num_params, net.hidden, net.parameterisation) == (112, 2, (16, 8), "released")
    x1, x2 = torch.rand(2, 1, 112, 112), torch.rand(2, 1, 112, 112)
    torch.testing.assert_close(net(x1, x2), src(x1, x2))
    assert net.fc[0].weight.requires_grad  # loaded nets stay trainable unless frozen


def _small_state():
    torch.manual_seed(3)
    return InverseNet(8, 4, hidden=(6, 5)).state_dict()


@pytest.mark.parametrize("corrupt, fragment", [
    (lambda s: s.pop("fc.4.bias"), "missing keys ['fc.4.bias']"),
    (lambda s: s.update({"backbone.conv.weight": torch.zeros(1)}), "unexpected keys ['backbone.conv.weight']"),
    (lambda s: s.update({"fc.2.weight": torch.zeros(5, 7)}), "fc.2.weight [5, 7]"),
    (lambda s: s.update({"fc.0.weight": torch.zeros(6, 129), "fc.0.bias": torch.zeros(6)}), "2*T*T"),
    (lambda s: s.update({"fc.1.weight": torch.zeros(2, 2)}), "Linear layers sit at even indices"),
    (lambda s: s.update({"fc.0.bias": torch.zeros(7)}), "not a Linear layer"),
])
def test_wrong_layout_is_rejected_with_the_expected_layout(tmp_path, corrupt, fragment):
    state = _small_state()
    corrupt(state)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        InverseNet.from_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert "fc.0.weight [H1, 2*T*T]" in message and "fc.0.weight [1000, 100352]" in message
    # InverseFormLoss given the path reports the same
    with pytest.raises(ValueError, match="wrong InverseNet layout"):
        InverseFormLoss(str(path))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        InverseNet.from_checkpoint(path)
    path2 = tmp_path / "garbage.pth"
    path2.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        InverseNet.from_checkpoint(path2)
    with pytest.raises(FileNotFoundError):
        InverseNet.from_checkpoint(tmp_path / "absent.pth")


def test_save_and_load_round_trip_with_metadata(tmp_path):
    torch.manual_seed(4)
    net = InverseNet(16, 6, hidden=(12, 5), parameterisation="affine")
    norm = ParamNormaliser([0.0] * 6, [0.1, 0.05, 0.2, 0.05, 0.1, 0.2])
    net.set_normalisation(norm)
    weights, meta_path = save_regressor(net, tmp_path / "reg.pth",
                                        {"dataset": "synthetic", "steps": 123, "normalisation": norm.to_dict()})
    assert meta_path == tmp_path / "reg.json"
    assert sorted(os.listdir(tmp_path)) == ["reg.json", "reg.pth"]        # no temp files left
    raw = torch.load(weights, weights_only=True)
    assert sorted(raw) == sorted(net.state_dict())                        # bare, released format
    meta = json.loads(meta_path.read_text())
    assert meta["parameterisation"] == "affine" and meta["tile_size"] == 16 and meta["num_params"] == 6
    assert meta["hidden"] == [12, 5] and meta["dataset"] == "synthetic"
    assert meta["normalisation"]["std"] == pytest.approx(norm.std.tolist())

    loaded = InverseNet.from_checkpoint(weights)
    assert loaded.parameterisation == "affine" and loaded.metadata["steps"] == 123
    torch.testing.assert_close(loaded.param_std, norm.std)
    x1, x2 = torch.rand(3, 1, 16, 16), torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(loaded(x1, x2), net(x1, x2))
    torch.testing.assert_close(loaded.denormalise(loaded(x1, x2)), net(x1, x2) * norm.std)

    # metadata contradicting the weights is an error naming the file
    meta["tile_size"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"reg\.pth.*tile_size=32"):
        InverseNet.from_checkpoint(weights)
    meta["tile_size"] = 16
    meta["parameterisation"] = "homography"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="8 parameters"):
        InverseNet.from_checkpoint(weights)


def test_save_rejects_conflicting_metadata(tmp_path):
    net = InverseNet(8, 4, hidden=(4, 4))
    with pytest.raises(ValueError, match="tile_size"):
        save_regressor(net, tmp_path / "a.pth", {"tile_size": 224})
    with pytest.raises(ValueError, match="set_normalisation"):
        save_regressor(net, tmp_path / "a.pth", {"normalisation": {"mean": [0] * 4, "std": [2.0] * 4}})
    with pytest.raises(ValueError, match="JSON"):
        save_regressor(net, tmp_path / "a.pth", {"obj": object()})
    assert os.listdir(tmp_path) == []


def test_forward_shapes_and_buffers():
    net = InverseNet(8, 8, hidden=(4,))
    assert net.parameterisation == "homography"
    assert sorted(net.state_dict()) == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    assert net(torch.rand(5, 1, 8, 8), torch.rand(5, 8, 8)).shape == (5, 8)
    with pytest.raises(ValueError, match="N x 1 x 8 x 8"):
        net(torch.rand(5, 1, 9, 9), torch.rand(5, 1, 8, 8))
    with pytest.raises(ValueError, match="5 x1 tiles but 4 x2"):
        net(torch.rand(5, 1, 8, 8), torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="parameterisation"):
        InverseNet(8, 6, parameterisation="released")
    net.set_normalisation([0.0] * 8, [2.0] * 8)
    assert "param_std" not in net.state_dict() and net.normaliser.std.tolist() == [2.0] * 8
    net.double()
    assert net.param_std.dtype == torch.float64     # buffers follow the module


def test_trainable_and_frozen_forward_agree_and_distance():
    torch.manual_seed(5)
    net = InverseNet(8, 4, hidden=(6, 5), parameterisation="scale_shift")
    net.set_normalisation([0.0] * 4, [0.5, 0.5, 2.0, 2.0])
    x1, x2 = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    trainable = net(x1, x2)
    assert trainable.requires_grad
    trainable.sum().backward()
    assert net.fc[0].weight.grad is not None
    net.requires_grad_(False)
    frozen = net(x1, x2)
    torch.testing.assert_close(frozen, trainable.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(net.distance(x1, x2), (frozen * net.param_std).norm(dim=1))
    torch.testing.assert_close(net.distance(x1, x2, "normalised"), frozen.norm(dim=1))
