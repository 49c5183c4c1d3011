"""Shared fixtures.

``tiny_cityscapes``: a small synthetic Cityscapes (6 train / 4 val / 2 test images of
64 x 128, seed 0) generated once per test session; returns its root as a str.  Treat it
as read-only: tests that modify files or write caches should copy it first
(``shutil.copytree``).
"""
import pytest

TINY_CITYSCAPES = dict(train=6, val=4, test=2, height=64, width=128, seed=0)


@pytest.fixture(scope="session")
def tiny_cityscapes(tmp_path_factory):
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_cityscapes") / "cityscapes"
    return generate(str(root), progress=False, **TINY_CITYSCAPES)
