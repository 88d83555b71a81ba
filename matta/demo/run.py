"""The study: per task, a Teacher, then per seed the baselines, one MatTA run, and every extracted model.

The code talks to the deep-learning framework only through the public MatTA
API (``MatTA``, ``Extracted``), so any backend works: ``--backend keras`` as
well as ``torch``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from matta.demo import data as data_mod
from matta.demo.config import TaskConfig, writes_files
from matta.demo.teachers import BatchMemo, get_teacher, spec_of

__all__ = ["limit_threads", "mixnmatch_chain", "evaluate_extracted", "run_task", "run_study"]

Log = Callable[[str], None]


def limit_threads(n: int, backend: str) -> None:
    """Caps the framework's CPU threads at ``n``.

    Small models on a shared CPU run *faster* on one thread than on an
    oversubscribed pool, and a fixed thread count keeps BLAS reductions (and so
    the last bits of every result) the same from machine to machine.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = str(n)
    if backend == "torch" or os.environ.get("KERAS_BACKEND") == "torch":
        from matta.backends.torch import set_num_threads  # framework code lives in the backend

        set_num_threads(n)


def _levels(spec, students: dict[str, float]) -> list[dict[str, Any]]:
    """Sizes of every nested dimension at each Student and at the TA, smallest first (lists are per layer)."""
    from matta import resolve
    from matta.nesting import full

    names = sorted(students, key=lambda n: students[n])
    out = []
    for g in [resolve(spec, students[n]) for n in names] + [full(spec)]:
        d = g.to_dict(spec)
        out.append({k: v for k, v in d.items() if k in ("hidden", "d_model", "d_ff", "n_heads")})
    return out


def mixnmatch_chain(spec, students: dict[str, float]) -> list[tuple[str, dict[str, Any]]]:
    """Mix'n'Match granularities on a nested staircase from the smallest Student to the TA.

    Starting from the smallest Student, one layer at a time is widened to the
    next trained size (Student -> larger Student -> TA), in order; a nested
    ``d_model`` (the residual width every block reads and writes) widens
    together with the first block. So every model is a mix of trained sizes,
    the groups rule T5 draws, and contains the previous one. Models equal to a
    Student or the TA are left out (they are reported under their own names).

    Why ``d_model`` does not widen on its own: a wider residual stream with
    every block still at the smaller size adds parameters to every projection
    but no heads or FFN units. In the text tuning runs (docs/results.md, all 27
    mixes of one trained model scored) that mix scores *worse* than the smaller
    model, and so does a block widened at the narrow ``d_model``, while
    ``d_model`` widened with the first block scores better.

    Returns:
        ``[(label, granularity dict), ...]`` in order of growing size.
    """
    levels = _levels(spec, students)
    per_layer = [k for k in levels[0] if isinstance(levels[0][k], list)]
    shared = [k for k in levels[0] if not isinstance(levels[0][k], list)]
    n = len(levels[0][per_layer[0]])
    nested_shared = [k for k in shared if any(level[k] != levels[0][k] for level in levels)]
    state = [0] * n  # the level of each layer; shared dimensions follow layer 0
    chain = []
    short = {"hidden": "h", "d_model": "d", "d_ff": "ff", "n_heads": "heads"}
    for level in range(1, len(levels)):
        for layer in range(n):
            state[layer] = level
            if all(v == level for v in state):
                continue  # that is the Student / TA itself
            g: dict[str, Any] = {k: levels[state[0]][k] for k in shared}
            g.update({k: [levels[state[j]][k][j] for j in range(n)] for k in per_layer})
            # e.g. "mix h[32,16,16]" (MLP hidden widths) or "mix d32 ff[128,64] heads[2,1]" (Transformer)
            label = "mix " + " ".join(
                f"{short[k]}{g[k]}" if k in shared else f"{short[k]}[{','.join(map(str, g[k]))}]"
                for k in ("d_model", "hidden", "d_ff", "n_heads") if k in g and (k not in shared or k in nested_shared)
            )
            chain.append((label, g))
    return chain


def _latency(model, x1: np.ndarray, repeats: int) -> float:
    """Median seconds of one single-example ``predict`` call (after one warm-up call)."""
    model.predict(x1)
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        model.predict(x1)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def evaluate_extracted(model, ds: data_mod.Dataset, repeats: int) -> dict[str, float]:
    """Held-out metrics, parameter count and per-example latency of one extracted model."""
    from matta.model import metrics

    outs = []
    for start in range(0, len(ds.x_test), 512):
        outs.append(model.predict(ds.x_test[start : start + 512]))
    m = metrics(model.spec, "classification", np.concatenate(outs), ds.y_test)
    out = {"params": int(model.num_params), "loss": m["loss"], "accuracy": m["accuracy"],
           "latency_ms": 1e3 * _latency(model, ds.x_test[:1], repeats)}
    if ds.name == "text":
        out["bpc"] = m["loss"] / math.log(2)
    return out


