"""Shared fixtures.

``tiny_cityscapes``: a small synthetic Cityscapes (6 train / 4 val / 2 test images of
64 x 128, seed 0) generated once per test session; returns its root as a str.  Treat it
as read-only: tests that modify files or write caches should copy it first
(``shutil.copytree``).

``regressor``: a small InverseForm regressor file in the released format (32 x 32 tiles, for
64 x 128 crops with tile_factor 1), made once per session.

``ctx``: a single-process CPU DistContext, with torchrun's variables cleared from the environment.
"""
import pytest

TINY_CITYSCAPES = dict(train=6, val=4, test=2, height=64, width=128, seed=0)


@pytest.fixture(scope="session")
def tiny_cityscapes(tmp_path_factory):
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_cityscapes") / "cityscapes"
    return generate(str(root), progress=False, **TINY_CITYSCAPES)


@pytest.fixture(scope="session")
def regressor(tmp_path_factory):
    import torch

    from inverseform import InverseNet, save_regressor

    torch.manual_seed(0)
    net = InverseNet(tile_size=32, num_params=4, hidden=(64, 16))
    path = tmp_path_factory.mktemp("regressor") / "regressor.pth"
    save_regressor(net, path, {"dataset": "test"})
    return path


@pytest.fixture
def ctx(monkeypatch):
    from utils import dist

    for key in dist.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return dist.init_distributed("cpu")
