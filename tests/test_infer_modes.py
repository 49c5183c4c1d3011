"""experiment/inference.py: sliding-window geometry and averaging, flip and multi-scale TTA, and their
effect on evaluate()'s mIoU (the same as whole-image inference where the model makes them exact)."""
import numpy as np
import pytest
import torch
from torch import nn

import models
from experiment.config import DataConfig, ModelConfig, ValConfig
from experiment.data import eval_loader, val_dataset
from experiment.tta import (InferenceMode, WHOLE, inference_mode_from_config, predict,
                                  sliding_window_forward, window_starts)
from experiment.evaluation import evaluate
from models.layers import rescale, resize_to
from synthetic_weights import synthetic_images, synthetic_state_dict


class Pointwise(nn.Module):
    """1x1 convolutions: each output pixel depends on its own input pixel only, so any crops
    covering the image give exactly the whole-image prediction."""

    def __init__(self, num_classes=19, edge=True):
        super().__init__()
        torch.manual_seed(0)
        self.cls = nn.Conv2d(3, num_classes, 1)
        self.edge = nn.Conv2d(3, 1, 1) if edge else None

    def forward(self, x):
        out = {"pred": self.cls(x)}
        if self.edge is not None:
            out["edge_prob"] = torch.sigmoid(self.edge(x))
        return out


class MirrorSymmetric(nn.Module):
    """3x3 convolutions whose kernels are left-right symmetric (zero padding): flipping the
    input flips the output, so flip TTA changes nothing."""

    def __init__(self, num_classes=19):
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, num_classes, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)

    def forward(self, x):
        return {"pred": self.conv2(torch.relu(self.conv1(x)))}


class CropColumn(nn.Module):
    """One channel holding each pixel's column index within the crop it was given."""

    def forward(self, x):
        n, _, h, w = x.shape
        return {"pred": torch.arange(w, dtype=torch.float32).expand(n, 1, h, w).clone()}


@pytest.fixture(scope="module")
def hr16():
    net = models.get_net("lighthrnet.HRNet16", has_edge=True)
    net.load_state_dict(synthetic_state_dict(net.state_dict(), seed=3))
    return net.eval()


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("length,window,stride", [(10, 4, 3), (10, 4, 4), (1024, 512, 341), (2048, 1024, 768),
                                                  (100, 100, 50), (60, 100, 50), (101, 50, 1), (7, 3, 2)])
