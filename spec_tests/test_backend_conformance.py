"""Conformance properties 1, 2 and 5 (docs/backends/index.md) for every backend given by ``--backends``.

1. the backend's nested forward at g equals the numpy reference at g (rules S1–S4, D1–D2; per-dtype tolerance);
2. the extracted plain model at g equals the nested forward at g, bit for bit
   (same backend, device, dtype and batch), unless the backend declares a
   measured bound in ``exactness_bounds``;
5. the composite loss equals the reference (rules L1–L6); with stop-gradient on, the
   distillation term gives exactly zero gradient outside the Student's slices (rule L3).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from matta import reference
from matta.errors import MattaError
from matta.extraction import extract
from matta.losses import LossOptions, NumpyOps, StepPlan, Term, composite_loss
from matta.nesting import full, slice_plan
from matta.specs import MLP
from matta.spec_tests.assertions import (
    FD_TOL,
    LOSS_TOL,
    assert_bitwise_equal,
    assert_close,
    assert_weights_equal,
    context,
    precise_dtype,
)
from matta.spec_tests.strategies import granularities, inputs_for, mlps, specs, targets_for, transformers, weights_for

DTYPES = ["float32", "float64"]


def refuses(backend, spec, weights) -> None:
    """An unsupported dtype must be refused with matta's own error at build time, never computed wrongly."""
    with pytest.raises(MattaError, match="dtype"):
        backend.build(spec, weights, device="cpu")


def exactness_bound(backend) -> float:
    """The documented max |extracted - nested| of a backend's engine; 0.0 means bit-exact (property 2)."""
    return float(backend.exactness_bounds.get(backend.engine(), 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), spec=specs(), seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_nested_forward_matches_the_reference(backend, dtype, data, spec, seed, batch):
    """Property 1."""
    g = data.draw(granularities(spec))
    weights = weights_for(spec, seed, dtype)
    x = inputs_for(spec, seed, batch)
    if not backend.supports_dtype(spec, dtype):
        return refuses(backend, spec, weights)
    model = backend.build(spec, weights, device="cpu")
    expected = reference.forward(spec, weights, x, g)
    actual = backend.forward(model, x, g)
    assert actual.dtype == np.dtype(dtype), f"output dtype {actual.dtype} ({context(backend, spec, g)})"
    assert_close(actual, expected, dtype, context(backend, spec, g, dtype=dtype), spec)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), spec=specs(), seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_extracted_model_equals_the_nested_sub_network(backend, dtype, data, spec, seed, batch):
    """Property 2: bit-for-bit on the same backend, device, dtype and batch."""
    g = data.draw(granularities(spec))
    weights = weights_for(spec, seed, dtype)
    x = inputs_for(spec, seed, batch)
    if not backend.supports_dtype(spec, dtype):
        return refuses(backend, spec, weights)
    model = backend.build(spec, weights, device="cpu")
    sub_spec, sub_weights = extract(weights, spec, g)
    plain = backend.build_plain(sub_spec, sub_weights, device="cpu")
    nested_out = backend.forward(model, x, g)
    plain_out = backend.plain_forward(plain, x)
    where = context(backend, spec, g, dtype=dtype)
    bound = exactness_bound(backend)
    if bound == 0.0:
        assert_bitwise_equal(plain_out, nested_out, where)
    else:
        err = float(np.max(np.abs(plain_out.astype(np.float64) - nested_out), initial=0.0))
        assert err <= bound * max(1.0, float(np.abs(nested_out).max())), f"|diff| {err:.3g} > documented bound {bound} ({where})"


@given(spec=specs(), seed=st.integers(0, 2**16))
def test_weights_round_trip_through_the_backend(backend, spec, seed):
    """get_weights(build(W)) == W to the bit, for nested and plain models."""
    weights = weights_for(spec, seed, "float32")
    where = context(backend, spec)
    assert_weights_equal(backend.get_weights(backend.build(spec, weights, device="cpu")), weights, where)
    model = backend.build(spec, weights_for(spec, seed + 1, "float32"), device="cpu")
    backend.set_weights(model, weights)
    assert_weights_equal(backend.get_weights(model), weights, where)


@st.composite
def loss_options(draw) -> LossOptions:
    return LossOptions(
        hard_label_weight=draw(st.sampled_from([0.0, 0.3])),
        ta_weight=draw(st.sampled_from([1.0, 0.5])),
        temperature=draw(st.sampled_from([1.0, 2.0, 0.5])),
        stop_gradient=draw(st.booleans()),
    )


@given(data=st.data(), spec=specs(min_classes=2), seed=st.integers(0, 2**16), options=loss_options(),
       distill=st.sampled_from([0.0, 0.4, 1.0]), soft=st.booleans())
