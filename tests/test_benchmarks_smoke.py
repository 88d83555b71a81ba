"""The benchmark keeps working (speed goals are checked by the benchmark, not by timed tests)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke_mode_writes_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training step" in proc.stdout and "Serving" in proc.stdout and "Extraction at scale" in proc.stdout
    r = json.loads(out.read_text())
    ratios = [row["train_ratio"] for row in r["training"]] + [row["matformer_ratio"] for row in r["training"]]
    ratios += [row["serve_ratio"] for row in r["serving"]] + [r["extraction"]["time_ratio"], r["extraction"]["memory_ratio"]]
    ratios += [row["rss_ratio"] for row in r["memory"]] + [row["ratio"] for row in r["paths"]]
    assert "Serving paths" in proc.stdout and "MatTA.frontier" in proc.stdout
    assert {row["path"] for row in r["paths"]} == {"torch Extracted.predict", "torch.export program", "onnxruntime"}
    assert {row["batch"] for row in r["paths"]} > {1} and {row["task"] for row in r["frontier"]} == {"digits", "text"}
    assert all(row["frontier_s"] > 0 and row["models"] > 2 for row in r["frontier"])
    ratios += [r["gpt2"]["time_ratio"], r["gpt2"]["matta_memory_ratio"]]
    assert "GPT-2 checkpoint" in proc.stdout and r["gpt2"]["student_params"] < r["gpt2"]["params"]
    assert {row["workload"] for row in r["training"]} == {"mlp", "transformer"}
    assert all(math.isfinite(x) and x > 0 for x in ratios), ratios
    assert r["extraction"]["student_params"] < r["extraction"]["ta_params"]


def test_the_distributed_benchmark_times_one_and_two_processes(tmp_path):
    """``--distributed`` launches 1 and 2 torch processes and reports their throughput and the 2-process overhead."""
    out = tmp_path / "bench.json"
    skip = "training,serving,paths,frontier,extraction,memory,gpt2"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--smoke", "--distributed",
                           "--skip", skip, "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Data-parallel training" in proc.stdout
    rows = json.loads(out.read_text())["distributed"]
    assert [(row["workload"], row["strategy"]) for row in rows] == [("mlp", "ddp")]
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in
                   ("examples_per_s_1p", "examples_per_s_2p", "speedup", "step_s_2p", "step_s_1p_half")), row
        assert math.isfinite(row["overhead_s"]) and row["overhead_s"] == row["step_s_2p"] - row["step_s_1p_half"]
