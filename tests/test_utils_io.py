"""utils.io: writes are atomic; a failure leaves the previous file intact and no temp file."""
import json

import pytest
import torch

from utils.io import atomic_open, atomic_torch_save, atomic_write_json, atomic_write_text


def test_write_then_replace(tmp_path):
    target = tmp_path / "deep" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_failure_keeps_previous_version(tmp_path):
    target = tmp_path / "ckpt.pth"
    atomic_torch_save({"step": 1}, target)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_json(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"miou": 0.5})
    assert json.loads((tmp_path / "m.json").read_text()) == {"miou": 0.5}


def test_read_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="write mode"):
        with atomic_open(tmp_path / "x", "rb"):
            pass
