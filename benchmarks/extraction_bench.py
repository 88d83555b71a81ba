"""Extraction at scale: a quarter-FFN Student out of a GPT-2-Medium-sized TA held as numpy weights."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from benchmarks.common import interleaved
from matta import Transformer
from matta.extraction import extract
from matta.nesting import resolve, slice_plan

GPT2_MEDIUM = Transformer(vocab_size=50257, max_len=1024, d_model=1024, n_layers=24, n_heads=16, d_ff=4096)
SMALL = Transformer(vocab_size=512, max_len=64, d_model=128, n_layers=4, n_heads=4, d_ff=512)


def run(smoke: bool) -> dict:
    spec = SMALL if smoke else GPT2_MEDIUM
    granularity = {"d_ff": 0.25}
    # Ones, not np.empty: every page is touched, as in a real checkpoint.
    weights = {name: np.ones(p.shape, dtype=np.float32) for name, p in spec.parameters().items()}
    g = resolve(spec, granularity)
    plan = list(slice_plan(spec, g))
    sizes = [(weights[name], int(np.prod([len(range(*s.indices(n))) for s, n in zip(slices, weights[name].shape)])))
             for _, name, slices in plan]
    student_bytes = sum(n for _, n in sizes) * 4

    def extract_once() -> float:
        start = time.perf_counter()
        out = extract(weights, spec, granularity)
        elapsed = time.perf_counter() - start
        del out
        return elapsed

    def copy_once() -> float:
        # The floor: one contiguous memcpy of each Student tensor's bytes into a new array.
        start = time.perf_counter()
        out = [np.array(w.reshape(-1)[:n], copy=True) for w, n in sizes]
        elapsed = time.perf_counter() - start
        del out
        return elapsed

    extract_once(), copy_once()
    t = interleaved({"extract": extract_once, "copy": copy_once}, 3)

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sub_spec, sub_weights = extract(weights, spec, granularity)
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    assert sum(w.nbytes for w in sub_weights.values()) == student_bytes
    return {
        "spec": "gpt2-medium" if not smoke else "small", "ta_params": spec.num_params, "student_params": sub_spec.num_params,
        "extract_s": t["extract"], "copy_s": t["copy"], "time_ratio": t["extract"] / t["copy"],
        "peak_extra_bytes": peak, "student_bytes": student_bytes, "memory_ratio": peak / student_bytes,
    }
