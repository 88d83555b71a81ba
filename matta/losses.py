"""Loss composition (rules L1–L6 and T1–T3).

::

    L = w_TA · task(z_TA, y_T)
      + Σ_g w_g · [ (1 − λ(t)) · task(z_g, y_T)
                    + λ(t) · τ² · KL( softmax(sg(z_p(g)) / τ) ‖ softmax(z_g / τ) ) ]

The core decides *what* to compute: which granularities are active at a step
(:class:`Schedule`), each one's parent and weight, and ``λ(t)``. The arithmetic
is written once in :func:`composite_loss` over a tiny array-ops interface
(:class:`Ops`) that each backend implements in its own framework, so the same
formula runs in numpy (the reference), PyTorch and ``keras.ops``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Generic, Mapping, Optional, Protocol, TypeVar

import numpy as np

from matta.errors import OptionError, choice, integer
from matta.nesting import Granularity, check_chain, full, num_params, sample_between, sample_mixnmatch
from matta.specs import Spec

__all__ = [
    "LossOptions",
    "Term",
    "StepPlan",
    "Choice",
    "Schedule",
    "Targets",
    "Ops",
    "NumpyOps",
    "ramp",
    "composite_loss",
    "TA",
]

#: The name that always means the full model.
TA = "TA"

T = TypeVar("T")

#: A Student a step trains: ``(name, granularity, weight)``.
Choice = tuple[str, Granularity, float]


@dataclass(frozen=True)
class LossOptions:
    """Every choice of the composite loss, with matta's defaults (the docs explain each).

    Attributes:
        task: ``"classification"`` (cross-entropy; the Transformer is always this)
            or ``"regression"`` (mean squared error; distillation is MSE to the parent).
        teacher_output: what a Teacher gives: ``"logits"`` (softmaxed at temperature 1)
            or ``"probabilities"`` (rule L1).
        hard_label_weight: with a Teacher, the share ``β`` of hard-label cross-entropy
            mixed into the task loss: ``(1 − β)·CE(z, p_T) + β·CE(z, y)`` (rule L1).
        ta_weight: ``w_TA`` (rule L6).
        student_weights: ``w_g`` per student name; students not named get 1.0.
            Random Mix'n'Match granularities of sandwich and mixnmatch sampling get 1.0 (rule L6).
        parent: ``"ta"`` (every student distils from the TA) or ``"chain"`` (each
            from the next larger active granularity, as in TA-KD) (rule L2).
        stop_gradient: detach the parent in the distillation term (rule L3).
        temperature: ``τ`` of the distillation term (rule L4).
        distill_weight: the largest ``λ``, reached at ``ramp_end`` (rule L5).
        ramp: shape of ``λ(t)``: ``"constant"``, ``"linear"`` or ``"cosine"`` (rule L5).
        ramp_start: step where the ramp leaves 0.
        ramp_end: step where it reaches ``distill_weight``; ``None`` means a tenth
            of the run's steps.
        sampling: granularities per step: ``"all"``, ``"sandwich"`` (TA + smallest
            student + ``num_random`` random Mix'n'Match between them), ``"one"``
            (TA + one student drawn uniformly) or ``"mixnmatch"`` (TA + every
            student + ``num_random`` random per-layer mixes of their sizes) (rules T2, T5).
        num_random: random Mix'n'Match granularities per ``sandwich`` or ``mixnmatch`` step.
    """

    task: str = "classification"
    teacher_output: str = "logits"
    hard_label_weight: float = 0.0
    ta_weight: float = 1.0
    student_weights: Mapping[str, float] = field(default_factory=dict)
    parent: str = "ta"
    stop_gradient: bool = True
    temperature: float = 2.0
    distill_weight: float = 0.5
    ramp: str = "linear"
    ramp_start: int = 0
    ramp_end: Optional[int] = None
    sampling: str = "all"
    num_random: int = 1

    def __post_init__(self) -> None:
        choice("task", self.task, ("classification", "regression"))
        choice("teacher_output", self.teacher_output, ("logits", "probabilities"))
        _number("hard_label_weight", self.hard_label_weight, 0.0, 1.0)
        _number("ta_weight", self.ta_weight, 0.0, math.inf)
        if not isinstance(self.student_weights, Mapping):
            raise OptionError(f"student_weights must be a dict of student name -> weight; got {self.student_weights!r}")
        for name, w in self.student_weights.items():
            _number(f"student_weights[{name!r}]", w, 0.0, math.inf)
        object.__setattr__(self, "student_weights", dict(self.student_weights))
        choice("parent", self.parent, ("ta", "chain"))
        choice("stop_gradient", self.stop_gradient, (True, False))
        _number("temperature", self.temperature, 0.0, math.inf, open_low=True)
        _number("distill_weight", self.distill_weight, 0.0, 1.0)
        choice("ramp", self.ramp, ("constant", "linear", "cosine"))
        integer("ramp_start", self.ramp_start, 0)
        if self.ramp_end is not None:
            integer("ramp_end", self.ramp_end, 0)
            if self.ramp_end < self.ramp_start:
                raise OptionError(f"ramp_end must be >= ramp_start={self.ramp_start}; got {self.ramp_end}")
        choice("sampling", self.sampling, ("all", "sandwich", "one", "mixnmatch"))
        integer("num_random", self.num_random, 0)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option name (the keyword arguments ``MatTA`` accepts)."""
        return tuple(f.name for f in fields(cls))

    def ramp_end_for(self, total_steps: int) -> int:
        """``ramp_end``, defaulting to a tenth of the run."""
        if self.ramp_end is not None:
            return self.ramp_end
        return max(self.ramp_start, self.ramp_start + total_steps // 10)


def _number(name: str, value: Any, low: float, high: float, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise OptionError(f"{name} must be a number in {'(' if open_low else '['}{low}, {high}]; got {value!r}")
    if value < low or value > high or (open_low and value == low):
        raise OptionError(f"{name} must be a number in {'(' if open_low else '['}{low}, {high}]; got {value}")


def ramp(options: LossOptions, step: int, total_steps: int) -> float:
    """Rule L5: ``λ(t)``, the distillation weight at ``step`` (0-based).

    ``constant``: ``distill_weight`` from ``ramp_start`` on (0 before);
    ``linear``: 0 until ``ramp_start``, a straight line to ``distill_weight`` at
    ``ramp_end``; ``cosine``: the same with a half-cosine ``(1 − cos(π·u)) / 2``.
    """
    top = options.distill_weight
    start, end = options.ramp_start, options.ramp_end_for(total_steps)
    if step < start:
        return 0.0
    if options.ramp == "constant" or step >= end:
        return top
    u = (step - start) / (end - start)
    if options.ramp == "linear":
        return top * u
    return top * (1 - math.cos(math.pi * u)) / 2


@dataclass(frozen=True)
class Term:
    """One granularity trained at a step: its loss weight and distillation parent."""

    name: str
    granularity: Granularity
    weight: float
    parent: Optional[str]  # None for the TA


@dataclass(frozen=True)
class StepPlan:
    """What one training step computes (rule T1): terms ordered largest first, and ``λ(t)``."""

    step: int
    terms: tuple[Term, ...]
    distill: float


class Schedule:
    """Rules T1–T3: which granularities each step trains, with weights and parents.

    Deterministic: the plan of step ``t`` depends only on the seed and ``t``, so a
    run is reproducible and every backend trains the same granularities.
    """

    def __init__(self, spec: Spec, students: Mapping[str, Granularity], options: LossOptions, seed: int = 0):
        self.spec = spec
        self.options = options
        self.seed = seed
        self.ta = full(spec)
        named = {TA: self.ta, **students}
        self.order = check_chain(spec, named)  # smallest first; raises NestingError
        self.students = dict(students)
        self._sizes = {g: num_params(spec, g) for g in named.values()}
        unknown = [k for k in options.student_weights if k not in students]
        if unknown:
            raise OptionError(f"student_weights names unknown student(s) {unknown}; students are {sorted(students)}")

    def _num_params(self, g: Granularity) -> int:
        # Declared granularities are cached (plan() runs every step and sub-specs are not free to
        # build); sandwich's random ones are not, so a long run does not grow the cache.
        if g in self._sizes:
            return self._sizes[g]
        return num_params(self.spec, g)

    def step_students(self, rng: np.random.Generator) -> tuple[list[Choice], list[Choice]]:
        """Rules T2, T3, T5: a step's Students as ``(kept, drawn)``, each a list of ``(name, granularity, weight)``.

        ``kept`` are the Students every step trains; ``drawn`` are those drawn from the step's
        ``rng``, as many at every step, and empty when no step draws one. This is where a sampling
        mode is defined: :meth:`plan`, :meth:`static_terms` and :meth:`fixed_terms` all follow from it.
        """
        o = self.options
        names = [n for n in self.order if n != TA]  # smallest first
        declared = [(n, self.students[n], float(o.student_weights.get(n, 1.0))) for n in names]
        if not names or o.sampling == "all":
            return declared, []
        if o.sampling == "mixnmatch":
            levels = [self.students[n] for n in names] + [self.ta]
            return declared, [(f"mix{k}", sample_mixnmatch(self.spec, levels, rng), 1.0) for k in range(o.num_random)]
        if o.sampling == "one":
            # One Student is no draw: that Student trains at every step.
            return (declared, []) if len(names) == 1 else ([], [declared[int(rng.integers(len(names)))]])
        smallest = declared[0]  # sandwich (rule T3)
        return [smallest], [(f"mix{k}", sample_between(self.spec, smallest[1], self.ta, rng), 1.0)
                            for k in range(o.num_random)]

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 7919, step])

    def _terms(self, chosen: list[Choice]) -> tuple[Term, ...]:
        # Largest first, so a chain parent is always the previous active term (rules T1, L2).
        chosen = sorted(chosen, key=lambda c: -self._num_params(c[1]))
        terms = [Term(TA, self.ta, self.options.ta_weight, None)]
        for name, g, w in chosen:
            parent = TA if self.options.parent == "ta" else terms[-1].name
            terms.append(Term(name, g, float(w), parent))
        return tuple(terms)

    def plan(self, step: int, total_steps: int) -> StepPlan:
        """The :class:`StepPlan` of ``step`` (rule T1): the TA and :meth:`step_students`, and λ(t)."""
        kept, drawn = self.step_students(self._rng(step))
        return StepPlan(step, self._terms(kept + drawn), ramp(self.options, step, total_steps))

    def static_terms(self) -> Optional[tuple[Term, ...]]:
        """The terms of every step when no step draws a Student (rule T2), else ``None``.

        A backend that compiles one step for the whole run uses these; the plans it is given
        still decide each step (a step that trains other terms is an error, never a silent change).
        """
        kept, drawn = self.step_students(self._rng(0))
        return None if drawn else self._terms(kept)

    def fixed_terms(self) -> frozenset[Term]:
        """The terms a step trains whenever it trains the TA and the kept Students (rule T2).

        The TA and :meth:`step_students`' kept Students, with the weight and parent they have at
        step 0. Under ``parent="chain"`` a kept Student's parent is a drawn term at some steps, so
        its :class:`Term` differs there and is not among these (compare terms, not names).
        """
        kept, drawn = self.step_students(self._rng(0))
        names = {TA, *(name for name, _, _ in kept)}
        return frozenset(t for t in self._terms(kept + drawn) if t.name in names)