def _baseline_spec(cfg: TaskConfig, fraction: float):
    from matta import resolve
    from matta.nesting import sub_spec

    ta = spec_of(cfg, "ta")
    return sub_spec(ta, resolve(ta, fraction))


def run_task(
    cfg: TaskConfig,
    seeds: list[int],
    backend: str,
    cache_dir: Optional[str],
    out_dir: Optional[str],
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """One task of the study: the Teacher, then for every seed the baselines, MatTA and its extractions.

    Returns:
        ``{"task", "config", "data", "teacher", "models": {name: {"kind", "params",
        "granularity", "per_seed": [...]}}}``; :mod:`matta.demo.report` adds the statistics.
    """
    from matta import MatTA

    ds = data_mod.digits(**cfg.data) if cfg.task == "digits" else data_mod.text(**cfg.data)
    log(f"[{cfg.task}] data: {len(ds.x_train)} training / {len(ds.x_test)} held-out examples")
    teacher, teacher_info = get_teacher(cfg, ds, backend, cache_dir, progress=progress, log=log)
    models: dict[str, dict[str, Any]] = {}

    def add(name: str, kind: str, seed: Optional[int], result: dict[str, float], granularity: Any = None) -> None:
        entry = models.setdefault(name, {"kind": kind, "params": result["params"], "granularity": granularity,
                                         "per_seed": []})
        entry["per_seed"].append({"seed": seed, **result})

    add("Teacher", "teacher", None, evaluate_extracted(teacher, ds, cfg.latency_repeats))
    ta_spec = spec_of(cfg, "ta")
    chain = mixnmatch_chain(ta_spec, cfg.students)
    common = dict(backend=backend, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                  learning_rate_schedule=cfg.learning_rate_schedule, **cfg.loss)
    fit = dict(steps=cfg.steps, batch_size=cfg.batch_size, progress=progress)
    # Digits: the Teacher's logits on the whole training set, computed once for every seed. Text: per
    # seed, a callable that remembers each batch's logits, shared by the baselines and MatTA of the seed
    # (its batches are the seed's own, so a memo per seed bounds the memory).
    digits_labels = teacher.predict(ds.x_train) if cfg.task == "digits" else None
    for seed in seeds:
        labels = digits_labels if digits_labels is not None else BatchMemo(teacher)
        for name, fraction in sorted(cfg.students.items(), key=lambda kv: kv[1]):
            log(f"[{cfg.task}] seed {seed}: baseline {name} trained alone")
            # A baseline has no Students and trains its one model with weight 1: the per-term
            # weights of the MatTA recipe do not apply to it.
            alone = {k: v for k, v in common.items() if k not in ("student_weights", "ta_weight")}
            base = MatTA(_baseline_spec(cfg, fraction), students={}, seed=seed, **alone)
            base.fit(ds.x_train, ds.y_train, teacher=labels, **fit)
            add(f"baseline {name}", "baseline", seed, evaluate_extracted(base.extract(), ds, cfg.latency_repeats),
                fraction)
        log(f"[{cfg.task}] seed {seed}: MatTA (TA with Students {cfg.students})")
        model = MatTA(ta_spec, students=cfg.students, seed=seed, **common)
        start = time.perf_counter()
        model.fit(ds.x_train, ds.y_train, teacher=labels, **fit)
        train_seconds = time.perf_counter() - start
        for name, fraction in cfg.students.items():
            extracted = model.extract(name)
            add(name, "matta_student", seed, evaluate_extracted(extracted, ds, cfg.latency_repeats), fraction)
            if out_dir and seed == seeds[0] and writes_files():
                folder = os.path.join(out_dir, "students", cfg.task, name)
                if cfg.export_native:
                    extracted.save(folder)
                else:
                    from matta import saving

                    saving.write(folder, extracted.spec, extracted.weights, extracted.info)
        add("TA", "ta", seed, {**evaluate_extracted(model.extract(), ds, cfg.latency_repeats),
                               "train_seconds": train_seconds})
        for label, g in chain:
            add(label, "mixnmatch", seed, evaluate_extracted(model.extract(g), ds, cfg.latency_repeats), g)
    return {"task": cfg.task, "config": cfg.to_dict(), "data": ds.info, "teacher": teacher_info,
            "mixnmatch_chain": [c[0] for c in chain], "models": models}


def run_study(
    configs: list[TaskConfig],
    seeds: list[int],
    backend: str,
    cache_dir: Optional[str],
    out_dir: Optional[str],
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Every task of ``configs``; returns the raw results keyed by task name."""
    return {cfg.task: run_task(cfg, seeds, backend, cache_dir, out_dir, progress, log) for cfg in configs}
