"""Command line: ``matta demo`` (also ``python -m matta demo``).

Only the standard library is imported here; the demo imports its heavy
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from matta.demo.cli import run
        from matta.errors import MattaError

        try:
            return run(args)
        except MattaError as e:
            print(f"matta demo: error: {e}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
