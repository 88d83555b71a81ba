"""The frontier of one MatTA run: which of its many models to ship for a deployment target.

One run holds many servable models: the Students, the TA, and every size between
them. :func:`candidates` lists a default set (numpy only, from the spec and the
trained granularities); :func:`measure` scores each one on held-out data
(parameters, FLOPs, measured latency, metrics) into a :class:`Frontier`, which
marks the Pareto-optimal rows and selects the best model under a :class:`Budget`.

Latency is measured in paired rounds (:func:`measure_latency`): every round calls
every model once, in an order that rotates from round to round, so a slow moment
of a shared machine costs all models alike; the median over rounds is reported.
:func:`serving_call` is the one place that says which serving path is timed.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from matta.cost import flops
from matta.errors import GranularityError, InputError, OptionError, choice, describe, integer
from matta.inputs import check_same_length, check_x, check_y
from matta.nesting import Granularity, full, is_nested, num_params, resolve, sub_spec
from matta.specs import MLP, Spec, Transformer

__all__ = [
    "METRICS",
    "Budget",
    "Row",
    "Frontier",
    "candidates",
    "staircase",
    "label",
    "pareto_mask",
    "measure_latency",
    "serving_call",
    "measure",
    "default_metric",
    "check_metric",
    "check_data",
    "named",
    "name_of",
]

#: Held-out metrics (those of :meth:`matta.MatTA.evaluate`) and whether larger is better.
METRICS = {"loss": False, "accuracy": True, "bits_per_token": False, "mse": False, "mae": False}
#: Uniform fractions :func:`candidates` tries between the smallest Student and the TA.
FRACTIONS = tuple(k / 8 for k in range(1, 8))


def default_metric(task: str) -> str:
    """The metric a frontier ranks by unless told: ``loss`` (classification) or ``mse`` (regression)."""
    return "mse" if task == "regression" else "loss"


def check_metric(spec: Spec, task: str, metric: Optional[str]) -> str:
    """``metric``, or the task's default, if :meth:`matta.MatTA.evaluate` reports it for ``spec``."""
    if task == "regression":
        allowed = ("mse", "mae")
    else:
        allowed = ("loss", "accuracy", "bits_per_token") if isinstance(spec, Transformer) else ("loss", "accuracy")
    return choice("metric", default_metric(task) if metric is None else metric, allowed)


def check_data(model: Any, x: Any, y: Any, batch_size: Any) -> tuple[np.ndarray, np.ndarray]:
    """Held-out ``(x, y)`` for ``model`` (a :class:`matta.MatTA`), checked, with ``1 <= batch_size <= len(x)``."""
    x = check_x(model.spec, x, model.dtype)
    y = check_y(model.spec, y, model.options.task)
    n = check_same_length(x=x, y=y)
    if isinstance(model.spec, Transformer) and y.shape != x.shape:
        raise InputError(f"y must have the shape of x {x.shape} (the next token at every position); got {y.shape}")
    integer("batch_size", batch_size, 1)
    if batch_size > n:
        raise OptionError(f"batch_size must be an integer in [1, {n}] (the held-out examples); got {batch_size!r}")
    return x, y


def name_of(model: Any, g: Granularity) -> str:
    """``"TA"`` or the Student's name when ``g`` is one of them, else :func:`label`."""
    if g == full(model.spec):
        return "TA"
    return next((n for n, s in model.students.items() if s == g), label(model.spec, g))


def named(model: Any, granularities: Any = None) -> list[tuple[str, Granularity]]:
    """Named, resolved granularities of ``model`` (a :class:`matta.MatTA`), each once, smallest first.

    Args:
        model: the MatTA.
        granularities: ``None`` for :func:`candidates`; else a list of ``"TA"``, Student names or any
            form of rule G1 (named by :func:`name_of`), or a dict of name -> any of those.
    """
    if granularities is None:
        return candidates(model.spec, model.students)
    if isinstance(granularities, Mapping) and not all(isinstance(k, str) for k in granularities):
        raise GranularityError("candidates as a dict must map names (strings) to granularities")
    if isinstance(granularities, Mapping):
        items = [(str(k), model.granularity(v)) for k, v in granularities.items()]
    elif isinstance(granularities, (list, tuple)):
        items = []
        for g in granularities:
            resolved = model.granularity(g)
            items.append((g if isinstance(g, str) else name_of(model, resolved), resolved))
    else:
        raise GranularityError(
            f"candidates must be None, a list of granularities or a dict of name -> granularity; got {type(granularities).__name__}")
    if not items:
        raise GranularityError("candidates must name at least one granularity")
    seen: dict[Granularity, str] = {}
    for name, g in items:
        seen.setdefault(g, name)
    names = list(seen.values())
    if len(set(names)) != len(names):
        raise GranularityError(f"candidate names must be distinct; got {names}")
    return sorted(((n, g) for g, n in seen.items()), key=lambda item: (num_params(model.spec, item[1]), item[0]))