def test_window_starts_cover_the_image(length, window, stride):
    starts = window_starts(length, window, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and (s + window <= length or (s == 0 and length < window))
        covered[s:s + window] = True
    assert covered.all()
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    assert min(length, starts[-1] + window) == length


def test_overlapping_crops_are_averaged():
    # width 10, window 4, stride 3: crops at 0, 3, 6; columns 3 and 6 are seen twice (as 3 and 0).
    out = sliding_window_forward(CropColumn(), torch.zeros(1, 3, 2, 10), (2, 4), (2, 3))
    expected = [0, 1, 2, 1.5, 1, 2, 1.5, 1, 2, 3]
    assert out["pred"][0, 0, 0].tolist() == expected and out["pred"][0, 0, 1].tolist() == expected


def test_sliding_window_equals_whole_for_a_pointwise_model():
    net = Pointwise().eval()
    images = synthetic_images((2, 3, 50, 70), seed=0)
    whole = net(images)
    mode = InferenceMode(sliding_window=True, window=(32, 32), stride=(20, 25))
    slid = predict(net, images, mode)
    torch.testing.assert_close(slid["pred"], whole["pred"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slid["edge_prob"], whole["edge_prob"], rtol=1e-6, atol=1e-6)


def test_one_window_covering_the_image_is_whole_image_inference(hr16):
    images = synthetic_images((1, 3, 64, 128), seed=1)
    with torch.no_grad():
        whole = hr16(images)
        slid = predict(hr16, images, InferenceMode(sliding_window=True, window=(64, 128), stride=(64, 128)))
        smaller = predict(hr16, images, InferenceMode(sliding_window=True, window=(32, 64), stride=(32, 64)))
    assert torch.equal(slid["pred"], whole["pred"]) and torch.equal(slid["edge_prob"], whole["edge_prob"])
    # Real crops of a real network do change the logits (the test above is not vacuous).
    assert (smaller["pred"] - whole["pred"]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- flip and scales
def test_flip_changes_nothing_for_a_flip_equivariant_model():
    net = MirrorSymmetric().eval()
    images = synthetic_images((2, 3, 40, 60), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(predict(net, images, InferenceMode(flip=True))["pred"], net(images)["pred"],
                                   rtol=1e-5, atol=1e-5)


def test_flip_tta_output_is_mirror_consistent(hr16):
    """Whatever the model, flip TTA of the mirrored image is the mirrored flip TTA."""
    images = synthetic_images((1, 3, 64, 96), seed=4)
    mode = InferenceMode(flip=True)
    with torch.no_grad():
        a = predict(hr16, images, mode)
        b = predict(hr16, images.flip(-1), mode)
        plain = hr16(images)
    torch.testing.assert_close(a["pred"], b["pred"].flip(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["edge_prob"], b["edge_prob"].flip(-1), rtol=1e-5, atol=1e-5)
    assert (a["pred"] - plain["pred"]).abs().max() > 1e-3


def test_scales_average_the_rescaled_predictions(hr16):
    images = synthetic_images((1, 3, 64, 128), seed=5)
    with torch.no_grad():
        out = predict(hr16, images, InferenceMode(scales=(0.5, 1.0)))
        half = resize_to(hr16(rescale(images, 0.5))["pred"], (64, 128))
        full = hr16(images)["pred"]
        single = predict(hr16, images, InferenceMode(scales=(1.0,)))
    torch.testing.assert_close(out["pred"], (half + full) / 2)
    assert out["pred"].shape == full.shape and out["edge_prob"].shape == (1, 1, 64, 128)
    assert torch.equal(single["pred"], full)  # (1.0,) is whole-image inference


def test_modes_combine_and_stay_float32_under_autocast():
    net = Pointwise().eval()
    images = synthetic_images((1, 3, 48, 64), seed=6)
    mode = InferenceMode(sliding_window=True, window=(32, 32), stride=(16, 16), flip=True, scales=(0.75, 1.0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = predict(net, images, mode)
    assert out["pred"].dtype == torch.float32 and out["pred"].shape == (1, 19, 48, 64)
    assert mode.describe() == "sliding window 32x32 stride 16x16, horizontal flip, scales 0.75,1"


def test_invalid_modes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="must not exceed the window"):
        InferenceMode(sliding_window=True, window=(32, 32), stride=(40, 16))
    with pytest.raises(ValueError, match="positive"):
        InferenceMode(scales=(0.0, 1.0))
    with pytest.raises(ValueError, match="two positive ints"):
        InferenceMode(window=(32,))


def test_config_mode_keeps_hms_scales_for_the_model():
    val = ValConfig(flip=True)
    assert inference_mode_from_config(val, ModelConfig(arch="ocrnet.HRNet", eval_scales=[0.5, 1.0])).scales == (0.5, 1.0)
    hms = inference_mode_from_config(val, ModelConfig(arch="ocrnet.HRNet_Mscale", eval_scales=[0.5, 1.0]))
    assert hms.scales == (1.0,) and hms.flip  # HMS: attention scales inside the model, not averaged
    assert inference_mode_from_config(ValConfig(), ModelConfig()).is_whole


# ----------------------------------------------------------------------------- evaluate(): the mIoU
@pytest.fixture(scope="module")
def val_loader(tiny_cityscapes):
    return eval_loader(val_dataset(DataConfig(), tiny_cityscapes, "val"), 2, 0)


@pytest.mark.parametrize("net_cls,mode", [
    (MirrorSymmetric, InferenceMode(flip=True)),
    (Pointwise, InferenceMode(sliding_window=True, window=(40, 48), stride=(24, 40))),
], ids=["flip-on-mirror-symmetric", "sliding-window-on-pointwise"])
def test_evaluate_reports_the_whole_image_miou_where_the_mode_is_exact(val_loader, net_cls, mode):
    net = net_cls().eval()
    whole = evaluate(net, val_loader, torch.device("cpu"), progress=False)
    tta = evaluate(net, val_loader, torch.device("cpu"), progress=False, inference=mode)
    assert whole["num_images"] == tta["num_images"] == 4
    for key in ("miou", "per_class_iou", "pixel_acc", "mba", "boundary_f"):
        assert tta[key] == whole[key], key
    # ...and a mode that is not exact for the model does move the metrics.
    moved = evaluate(Pointwise().eval(), val_loader, torch.device("cpu"), progress=False,
                     inference=InferenceMode(scales=(0.25, 1.0)))
    assert moved["pixel_acc"] != evaluate(Pointwise().eval(), val_loader, torch.device("cpu"),
                                          progress=False)["pixel_acc"]


def test_whole_mode_is_the_plain_forward(hr16):
    images = synthetic_images((1, 3, 64, 64), seed=7)
    with torch.no_grad():
        a, b = predict(hr16, images, WHOLE), hr16(images)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- experiment.validation flags
def test_validation_command_line_reports_the_mode_and_its_miou(tiny_cityscapes, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    net = models.get_net("lighthrnet.HRNet16", has_edge=True)
    ckpt = tmp_path / "hr16s.pth"
    torch.save({"state_dict": synthetic_state_dict(net.state_dict(), seed=3)}, ckpt)
    out = tmp_path / "val"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CITYSCAPES_DATASET")}
    proc = subprocess.run(
        [sys.executable, "-m", "experiment.validation", "--output_dir", str(out), "--model_path", str(ckpt),
         "--arch", "lighthrnet.HRNet16", "--has_edge", "True", "--dataset_dir", tiny_cityscapes, "--num_workers", "0",
         "--max_images", "1", "--flip", "--sliding_window", "--window_size", "64,128", "--window_stride", "48",
         "--scales", "0.75,1.0"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inference"] == "sliding window 64x128 stride 48x48, horizontal flip, scales 0.75,1"
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["num_images"] == 1
    assert "inference: sliding window 64x128" in proc.stdout and "mIoU" in proc.stdout


def test_window_config_is_validated():
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match="val.window_stride"):
        ValConfig(window_size=(64, 64), window_stride=(80, 64)).validate()
    with pytest.raises(ConfigError, match="val.window_size"):
        ValConfig(window_size=(0, 64)).validate()
