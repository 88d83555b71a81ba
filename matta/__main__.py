"""Command line: ``matta demo``, ``matta export`` and ``matta distill`` (also ``python -m matta ...``).

Only the standard library is imported here; each command imports its heavy
dependencies (scikit-learn, matplotlib, rich, the framework) when it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``matta`` command.

    Returns:
        The process exit code: 0 on success, 2 on a usage error (as argparse),
        1 when matta raises one of its own errors.
    """
    from matta.demo.cli import add_arguments

    parser = argparse.ArgumentParser(prog="matta", description="MatTA: one training run, many model sizes.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="Teacher -> TA -> Students on real offline data, with a report",
        description="Runs the main job: on scikit-learn's digits (MLP) and Python's pydoc help text "
        "(char-level Transformer), trains a Teacher, baseline Students alone, and one MatTA run; "
        "reports held-out metrics of every extracted model, a Pareto plot and the exported Students.",
    )
    add_arguments(demo)
    export = sub.add_parser(
        "export", help="export Students of a saved MatTA by name or budget, with a manifest",
        description="Loads a MatTA saved by MatTA.save and writes one folder per chosen model plus manifest.json "
        "(granularity, spec, parameters, FLOPs, metrics, latency, SHA-256 of every file) into OUT, atomically. "
        "Each value of each --budget chooses one model: the best held-out metric within it (needs --data).",
    )
    _export_arguments(export)
    distill = sub.add_parser(
        "distill", help="a pretrained GPT-2 checkpoint in, nested GPT-2 Students out",
        description="Starts the TA from a GPT-2 checkpoint folder, tokenizes the text with the tokenizer saved "
        "there, holds out the last tenth of the sequences, co-trains the TA and the Students (on a Teacher "
        "checkpoint's logits with --teacher), and writes each Student and the TA as GPT-2 checkpoints with the "
        "tokenizer, plus metrics.json (held-out loss and perplexity, parameters), into OUT.",
    )
    _distill_arguments(distill)
    args = parser.parse_args(argv)
    from matta.errors import MattaError

    if args.command == "demo":
        from matta.demo.cli import run
    else:
        run = _export if args.command == "export" else _distill
    try:
        return run(args)
    except MattaError as e:
        print(f"matta {args.command}: error: {e}", file=sys.stderr)
        return 1


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``matta export``."""
    parser.add_argument("saved_model", metavar="SAVED_MODEL", help="a folder written by MatTA.save")
    parser.add_argument("--out", required=True, help="the export's folder (replaced as a whole)")
    parser.add_argument("--budget", action="append", default=[], metavar="KEY=VALUE[,VALUE...]",
                        help="params, flops or latency_ms; one model per value, e.g. params=10k,50k or latency_ms=0.2")
    parser.add_argument("--student", action="append", default=[], metavar="NAME[,NAME...]",
                        help="export these by name (Students, TA); default without --budget: every Student and the TA")
    parser.add_argument("--format", default="safetensors", help="comma-separated: safetensors, onnx, native")
    parser.add_argument("--data", default=None, metavar="FILE.npz",
                        help="held-out data (arrays x and y) for metrics and latency; needed by --budget")
    parser.add_argument("--batch-size", type=int, default=1, help="examples per timed call (default 1)")
    parser.add_argument("--metric", default=None, help="the metric budgets choose by (default loss; mse for regression)")
    parser.add_argument("--rounds", type=int, default=30, help="paired timing rounds (default 30)")
    parser.add_argument("--backend", default="torch", help="the backend to load the model on (default torch)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT even if it is not a matta export")


def _export(args: argparse.Namespace) -> int:
    """Runs ``matta export``: formats, budgets, numbers and the data file are checked before the model is loaded."""
    import os

    import numpy as np

    from matta import MatTA
    from matta.errors import InputError, integer
    from matta.shipping import check_formats, export_many, parse_budget

    formats = check_formats(args.format)
    integer("--batch-size", args.batch_size, 1)
    integer("--rounds", args.rounds, 1)
    budgets = [b for text in args.budget for b in parse_budget(text)]
    names = [n.strip() for text in args.student for n in text.split(",") if n.strip()]
    if budgets and args.data is None:
        raise InputError("--budget chooses by held-out metric and latency: give --data FILE.npz with arrays x and y")
    x = y = None
    if args.data is not None:
        try:
            with np.load(args.data, allow_pickle=False) as data:
                missing = sorted({"x", "y"} - set(data.files))
                if missing:
                    raise InputError(f"--data {args.data!r} must hold arrays x and y; it lacks {missing} (has {data.files})")
                x, y = data["x"], data["y"]
        except (OSError, ValueError) as exc:
            raise InputError(f"--data {args.data!r} is not a readable .npz file of arrays x and y: {exc}") from None
    model = MatTA.load(args.saved_model, backend=args.backend)
    manifest = export_many(model, args.out, [*names, *budgets] or None, formats, x_val=x, y_val=y,
                           batch_size=args.batch_size, metric=args.metric, rounds=args.rounds, overwrite=args.overwrite,
                           source_path=os.path.abspath(args.saved_model),
                           data_path=None if args.data is None else os.path.abspath(args.data))
    for m in manifest["models"]:
        latency = "-" if m["latency_ms"] is None else f"{m['latency_ms']:.4f} ms"
        metric = manifest["measured_on"]["metric"]
        score = "-" if not m["metrics"] else f"{metric} {m['metrics'][metric]:.4f}"
        print(f"{m['folder']}: {m['name']}, {m['params']:,} params, {m['flops']:,} FLOPs, {latency}, {score}")
    print(f"wrote {os.path.join(os.path.abspath(args.out), 'manifest.json')}")
    return 0


def _distill_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``matta distill``."""
    parser.add_argument("--ta", required=True, metavar="DIR", help="the TA's GPT-2 checkpoint folder (with tokenizer.json)")
    parser.add_argument("--teacher", default=None, metavar="DIR", help="a GPT-2 checkpoint whose logits are the targets")
    parser.add_argument("--text", required=True, nargs="+", metavar="FILE", help="UTF-8 text files to train on")
    parser.add_argument("--students", default="S=0.25", metavar="NAME=SIZE[,...]",
                        help="the Students, e.g. S=0.25,M=0.5 (fractions of d_ff) or S=d_ff:0.25+n_layers:6 "
                        "(per dimension); default S=0.25")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--out", required=True, help="the output folder (replaced as a whole)")
    parser.add_argument("--backend", default="torch", choices=("torch", "keras"), help="the backend (default torch)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default min(128, n_positions))")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seeds batch order and granularity sampling (default 0)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT even if it is not empty")


def _distill(args: argparse.Namespace) -> int:
    """Runs ``matta distill`` (:func:`matta.distill.distill`)."""
    from matta.distill import distill, parse_students

    distill(args.ta, args.text, parse_students(args.students), args.steps, args.out, teacher=args.teacher,
            backend=args.backend, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
            learning_rate=args.learning_rate, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