# ---------------------------------------------------------------------- budgets
def _positive(field_name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise OptionError(f"{field_name} must be a finite number > 0 or None; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """A deployment target: the largest parameter count, FLOPs and latency a model may have.

    ``None`` leaves a figure free. FLOPs are per example (a Transformer's: per sequence of the
    validation data's length); latency is milliseconds per call at the frontier's batch size.

    Raises:
        OptionError: a figure that is not a finite number > 0.
    """

    max_params: Optional[float] = None
    max_flops: Optional[float] = None
    max_latency_ms: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("max_params", "max_flops", "max_latency_ms"):
            object.__setattr__(self, name, _positive(name, getattr(self, name)))

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> "Budget":
        """A budget from ``{"max_params": ..., "max_flops": ..., "max_latency_ms": ...}`` (any subset)."""
        allowed = ("max_params", "max_flops", "max_latency_ms")
        unknown = sorted(set(value) - set(allowed))
        if unknown or not value:
            raise OptionError(f"a budget's keys must be drawn from {describe(allowed)}; got {sorted(value)}")
        return cls(**value)

    def to_dict(self) -> dict[str, float]:
        """The figures that are set."""
        return {k: v for k, v in (("max_params", self.max_params), ("max_flops", self.max_flops),
                                  ("max_latency_ms", self.max_latency_ms)) if v is not None}

    def __str__(self) -> str:
        return ", ".join(f"{k}={_number(v)}" for k, v in self.to_dict().items()) or "no budget"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# ---------------------------------------------------------------------- candidates
def label(spec: Spec, g: Granularity) -> str:
    """A short description of ``g``: ``h[32,16]`` (MLP), ``d32 ff[128,64] heads[2,1]`` (Transformer).

    A Transformer's label adds ``layers[...]`` when ``g`` drops blocks (rule D1).
    """
    d = g.to_dict(spec)
    fmt = lambda xs: "[" + ",".join(map(str, xs)) + "]"  # noqa: E731
    if isinstance(spec, MLP):
        return "h" + fmt(d["hidden"])
    kept = g.blocks
    out = f"d{d['d_model']} ff{fmt(d['d_ff'][i] for i in kept)} heads{fmt(d['n_heads'][i] for i in kept)}"
    return out if len(kept) == spec.n_layers else out + f" layers{fmt(kept)}"


def _groups(spec: Spec) -> list[list[str]]:
    """The dimension keys of each layer, in order; a Transformer's ``d_model`` widens with block 0."""
    if isinstance(spec, MLP):
        return [[f"hidden.{i}"] for i in range(len(spec.hidden))]
    groups = [[f"blocks.{i}.n_heads", f"blocks.{i}.d_ff"] for i in range(spec.n_layers)]
    groups[0] = ["d_model", *groups[0]]
    return groups


def staircase(spec: Spec, levels: Sequence[Granularity]) -> list[Granularity]:
    """Per-layer Mix'n'Match steps from ``levels[0]`` to ``levels[-1]`` (a nested chain, smallest first).

    One layer at a time takes the next level's sizes, in layer order, so every step is a mix of
    trained sizes (the groups rule T5 draws) and contains the step before it. A block is kept when
    its current level keeps it. The levels themselves are not repeated.
    """
    groups = _groups(spec)
    sizes = [g.as_dict() for g in levels]
    state = [0] * len(groups)
    steps = []
    for level in range(1, len(levels)):
        for j in range(len(groups)):
            state[j] = level
            if all(s == level for s in state):
                continue
            mixed = {k: sizes[state[j2]][k] for j2, keys in enumerate(groups) for k in keys}
            blocks: tuple[int, ...] = ()
            if isinstance(spec, Transformer):
                blocks = tuple(i for i in range(spec.n_layers) if i in levels[state[i]].blocks)
            steps.append(Granularity(tuple(sorted(mixed.items())), blocks))
    return steps


def candidates(
    spec: Spec, students: Mapping[str, Granularity], fractions: Sequence[float] = FRACTIONS
) -> list[tuple[str, Granularity]]:
    """The default models of a frontier, named, smallest first: Students, TA, uniform fractions, Mix'n'Match.

    * every Student (by name) and the TA (``"TA"``);
    * ``uniform f``: the fraction ``f`` of ``spec.nested`` (rule G1a), for each ``f`` in ``fractions``
      whose model contains the smallest Student (rule N1), so it is made of trained units;
    * ``mix ...``: the per-layer Mix'n'Match staircase between neighbouring trained sizes
      (smallest Student, larger Students, TA), one layer widened at a time.

    A granularity listed twice keeps its first name (Students, then the TA, fractions, mixes).

    Args:
        spec: the TA's spec.
        students: name -> resolved granularity (rule N1: a nested chain).
        fractions: the uniform fractions to try, each in ``(0, 1]``.
    """
    ta = full(spec)
    levels = sorted(students.values(), key=lambda g: num_params(spec, g)) + [ta]
    named: list[tuple[str, Granularity]] = [*students.items(), ("TA", ta)]
    for f in fractions:
        g = resolve(spec, float(f))
        if is_nested(levels[0], g):
            named.append((f"uniform {float(f):g}", g))
    named += [(f"mix {label(spec, g)}", resolve(spec, g)) for g in staircase(spec, levels)]
    seen: dict[Granularity, str] = {}
    for name, g in named:
        seen.setdefault(g, name)
    out = [(name, g) for g, name in seen.items()]
    return sorted(out, key=lambda item: (num_params(spec, item[1]), item[0]))


# ---------------------------------------------------------------------- Pareto
def pareto_mask(objectives: Any) -> np.ndarray:
    """Which rows no other row dominates, all objectives minimised.

    Row ``a`` dominates row ``b`` when it is no worse on every objective and better on one;
    identical rows do not dominate each other, so both stay optimal.

    Args:
        objectives: ``(rows, objectives)`` numbers (negate a figure to maximise it).

    Returns:
        A boolean array, one entry per row.
    """
    v = np.asarray(objectives, dtype=np.float64)
    if v.ndim != 2:
        raise OptionError(f"objectives must be a 2-D array (rows, objectives); got shape {v.shape}")
    if v.size and not np.isfinite(v).all():
        raise OptionError("objectives must be finite numbers")
    no_worse = (v[:, None, :] <= v[None, :, :]).all(-1)  # [a, b]: a is no worse than b everywhere
    better = (v[:, None, :] < v[None, :, :]).any(-1)
    return ~(no_worse & better).any(0)


# ---------------------------------------------------------------------- latency
def serving_call(model: Any, x: np.ndarray) -> Callable[[], Any]:
    """The call whose time is a model's latency: the public :meth:`matta.Extracted.predict` on ``x``.

    This is the one place that picks the serving path the frontier times.
    """
    return lambda: model.predict(x)


def measure_latency(calls: Mapping[str, Callable[[], Any]], rounds: int = 30, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each of ``calls``, timed in paired rounds.

    Each of ``warmup`` untimed rounds and ``rounds`` timed ones calls every model once; round
    ``r`` starts at the ``r``-th model (rotating order), so drift and order effects are shared.

    Args:
        calls: name -> a callable with no arguments (see :func:`serving_call`).
        rounds: timed rounds, >= 1.
        warmup: untimed rounds first, >= 0.
    """
    integer("rounds", rounds, 1)
    integer("warmup", warmup, 0)
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            start = time.perf_counter()
            calls[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: 1e3 * float(np.median(t)) for n, t in times.items()}


# ---------------------------------------------------------------------- the frontier
@dataclass(frozen=True)
class Row:
    """One model of a frontier.

    Attributes:
        name: ``"S"``, ``"TA"``, ``"uniform 0.5"``, ``"mix h[32,16]"``, or a label for a given granularity.
        granularity: its resolved granularity of the TA's spec.
        spec: the extracted model's spec (rule E2).
        params: scalar parameters.
        flops: FLOPs of one forward pass per example (:func:`matta.cost.flops`).
        latency_ms: median milliseconds per call at the frontier's batch size, or ``None`` if not measured.
        metrics: held-out metrics (:meth:`matta.MatTA.evaluate`), or ``{}`` without data.
        pareto: no other row has fewer or equal params, FLOPs, latency and an equal or better metric
            with one of them strictly better.
    """

    name: str
    granularity: Granularity
    spec: Spec
    params: int
    flops: int
    latency_ms: Optional[float]
    metrics: dict[str, float]
    pareto: bool = False

    def fits(self, budget: Budget) -> bool:
        """Whether this row is within every figure ``budget`` sets."""
        return ((budget.max_params is None or self.params <= budget.max_params)
                and (budget.max_flops is None or self.flops <= budget.max_flops)
                and (budget.max_latency_ms is None or (self.latency_ms is not None and self.latency_ms <= budget.max_latency_ms)))


@dataclass
class Frontier:
    """Measured models of one MatTA run, Pareto-optimal rows marked.

    Attributes:
        spec: the TA's spec (granularities are of it).
        rows: the models, smallest first.
        metric: the metric rows are ranked by (a key of :data:`METRICS`), or ``None`` without data.
        batch_size: the batch size latency was measured at.
        seq_len: a Transformer's sequence length (FLOPs are per sequence of it); ``None`` for an MLP.
        examples: number of held-out examples the metrics were measured on (0 without data).
        backend: the backend name the latency was measured on.
        rounds: paired timing rounds per model (0 when latency was not measured).
    """

    spec: Spec
    rows: list[Row]
    metric: Optional[str]
    batch_size: int
    seq_len: Optional[int]
    examples: int
    backend: str
    rounds: int
    _by_name: dict[str, Row] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = _mark_pareto(self.rows, self.metric)
        self._by_name = {r.name: r for r in self.rows}

    def __getitem__(self, name: str) -> Row:
        try:
            return self._by_name[name]
        except KeyError:
            raise GranularityError(f"frontier row name must be {describe(self._by_name)}; got {name!r}") from None

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def latency_measured(self) -> bool:
        """Whether the rows carry measured latency."""
        return self.rounds > 0

    def select(self, budget: Budget) -> Row:
        """The row with the best metric among those within ``budget`` (ties: fewer params, then lower latency).

        Raises:
            OptionError: nothing fits; the message names the smallest achievable figure of each
                budget set. Also when a latency budget is given but latency was not measured.
        """
        if not isinstance(budget, Budget):
            raise OptionError(f"budget must be a matta.frontier.Budget; got {type(budget).__name__}")
        if budget.max_latency_ms is not None and not self.latency_measured:
            raise OptionError("max_latency_ms needs measured latency; this frontier was built without it")
        fitting = [r for r in self.rows if r.fits(budget)]
        if not fitting:
            raise OptionError(f"no model fits the budget {budget}: " + self._smallest(budget))
        return min(fitting, key=lambda r: (self._score(r), r.params, r.latency_ms or 0.0, r.name))

    def _score(self, row: Row) -> float:
        if self.metric is None:
            return 0.0
        value = row.metrics[self.metric]
        return -value if METRICS[self.metric] else value

    def _smallest(self, budget: Budget) -> str:
        parts = []
        for key, attr, unit in (("max_params", "params", " parameters"), ("max_flops", "flops", " FLOPs"),
                                ("max_latency_ms", "latency_ms", " ms")):
            if key in budget.to_dict():
                best = min(self.rows, key=lambda r: getattr(r, attr))
                value = getattr(best, attr)
                shown = f"{value:.4g}" if attr == "latency_ms" else f"{value:,}"
                parts.append(f"{key} must be >= {shown}{unit}, the smallest achievable ({best.name!r})")
        where = f" at batch size {self.batch_size}" if budget.max_latency_ms is not None else ""
        return "; ".join(parts) + where

    def to_rows(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts: name, granularity (rule G1 form), params, flops, latency_ms, metrics, pareto."""
        out = []
        for r in self.rows:
            out.append({"name": r.name, "granularity": r.granularity.to_dict(self.spec), "params": r.params,
                        "flops": r.flops, "latency_ms": r.latency_ms, **r.metrics, "pareto": r.pareto})
        return out

    def __str__(self) -> str:
        metric_names = [m for m in METRICS if self.rows and m in self.rows[0].metrics]
        head = ["", "model", "params", "FLOPs", f"ms (batch {self.batch_size})", *metric_names]
        body = []
        for r in self.rows:
            latency = "-" if r.latency_ms is None else f"{r.latency_ms:.4f}"
            body.append(["*" if r.pareto else "", r.name, f"{r.params:,}", f"{r.flops:,}", latency,
                         *(f"{r.metrics[m]:.4f}" for m in metric_names)])
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(  # noqa: E731
            str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        per = f"per sequence of {self.seq_len} tokens" if self.seq_len else "per example"
        note = (f"* Pareto-optimal (fewer params, FLOPs, latency; better {self.metric or 'nothing'}); "
                f"FLOPs {per}; {self.examples} held-out examples; {self.backend}")
        return "\n".join([line(head), *(line(b) for b in body), note])

    def plot(self, path: Optional[str] = None, x: str = "params") -> Any:
        """A scatter of ``x`` (``params``, ``flops`` or ``latency_ms``) against the metric, Pareto rows joined.

        matplotlib is imported here, on first use. Returns the ``matplotlib.figure.Figure``; saves it
        to ``path`` (e.g. a ``.png``) if given.
        """
        choice("x", x, ("params", "flops", "latency_ms"))
        if self.metric is None:
            raise OptionError("plot needs metrics; this frontier was built without held-out data")
        if x == "latency_ms" and not self.latency_measured:
            raise OptionError("x='latency_ms' needs measured latency; this frontier was built without it")
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched

        fig = Figure(figsize=(6.4, 4.4))
        ax = fig.add_subplot()
        xs = [getattr(r, x) for r in self.rows]
        ys = [r.metrics[self.metric] for r in self.rows]
        ax.scatter(xs, ys, color="tab:gray", s=18, label="candidate")
        best = sorted((r for r in self.rows if r.pareto), key=lambda r: getattr(r, x))
        ax.plot([getattr(r, x) for r in best], [r.metrics[self.metric] for r in best], "o-", color="tab:blue",
                label="Pareto-optimal")
        for r in self.rows:
            if not r.name.startswith(("mix ", "uniform ")):
                ax.annotate(r.name, (getattr(r, x), r.metrics[self.metric]), textcoords="offset points", xytext=(5, 4))
        ax.set_xscale("log")
        ax.set_xlabel({"params": "parameters", "flops": "FLOPs", "latency_ms": f"latency (ms, batch {self.batch_size})"}[x])
        ax.set_ylabel(f"held-out {self.metric}")
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _mark_pareto(rows: list[Row], metric: Optional[str]) -> list[Row]:
    if not rows:
        return rows
    columns = [[r.params for r in rows], [r.flops for r in rows]]
    if all(r.latency_ms is not None for r in rows):
        columns.append([r.latency_ms for r in rows])
    if metric is not None:
        sign = -1.0 if METRICS[metric] else 1.0
        columns.append([sign * r.metrics[metric] for r in rows])
    mask = pareto_mask(np.array(columns, dtype=np.float64).T)
    return [Row(**{**r.__dict__, "pareto": bool(m)}) for r, m in zip(rows, mask)]


def measure(
    model: Any,
    named: Sequence[tuple[str, Granularity]],
    x: Optional[np.ndarray] = None,
    y: Optional[np.ndarray] = None,
    *,
    batch_size: int = 1,
    metric: Optional[str] = None,
    rounds: int = 30,
    latency: bool = True,
) -> Frontier:
    """Scores each named granularity of ``model`` (a :class:`matta.MatTA`) into a :class:`Frontier`.

    Metrics come from ``model.evaluate`` on ``(x, y)``; latency from extracted models on the
    first ``batch_size`` rows of ``x`` (:func:`serving_call`, :func:`measure_latency`). Without
    data, rows carry parameters and FLOPs only. Inputs are checked by the caller.
    """
    integer("rounds", rounds, 1)
    spec = model.spec
    seq_len = int(x.shape[1]) if (x is not None and isinstance(spec, Transformer)) else None
    timed = latency and x is not None
    times: dict[str, float] = {}
    if timed:
        extracted = {name: model.extract(g) for name, g in named}
        batch = x[:batch_size]
        times = measure_latency({n: serving_call(m, batch) for n, m in extracted.items()}, rounds)
        del extracted
    rows = []
    for name, g in named:
        sub = sub_spec(spec, g)
        scores = next(iter(model.evaluate(x, y, [g]).values())) if x is not None else {}
        rows.append(Row(name, g, sub, sub.num_params, flops(sub, seq_len), times.get(name), scores))
    return Frontier(spec, rows, metric if x is not None else None, batch_size, seq_len,
                    0 if x is None else int(len(x)), model.backend.name, rounds if timed else 0)
