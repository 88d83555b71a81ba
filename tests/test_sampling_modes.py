"""A sampling mode added to the core trains the terms it plans on every backend, or fails with a matta error.

Keras compiles its step from what :class:`matta.losses.Schedule` says is fixed and what varies
(``static_terms``, ``fixed_terms``), so a new mode must never make it silently train other terms.
Runs under each ``KERAS_BACKEND``, like ``tests/test_keras_backend.py``::

    KERAS_BACKEND=jax .venv/bin/python -m pytest tests/test_sampling_modes.py
"""

from __future__ import annotations

import numpy as np
import pytest

import matta
from matta import MLP, MatTA
from matta.losses import Schedule

SPEC = MLP(d_in=12, hidden=[32, 24], d_out=5, multiple_of=4)
STUDENTS = {"S": 0.25, "M": 0.5}
STEPS = 6


class Subsets(Schedule):
    """A new mode: each step draws a non-empty random subset of the declared Students (none kept)."""

    def step_students(self, rng):
        declared = [(name, g, 1.0) for name, g in self.students.items()]
        chosen = [c for c in declared if rng.random() < 0.5]
        return [], chosen or [declared[int(rng.integers(len(declared)))]]


class AlternatingPlan(Schedule):
    """A plan changed outside ``step_students``: odd steps drop the largest Student, so the terms vary
    while ``static_terms`` still promises the same terms at every step."""

    def plan(self, step, total_steps):
        plan = super().plan(step, total_steps)
        return plan if step % 2 == 0 else type(plan)(plan.step, plan.terms[:1] + plan.terms[2:], plan.distill)


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((SPEC.d_out, SPEC.d_in))
    y = rng.integers(0, SPEC.d_out, n)
    return (centers[y] + rng.standard_normal((n, SPEC.d_in))).astype("float32"), y


def _fit(backend: str, mode: type, **options):
    """``(model, per-step loss logs)`` of a short fit under the schedule ``mode``."""
    model = MatTA(SPEC, students=STUDENTS, backend=backend, seed=5, learning_rate=3e-3, distill_weight=0.5,
                  ramp_end=2, **options)
    model.schedule = mode(model.spec, model.students, model.options, model.seed)
    x, y = _data()
    steps = model.fit(x, y, steps=STEPS, batch_size=32, progress=False)["steps"]
    return model, [{k: s[k] for k in s if k == "loss" or k.startswith("loss/")} for s in steps]


def _planned(model) -> list[set[str]]:
    return [{t.name for t in model.schedule.plan(step, STEPS).terms} for step in range(STEPS)]


@pytest.mark.parametrize("parent", ["ta", "chain"])
def test_a_new_sampling_mode_trains_the_planned_terms_on_torch_and_keras_alike(parent):
    """Both backends train, at every step, exactly the terms the new mode plans, with equal losses."""
    logs = {}
    for backend in ("torch", "keras"):
        model, logs[backend] = _fit(backend, Subsets, parent=parent)
        planned = _planned(model)
        assert len({frozenset(p) for p in planned}) > 1, planned  # the mode does vary the terms
        assert model.schedule.static_terms() is None
        for step, (entry, names) in enumerate(zip(logs[backend], planned)):
            assert {k[len("loss/"):] for k in entry if k.startswith("loss/")} == names, (backend, step, entry)
    for step, (k, t) in enumerate(zip(logs["keras"], logs["torch"])):
        np.testing.assert_allclose([k[n] for n in sorted(k)], [t[n] for n in sorted(t)], rtol=1e-4,
                                   err_msg=f"keras vs torch, step {step}")


def test_a_plan_that_breaks_its_static_terms_fails_loudly_on_keras():
    """Torch follows the plan; Keras, whose compiled step trains ``static_terms``, refuses the step that differs."""
    model, logs = _fit("torch", AlternatingPlan)
    assert [{k[len("loss/"):] for k in e if k.startswith("loss/")} for e in logs] == _planned(model)
    assert model.schedule.static_terms() is not None
    with pytest.raises(matta.OptionError, match=r"sampling: step 1 plans the terms \['TA', 'S'\], but the schedule's "
                                                r"static_terms\(\) are \['TA', 'M', 'S'\]"):
        _fit("keras", AlternatingPlan)
