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


# ----------------------------------------------------------------------------- experiment/
EXPERIMENT = ROOT / "experiment"
ENTRY_POINTS = {"experiment.train", "experiment.validation", "experiment.train_inverseform", "experiment.ablation",
                "experiment.infer"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def experiment_modules():
    return {module_name(p): p for p in sorted(EXPERIMENT.rglob("*.py"))}


def imported_experiment_modules(path: Path, known):
    """Every experiment module ``path`` imports, at module level or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name for name in found if name in known}


def import_graph():
    modules = experiment_modules()
    return {name: imported_experiment_modules(path, modules) for name, path in modules.items()}


def test_experiment_has_no_import_cycle():
    graph = import_graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles in experiment/: {[' -> '.join(c) for c in cycles]}"


def test_the_scanner_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "experiment"
    package.mkdir()
    (package / "a.py").write_text("def f():\n    from experiment.b import g\n")
    (package / "b.py").write_text("from experiment import a\n")
    modules = {"experiment.a": package / "a.py", "experiment.b": package / "b.py"}
    assert imported_experiment_modules(package / "a.py", modules) == {"experiment.b"}
    assert imported_experiment_modules(package / "b.py", modules) == {"experiment.a"}


def test_entry_points_import_no_other_entry_point_and_no_method_by_name():
    graph = import_graph()
    assert ENTRY_POINTS <= set(graph)
    for name in sorted(ENTRY_POINTS | {"experiment.engine"}):
        crossing = sorted(graph[name] & (ENTRY_POINTS - {name}))
        assert not crossing, f"{name} imports the entry point(s) {crossing}"
        methods = sorted(m for m in graph[name] if m.startswith("experiment.methods."))
        assert not methods, f"{name} names a method by its module: {methods} (use the registry)"


@pytest.mark.parametrize("construct", ["DistributedDataParallel(", "GradScaler(", "LambdaLR("])
def test_the_loop_machinery_is_built_in_one_place(construct):
    places = [f"{p.relative_to(ROOT)}:{n}" for p in sorted(EXPERIMENT.rglob("*.py"))
              for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
              if construct in line and not line.lstrip().startswith("#")]
    assert len(places) == 1, f"{construct} in {places}"


def test_no_function_of_experiment_is_longer_than_80_lines():
    long = []
    for path in sorted(EXPERIMENT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long
