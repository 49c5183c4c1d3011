"""Packaging that leaves a user's environment alone: only the plug-ins are top-level
packages, the console scripts find the private packages themselves, an installed copy resolves
its configs and their relative paths without depending on the current directory, and the
Docker image runs the main job and the tests.  The real `pip install` into a virtual
environment beside Hugging Face `datasets` is tests/test_install.py (slow)."""
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import setuptools

import inverseform_seg

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = ("experiment", "models", "datasets", "utils")


@pytest.fixture(scope="module")
def setup_kwargs():
    """The arguments setup.py passes to setuptools.setup (nothing is built)."""
    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
    return captured


def test_only_plugins_and_the_launcher_are_top_level(setup_kwargs):
    top_level = {p.split(".")[0] for p in setup_kwargs["packages"]}
    plugins = {"inverseform"} | ({"rloss"} if (ROOT / "rloss" / "__init__.py").is_file() else set())
    assert top_level == plugins | {"inverseform_seg"}
    for name in PRIVATE + ("configs",):
        assert setup_kwargs["package_dir"][f"inverseform_seg._root.{name}"] == name
        assert f"inverseform_seg._root.{name}" in setup_kwargs["packages"]
    assert setup_kwargs["package_data"]["inverseform_seg._root.configs"] == ["*.yaml", "classes/*.yaml"]
    # every subpackage of a private package is shipped too
    for name in PRIVATE:
        for init in (ROOT / name).rglob("__init__.py"):
            dotted = ".".join(init.parent.relative_to(ROOT).parts)
            assert f"inverseform_seg._root.{dotted}" in setup_kwargs["packages"]


def test_console_scripts_go_through_the_launcher(setup_kwargs):
    scripts = dict(line.split(" = ") for line in setup_kwargs["entry_points"]["console_scripts"])
    import inverseform_seg.cli as cli

    assert {"inverseform-synthetic", "inverseform-validate", "inverseform-train",
            "inverseform-train-regressor"} <= set(scripts)
    assert set(scripts) == {f"inverseform-{name}" for name in cli.SCRIPTS}  # python -m inverseform_seg NAME too
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module == "inverseform_seg.cli" and getattr(cli, func) is cli.SCRIPTS[name[len("inverseform-"):]]


def test_pyproject_asks_for_a_mapping_editable_install():
    text = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'"setuptools>=(\d+)', text)
    assert version and int(version.group(1)) >= 64
    assert 'build-backend = "setuptools.build_meta"' in text


