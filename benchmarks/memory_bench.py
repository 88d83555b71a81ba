"""Peak RSS of MatTA training against training the TA alone, each in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from benchmarks.common import workloads, data
from matta import MatTA
w = [w for w in workloads({smoke}) if w.name == {name!r}][0]
x, y = data(w.spec, w.num_examples)
students = w.students if {matta} else {{}}
model = MatTA(w.spec, students, backend={backend!r}, seed=0)
def hwm():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child started by a
    # large parent would report the parent's peak. VmHWM belongs to this process image only.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")
base = hwm()
model.fit(x, y, steps={steps}, batch_size=w.batch_size, progress=False)
peak = hwm()
print(json.dumps({{"base_kb": base, "peak_kb": peak}}))
"""


def _child(root: str, smoke: bool, name: str, matta: bool, backend: str, engine: str | None, steps: int) -> dict:
    env = dict(os.environ)
    if engine:
        env["KERAS_BACKEND"] = engine
    code = CHILD.format(root=root, smoke=smoke, name=name, matta=matta, backend=backend, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(smoke: bool, backends: list[str]) -> list[dict]:
    from benchmarks.common import workloads

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    steps = 3 if smoke else 20
    rows = []
    for backend_name in backends:
        backend, engine = ("torch", None) if backend_name == "torch" else ("keras", backend_name.split("-", 1)[1])
        for w in workloads(smoke):
            m = _child(root, smoke, w.name, True, backend, engine, steps)
            t = _child(root, smoke, w.name, False, backend, engine, steps)
            md, td = (m["peak_kb"] - m["base_kb"]) / 1024, (t["peak_kb"] - t["base_kb"]) / 1024
            rows.append({
                "workload": w.name, "backend": backend_name, "matta_rss_mb": m["peak_kb"] / 1024, "ta_rss_mb": t["peak_kb"] / 1024,
                "rss_ratio": m["peak_kb"] / t["peak_kb"], "matta_delta_mb": md, "ta_delta_mb": td,
                "delta_ratio": md / td if td > 0 else float("nan"),
            })
    return rows
