"""The report: statistics over seeds, quality checks, a rich table, ``metrics.json`` and ``pareto.png``."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np

__all__ = ["SCHEMA", "summarize", "quality", "write_metrics", "plot_pareto", "pareto", "budget_rows", "print_tables",
           "headline"]

#: Tag of the ``metrics.json`` layout; bump it when the layout changes.
SCHEMA = "matta.demo.metrics/1"

#: Per-seed numbers that get a mean and a standard deviation.
_STATS = ("loss", "accuracy", "bpc", "latency_ms", "train_seconds")

#: Display order of the kinds of model.
KINDS = ("teacher", "ta", "mixnmatch", "matta_student", "baseline")


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    # Sample standard deviation (ddof=1) across seeds; 0 for a single seed.
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(task_result: dict[str, Any]) -> dict[str, Any]:
    """Adds ``mean``/``std`` of every per-seed metric to each model, and the task's ``quality``."""
    for entry in task_result["models"].values():
        entry["mean"], entry["std"] = {}, {}
        for key in _STATS:
            values = [r[key] for r in entry["per_seed"] if key in r]
            if values:
                entry["mean"][key], entry["std"][key] = _mean_std(values)
    task_result["quality"] = quality(task_result)
    return task_result


def quality(task_result: dict[str, Any]) -> dict[str, Any]:
    """The issue's quality bar on held-out loss (mean over seeds).

    * ``students``: per Student, MatTA vs the same-size baseline: both means,
      the relative improvement ``(baseline - matta) / baseline``, how many seeds
      MatTA won, and ``holds`` (lower mean loss).
    * ``mixnmatch``: the chain smallest Student -> Mix'n'Match models -> ... -> TA,
      ordered by parameters, and ``monotone``: every step down in loss.
    """
    models = task_result["models"]
    students = {}
    for name, entry in models.items():
        if entry["kind"] != "matta_student" or f"baseline {name}" not in models:
            continue
        base = models[f"baseline {name}"]
        m, b = entry["mean"]["loss"], base["mean"]["loss"]
        wins = sum(
            r["loss"] < rb["loss"] for r, rb in zip(entry["per_seed"], base["per_seed"]) if r["seed"] == rb["seed"]
        )
        students[name] = {"matta_loss": m, "baseline_loss": b, "relative_improvement": (b - m) / b,
                          "seeds_won": int(wins), "seeds": len(entry["per_seed"]), "holds": bool(m < b)}
    chain = [(n, e) for n, e in models.items() if e["kind"] in ("matta_student", "mixnmatch", "ta")]
    chain.sort(key=lambda ne: ne[1]["params"])
    losses = [e["mean"]["loss"] for _, e in chain]
    steps = [b < a for a, b in zip(losses, losses[1:])]
    return {
        "students": students,
        "all_students_beat_baselines": bool(students) and all(s["holds"] for s in students.values()),
        "mixnmatch": {"models": [n for n, _ in chain], "params": [e["params"] for _, e in chain],
                      "loss": losses, "monotone": bool(all(steps)),
                      "violations": [[chain[i][0], chain[i + 1][0]] for i, ok in enumerate(steps) if not ok]},
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics(path: str, results: dict[str, Any], run_info: dict[str, Any]) -> dict[str, Any]:
    """Writes ``metrics.json``: ``{"schema", "run": {...}, "tasks": {task: summary}}``."""
    doc = _jsonable({"schema": SCHEMA, "run": run_info, "tasks": results})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False, allow_nan=False)
    return doc


_STYLE = {  # kind -> (label, matplotlib marker, colour)
    "baseline": ("baseline Student (trained alone)", "s", "tab:gray"),
    "matta_student": ("MatTA Student", "o", "tab:red"),
    "mixnmatch": ("Mix'n'Match", ".", "tab:blue"),
    "ta": ("TA", "D", "tab:purple"),
    "teacher": ("Teacher", "*", "black"),
}


