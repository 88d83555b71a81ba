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

__all__ = ["limit_threads", "mixnmatch_chain", "evaluate_extracted", "time_models", "budget_choices", "run_task",
           "run_study"]

Log = Callable[[str], None]


def limit_threads(n: int, backend: str) -> None:
    """Caps the framework's CPU threads at ``n``.

    Small models on a shared CPU run *faster* on one thread than on an
    oversubscribed pool, and a fixed thread count keeps BLAS reductions (and so
    the last bits of every result) the same from machine to machine.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(n)
    # TensorFlow's inter-op pool schedules ops and runs Keras' input pipeline (the Python batch
    # generator); the arithmetic runs on the intra-op threads above, so the results keep every bit.
    # With one inter-op thread the pipeline and the step wait on each other (docs/benchmarks.md),
    # so it gets at least two.
    os.environ["TF_NUM_INTEROP_THREADS"] = str(max(n, 2))
    if backend == "torch" or os.environ.get("KERAS_BACKEND") == "torch":
        from matta.backends.torch import set_num_threads  # framework code lives in the backend

        set_num_threads(n)


def mixnmatch_chain(spec, students: dict[str, float]) -> list[tuple[str, dict[str, Any]]]:
    """Mix'n'Match granularities on a nested staircase from the smallest Student to the TA.

    The staircase is :func:`matta.frontier.staircase`: one layer at a time widens to the next
    trained size (Student -> larger Student -> TA), a nested ``d_model`` together with the first
    block, so every model is a mix of trained sizes and contains the previous one.

    Why ``d_model`` does not widen on its own: a wider residual stream with every block still at
    the smaller size adds parameters to every projection but no heads or FFN units. In the text
    tuning runs (docs/results.md, all 27 mixes of one trained model scored) that mix scores
    *worse* than the smaller model, and so does a block widened at the narrow ``d_model``, while
    ``d_model`` widened with the first block scores better.

    Returns:
        ``[(label, granularity dict), ...]`` in order of growing size; labels such as
        ``"mix h[32,16,16]"`` or ``"mix d32 ff[128,64] heads[2,1]"`` (``d`` only when nested).
    """
    from matta import MLP, resolve
    from matta.frontier import staircase
    from matta.nesting import full, num_params

    levels = sorted((resolve(spec, f) for f in students.values()), key=lambda g: num_params(spec, g)) + [full(spec)]
    chain = []
    for g in staircase(spec, levels):
        d = g.to_dict(spec)
        fmt = lambda xs: "[" + ",".join(map(str, xs)) + "]"  # noqa: E731
        if isinstance(spec, MLP):
            label = f"mix h{fmt(d['hidden'])}"
        else:
            width = f"d{d['d_model']} " if "d_model" in spec.nested else ""
            label = f"mix {width}ff{fmt(d['d_ff'])} heads{fmt(d['n_heads'])}"
        chain.append((label, d))
    return chain


def evaluate_extracted(model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Held-out metrics and parameter count of one extracted model (latency: :func:`time_models`)."""
    from matta.model import metrics

    outs = []
    for start in range(0, len(x), 512):
        outs.append(model.predict(x[start : start + 512]))
    m = metrics(model.spec, "classification", np.concatenate(outs), y)
    out = {"params": int(model.num_params), "loss": m["loss"], "accuracy": m["accuracy"]}
    if model.spec.family == "transformer":
        out["bpc"] = m["loss"] / math.log(2)
    return out


def time_models(models: dict[str, Any], x1: np.ndarray, rounds: int) -> dict[str, float]:
    """Milliseconds per single-example serving call of each model, in paired rounds (:mod:`matta.frontier`)."""
    from matta.frontier import measure_latency, serving_call

    return measure_latency({name: serving_call(m, x1) for name, m in models.items()}, rounds)


