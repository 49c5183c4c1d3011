"""benchmarks/gpu_suite.py: ``--smoke`` runs every step of the GPU suite on the CPU (tiny sizes,
no target judged) and reports every figure in its table and JSON; ``--only`` runs the chosen
steps; a step stopped at its limit is reported, not lost; ``--out`` is never replaced silently.

Measured with OMP_NUM_THREADS=1 on this project's 2-core machine while other jobs shared it (load
average 5-10): the smoke run 55-75 s, this whole file 70-90 s (about 70 s of CPU time, most of it
starting the 12 Python processes: 7 steps and the CLIs that steps 6 and 7 run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
STEPS = {"forward", "evaluate", "train", "rloss", "nus", "main_job", "deterministic"}


def suite(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "CITYSCAPES_DATASET")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, str(SUITE), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def figures_by_step(results):
    steps = {}
    for row in results["figures"]:
        steps.setdefault(row["step"], []).append(row)
    return steps


def test_smoke_runs_every_step_and_reports_every_figure(tmp_path):
    out = tmp_path / "r.json"
    proc = suite("--smoke", "--out", out, "--workdir", tmp_path / "work")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["smoke"] and set(results["steps"]) == STEPS
    assert all(step["status"] == "ok" for step in results["steps"].values()), results["steps"]
    rows = results["figures"]
    assert not [r for r in rows if r["status"] in ("ERROR", "TIMEOUT")], [r for r in rows if "error" in r]
    assert {r["status"] for r in rows} == {"-", "smoke"}  # no target judged on the CPU
    by_step = figures_by_step(results)
    assert set(by_step) == STEPS
    # every arch, every variant: the same figures as on the GPU
    assert len(by_step["forward"]) == 1 + 4 * 5 + 1 + 4 * 2 + 1
    assert len(by_step["train"]) == 4 * 3
    assert all(r["value"]["ms"] > 0 and r["value"]["syncs_per_step"] is None for r in by_step["train"])
    assert len(by_step["evaluate"]) == 3 and all(r["value"] > 0 for r in by_step["evaluate"])
    deterministic, = by_step["deterministic"]
    assert deterministic["value"] is True and deterministic["measured"].startswith("equal")  # a CPU is exact
    wall, miou, infer, export = by_step["main_job"]
    assert wall["value"] > 0 and 0 <= miou["value"] <= 100 and infer["value"] > 0 and export["value"] > 0
    # the table: its header and every figure with its status
    header = next(line for line in proc.stdout.splitlines() if line.startswith("figure"))
    assert header.split() == ["figure", "target", "measured", "status"]
    lines = proc.stdout.splitlines()
    for row in rows:
        assert any(line.startswith(row["figure"]) and line.rstrip().endswith(row["status"]) for line in lines), row
    assert results["environment"]["device_name"] == "CPU"


def test_only_runs_the_chosen_steps(tmp_path):
    out = tmp_path / "r.json"
    proc = suite("--smoke", "--only", "rloss,5", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["steps"]) == {"rloss", "nus"}
    assert {r["step"] for r in results["figures"]} == {"rloss", "nus"}
    assert "[4] rloss" in proc.stdout and "[5] NUS unsample" in proc.stdout and "[1]" not in proc.stdout


def test_a_step_stopped_at_its_limit_is_reported_as_a_timeout(tmp_path):
    out = tmp_path / "r.json"
    proc = suite("--smoke", "--only", "nus", "--step-limit", "0.5", "--out", out)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["steps"]["nus"]["status"] == "TIMEOUT"
    assert results["figures"] and all(r["status"] == "TIMEOUT" for r in results["figures"])
    assert "stopped at the step's limit" in results["figures"][0]["error"]
    assert "TIMEOUT: stopped at the step's limit" in proc.stdout


def load_suite(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_one_figure_failing_marks_only_the_figures_it_had_left(tmp_path, monkeypatch):
    gpu_suite = load_suite(monkeypatch)
    rec = gpu_suite.Recorder(str(tmp_path / "step.jsonl"), smoke=False)
    for figure in ("a", "b", "c"):
        rec.plan(figure, ">= 1")
    with rec.guard([("a", ">= 1"), ("b", ">= 1")]):
        rec.judge("a", ">= 1", "2", True, 2)
        raise ValueError("boom\nthe last line")
    with rec.guard([("c", ">= 1")]):
        rec.judge("c", ">= 1", "0.5", False, 0.5)
    result = {"number": 9, "status": "ok", "error": None, "records": gpu_suite.read_records(rec.path)}
    rows = gpu_suite.figure_rows("x", result)
    assert [(r["figure"], r["status"]) for r in rows] == [("a", "PASS"), ("b", "ERROR"), ("c", "FAIL")]
    assert rows[1]["error"] == "ValueError: the last line"
    table = gpu_suite.format_table(rows)
    assert table.splitlines()[3].endswith("ERROR: ValueError: the last line")


@pytest.mark.parametrize("args, message", [
    ((), "exists; pass --overwrite to replace it"),
    (("--only", "nonsense"), "--only: unknown step 'nonsense'"),
    (("--jobs", "2"), "--jobs N (N >= 1) applies to --smoke only"),
])
def test_refuses_in_one_line_before_running_anything(tmp_path, args, message):
    out = tmp_path / "r.json"
    out.write_text("earlier results\n")
    proc = suite("--out", out, *args, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert out.read_text() == "earlier results\n" and proc.stdout == ""
