"""Keras measurements on one engine (KERAS_BACKEND is read once per process, so run.py starts one per engine).

Usage: ``KERAS_BACKEND=jax python benchmarks/keras_bench.py [--smoke] --json PATH``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import SERVING_ROUNDS, Workload, data, interleaved, serving_row, timed, workloads  # noqa: E402
from matta import MLP, MatTA  # noqa: E402
from matta.nesting import sub_spec  # noqa: E402
from matta.specs import Spec  # noqa: E402

ENGINE = os.environ.get("KERAS_BACKEND", "tensorflow")


def independent_plain(spec: Spec) -> keras.Model:
    """A plain Keras model a user would write (MLP: a Sequential of Dense layers)."""
    if isinstance(spec, MLP):
        layers = [keras.Input((spec.d_in,))]
        for width in spec.hidden:
            layers.append(keras.layers.Dense(width, activation=lambda t: keras.ops.gelu(t, approximate=True)))
        layers.append(keras.layers.Dense(spec.d_out))
        return keras.Sequential(layers)
    from matta.backends.keras.models import plain_model  # built-in layers only: what a user would build

    return plain_model(spec, "float32")


def training(w: Workload, steps: int, repeats: int) -> dict:
    x, y = data(w.spec, w.num_examples)
    model = MatTA(w.spec, w.students, backend="keras", seed=0)
    model.fit(x, y, steps=2, batch_size=w.batch_size, progress=False, verbose=0)  # warm-up: compiles the step
    names = ["TA", *w.students]
    plains = {}
    for name in names:
        m = independent_plain(sub_spec(w.spec, model.granularity(name)))
        m.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        plains[name] = m

    def matta_step() -> float:
        start = time.perf_counter()
        model.fit(x, y, steps=steps, batch_size=w.batch_size, progress=False, verbose=0)
        return (time.perf_counter() - start) / steps

    def plain_step(name: str) -> float:
        rng = np.random.default_rng(1)
        index = rng.integers(0, len(x), steps * w.batch_size)
        start = time.perf_counter()
        plains[name].fit(x[index], y[index], batch_size=w.batch_size, epochs=1, verbose=0, shuffle=False)
        return (time.perf_counter() - start) / steps

    fns = {"matta": matta_step, **{f"plain:{n}": (lambda n=n: plain_step(n)) for n in names}}
    for fn in fns.values():
        fn()
    t = interleaved(fns, repeats)
    plain_sum = sum(t[f"plain:{n}"] for n in names)
    return {"workload": w.name, "backend": f"keras-{ENGINE}", "matta_step_s": t["matta"], "plain_sum_s": plain_sum,
            "plain_steps_s": {n: t[f"plain:{n}"] for n in names}, "train_ratio": t["matta"] / plain_sum}


def serving(w: Workload, repeats: int, student: str = "S") -> list[dict]:
    x, _ = data(w.spec, w.batch_size)
    model = MatTA(w.spec, w.students, backend="keras", seed=0)
    extracted = model.extract(student)
    plain = independent_plain(extracted.spec)
    plain.set_weights([np.asarray(v) for v in extracted.model.weights])
    g = model.granularity(student)
    rows = []
    for batch in (1, w.batch_size):
        xb = keras.ops.convert_to_tensor(x[:batch])
        number = 10 if batch == 1 else 3  # eager Keras calls are slow: keep the whole run in minutes
        fns = {
            "extracted": lambda: timed(lambda: extracted.model(xb), number),
            "plain": lambda: timed(lambda: plain(xb), number),
            "nested": lambda: timed(lambda: model.model.run(xb, g), number),
        }
        rows.append(serving_row(w.name, f"keras-{ENGINE}", batch, fns, repeats))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", required=True)
    parser.add_argument("--skip", default="")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    steps, repeats = (2, 1) if args.smoke else (5, 3)
    out = {"training": [], "serving": []}
    for w in workloads(args.smoke):
        if "training" not in skip:
            out["training"].append(training(w, steps, repeats))
        if "serving" not in skip:
            out["serving"] += serving(w, 1 if args.smoke else SERVING_ROUNDS)
    with open(args.json, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