@dataclass
class Targets(Generic[T]):
    """The targets of one batch, already in a backend's array type.

    ``hard``: class / next-token ids; ``soft``: Teacher probabilities;
    ``regression``: real targets. Unused fields are ``None``.
    """

    hard: Optional[T] = None
    soft: Optional[T] = None
    regression: Optional[T] = None


class Ops(Protocol[T]):
    """The array operations the composite loss needs; each backend implements them."""

    def log_softmax(self, x: T) -> T: ...  # over the last axis
    def stop_gradient(self, x: T) -> T: ...
    def mean(self, x: T) -> T: ...  # over all elements, to a scalar
    def sum_last(self, x: T) -> T: ...  # over the last axis
    def take_last(self, x: T, ids: T) -> T: ...  # x[..., ids] elementwise: (..., C), (...) -> (...)
    def exp(self, x: T) -> T: ...
    def square(self, x: T) -> T: ...


class NumpyOps:
    """:class:`Ops` in numpy: the reference."""

    def log_softmax(self, x: np.ndarray) -> np.ndarray:
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    def stop_gradient(self, x: np.ndarray) -> np.ndarray:
        return x

    def mean(self, x: np.ndarray) -> np.ndarray:
        return np.mean(x)

    def sum_last(self, x: np.ndarray) -> np.ndarray:
        return x.sum(axis=-1)

    def take_last(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, ids[..., None], axis=-1)[..., 0]

    def exp(self, x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    def square(self, x: np.ndarray) -> np.ndarray:
        return np.square(x)


def task_loss(ops: Ops[T], z: T, targets: Targets[T], options: LossOptions) -> T:
    """Rule L1: ``task(z, y_T)``: cross-entropy to hard and/or soft labels, or MSE."""
    if options.task == "regression":
        assert targets.regression is not None
        return ops.mean(ops.square(z - targets.regression))
    logp = ops.log_softmax(z)
    if targets.soft is None:
        assert targets.hard is not None
        return -ops.mean(ops.take_last(logp, targets.hard))
    soft = -ops.mean(ops.sum_last(targets.soft * logp))
    beta = options.hard_label_weight
    if beta == 0 or targets.hard is None:
        return soft
    return (1 - beta) * soft - beta * ops.mean(ops.take_last(logp, targets.hard))


def distillation_loss(ops: Ops[T], z: T, z_parent: T, options: LossOptions) -> T:
    """Rules L3–L4: ``τ² · KL(softmax(sg(z_p)/τ) ‖ softmax(z/τ))`` (classification) or ``MSE(z, sg(z_p))``."""
    if options.stop_gradient:
        z_parent = ops.stop_gradient(z_parent)
    if options.task == "regression":
        return ops.mean(ops.square(z - z_parent))
    tau = options.temperature
    logp_parent = ops.log_softmax(z_parent / tau)
    logp = ops.log_softmax(z / tau)
    kl = ops.sum_last(ops.exp(logp_parent) * (logp_parent - logp))
    return (tau * tau) * ops.mean(kl)


def composite_loss(
    ops: Ops[T], outputs: Mapping[str, T], targets: Targets[T], plan: StepPlan, options: LossOptions
) -> tuple[T, dict[str, T]]:
    """The composite loss of one step (rules L1–L6).

    Args:
        ops: the backend's array operations.
        outputs: model outputs (logits or predictions) per term name of ``plan``.
        targets: the batch's targets in the backend's array type.
        plan: from :meth:`Schedule.plan`; its ``distill`` (λ) may be a backend scalar tensor.
        options: the loss options.

    Returns:
        ``(total, parts)``: the scalar loss and each term's weighted contribution.
    """
    parts: dict[str, T] = {}
    total = None
    lam = plan.distill
    # A compiled backend step may carry λ(t) as a tensor (one trace for the whole ramp); Python cannot branch
    # on its value, so the term is always added. That is exact at λ = 0: (1 − 0)·task + 0·KL = task.
    traced = not isinstance(lam, (int, float))
    for term in plan.terms:
        z = outputs[term.name]
        task = task_loss(ops, z, targets, options)
        if term.parent is None:
            value = term.weight * task
        elif traced or lam > 0:
            value = term.weight * ((1 - lam) * task + lam * distillation_loss(ops, z, outputs[term.parent], options))
        else:
            value = term.weight * task
        parts[term.name] = value
        total = value if total is None else total + value
    assert total is not None, "a step plan always holds the TA"
    return total, parts


def teacher_probabilities(values: np.ndarray, options: LossOptions) -> np.ndarray:
    """Rule L1: Teacher logits become probabilities at temperature 1; probabilities pass through."""
    if options.teacher_output == "probabilities":
        return values
    return np.exp(NumpyOps().log_softmax(values.astype(np.float64)))
