"""Conformance property 3 (docs/backends/index.md): weights move between the backend under test and PyTorch with equal outputs,
and both backends compute the same composite loss and gradients.

PyTorch is the partner because it is always installed with matta's test extras;
with ``--backends=torch`` this checks torch against a fresh torch model.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from matta.backend import get_backend
from matta.losses import LossOptions, StepPlan, Term
from matta.nesting import full
from matta.spec_tests.assertions import LOSS_TOL, assert_close, assert_weights_equal, context, precise_dtype
from matta.spec_tests.strategies import granularities, inputs_for, specs, targets_for, weights_for


@given(data=st.data(), spec=specs(), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_weights_move_to_and_from_torch_with_equal_outputs(backend, data, spec, seed, batch):
    """Property 3: torch → backend → torch keeps every bit of the weights and the outputs agree."""
    torch_backend = get_backend("torch")
    g = data.draw(granularities(spec))
    weights = weights_for(spec, seed, "float32")
    x = inputs_for(spec, seed, batch)
    where = context(backend, spec, g)
    torch_model = torch_backend.build(spec, weights, device="cpu")
    model = backend.build(spec, torch_backend.get_weights(torch_model), device="cpu")
    assert_close(backend.forward(model, x, g), torch_backend.forward(torch_model, x, g), "float32", where, spec)
    back = torch_backend.build(spec, backend.get_weights(model), device="cpu")
    assert_weights_equal(torch_backend.get_weights(back), weights, where)


@given(data=st.data(), spec=specs(min_classes=2), seed=st.integers(0, 2**16), distill=st.sampled_from([0.0, 0.5]))
def test_loss_and_gradients_agree_with_torch(backend, data, spec, seed, distill):
    """Property 3/5: the same step gives the same loss and gradients on the backend and on torch."""
    torch_backend = get_backend("torch")
    dtype = precise_dtype(backend, spec)
    g = data.draw(granularities(spec))
    options = LossOptions(stop_gradient=data.draw(st.booleans()), temperature=2.0, hard_label_weight=0.3)
    plan = StepPlan(0, (Term("TA", full(spec), 1.0, None), Term("S", g, 1.0, "TA")), distill)
    weights = weights_for(spec, seed, dtype, scale=0.5)
    x = inputs_for(spec, seed, 2)
    targets = targets_for(spec, seed, 2, x, soft=True)
    targets.soft = targets.soft.astype(dtype)
    loss_t, grads_t = torch_backend.loss_and_gradients(torch_backend.build(spec, weights, device="cpu"), x, targets,
                                                       plan, options)
    loss_b, grads_b = backend.loss_and_gradients(backend.build(spec, weights, device="cpu"), x, targets, plan, options)
    where = context(backend, spec, g, dtype=dtype, distill=distill)
    tol = LOSS_TOL[dtype]
    assert abs(loss_b - loss_t) <= tol * max(1.0, abs(loss_t)), f"loss {loss_b} != torch {loss_t} ({where})"
    assert sorted(grads_b) == sorted(grads_t), where
    scale = max(1.0, max(float(np.abs(v).max(initial=0.0)) for v in grads_t.values()))
    for name in grads_t:
        err = float(np.abs(grads_b[name].astype(np.float64) - grads_t[name]).max(initial=0.0))
        assert err <= 50 * tol * scale, f"gradient of {name} differs by {err:.3g} ({where})"
