"""Serving latency of extracted Students on each fast path, against the plain torch model, and the frontier's time.

Paths: ``Extracted.predict`` on torch (the module under ``inference_mode``), the
``torch.export`` program of ``model.pt2``, ONNX Runtime on ``matta.onnx.export``'s
file, and, in a process per Keras engine (``--engine``), ``Extracted.predict`` on
Keras (the engine's compiled call where it is bit-exact) beside its eager call.
Every path is timed in the same paired rounds as the plain torch model
(:func:`matta.frontier.measure_latency`); ``ratio`` is path / plain torch.

Usage::

    python benchmarks/serving_bench.py [--smoke] [--engine tensorflow|jax|torch] --json PATH
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # so "benchmarks.*" imports from a checkout

import numpy as np  # noqa: E402

from benchmarks.common import SERVING_ROUNDS, data, workloads  # noqa: E402


def _student(w):
    from matta import MatTA

    return MatTA(w.spec, students=w.students, backend="torch", seed=0).extract("S")


def _torch_paths(student, tmp: str) -> dict:
    """name -> callable(x) of the torch process's paths (ONNX Runtime included)."""
    import onnxruntime
    import torch

    from matta import onnx

    student.save(os.path.join(tmp, "S"))
    program = torch.export.load(os.path.join(tmp, "S", "model.pt2")).module()
    session = onnxruntime.InferenceSession(onnx.export(student.spec, student.weights, os.path.join(tmp, "S.onnx")),
                                           providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name

    def exported(x):
        with torch.no_grad():
            return program(torch.as_tensor(x)).numpy()

    return {"torch Extracted.predict": student.predict, "torch.export program": exported,
            "onnxruntime": lambda x: session.run(None, {feed: x})[0]}


def _keras_paths(student, engine: str) -> dict:
    from matta import Extracted

    k = Extracted(student.spec, student.weights, "keras")
    return {f"keras-{engine} Extracted.predict": k.predict,
            f"keras-{engine} eager call": lambda x: k.backend.plain_forward(k.model, x)}


def paths(smoke: bool, engine: str | None = None) -> list[dict]:
    """One row per workload, path and batch size (1 and the workload's batch): milliseconds and ratio to plain torch."""
    from matta.frontier import measure_latency

    rounds = 3 if smoke else SERVING_ROUNDS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in workloads(smoke):
            student = _student(w)
            fns = _torch_paths(student, tmp) if engine is None else _keras_paths(student, engine)
            plain = student.backend
            x_all, _ = data(w.spec, w.batch_size)
            for batch in (1, w.batch_size):
                x = x_all[:batch]
                calls = {name: (lambda f=f: f(x)) for name, f in fns.items()}
                calls["plain torch"] = lambda: plain.plain_forward(student.model, x)
                ms = measure_latency(calls, rounds)
                for name in fns:
                    rows.append({"workload": w.name, "path": name, "batch": batch, "rounds": rounds, "ms": ms[name],
                                 "plain_torch_ms": ms["plain torch"], "ratio": ms[name] / ms["plain torch"]})
    return rows


def frontier_time(smoke: bool, backend: str = "torch") -> list[dict]:
    """Seconds of ``MatTA.frontier`` over the demo's TA and Students (default candidates), per task."""
    from matta import MatTA
    from matta.demo.config import task_configs
    from matta.demo.teachers import spec_of

    rows = []
    for cfg in task_configs("smoke" if smoke else "default"):
        spec = spec_of(cfg, "ta")
        model = MatTA(spec, students=cfg.students, backend=backend, seed=0)
        x, y = data(spec, 64)
        start = time.perf_counter()
        front = model.frontier(x, y, rounds=3 if smoke else 30)
        rows.append({"task": cfg.task, "backend": backend, "models": len(front), "rounds": front.rounds,
                     "frontier_s": time.perf_counter() - start})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--engine", default=None, help="a Keras engine: time Keras' paths (KERAS_BACKEND must name it)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    rows = paths(args.smoke, args.engine)
    with open(args.json, "w") as f:
        json.dump({"paths": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
