"""``matta demo --smoke``: the whole command at tiny size, its report, reuse of cached Teachers, reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from matta.__main__ import main

HEAVY = ("sklearn", "matplotlib", "rich", "torch", "tensorflow", "keras", "jax")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The smoke demo twice with one Teacher cache: the second run must reuse the Teachers."""
    root = tmp_path_factory.mktemp("demo")
    cache = str(root / "cache")
    outs = [str(root / "first"), str(root / "second")]
    for out in outs:
        assert main(["demo", "--smoke", "--out", out, "--cache", cache, "--no-progress"]) == 0
    return [json.load(open(os.path.join(o, "metrics.json"))) for o in outs], outs


def test_smoke_run_writes_the_report(two_runs):
    (doc, _), (out, _) = two_runs[0], two_runs[1]
    assert doc["schema"] == "matta.demo.metrics/1" and doc["run"]["mode"] == "smoke"
    assert set(doc["tasks"]) == {"digits", "text"}
    for task in doc["tasks"].values():
        kinds = {e["kind"] for e in task["models"].values()}
        assert kinds == {"teacher", "ta", "mixnmatch", "matta_student", "baseline"}
        for e in task["models"].values():
            assert e["params"] > 0 and np.isfinite(e["mean"]["loss"]) and e["mean"]["latency_ms"] > 0
        assert set(task["quality"]["students"]) == {"S", "M"}
    assert "bpc" in doc["tasks"]["text"]["models"]["S"]["mean"]
    with open(os.path.join(out, "pareto.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_exported_students_load_and_match_the_report(two_runs):
    from matta import load
    from matta.demo import data
    from matta.model import metrics

    (doc, _), (out, _) = two_runs[0], two_runs[1]
    for task in ("digits", "text"):
        for name in ("S", "M"):
            folder = os.path.join(out, "students", task, name)
            assert {"spec.json", "weights.safetensors"} <= set(os.listdir(folder))
            student = load(folder, backend="torch")
            assert student.num_params == doc["tasks"][task]["models"][name]["params"]
    # The saved digits Student scores what the report says it scored.
    from matta.demo.config import task_configs

    ds = data.digits(**task_configs("smoke", ["digits"])[0].data)
    student = load(os.path.join(out, "students", "digits", "S"))
    m = metrics(student.spec, "classification", student.predict(ds.x_test), ds.y_test)
    assert m["loss"] == pytest.approx(doc["tasks"]["digits"]["models"]["S"]["per_seed"][0]["loss"], rel=1e-6)


def test_rerun_reuses_cached_teachers_and_reproduces_every_number(two_runs):
    (first, second), _ = two_runs
    for task in ("digits", "text"):
        assert first["tasks"][task]["teacher"]["cached"] is False
        assert second["tasks"][task]["teacher"]["cached"] is True
        for name, e in first["tasks"][task]["models"].items():
            again = second["tasks"][task]["models"][name]
            assert [r["loss"] for r in again["per_seed"]] == [r["loss"] for r in e["per_seed"]], name


@pytest.mark.subprocess
def test_python_dash_m_and_help(tmp_path):
    out = subprocess.run([sys.executable, "-m", "matta", "demo", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--full", "--smoke", "--backend", "--seeds", "--out", "--cache"):
        assert flag in out.stdout


def test_bad_option_is_a_matta_error_not_a_traceback(capsys):
    assert main(["demo", "--smoke", "--seeds", "0", "--no-progress"]) == 1
    assert "matta demo: error: --seeds must be >= 1" in capsys.readouterr().err


@pytest.mark.subprocess
def test_importing_matta_and_the_demo_package_stays_light():
    code = (
        "import sys, matta, matta.demo, matta.__main__\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_baselines_ignore_the_recipes_per_term_weights(tmp_path, monkeypatch):
    """A recipe with student_weights/ta_weight must still train its baselines (they have no Students)."""
    import dataclasses

    from matta.demo import config, run

    smoke = config.task_configs("smoke", ["digits"])[0]
    weighted = dataclasses.replace(smoke, loss={**smoke.loss, "student_weights": {"S": 2.0}, "ta_weight": 0.5})
    result = run.run_task(weighted, seeds=[0], backend="torch", cache_dir=str(tmp_path / "cache"),
                          out_dir=None, progress=False, log=lambda *_: None)
    assert {"baseline S", "baseline M", "S", "M", "TA"} <= set(result["models"])
