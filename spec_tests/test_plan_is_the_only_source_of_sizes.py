"""A backend reads nested sizes only through the core's plan (rule S1), for every backend given by ``--backends``.

Slice bounds are computed in one place, ``matta.nesting.plan(spec, g)`` (and
``matta.nesting.shared_first_layer``, which reads the plans): a backend's nested
forward is its plain functional forward of ``plan.spec`` over the weights
``plan.reads`` name. So a backend never reads a granularity's sizes itself.

The check: a :class:`SealedGranularity` equals a plain one but, once sealed,
refuses every read of its sizes (``sizes``, ``blocks``, ``as_dict``,
``__getitem__``, ``to_dict``) from any code outside ``matta.nesting``. Its
plans are computed before it is sealed, so the core's plan cache holds them.
A backend's ``forward`` and ``loss_and_gradients`` at sealed granularities
must then run and give the same bits as at plain ones.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import numpy as np
from hypothesis import given, strategies as st

from matta.losses import LossOptions, StepPlan, Targets, Term
from matta.nesting import Granularity, full, plan
from matta.specs import MLP
from matta.spec_tests.assertions import assert_bitwise_equal, assert_weights_equal, context
from matta.spec_tests.strategies import granularities, inputs_for, specs, weights_for

#: The only module that may read a granularity's sizes: the one that computes the plan.
PLANNER = "matta.nesting"


class SealedGranularity(Granularity):
    """A :class:`Granularity` whose sizes only :data:`PLANNER` may read once :meth:`seal` is called."""

    _sealed = False

    @classmethod
    def of(cls, g: Granularity) -> "SealedGranularity":
        return cls(g.sizes, g.blocks)

    def seal(self) -> None:
        object.__setattr__(self, "_sealed", True)

    def _check(self, what: str, caller: FrameType) -> None:
        module = caller.f_globals.get("__name__")
        if object.__getattribute__(self, "_sealed") and module != PLANNER:
            raise AssertionError(
                f"{module}.{caller.f_code.co_name} read Granularity.{what}; a backend must take every size "
                f"from matta.nesting.plan(spec, g) (its .spec and .reads), not from the granularity"
            )

    def __getattribute__(self, name: str) -> Any:
        if name in ("sizes", "blocks"):
            object.__getattribute__(self, "_check")(name, sys._getframe(1))
        return super().__getattribute__(name)

    def __getitem__(self, dim: str) -> int:
        self._check("__getitem__", sys._getframe(1))
        return super().__getitem__(dim)

    def as_dict(self) -> dict[str, int]:
        self._check("as_dict", sys._getframe(1))
        return super().as_dict()

    def to_dict(self, spec: Any) -> dict[str, Any]:
        self._check("to_dict", sys._getframe(1))
        return super().to_dict(spec)


def test_a_sealed_granularity_refuses_reads_outside_the_planner():
    """The mechanism itself: reads from here fail once sealed, the planner's reads still work."""
    spec = MLP(d_in=3, hidden=(4, 2), d_out=2)
    g = SealedGranularity.of(full(spec))
    assert g.as_dict() == {"hidden.0": 4, "hidden.1": 2}
    g.seal()
    for read in (lambda: g.sizes, lambda: g.blocks, g.as_dict, lambda: g["hidden.0"], lambda: g.to_dict(spec)):
        try:
            read()
        except AssertionError as exc:
            assert __name__ in str(exc), exc
        else:
            raise AssertionError("a sealed granularity gave its sizes to a test module")
    assert plan(spec, g).spec == spec  # matta.nesting computes (and caches) the plan of a sealed granularity


def _targets(spec, seed: int, x: np.ndarray) -> Targets:
    rng = np.random.default_rng([seed, 2])
    classes = spec.d_out if isinstance(spec, MLP) else spec.vocab_size
    return Targets(hard=rng.integers(0, classes, size=(x.shape[0],) if isinstance(spec, MLP) else x.shape))


@given(data=st.data(), spec=specs(min_classes=2), seed=st.integers(0, 2**16), with_ta=st.booleans())
def test_a_backend_reads_nested_sizes_only_through_the_plan(backend, data, spec, seed, with_ta):
    """forward and loss_and_gradients at sealed granularities run, and equal the plain ones bit for bit."""
    named = {"a": data.draw(granularities(spec)), "b": data.draw(granularities(spec))}
    if with_ta:
        named = {"TA": full(spec), **named}
    sealed = {name: SealedGranularity.of(g) for name, g in named.items()}
    for g in sealed.values():
        plan(spec, g)  # the core caches the plan; a backend reaches sizes only through it
    names = list(named)
    step = lambda gs: StepPlan(0, tuple(  # noqa: E731 - the same step over plain or sealed granularities
        Term(n, gs[n], 1.0 - i / 4, None if i == 0 else names[0]) for i, n in enumerate(names)), 0.5)
    weights = weights_for(spec, seed, "float32", scale=0.5)
    x = inputs_for(spec, seed, 2)
    targets, options = _targets(spec, seed, x), LossOptions(temperature=2.0)
    model = backend.build(spec, weights, device="cpu")
    expected_out = backend.forward(model, x, named["a"])
    expected_loss, expected_grads = backend.loss_and_gradients(model, x, targets, step(named), options)

    for g in sealed.values():
        g.seal()
    where = context(backend, spec, named["a"])
    assert_bitwise_equal(backend.forward(model, x, sealed["a"]), expected_out, f"forward, {where}")
    loss, grads = backend.loss_and_gradients(model, x, targets, step(sealed), options)
    assert loss == expected_loss, f"loss {loss} != {expected_loss} ({where})"
    assert_weights_equal(grads, expected_grads, f"gradients, {where}")