def test_composite_loss_matches_the_reference(backend, data, spec, seed, options, distill, soft):
    """Property 5a: the backend's composite loss equals the numpy reference (float64)."""
    g_small = data.draw(granularities(spec))
    g_mid = data.draw(granularities(spec))
    plan = StepPlan(0, (Term("TA", full(spec), options.ta_weight, None), Term("a", g_mid, 0.7, "TA"),
                        Term("b", g_small, 1.3, "a")), distill)
    dtype = precise_dtype(backend, spec)
    # The reference runs in float64 on exactly the values the backend holds.
    weights = {k: v.astype(dtype).astype("float64") for k, v in weights_for(spec, seed, "float64", scale=0.5).items()}
    x = inputs_for(spec, seed, 3)
    targets = targets_for(spec, seed, 3, x, soft)
    outputs = {t.name: reference.forward(spec, weights, x, t.granularity) for t in plan.terms}
    expected, _ = composite_loss(NumpyOps(), outputs, targets, plan, options)
    model = backend.build(spec, {k: v.astype(dtype) for k, v in weights.items()}, device="cpu")
    actual, grads = backend.loss_and_gradients(model, x, targets, plan, options)
    where = context(backend, spec, options=options, distill=distill, dtype=dtype)
    tol = LOSS_TOL[dtype]
    assert abs(actual - float(expected)) <= tol * max(1.0, abs(float(expected))), f"{actual} != {expected} ({where})"
    assert sorted(grads) == sorted(weights) and all(grads[k].shape == weights[k].shape for k in weights), where


@given(data=st.data(), spec=st.one_of(mlps(min_classes=2), transformers(min_vocab=2)), seed=st.integers(0, 2**16))
def test_gradients_match_finite_differences(backend, data, spec, seed):
    """Property 5b: the backend's gradient of the composite loss is the derivative of the reference loss."""
    g = data.draw(granularities(spec))
    options = LossOptions(stop_gradient=False, temperature=2.0)
    plan = StepPlan(0, (Term("TA", full(spec), 1.0, None), Term("S", g, 1.0, "TA")), 0.5)
    dtype = precise_dtype(backend, spec)
    weights = {k: v.astype(dtype).astype("float64") for k, v in weights_for(spec, seed, "float64", scale=0.5).items()}
    x = inputs_for(spec, seed, 2)
    targets = targets_for(spec, seed, 2, x, soft=False)
    model = backend.build(spec, {k: v.astype(dtype) for k, v in weights.items()}, device="cpu")
    _, grads = backend.loss_and_gradients(model, x, targets, plan, options)
    rng = np.random.default_rng([seed, 3])
    direction = {k: rng.standard_normal(w.shape) for k, w in weights.items()}

    def loss_at(eps: float) -> float:
        w = {k: weights[k] + eps * direction[k] for k in weights}
        outputs = {t.name: reference.forward(spec, w, x, t.granularity) for t in plan.terms}
        return float(composite_loss(NumpyOps(), outputs, targets, plan, options)[0])

    eps = 1e-6
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum(float(np.sum(grads[k] * direction[k])) for k in weights)
    tol = FD_TOL[dtype]
    assert abs(numeric - analytic) <= tol * max(1.0, abs(numeric)), f"{analytic} != {numeric} ({context(backend, spec, g, dtype=dtype)})"


def _outside_student(spec, g, name: str, shape) -> np.ndarray:
    """True where a parameter element is outside the Student's slices (rule S1)."""
    inside = np.zeros(shape, dtype=bool)
    for _, full_name, slices in slice_plan(spec, g):
        if full_name == name:
            inside[slices] = True
    return ~inside


@given(data=st.data(), spec=st.one_of(mlps(min_classes=2), transformers(min_vocab=2)), seed=st.integers(0, 2**16))
def test_stop_gradient_keeps_the_distillation_term_inside_the_student(backend, data, spec, seed):
    """Property 5c (rule L3): with sg on, the distillation term's gradient is exactly 0 outside the
    Student's slices; with sg off it reaches the TA's other parameters."""
    if isinstance(spec, MLP):
        spec = MLP(spec.d_in, spec.hidden, spec.d_out, activation="tanh")  # no dead units to hide a gradient
    g = data.draw(granularities(spec))
    assume(g != full(spec))
    # Distillation only: the TA term has weight 0 and λ = 1, so L = τ²·KL(sg(z_TA) ‖ z_S).
    plan = StepPlan(0, (Term("TA", full(spec), 0.0, None), Term("S", g, 1.0, "TA")), 1.0)
    weights = weights_for(spec, seed, precise_dtype(backend, spec))
    x = inputs_for(spec, seed, 3)
    targets = targets_for(spec, seed, 3, x, soft=False)
    outside_total = {}
    for stop in (True, False):
        model = backend.build(spec, weights, device="cpu")
        _, grads = backend.loss_and_gradients(model, x, targets, plan, LossOptions(stop_gradient=stop))
        outside_total[stop] = 0.0
        for name, grad in grads.items():
            outside = _outside_student(spec, g, name, grad.shape)
            if stop:
                leaked = np.abs(grad[outside]).max(initial=0.0)
                assert leaked == 0.0, f"stop-gradient leaked {leaked:.3g} into {name} ({context(backend, spec, g)})"
            outside_total[stop] += float(np.abs(grad[outside]).sum())
    z_ta = reference.forward(spec, weights, x, full(spec))
    z_s = reference.forward(spec, weights, x, g)
    # With sg off the gradient reaches the TA, unless the two distributions already agree.
    assume(np.abs(z_ta - z_ta.mean(-1, keepdims=True) - (z_s - z_s.mean(-1, keepdims=True))).max() > 1e-3)
    assert outside_total[False] > 0.0, f"with stop_gradient off no gradient reached the TA ({context(backend, spec, g)})"
