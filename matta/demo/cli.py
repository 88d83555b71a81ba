"""``matta demo``: argument parsing and the top-level flow (data -> Teachers -> study -> report)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Optional, Sequence

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``matta demo``."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the complete study (longer training, 3 seeds by default)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for tests: well under a minute")
    parser.add_argument("--backend", default="torch", choices=["torch", "keras"], help="deep-learning backend")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: 1, or 3 with --full)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (seeds are SEED..SEED+N-1)")
    parser.add_argument("--tasks", default="digits,text", help="comma-separated: digits (task A), text (task B)")
    parser.add_argument("--out", default="matta-report", help="report folder: metrics.json, pareto.png, students/")
    parser.add_argument("--cache", default=None, help="Teacher cache folder (default: $MATTA_CACHE or ~/.cache/matta/teachers)")
    parser.add_argument("--no-cache", action="store_true", help="train the Teachers without reading or writing a cache")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps of MatTA and baselines")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of the framework (default 1: fastest for these small models on a shared CPU, "
                             "and reproducible to the last bit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Runs the demo for parsed ``args``; returns the process exit code."""
    from rich.console import Console

    from matta.demo import report
    from matta.demo.config import task_configs
    from matta.demo.run import limit_threads, run_study
    from matta.demo.teachers import default_cache_dir
    from matta.errors import OptionError

    from matta.demo.config import writes_files

    quiet = not writes_files()  # under torchrun, rank 0 alone prints
    console = Console(quiet=quiet)
    if not console.is_terminal:
        console = Console(width=120, quiet=quiet)  # a log file or pipe: wide enough that the table does not wrap
    mode = "full" if args.full else "smoke" if args.smoke else "default"
    n_seeds = args.seeds if args.seeds is not None else (3 if args.full else 1)
    if n_seeds < 1 or args.seed < 0:
        raise OptionError(f"--seeds must be >= 1 and --seed >= 0; got {n_seeds}, {args.seed}")
    if args.threads < 1:
        raise OptionError(f"--threads must be >= 1; got {args.threads}")
    seeds = list(range(args.seed, args.seed + n_seeds))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    configs = task_configs(mode, tasks, args.steps)
    cache = None if args.no_cache else (args.cache or default_cache_dir())
    limit_threads(args.threads, args.backend)

    console.rule(f"matta demo — mode {mode}, backend {args.backend}, seeds {seeds}")
    start = time.perf_counter()
    results = run_study(configs, seeds, args.backend, cache, args.out, progress=not args.no_progress,
                        log=lambda msg: console.print(msg, style="cyan", markup=False, highlight=False))
    for res in results.values():
        report.summarize(res)
    wall = time.perf_counter() - start
    import matta

    run_info = {
        "command": "matta demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else None,
        "mode": mode, "backend": args.backend, "seeds": seeds, "threads": args.threads,
        "wall_seconds": wall, "matta_version": matta.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "cache": cache,
    }
    if quiet:
        return 0
    os.makedirs(args.out, exist_ok=True)
    report.write_metrics(os.path.join(args.out, "metrics.json"), results, run_info)
    report.plot_pareto(os.path.join(args.out, "pareto.png"), results)
    report.print_tables(results, console)
    console.print(f"report: {os.path.abspath(args.out)} (metrics.json, pareto.png, students/) — {wall:.0f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - convenience
    parser = argparse.ArgumentParser(prog="matta demo")
    add_arguments(parser)
    return run(parser.parse_args(argv))
