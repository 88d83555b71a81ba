"""Command line: ``matta demo`` (also ``python -m matta demo``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``matta`` command."""
    parser = argparse.ArgumentParser(prog="matta", description="MatTA: one training run, many model sizes.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Teacher -> TA -> Students on real data, with a report")
    demo.add_argument("--backend", default="torch", choices=["torch", "keras"])
    demo.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _quick_demo(args.backend, args.steps)
    return 2


def _quick_demo(backend: str, steps: int) -> int:
    """A short MLP run on scikit-learn's handwritten digits: MatTA Students vs the TA."""
    import numpy as np
    from sklearn.datasets import load_digits

    from matta import MLP, MatTA

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    spec = MLP(d_in=64, hidden=[256, 256], d_out=10)
    model = MatTA(spec, students={"S": 0.125, "M": 0.25}, backend=backend, seed=0)
    model.fit(x[train], y[train], steps=steps, batch_size=64)
    results = model.evaluate(x[test], y[test])
    print(f"{'model':<6} {'params':>8} {'accuracy':>9} {'log-loss':>9}")
    for name, m in results.items():
        print(f"{name:<6} {model.num_params(name):>8} {m['accuracy']:>9.3f} {m['loss']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
