"""Data-parallel training on torch: 1 process against 2 under ``torchrun`` (gloo, CPU), per workload.

Each configuration is its own launch and times ``MatTA.fit`` steps after a warm-up fit:

* ``1 process, batch B``: the run in one process;
* ``1 process, batch B/2``: one rank's share of the work, with no communication;
* ``2 processes, global batch B`` (``ddp``, ``fsdp``): each rank computes B/2 examples, then the
  gradients are averaged (DDP) or reduce-scattered and the parameters gathered per block (FSDP).

Reported: examples per second of each, and the per-step overhead of the 2-process step over the
B/2 step: communication and synchronisation, plus whatever the two processes lose by sharing the
machine, which the 1-process runs have to themselves. On a machine with as many cores as processes
(2 here) that last part is not separable from communication, so the overhead is an upper bound on
the communication cost, and the 2-process throughput says nothing about a cluster's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, statistics, sys, time
sys.path.insert(0, {root!r})
from benchmarks.common import workloads, data
from matta import MatTA
w = [w for w in workloads({smoke}) if w.name == {name!r}][0]
x, y = data(w.spec, w.num_examples)
model = MatTA(w.spec, w.students, backend="torch", seed=0)
kwargs = dict(batch_size={batch}, progress=False, distributed={strategy!r})
model.fit(x, y, steps=2, **kwargs)  # warm-up: first-call costs and the process group
times = []
for _ in range({repeats}):
    start = time.perf_counter()
    model.fit(x, y, steps={steps}, **kwargs)
    times.append((time.perf_counter() - start) / {steps})
if int(os.environ.get("RANK", "0")) == 0:
    with open({out!r}, "w") as f:
        json.dump({{"step_s": statistics.median(times)}}, f)
"""


def _launch(root: str, smoke: bool, name: str, batch: int, strategy, processes: int, steps: int, repeats: int) -> float:
    """Median seconds per step of one configuration, measured on rank 0 of its own launch."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        code = CHILD.format(root=root, smoke=smoke, name=name, batch=batch, strategy=strategy, steps=steps,
                            repeats=repeats, out=out)
        script = os.path.join(folder, "child.py")
        with open(script, "w") as f:
            f.write(code)
        command = [sys.executable, script] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        with open(out) as f:
            return json.load(f)["step_s"]


def run(smoke: bool) -> list[dict]:
    """One row per workload and strategy: examples/s of 1 and 2 processes and the 2-process step's overhead."""
    from benchmarks.common import workloads

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    steps, repeats = (2, 1) if smoke else (5, 3)
    chosen = [w for w in workloads(smoke) if not smoke or w.name == "mlp"]
    rows = []
    for w in chosen:
        batch = w.batch_size
        one_full = _launch(root, smoke, w.name, batch, None, 1, steps, repeats)
        one_half = _launch(root, smoke, w.name, batch // 2, None, 1, steps, repeats)
        for strategy in ("ddp",) if smoke else ("ddp", "fsdp"):
            two = _launch(root, smoke, w.name, batch, strategy, 2, steps, repeats)
            rows.append({
                "workload": w.name, "strategy": strategy, "global_batch": batch,
                "examples_per_s_1p": batch / one_full, "examples_per_s_2p": batch / two,
                "speedup": one_full / two, "step_s_2p": two, "step_s_1p_half": one_half,
                "overhead_s": two - one_half, "overhead_share": (two - one_half) / two,
            })
    return rows


COLUMNS = ["workload", "strategy", "global_batch", "examples_per_s_1p", "examples_per_s_2p", "speedup", "step_s_2p",
           "step_s_1p_half", "overhead_s", "overhead_share"]

