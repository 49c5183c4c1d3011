"""`pip install .` and `pip install -e .` in a fresh virtual environment that holds Hugging Face
`datasets`: its package keeps working and is never overwritten, every console script
runs its --help and its part of the main job from another directory, validation needs no
architecture flags, and `pip uninstall` leaves Hugging Face's package intact.

Slow (a few minutes; pip reaches the package index for `datasets` and, in the build's isolated
environment, for setuptools):  python -m pytest -m slow tests/test_install.py
The virtual environment sees the system's packages (--system-site-packages) so that torch is
not downloaded again; everything of this project and `datasets` is installed into it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("inverseform-synthetic", "inverseform-train", "inverseform-validate", "inverseform-train-regressor")


def console_scripts():
    """Every console script setup.py declares (the four above and any added since)."""
    from inverseform_seg.cli import SCRIPTS as names

    return sorted(set(SCRIPTS) | {f"inverseform-{name}" for name in names})
IGNORED = shutil.ignore_patterns(".git", "data", "runs", "build", "*.egg-info", "__pycache__", "*.pth", ".pytest_cache")


def sh(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CITYSCAPES_DATASET", "INVERSEFORM_SYNTHETIC_DIR", "PYTHONPATH", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} (in {cwd}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    venv = base / "venv"
    sh([sys.executable, "-m", "venv", "--system-site-packages", venv], base)
    python = venv / "bin" / "python"
    sh([python, "-m", "pip", "install", "-q", "datasets"], base)
    return base, python


def hf_datasets(python, cwd):
    """(path of Hugging Face's datasets/__init__.py, its sha256), imported from ``cwd``."""
    out = sh([python, "-c", "import datasets, hashlib; assert callable(datasets.load_dataset); "
                            "print(datasets.__file__); print(hashlib.sha256(open(datasets.__file__, 'rb').read())"
                            ".hexdigest())"], cwd).split()
    return out[0], out[1]


def installed_top_level(python, cwd):
    """Top-level names of the files this distribution installed (its RECORD)."""
    out = sh([python, "-c", "import importlib.metadata as m; "
                            "print('\\n'.join(sorted({str(f).split('/')[0] for f in m.files('inverseform-seg')})))"],
             cwd)
    return {name for name in out.split() if not name.endswith((".dist-info", ".pth", ".py")) and name != ".."}


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_install_beside_hugging_face_datasets(env, editable):
    base, python = env
    bin_dir = python.parent
    mode = "editable" if editable else "regular"
    src = base / f"src-{mode}"   # a checkout of the repository (no data, runs or weights)
    shutil.copytree(ROOT, src, ignore=IGNORED)
    work = base / f"work-{mode}"  # the user's current directory: anywhere else
    work.mkdir()
    hf_before = hf_datasets(python, work)

    sh([python, "-m", "pip", "install", "-q", *(["-e"] if editable else []), "."], src)
    assert hf_datasets(python, work) == hf_before           # not shadowed, not overwritten
    if not editable:
        top = installed_top_level(python, work)
        assert top <= {"inverseform", "rloss", "inverseform_seg"} and "inverseform_seg" in top, top
    for script in console_scripts():
        assert "usage:" in sh([bin_dir / script, "--help"], work)

    # The main job, piece by piece, from `work`: a shipped config by name; relative paths resolve
    # against the checkout (editable) or the current directory (installed copy), never site-packages.
    home = src if editable else work
    data = home / "data" / "synthetic_cityscapes"
    sh([bin_dir / "inverseform-synthetic", "--out", data, "--quiet"], work)
    sh([bin_dir / "inverseform-train-regressor", "--config", "synthetic_regressor", "--steps", 4,
        "--opt", "train.eval_images=4", "train.images_per_batch=4", "train.log_interval=2"], work)
    assert (home / "checkpoints" / "synthetic_regressor.pth").is_file()
    out = sh([bin_dir / "inverseform-train", "--config", "synthetic", "--max_iters", 2,
              "--opt", "val.max_images=2", "val.num_workers=0", "data.num_workers=0"], work)
    best = home / "runs" / "synthetic" / "best.pth"
    assert best.is_file() and "InverseForm on" in out  # the regressor made above was found and used
    # validation of a training checkpoint needs no architecture flags
    out = sh([bin_dir / "inverseform-validate", "--model_path", best, "--dataset_dir", data, "--max_images", 2,
              "--num_workers", 0, "--output_dir", work / "val"], work)
    assert "mIoU" in out and (work / "val" / "metrics.json").is_file()
    if editable:
        assert sorted(p.name for p in work.iterdir()) == ["val"]  # nothing else lands in the cwd
        # from the checkout: the README's form, and the bare `pytest` (docker run IMAGE pytest)
        assert "usage:" in sh([python, "-m", "experiment.train", "--help"], src)
        sh([python, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layout.py"], src)

    sh([python, "-m", "pip", "uninstall", "-y", "-q", "inverseform-seg"], work)
    assert hf_datasets(python, work) == hf_before           # Hugging Face's package intact
    assert not any((bin_dir / script).exists() for script in console_scripts())
