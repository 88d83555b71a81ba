"""The small, CPU-only experiment behind the quick table on docs/results.md.

Teacher -> TA -> Students on scikit-learn's handwritten digits (ships with
scikit-learn, no download): a Teacher MLP is trained first; then one MatTA run
co-trains the TA and two nested Students on the Teacher's logits; each Student
is compared with a model of the same size trained alone on the same Teacher
labels for the same number of steps. Prints a Markdown table (mean ± std over
seeds of held-out accuracy and log-loss).

    OMP_NUM_THREADS=1 .venv/bin/python docs/scripts/results_digits.py [--steps 600] [--seeds 3]
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits

from matta import MLP, MatTA
from matta.nesting import sub_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    ta_spec = MLP(d_in=64, hidden=[256, 256], d_out=10)
    students = {"S": 0.125, "M": 0.25}
    rows: dict[str, dict[str, list]] = {}

    def add(name: str, params: int, result: dict) -> None:
        row = rows.setdefault(name, {"params": params, "accuracy": [], "loss": []})
        row["accuracy"].append(result["accuracy"])
        row["loss"].append(result["loss"])

    for seed in range(args.seeds):
        teacher = MatTA(MLP(d_in=64, hidden=[512, 512], d_out=10), students={}, seed=100 + seed)
        teacher.fit(x[train], y[train], steps=args.steps, batch_size=64, progress=False)
        add("Teacher", teacher.num_params(), teacher.evaluate(x[test], y[test])["TA"])
        logits = teacher.predict(x[train])

        model = MatTA(ta_spec, students=students, seed=seed)
        model.fit(x[train], y[train], teacher=logits, steps=args.steps, batch_size=64, progress=False)
        for name, result in model.evaluate(x[test], y[test]).items():
            add(f"MatTA {name}", model.num_params(name), result)

        for name in students:
            alone = MatTA(sub_spec(ta_spec, model.granularity(name)), students={}, seed=seed)
            alone.fit(x[train], y[train], teacher=logits, steps=args.steps, batch_size=64, progress=False)
            add(f"alone {name}", alone.num_params(), alone.evaluate(x[test], y[test])["TA"])

    print(f"steps={args.steps}, seeds={args.seeds}, train=1400, test={len(test)}\n")
    print("| model | parameters | accuracy | log-loss |")
    print("| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        acc, loss = np.array(row["accuracy"]), np.array(row["loss"])
        print(f"| {name} | {row['params']:,} | {acc.mean():.3f} ± {acc.std():.3f} | {loss.mean():.3f} ± {loss.std():.3f} |")


if __name__ == "__main__":
    main()
