"""Package boundaries of the design: no torchvision in core code; inverseform/ and rloss/ import nothing of ours;
models/ knows no dataset, loss or experiment; datasets/ knows no model; utils/ depends on nothing of ours."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"inverseform", "rloss", "models", "datasets", "experiment", "utils"}
ALLOWED = {
    "inverseform": {"inverseform"},
    "rloss": {"rloss"},
    "models": {"models", "utils"},
    "datasets": {"datasets", "utils"},
    "utils": {"utils"},
}


def imported_top_levels(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def python_files(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package}/ has no Python files"
    return files


@pytest.mark.parametrize("package", ["inverseform", "rloss", "models", "datasets", "utils"])
def test_core_packages_do_not_import_torchvision(package):
    hits = [f"{p.relative_to(ROOT)}:{line}" for p in python_files(package)
            for line, mod in imported_top_levels(p) if mod == "torchvision"]
    assert not hits, f"torchvision imported in core code: {hits}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_boundaries(package):
    hits = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in python_files(package)
            for line, mod in imported_top_levels(p) if mod in OURS and mod not in ALLOWED[package]]
    assert not hits, f"{package}/ crosses the design's boundaries: {hits}"


def test_scanner_sees_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import torchvision.transforms as T\nfrom models.x import y\nfrom . import z\n")
    assert list(imported_top_levels(sample)) == [(1, "torchvision"), (2, "models")]
