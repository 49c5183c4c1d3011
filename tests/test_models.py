"""models/: structure against the released checkpoints, output contract, loading, helpers.

W48 models (70M parameters) are built once per module and used with tiny inputs.
"""
import copy
import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from synthetic_weights import synthetic_images, synthetic_state_dict

MANIFEST = Path(__file__).parent / "fixtures" / "models" / "released_state_dicts.json.gz"
SEED = 7
ALL_ARCHS = ["ocrnet.AuxHRNet", "lighthrnet.HRNet16", "ocrnet.HRNet", "ocrnet.HRNet_Mscale"]
HMS = "ocrnet.HRNet_Mscale"
EDGE_KEYS = ("edge_pred", "edge_prob")


@pytest.fixture(scope="module")
def manifest():
    with gzip.open(MANIFEST, "rt") as f:
        return json.load(f)


class NetCache:
    """Builds each (arch, has_edge) once, with deterministic synthetic weights.

    Tests that run train mode (which updates BN running stats) use ``fresh()``.
    """

    def __init__(self):
        self._nets = {}

    def get(self, arch, has_edge):
        key = (arch, has_edge)
        if key not in self._nets:
            net = models.get_net(arch, has_edge=has_edge)
            net.load_state_dict(synthetic_state_dict(net.state_dict(), SEED))
            self._nets[key] = net.eval()
        return self._nets[key]

    def fresh(self, arch, has_edge):
        return copy.deepcopy(self.get(arch, has_edge))


@pytest.fixture(scope="module")
def nets():
    return NetCache()


# ---------------------------------------------------------------- structure

MANIFEST_ENTRIES = ["hrnet18_IF", "hrnet18_IF_noedge", "hr16s_4k_slim", "hr16s_4k_slim_noedge",
                    "hrnet48_OCR_IF", "hrnet48_OCR_IF_noedge", "hrnet48_OCR_HMS_IF",
                    "hrnet48_OCR_HMS_IF_noedge"]


@pytest.mark.parametrize("entry", MANIFEST_ENTRIES)
def test_state_dict_matches_released_checkpoint(manifest, nets, entry):
    spec = manifest[entry]
    net = nets.get(spec["arch"], spec["has_edge"])
    assert net.hrnet_base == spec["hrnet_base"]
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    expected = spec["state_dict"]
    assert sorted(set(ours) - set(expected)) == [], "keys the released file lacks"
    assert sorted(set(expected) - set(ours)) == [], "released keys we lack"
    wrong = {k: (ours[k], s) for k, s in expected.items() if ours[k] != s}
    assert wrong == {}
    assert list(ours) == list(expected), "same keys, different order"
    assert models.count_parameters(net) == spec["params"]


def test_manifest_covers_every_arch(manifest):
    assert {manifest[e]["arch"] for e in MANIFEST_ENTRIES} == set(models.ARCHS)


# ---------------------------------------------------------------- factory

def test_default_bases():
    assert {a: s.default_base for a, s in models.ARCHS.items()} == {
        "ocrnet.AuxHRNet": 18, "lighthrnet.HRNet16": 16, "ocrnet.HRNet": 48, HMS: 48}
    assert models.get_net("ocrnet.AuxHRNet").hrnet_base == 18
    assert models.get_net("lighthrnet.HRNet16", hrnet_base="16").hrnet_base == 16


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        models.get_net("ocrnet.HRNet18")
    for arch in ALL_ARCHS:
        assert arch in str(err.value)


@pytest.mark.parametrize("arch, base", [("lighthrnet.HRNet16", 18), ("lighthrnet.HRNet16", 48),
                                        ("ocrnet.HRNet", 18), (HMS, 18), ("ocrnet.AuxHRNet", 32)])
def test_unsupported_base_is_refused(arch, base):
    with pytest.raises(ValueError, match=rf"{arch} accepts hrnet_base .*got {base}"):
        models.get_net(arch, hrnet_base=base)


def test_options_only_where_accepted():
    with pytest.raises(TypeError, match="scales"):
        models.get_net("ocrnet.AuxHRNet", scales=(1.0,))
    with pytest.raises(TypeError, match="unknown option"):
        models.get_net(HMS, hrnet_base=16, criterion=None)
    with pytest.raises(ValueError, match="num_classes"):
        models.get_net("ocrnet.AuxHRNet", num_classes=0)