def plot_pareto(path: str, results: dict[str, Any]) -> None:
    """Parameters vs held-out loss per task (mean ± std over seeds), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works headless
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        res = results[task]
        text = task == "text"
        scale = 1 / math.log(2) if text else 1.0  # nats -> bits per character
        models = res["models"]
        chain = sorted((e for e in models.values() if e["kind"] in ("matta_student", "mixnmatch", "ta")),
                       key=lambda e: e["params"])
        ax.plot([e["params"] for e in chain], [scale * e["mean"]["loss"] for e in chain], "-", color="tab:blue",
                alpha=0.6, lw=1.5, label="Mix'n'Match curve (one MatTA run)")
        best = [e for e, keep in zip(models.values(), pareto(models)) if keep]
        ax.scatter([e["params"] for e in best], [scale * e["mean"]["loss"] for e in best], s=190, facecolors="none",
                   edgecolors="tab:green", linewidths=1.8, zorder=3, label="Pareto-optimal (params, loss)")
        seen = set()
        for kind in ("mixnmatch", "baseline", "matta_student", "ta", "teacher"):
            for e in (e for e in models.values() if e["kind"] == kind):
                label, marker, colour = _STYLE[kind]
                ax.errorbar(e["params"], scale * e["mean"]["loss"], yerr=scale * e["std"].get("loss", 0.0),
                            fmt=marker, color=colour, ms=12 if kind == "teacher" else 7, capsize=3,
                            label=None if kind in seen else label)
                seen.add(kind)
        for name, e in models.items():
            if e["kind"] in ("baseline", "matta_student", "ta", "teacher"):
                ax.annotate(name.replace("baseline ", "base "), (e["params"], scale * e["mean"]["loss"]),
                            textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log scale)")
        ax.set_ylabel("held-out bits per character" if text else "held-out log-loss (nats)")
        n_seeds = max(len(e["per_seed"]) for e in models.values())
        ax.set_title(("B: char-level LM, Transformer" if text else "A: digits, MLP") + f" ({n_seeds} seed(s))")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto(models: dict[str, Any]) -> list[bool]:
    """Per model (in order), whether no other model has fewer or equal parameters and lower or equal mean loss."""
    from matta.frontier import pareto_mask

    return [bool(m) for m in pareto_mask([[e["params"], e["mean"]["loss"]] for e in models.values()])]


def budget_rows(task_result: dict[str, Any]) -> list[list[str]]:
    """One row per parameter budget: the model ``MatTA.select`` chose and its scores on the report half."""
    text = task_result["task"] == "text"
    out = []
    for b in task_result.get("budgets", []):
        metric = f"{b['bpc']:.3f}" if text else f"{b['loss']:.4f}"
        out.append([f"≤ {b['max_params']:,}", b["model"], f"{b['params']:,}", metric, f"{b['accuracy']:.3f}"])
    return out


def _fmt(entry: dict[str, Any], key: str, digits: int) -> str:
    if key not in entry["mean"]:
        return "-"
    m, s = entry["mean"][key], entry["std"][key]
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(entry["per_seed"]) > 1 else f"{m:.{digits}f}"


def rows(task_result: dict[str, Any]) -> list[list[str]]:
    """The table rows of one task, largest model first (also used for docs/results.md)."""
    text = task_result["task"] == "text"
    q = task_result.get("quality", {}).get("students", {})
    out = []
    order = sorted(task_result["models"].items(), key=lambda ne: (-ne[1]["params"], KINDS.index(ne[1]["kind"])))
    for name, e in order:
        delta = ""
        if e["kind"] == "matta_student" and name in q:
            delta = f"{100 * q[name]['relative_improvement']:+.1f}% ({q[name]['seeds_won']}/{q[name]['seeds']} seeds)"
        metric = _fmt(e, "bpc", 3) if text else _fmt(e, "loss", 4)
        out.append([name, e["kind"], f"{e['params']:,}", metric, _fmt(e, "accuracy", 3 if text else 4),
                    _fmt(e, "latency_ms", 3), delta])
    return out


def columns(task: str) -> list[str]:
    """Column headers matching :func:`rows`."""
    return ["model", "kind", "params", "bits/char" if task == "text" else "log-loss",
            "next-char acc." if task == "text" else "accuracy", "ms/example", "vs baseline"]


def print_tables(results: dict[str, Any], console: Optional[Any] = None) -> None:
    """Prints one rich table per task and the quality verdicts."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for task, res in results.items():
        title = "Task A: digits, MLP" if task == "digits" else "Task B: pydoc text, char-level Transformer"
        n = max(len(e["per_seed"]) for e in res["models"].values())
        table = Table(title=f"{title} — held-out, mean ± std over {n} seed(s)" if n > 1 else f"{title} — held-out")
        for i, c in enumerate(columns(task)):
            table.add_column(c, justify="left" if i < 2 else "right")
        for r in rows(res):
            style = {"baseline": "dim", "matta_student": "bold", "teacher": "italic"}.get(r[1])
            table.add_row(*r, style=style)
        console.print(table)
        if res.get("budgets"):
            picks = Table(title=f"{title} — best model per parameter budget (chosen on half the held-out data, "
                                "scored on the other half)")
            for i, c in enumerate(["budget (params)", "model", "params", "bits/char" if task == "text" else "log-loss",
                                   "accuracy"]):
                picks.add_column(c, justify="left" if i == 1 else "right")
            for r in budget_rows(res):
                picks.add_row(*r)
            console.print(picks)
        console.print(headline(task, res), markup=False)


def headline(task: str, res: dict[str, Any]) -> str:
    """One line of verdicts: Students vs baselines and the Mix'n'Match monotonicity."""
    q = res["quality"]
    parts = []
    for name, s in q["students"].items():
        parts.append(f"{name}: {'beats' if s['holds'] else 'does NOT beat'} its baseline "
                     f"({100 * s['relative_improvement']:+.1f}% held-out loss)")
    mono = q["mixnmatch"]
    parts.append("Mix'n'Match frontier " + ("monotone" if mono["monotone"]
                                             else f"NOT monotone at {mono['violations']}"))
    return f"[{task}] " + "; ".join(parts)


def markdown(doc: dict[str, Any]) -> str:
    """The tables of a ``metrics.json`` document as Markdown (what docs/results.md quotes)."""
    lines = []
    for task, res in doc["tasks"].items():
        cols = columns(task)
        lines += [f"### {task}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows(res)]
        lines += ["", headline(task, res), ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m matta.demo.report REPORT/metrics.json
    import sys

    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