def budget_choices(model, cfg: TaskConfig, ds: data_mod.Dataset) -> list[dict[str, Any]]:
    """The best model under a few parameter budgets, chosen on one half of the held-out data, scored on the other.

    The budgets are each Student's size times 1.5 and half the TA's. The held-out examples
    alternate between the validation half (``MatTA.select`` ranks by its loss) and the report half.
    """
    from matta.frontier import Budget, name_of

    x_val, y_val, x_rep, y_rep = ds.x_test[0::2], ds.y_test[0::2], ds.x_test[1::2], ds.y_test[1::2]
    budgets = sorted({int(1.5 * model.num_params(n)) for n in cfg.students} | {model.num_params("TA") // 2})
    # One scoring of the candidates serves every budget: what MatTA.select(max_params=b) does for each b.
    front = model.frontier(x_val, y_val, latency=False)
    out = []
    for max_params in budgets:
        g = front.select(Budget(max_params=max_params)).granularity
        out.append({"max_params": max_params, "model": name_of(model, g), "granularity": g.to_dict(model.spec),
                    **evaluate_extracted(model.extract(g), x_rep, y_rep)})
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

    held_out = (ds.x_test, ds.y_test)
    teacher_result = evaluate_extracted(teacher, *held_out)
    ta_spec = spec_of(cfg, "ta")
    chain = mixnmatch_chain(ta_spec, cfg.students)
    common = dict(backend=backend, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                  learning_rate_schedule=cfg.learning_rate_schedule, **cfg.loss)
    fit = dict(steps=cfg.steps, batch_size=cfg.batch_size, progress=progress)
    budgets: list[dict[str, Any]] = []
    # Digits: the Teacher's logits on the whole training set, computed once for every seed. Text: per
    # seed, a callable that remembers each batch's logits, shared by the baselines and MatTA of the seed
    # (its batches are the seed's own, so a memo per seed bounds the memory).
    digits_labels = teacher.predict(ds.x_train) if cfg.task == "digits" else None
    for seed in seeds:
        labels = digits_labels if digits_labels is not None else BatchMemo(teacher)
        # name -> (kind, extracted model, metrics, granularity): timed together once the seed's models exist.
        seed_models: dict[str, tuple[str, Any, dict[str, float], Any]] = {}
        if seed == seeds[0]:
            seed_models["Teacher"] = ("teacher", teacher, teacher_result, None)
        for name, fraction in sorted(cfg.students.items(), key=lambda kv: kv[1]):
            log(f"[{cfg.task}] seed {seed}: baseline {name} trained alone")
            # A baseline has no Students and trains its one model with weight 1: the per-term
            # weights of the MatTA recipe do not apply to it.
            alone = {k: v for k, v in common.items() if k not in ("student_weights", "ta_weight")}
            base = MatTA(_baseline_spec(cfg, fraction), students={}, seed=seed, **alone)
            base.fit(ds.x_train, ds.y_train, teacher=labels, **fit)
            extracted = base.extract()
            seed_models[f"baseline {name}"] = ("baseline", extracted, evaluate_extracted(extracted, *held_out), fraction)
        log(f"[{cfg.task}] seed {seed}: MatTA (TA with Students {cfg.students})")
        model = MatTA(ta_spec, students=cfg.students, seed=seed, **common)
        start = time.perf_counter()
        model.fit(ds.x_train, ds.y_train, teacher=labels, **fit)
        train_seconds = time.perf_counter() - start
        for name, fraction in cfg.students.items():
            extracted = model.extract(name)
            seed_models[name] = ("matta_student", extracted, evaluate_extracted(extracted, *held_out), fraction)
            if out_dir and seed == seeds[0] and writes_files():
                _export(extracted, os.path.join(out_dir, "students", cfg.task, name), cfg.export_native)
        extracted = model.extract()
        seed_models["TA"] = ("ta", extracted, {**evaluate_extracted(extracted, *held_out),
                                               "train_seconds": train_seconds}, None)
        for label, g in chain:
            extracted = model.extract(g)
            seed_models[label] = ("mixnmatch", extracted, evaluate_extracted(extracted, *held_out), g)
        # Paired rounds: every model of the seed is called once per round, so two models of one size
        # read the same latency within noise, whatever the machine does meanwhile.
        times = time_models({n: m for n, (_, m, _, _) in seed_models.items()}, ds.x_test[:1], cfg.latency_repeats)
        for name, (kind, _, result, g) in seed_models.items():
            add(name, kind, None if kind == "teacher" else seed, {**result, "latency_ms": times[name]}, g)
        del seed_models
        if seed == seeds[0]:
            log(f"[{cfg.task}] seed {seed}: the best model under each parameter budget (MatTA.select)")
            budgets = budget_choices(model, cfg, ds)
    return {"task": cfg.task, "config": cfg.to_dict(), "data": ds.info, "teacher": teacher_info,
            "mixnmatch_chain": [c[0] for c in chain], "models": models, "budgets": budgets}


def _export(extracted, folder: str, native: bool) -> None:
    """A Student's save: ``spec.json`` + ``weights.safetensors``, the native file if ``native``, and ``model.onnx``."""
    extracted.save(folder, native=native, onnx=True)


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