def test_slim_trunk_has_stem_downsample_and_others_do_not():
    assert hasattr(models.get_net("ocrnet.AuxHRNet", hrnet_base=16).backbone, "conv0")
    assert not hasattr(models.get_net("ocrnet.AuxHRNet", hrnet_base=18).backbone, "conv0")


def test_num_classes_sets_every_classifier():
    net = models.get_net("ocrnet.HRNet", num_classes=5, hrnet_base=16)
    assert net.ocr.cls_head.out_channels == 5
    assert net.ocr.aux_head[2].out_channels == 5
    out = net.eval()(torch.randn(1, 3, 32, 48))
    assert out["pred"].shape == (1, 5, 32, 48)


# ---------------------------------------------------------------- output contract

def _expected_keys(arch, has_edge, training):
    if training:
        keys = {"pred", "aux"} | ({"edge", "edge_aux"} if has_edge else set())
        if arch == HMS:
            keys |= {"pred_05x", "pred_10x"}
        return keys
    return {"pred"} | (set(EDGE_KEYS) if has_edge else set())


@pytest.mark.parametrize("has_edge", [True, False], ids=["edge", "noedge"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_eval_outputs(nets, arch, has_edge):
    net = nets.get(arch, has_edge)
    n = 1 if net.hrnet_base == 48 else 2  # keep the 70M-parameter models cheap
    # odd sizes: every resize must land exactly on the input size
    with torch.no_grad():
        out = net(synthetic_images((n, 3, 67, 131), 1))
    assert set(out) == _expected_keys(arch, has_edge, training=False)
    assert out["pred"].shape == (n, 19, 67, 131)
    assert torch.isfinite(out["pred"]).all()
    if has_edge:
        assert out["edge_pred"].shape == out["edge_prob"].shape == (n, 1, 67, 131)
        prob = out["edge_prob"]
        assert 0 <= prob.min() and prob.max() <= 1
        if arch == HMS:  # the reference's HMS edge_pred is already a probability
            assert torch.equal(out["edge_pred"], prob)
        else:  # logits elsewhere: not confined to [0, 1]
            assert ((out["edge_pred"] < 0) | (out["edge_pred"] > 1)).any()
            assert torch.allclose(prob, torch.sigmoid(out["edge_pred"]))


@pytest.mark.parametrize("has_edge", [True, False], ids=["edge", "noedge"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_train_outputs(nets, arch, has_edge):
    net = nets.fresh(arch, has_edge).train()
    images = synthetic_images((2, 3, 64, 97) if net.hrnet_base != 48 else (2, 3, 48, 65), 2)
    out = net(images)
    assert set(out) == _expected_keys(arch, has_edge, training=True)
    for key, value in out.items():
        channels = 1 if key.startswith("edge") else 19
        assert value.shape == (2, channels) + tuple(images.shape[-2:]), key
        assert torch.isfinite(value).all(), key
    if has_edge:  # edges come out as logits in training, for BCE-with-logits
        for key in ("edge", "edge_aux"):
            assert ((out[key] < 0) | (out[key] > 1)).any(), key
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    trunk_grad = net.backbone.conv1.weight.grad
    assert trunk_grad is not None and trunk_grad.abs().sum() > 0


def test_train_mode_edge_logits_match_eval_edge(nets):
    """In a model without dropout, train-mode `edge` is the eval `edge_pred` when BN
    uses the same statistics; checked by putting only the BN layers in eval."""
    net = nets.fresh("ocrnet.AuxHRNet", True).train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    images = synthetic_images((1, 3, 40, 56), 3)
    with torch.no_grad():
        train_out = net(images)
        eval_out = net.eval()(images)
    assert torch.equal(train_out["pred"], eval_out["pred"])
    assert torch.equal(train_out["edge"], eval_out["edge_pred"])


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_has_edge_off_gives_identical_pred(nets, arch):
    images = synthetic_images((1, 3, 45, 71), 4)
    with torch.no_grad():
        with_edge = nets.get(arch, True)(images)["pred"]
        without = nets.get(arch, False)(images)["pred"]
    assert torch.equal(with_edge, without)


def test_hms_single_scale_equals_ocrnet(nets):
    """HMS restricted to scale 1.0 is OCRNet with the same trunk and OCR weights."""
    images = synthetic_images((1, 3, 48, 80), 5)
    hms = nets.get(HMS, False)
    ocr = nets.get("ocrnet.HRNet", False)
    assert torch.equal(hms.state_dict()["ocr.cls_head.weight"], ocr.state_dict()["ocr.cls_head.weight"])
    saved = hms.scales
    try:
        hms.scales = (1.0,)
        with torch.no_grad():
            assert torch.equal(hms(images)["pred"], ocr(images)["pred"])
    finally:
        hms.scales = saved


def test_hms_two_scale_combination(nets):
    """scales (0.5, 1.0): p = up(a_0.5 * q_0.5) + (1 - up(a_0.5)) * q_1.0, computed
    here from the network's single-scale pieces."""
    hms = nets.get(HMS, False)
    images = synthetic_images((1, 3, 50, 78), 6)
    up = lambda t: torch.nn.functional.interpolate(t, size=(50, 78), mode="bilinear", align_corners=False)
    with torch.no_grad():
        lo = hms._single_scale(torch.nn.functional.interpolate(
            images, size=(25, 39), mode="bilinear", align_corners=False), with_aux=False, with_edge=False)
        hi = hms._single_scale(images, with_aux=False, with_edge=False)
        expected = up(lo["attn"] * lo["cls"]) + (1 - up(lo["attn"])) * hi["cls"]
        saved = hms.scales
        try:
            hms.scales = (1.0, 0.5)
            got = hms(images)["pred"]
        finally:
            hms.scales = saved
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, hi["cls"], atol=1e-3)


def test_hms_scales_default_option_and_validation():
    net = models.get_net(HMS, hrnet_base=16)
    assert net.scales == (0.25, 0.5, 1.0, 2.0)
    assert models.get_net(HMS, hrnet_base=16, scales=[1, 1.5]).scales == (1.0, 1.5)
    for bad in [(0.5, 2.0), (1.0, -0.5), (1.0, 1.0), "abc", None]:
        with pytest.raises(ValueError, match="scales"):
            net.scales = bad
    with pytest.raises(ValueError, match="lo_scale"):
        models.get_net(HMS, hrnet_base=16, lo_scale=1.0)


def test_hms_multiscale_uses_every_scale(nets):
    hms = nets.get(HMS, True)
    images = synthetic_images((1, 3, 64, 96), 8)
    saved = hms.scales
    try:
        with torch.no_grad():
            four = hms(images)
            hms.scales = (0.5, 1.0, 2.0)
            three = hms(images)
    finally:
        hms.scales = saved
    assert four["pred"].shape == three["pred"].shape == (1, 19, 64, 96)
    assert not torch.allclose(four["pred"], three["pred"], atol=1e-3)
    # the edge output comes from the 1.0 scale only
    assert torch.equal(four["edge_pred"], three["edge_pred"])


def test_hms_too_small_input_names_the_scale(nets):
    net = nets.get(HMS, False)  # 3 rows: 0.5x gives 1 row, 0.25x gives none
    with torch.no_grad(), pytest.raises(ValueError, match="scale 0.25 .* 3x40 input"):
        net(torch.randn(1, 3, 3, 40))


def test_forward_rejects_bad_input():
    net = models.get_net("lighthrnet.HRNet16").eval()
    with pytest.raises(TypeError, match="not a dict"):
        net({"images": torch.randn(1, 3, 32, 32)})
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        net(torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------- checkpoints

def _small_net(arch="ocrnet.AuxHRNet", has_edge=True, seed=SEED, base=None):
    net = models.get_net(arch, has_edge=has_edge, hrnet_base=base)
    net.load_state_dict(synthetic_state_dict(net.state_dict(), seed))
    return net.eval()


def _eval(net, images):
    with torch.no_grad():
        return net.eval()(images)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_checkpoint_round_trip_with_wrapper_prefix(tmp_path, prefix):
    source = _small_net()
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()},
                "epoch": 3}, path)
    target = models.get_net("ocrnet.AuxHRNet", has_edge=True)
    report = models.load_checkpoint(target, path)
    assert report.ok and report.stripped_prefix == prefix
    assert report.loaded == len(source.state_dict())
    images = synthetic_images((2, 3, 67, 131), 9)
    a, b = _eval(source, images), _eval(target, images)
    assert torch.equal(a["pred"], b["pred"]) and torch.equal(a["edge_pred"], b["edge_pred"])


def test_checkpoint_bare_dict_and_missing_backbone_prefix():
    source = _small_net("lighthrnet.HRNet16")
    state = {(k[len("backbone."):] if k.startswith("backbone.") else k): v
             for k, v in source.state_dict().items()}
    target = models.get_net("lighthrnet.HRNet16", has_edge=True)
    report = models.load_checkpoint(target, state)
    n_trunk = sum(k.startswith("backbone.") for k in source.state_dict())
    assert report.added_backbone_prefix == n_trunk > 0
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_checkpoint_from_another_arch_names_the_keys(tmp_path):
    path = tmp_path / "hr16s.pth"
    torch.save({"state_dict": _small_net("lighthrnet.HRNet16").state_dict()}, path)
    target = models.get_net("ocrnet.AuxHRNet", has_edge=True)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(models.CheckpointMismatchError) as err:
        models.load_checkpoint(target, path)
    msg = str(err.value)
    assert str(path) in msg and "ocrnet.AuxHRNet" in msg
    assert "unexpected keys: backbone.conv0.weight" in msg
    assert "shape mismatches" in msg and "backbone.transition1.0.0.weight" in msg
    assert "missing keys: hrhead.last_layer.0.bias" in msg
    # nothing was loaded
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_ocr_into_auxhrnet_fails_with_counts():
    state = _small_net("ocrnet.HRNet", base=16).state_dict()
    target = models.get_net("ocrnet.AuxHRNet", has_edge=True, hrnet_base=16)
    with pytest.raises(models.CheckpointMismatchError, match=r"\d+ unexpected keys: ocr\.") as err:
        models.load_checkpoint(target, state)
    assert "more)" in str(err.value)  # long lists are cut, with the count of the rest


def test_checkpoint_non_strict_loads_what_matches(caplog):
    state = _small_net("ocrnet.AuxHRNet", has_edge=False).state_dict()
    del state["hrhead.last_layer.2.bias"]
    state["extra.weight"] = torch.zeros(1)
    target = models.get_net("ocrnet.AuxHRNet")
    with caplog.at_level(logging.WARNING, logger="models"):
        report = models.load_checkpoint(target, state, strict=False)
    assert report.missing == ["hrhead.last_layer.2.bias"] and report.unexpected == ["extra.weight"]
    assert report.loaded == len(state) - 1
    assert torch.equal(target.state_dict()["aux_head.0.weight"], state["aux_head.0.weight"])
    assert any("hrhead.last_layer.2.bias" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arch", ["ocrnet.AuxHRNet", "ocrnet.HRNet", HMS])
def test_edge_keys_dropped_for_has_edge_false(tmp_path, caplog, arch):
    base = 18 if arch == "ocrnet.AuxHRNet" else 16
    path = tmp_path / "with_edge.pth"
    torch.save({"state_dict": _small_net(arch, True, base=base).state_dict()}, path)
    with_edge = models.get_net(arch, has_edge=True, hrnet_base=base)
    without = models.get_net(arch, has_edge=False, hrnet_base=base)
    models.load_checkpoint(with_edge, path)
    with caplog.at_level(logging.INFO, logger="models"):
        report = models.load_checkpoint(without, path)
    notices = [r for r in caplog.records if r.name == "models"]
    assert len(notices) == 1 and "edge-head keys" in notices[0].getMessage()
    n_edge = 9 if arch == HMS else 11  # edge_head: 9 entries; edgeocr_cls_head: 2
    assert len(report.dropped_edge_keys) == n_edge
    images = synthetic_images((1, 3, 48, 64), 10)
    if arch == HMS:
        with_edge.scales = without.scales = (0.5, 1.0)
    assert torch.equal(_eval(with_edge, images)["pred"], _eval(without, images)["pred"])


def test_edge_model_refuses_file_without_edge_heads():
    state = _small_net("ocrnet.AuxHRNet", has_edge=False).state_dict()
    with pytest.raises(models.CheckpointMismatchError, match="missing keys: edge_head"):
        models.load_checkpoint(models.get_net("ocrnet.AuxHRNet", has_edge=True), state)


def test_checkpoint_file_errors(tmp_path):
    net = models.get_net("lighthrnet.HRNet16")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        models.load_checkpoint(net, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 1, "arch": "x"}, bad)
    with pytest.raises(ValueError, match="bad.pth: not a state dict"):
        models.load_checkpoint(net, bad)
    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": {}, "args": logging.getLogger("x")}, pickled)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        models.load_checkpoint(net, pickled)


def test_load_into_dataparallel_wrapper():
    source = _small_net("lighthrnet.HRNet16", has_edge=False)
    wrapped = nn.DataParallel(models.get_net("lighthrnet.HRNet16"))
    models.load_checkpoint(wrapped, {"state_dict": source.state_dict()})
    assert torch.equal(wrapped.module.state_dict()["hrhead.last_layer.2.weight"],
                       source.state_dict()["hrhead.last_layer.2.weight"])


# ---------------------------------------------------------------- ImageNet-pretrained trunk

def _imagenet_style_file(trunk_variant, seed=11):
    """A state dict in the HRNet authors' classification format: trunk keys without
    'backbone.', plus the classification head, minus the slim-only conv0."""
    trunk = models.hrnetv2(trunk_variant)
    state = {k: v for k, v in synthetic_state_dict(trunk.state_dict(), seed).items()
             if not k.startswith("conv0.")}
    state["incre_modules.0.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
    state["downsamp_modules.0.0.weight"] = torch.zeros(256, 128, 3, 3)
    state["final_layer.0.weight"] = torch.zeros(2048, 1024, 1, 1)
    state["classifier.weight"] = torch.zeros(1000, 2048)
    state["classifier.bias"] = torch.zeros(1000)
    return state


def test_pretrained_backbone_loading(tmp_path, caplog):
    state = _imagenet_style_file("w18")
    path = tmp_path / "hrnetv2_w18_imagenet_pretrained.pth"
    torch.save(state, path)
    net = models.get_net("ocrnet.AuxHRNet", has_edge=True)
    head_before = net.hrhead.last_layer[0].weight.clone()
    with caplog.at_level(logging.INFO, logger="models"):
        report = models.load_pretrained_backbone(net, path)
    assert report.missing == []
    assert sorted(report.unexpected) == sorted(k for k in state if k.split(".")[0] in {
        "incre_modules", "downsamp_modules", "final_layer", "classifier"})
    assert report.loaded == len(net.backbone.state_dict())
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(net.hrhead.last_layer[0].weight, head_before)
    assert any("5 classifier keys" in r.getMessage() for r in caplog.records if r.name == "models")


def test_pretrained_backbone_reports_slim_stem_and_refuses_other_width():
    net = models.get_net("lighthrnet.HRNet16")
    report = models.load_pretrained_backbone(net, {"model." + k: v for k, v in
                                                   _imagenet_style_file("w16_slim").items()})
    assert report.missing == ["conv0.weight"] and report.stripped_prefix == "model."
    with pytest.raises(ValueError, match="shape mismatches"):
        models.load_pretrained_backbone(net, _imagenet_style_file("w18"))
    with pytest.raises(ValueError, match="no key matches"):
        models.load_pretrained_backbone(net, {"fc.weight": torch.zeros(2, 2)})


# ---------------------------------------------------------------- helpers

def test_count_flops_against_hand_count():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert models.count_flops(conv, (1, 3, 10, 12)) == 2 * 8 * 3 * 9 * 10 * 12


def test_count_flops_scales_with_area_and_restores_mode():
    net = models.get_net("ocrnet.AuxHRNet", hrnet_base=16).train()
    small = models.count_flops(net, (1, 3, 64, 128))
    large = models.count_flops(net, (1, 3, 128, 256))
    assert net.training
    # convolutions only, all linear in the pixel count (unlike OCR's region projections)
    assert small > 0 and large == 4 * small


def test_count_parameters_trainable_only():
    net = models.get_net("lighthrnet.HRNet16")
    total = models.count_parameters(net)
    net.backbone.requires_grad_(False)
    assert models.count_parameters(net, trainable_only=True) == total - models.count_parameters(net.backbone)


def test_convert_sync_batchnorm_keeps_state_dict():
    net = models.get_net("ocrnet.AuxHRNet", has_edge=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    keys = list(net.state_dict())
    synced = models.convert_sync_batchnorm(net)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert list(synced.state_dict()) == keys
    assert all(m.momentum == 0.1 for m in synced.modules() if isinstance(m, nn.SyncBatchNorm))
