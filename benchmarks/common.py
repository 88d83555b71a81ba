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


def interleaved_samples(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function in every round, measured round-robin so drift hits all alike.

    Each function returns the seconds of the work it timed (so it can exclude set-up).
    """
    assert repeats >= 1 and fns, (repeats, list(fns))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(fn())
    return samples


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` round-robin rounds."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, repeats).items()}


def paired_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator / denominator`` timed in the same round.

    A slow moment on a shared machine slows both sides of one round alike, so the
    per-round ratio is steadier than a ratio of two medians.
    """
    a, b = samples[numerator], samples[denominator]
    assert len(a) == len(b) > 0 and all(t > 0 for t in b), (numerator, denominator)
    return statistics.median(x / y for x, y in zip(a, b))


#: Rounds of the serving comparison (a ratio near 1 at batch 1 needs many rounds to resolve 2 %).
SERVING_ROUNDS = 21


def serving_row(workload: str, backend: str, batch: int, fns: dict[str, Callable[[], float]], rounds: int) -> dict:
    """One serving row: ``fns`` times ``extracted``, ``plain`` and ``nested`` calls; one warm-up call each.

    The times are medians over the rounds; the ratios are medians of per-round ratios (:func:`paired_ratio`).
    """
    assert set(fns) == {"extracted", "plain", "nested"}, sorted(fns)
    for fn in fns.values():
        fn()
    samples = interleaved_samples(fns, rounds)
    t = {k: statistics.median(v) for k, v in samples.items()}
    return {"workload": workload, "backend": backend, "batch": batch, "rounds": rounds,
            "extracted_s": t["extracted"], "plain_s": t["plain"], "nested_s": t["nested"],
            "serve_ratio": paired_ratio(samples, "extracted", "plain"),
            "nested_ratio": paired_ratio(samples, "nested", "extracted")}


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
