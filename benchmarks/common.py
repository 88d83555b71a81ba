"""Shared helpers of the benchmarks: interleaved timing, the workloads, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from matta import MLP, Transformer
from matta.specs import Spec


@dataclass(frozen=True)
class Workload:
    """A spec, its students and a batch shape to benchmark."""

    name: str
    spec: Spec
    students: dict
    batch_size: int
    num_examples: int


def workloads(smoke: bool) -> list[Workload]:
    """The MLP (a ranker/classifier) and GPT-2-style workloads; tiny ones for ``--smoke``."""
    if smoke:
        return [
            Workload("mlp", MLP(d_in=16, hidden=[64, 64], d_out=10, activation="gelu"), {"S": 0.25, "M": 0.5}, 32, 128),
            Workload("transformer", Transformer(vocab_size=64, max_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=128),
                     {"S": 0.25, "M": 0.5}, 8, 32),
        ]
    return [
        Workload("mlp", MLP(d_in=256, hidden=[2048, 2048], d_out=100, activation="gelu"), {"S": 0.25, "M": 0.5}, 256, 4096),
        Workload("transformer", Transformer(vocab_size=256, max_len=128, d_model=256, n_layers=4, n_heads=4, d_ff=1024),
                 {"S": 0.25, "M": 0.5}, 16, 256),
    ]


def data(spec: Spec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and labels of the spec's kind."""
    rng = np.random.default_rng(seed)
    if isinstance(spec, MLP):
        return rng.standard_normal((n, spec.d_in)).astype("float32"), rng.integers(0, spec.d_out, n)
    tokens = rng.integers(0, spec.vocab_size, (n, spec.max_len + 1))
    return tokens[:, :-1], tokens[:, 1:]


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, measured round-robin so drift hits all alike.

    Each function returns the seconds of the work it timed (so it can exclude set-up).
    """
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def timed(fn: Callable[[], object], number: int = 1) -> float:
    """Seconds per call of ``fn`` over ``number`` calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def machine() -> dict:
    """What the absolute numbers were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table (the benchmark must print without optional dependencies)."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda items: "  ".join(s.ljust(w) for s, w in zip(items, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