def test_launcher_uses_the_checkout_and_refuses_a_foreign_module(monkeypatch):
    assert inverseform_seg.code_root() == ROOT
    foreign = types.ModuleType("datasets")
    foreign.__file__ = "/elsewhere/site-packages/datasets/__init__.py"
    monkeypatch.setitem(sys.modules, "datasets", foreign)
    with pytest.raises(RuntimeError, match=r"'datasets' from /elsewhere/site-packages"):
        inverseform_seg.activate()


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory):
    """site-packages as `pip install .` lays it out (setup.py), plus a stand-in for Hugging Face
    `datasets`, and an unrelated working directory."""
    site = tmp_path_factory.mktemp("site")
    for plugin in ("inverseform", "rloss"):  # setup.py's top-level packages
        shutil.copytree(ROOT / plugin, site / plugin, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "inverseform_seg", site / "inverseform_seg")
    for name in PRIVATE + ("configs",):
        shutil.copytree(ROOT / name, site / "inverseform_seg" / "_root" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (site / "datasets").mkdir()
    (site / "datasets" / "__init__.py").write_text("def load_dataset(*args, **kwargs):\n    return 'hf'\n")
    work = tmp_path_factory.mktemp("work")
    return site, work


def run_python(code, site, cwd, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("CITYSCAPES_DATASET", "INVERSEFORM_SYNTHETIC_DIR")}
    env["PYTHONPATH"] = str(site)
    # -P: the working directory is not put on sys.path, as for a console script
    return subprocess.run([sys.executable, "-P", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_installed_copy_keeps_foreign_datasets_and_resolves_paths_from_cwd(installed_copy):
    site, work = installed_copy
    proc = run_python("import datasets; assert datasets.load_dataset() == 'hf', datasets.__file__", site, work)
    assert proc.returncode == 0, proc.stderr
    code = (
        "import inverseform_seg, sys\n"
        "root = inverseform_seg.activate()\n"
        "import experiment.paths as paths\n"
        "from experiment.methods.regressor import RegressorConfig\n"
        "from experiment.run_config import load_run_config\n"
        "assert paths.INSTALLED_COPY and str(paths.CODE_ROOT) == str(root), (paths.CODE_ROOT, root)\n"
        "cfg = load_run_config(['synthetic'])\n"
        "print(cfg.output_dir); print(cfg.data.synthetic_dir); print(cfg.loss.inverseform_path)\n"
        "print(cfg.loss.regressor_config)\n"
        "reg = load_run_config([cfg.loss.regressor_config], schema=RegressorConfig)\n"
        "print(reg.output_dir)\n"
    )
    proc = run_python(code, site, work)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    assert out[:3] == [str(work / "runs" / "synthetic"), str(work / "data" / "synthetic_cityscapes"),
                       str(work / "checkpoints" / "synthetic_regressor.pth")]
    assert out[3] == str(site / "inverseform_seg" / "_root" / "configs" / "synthetic_regressor.yaml")
    assert out[4] == str(work / "runs" / "synthetic_regressor")


def test_installed_console_script_runs_from_another_directory(installed_copy):
    site, work = installed_copy
    code = ("import sys\nfrom inverseform_seg.cli import synthetic\n"
            "sys.argv = ['inverseform-synthetic', '--out', 'tiny', '--train', '1', '--val', '1', '--test', '1',"
            " '--height', '64', '--width', '128', '--quiet']\n"
            "code = synthetic()\nimport datasets\nassert datasets.__file__.startswith(sys.path[0]), datasets.__file__\n"
            "sys.exit(code)\n")
    proc = run_python(code, site, work)
    assert proc.returncode == 0, proc.stderr
    assert len(list((work / "tiny" / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))) == 1


# ----------------------------------------------------------------------------- Docker
def dockerfile_instructions():
    """(INSTRUCTION, argument) pairs of docker/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_the_main_job_and_the_tests():
    instructions = dockerfile_instructions()
    kinds = [k for k, _ in instructions]
    env = " ".join(v for k, v in instructions if k == "ENV")
    # a dataset variable pointing at an unmounted folder would turn the synthetic default into an error
    assert "CITYSCAPES_DATASET" not in env
    # no ENTRYPOINT: `docker run IMAGE pytest` runs pytest, `docker run IMAGE` the CMD
    assert "ENTRYPOINT" not in kinds
    runs = " ".join(v for k, v in instructions if k == "RUN")
    assert re.search(r"pip install (-e )?[\"']?\.\[test\][\"']?", runs), runs
    workdir = [v for k, v in instructions if k == "WORKDIR"][-1]
    copies = [v.split() for k, v in instructions if k == "COPY"]
    assert [".", "."] in copies  # the repository is the working directory: pytest.ini, tests/, configs/
    cmd = [v for k, v in instructions if k == "CMD"][-1]
    import json

    argv = json.loads(cmd)
    readme = (ROOT / "README.md").read_text()
    main_job = re.search(r"&& (python -m experiment\.train --config \S+)", readme).group(1)
    assert argv == shlex.split(main_job), (argv, main_job)
    assert (ROOT / argv[argv.index("--config") + 1]).is_file()
    assert workdir.startswith("/")


def test_dockerignore_keeps_data_and_weights_out_of_the_image():
    patterns = (ROOT / ".dockerignore").read_text().split()
    for needed in ("data", "runs", "*.pth"):
        assert any(p.strip("/*") == needed.strip("/*") or p == needed for p in patterns), needed


def test_python_dash_m_inverseform_seg_runs_a_script(installed_copy):
    """`python -m inverseform_seg SCRIPT` (and so `torchrun -m inverseform_seg train ...`)."""
    site, work = installed_copy
    env = {k: v for k, v in os.environ.items() if k != "CITYSCAPES_DATASET"}
    env["PYTHONPATH"] = str(site)
    run = lambda *argv: subprocess.run([sys.executable, "-P", "-m", "inverseform_seg", *argv], cwd=work, env=env,
                                       capture_output=True, text=True, timeout=120)
    proc = run("synthetic", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: inverseform-synthetic"), proc.stderr
    proc = run("nonsense")
    assert proc.returncode == 2 and "{train,validate,train-regressor,synthetic" in proc.stderr


def test_scripts_run_by_path_find_the_private_packages_themselves():
    """`python benchmarks/x.py`, `python tools/x.py`, `torchrun experiment/train.py`: an install no
    longer makes `models`, `datasets`, ... importable, so each such script puts the repository
    root on sys.path before importing them."""
    import ast

    offenders = []
    for path in sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("tests/scripts/*.py"),
                        *ROOT.glob("experiment/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports_private = any(
            (isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").split(".")[0] in PRIVATE)
            or (isinstance(n, ast.Import) and any(a.name.split(".")[0] in PRIVATE for a in n.names))
            for n in ast.walk(tree))
        runnable = "__main__" in path.read_text(encoding="utf-8") or path.parent.name != "experiment"
        if imports_private and runnable and "sys.path.insert(0" not in path.read_text(encoding="utf-8"):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
