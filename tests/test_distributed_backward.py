"""The torch step's term-by-term backward: the one-backward step's loss and gradients, one term's graph at a time.

With stop-gradient on (rule L3) the torch ``fit`` backpropagates each term on its own, so a
Transformer step holds one term's activations, not all of them (the memory that data-parallel
and sharded training save per process is then the TA's own; see ``docs/scaling.md``).
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from matta import MLP, MatTA, Transformer
from matta.errors import OptionError
from matta.backends.torch import backend
from matta.backends.torch.modules import torch_name

SPECS = {
    "mlp": MLP(d_in=12, hidden=[32, 24], d_out=5, multiple_of=4),
    "transformer": Transformer(vocab_size=13, max_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32, multiple_of=4),
}


def _batch(spec, n=12, seed=0):
    rng = np.random.default_rng(seed)
    if isinstance(spec, MLP):
        return rng.standard_normal((n, spec.d_in)), rng.integers(0, spec.d_out, n), rng.standard_normal((n, spec.d_out))
    x = rng.integers(0, spec.vocab_size, (n, spec.max_len))
    return x, np.roll(x, -1, axis=1), rng.standard_normal((n, spec.max_len, spec.vocab_size))


@pytest.mark.parametrize("family", sorted(SPECS))
@pytest.mark.parametrize("parent", ["ta", "chain"])
@pytest.mark.parametrize("sampling", ["all", "mixnmatch"])
def test_term_by_term_gradients_equal_one_backward(family, parent, sampling):
    """Loss, parts and every parameter's gradient match the one-backward step (float64 rounding)."""
    spec = SPECS[family]
    model = MatTA(spec, {"S": 0.25, "M": 0.5}, backend="torch", seed=2, dtype="float64", parent=parent,
                  sampling=sampling, ramp="constant")
    x, y, logits = _batch(spec)
    run = _run(model, x, y, logits)
    batch = next(iter(run.batch_stream()))
    assert batch.plan.distill > 0 and len(batch.plan.terms) >= 3
    targets = backend._targets(model.model, batch.targets)
    loss_one, grads_one = backend.loss_and_gradients(model.model, batch.x, batch.targets, batch.plan, model.options)
    inputs = backend._input(model.model, batch.x)
    model.model.zero_grad(set_to_none=True)
    loss_terms, parts = backend.backward(model.model, inputs, targets, batch.plan, model.options)
    _, parts_one = backend._loss(model.model, inputs, targets, batch.plan, model.options)
    np.testing.assert_allclose(float(loss_terms), loss_one, rtol=1e-12)
    for name in parts_one:
        np.testing.assert_allclose(float(parts[name]), float(parts_one[name]), rtol=1e-12, err_msg=name)
    params = dict(model.model.named_parameters())
    for name, want in grads_one.items():
        key, transposed = torch_name(name)
        got = params[key].grad
        got = (got.T if transposed else got).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13, err_msg=name)
    model.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_each_terms_forward_starts_with_no_other_terms_activations_alive(stop_gradient):
    """With stop-gradient, no activation an earlier term saved for backward is alive at a term's forward.

    Without it the step is one backward (a parent's graph serves its children), and the
    activations pile up: the same count shows it, so the check can tell the two apart.
    """
    spec = SPECS["transformer"]
    model = MatTA(spec, {"S": 0.25, "M": 0.5}, backend="torch", seed=2, ramp="constant", stop_gradient=stop_gradient)
    x, y, logits = _batch(spec)
    batch = next(iter(_run(model, x, y, logits).batch_stream()))
    targets = backend._targets(model.model, batch.targets)
    inputs = backend._input(model.model, batch.x)
    params = {id(p) for p in model.model.parameters()}
    saved: list[weakref.ref] = []
    outputs: list[weakref.ref] = []  # a term's output outlives its graph (a parent's is a constant later)
    alive: list[int] = []
    forward = model.model.forward

    def counting(tokens, granularity=None):
        kept = [r() for r in outputs]
        alive.append(sum(r() is not None and not any(r() is o for o in kept) for r in saved))
        out = forward(tokens, granularity)
        outputs.append(weakref.ref(out))
        return out

    batch_tensors = {id(inputs), id(targets.hard), id(targets.soft)}  # the step's data, alive throughout

    def pack(t):
        if id(t) not in params and id(t) not in batch_tensors:
            saved.append(weakref.ref(t))
        return t

    model.model.forward = counting
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend.backward(model.model, inputs, targets, batch.plan, model.options)
    del model.model.forward
    assert len(alive) == len(batch.plan.terms) == 3
    if stop_gradient:
        assert alive == [0, 0, 0]
    else:
        assert 0 == alive[0] < alive[1] < alive[2], alive


def _run(model, x, y, logits):
    from matta.training import TrainingRun

    return TrainingRun(spec=model.spec, x=x, y=y, teacher=logits, options=model.options, schedule=model.schedule,
                       steps=4, batch_size=len(x), seed=0, dtype=model.dtype, progress=False)


def _kept_for_backward(model, batch, recompute):
    """Bytes autograd keeps for the backward pass of one step (parameters and data aside), and the gradients."""
    targets = backend._targets(model.model, batch.targets)
    inputs = backend._input(model.model, batch.x)
    params = {id(p) for p in model.model.parameters()}
    kept = []

    def pack(t):
        if id(t) not in params:
            kept.append(t.numel() * t.element_size())
        return t

    model.model.zero_grad(set_to_none=True)
    model.model.recompute_blocks = recompute
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend.backward(model.model, inputs, targets, batch.plan, model.options)
    model.model.recompute_blocks = False
    return sum(kept), {k: p.grad.clone() for k, p in model.model.named_parameters()}


def test_recomputed_blocks_keep_less_for_the_backward_and_give_the_same_gradients():
    """``recompute_blocks``: each block keeps its input only; gradients and a fit's weights are the same bits."""
    spec = Transformer(vocab_size=13, max_len=32, d_model=16, n_layers=3, n_heads=2, d_ff=64, multiple_of=4)
    model = MatTA(spec, {"S": 0.25, "M": 0.5}, backend="torch", seed=2, dtype="float64", ramp="constant")
    x, y, logits = _batch(spec)
    batch = next(iter(_run(model, x, y, logits).batch_stream()))
    kept, grads = _kept_for_backward(model, batch, False)
    kept_recomputed, grads_recomputed = _kept_for_backward(model, batch, True)
    assert kept_recomputed < 0.5 * kept, (kept_recomputed, kept)
    for name in grads:
        torch.testing.assert_close(grads_recomputed[name], grads[name], rtol=0, atol=0, msg=name)
    weights = []
    for recompute in (False, True):
        model = MatTA(spec, {"S": 0.25, "M": 0.5}, backend="torch", seed=2, dtype="float64")
        model.fit(x, y, steps=3, batch_size=6, teacher=logits, progress=False, recompute_blocks=recompute)
        assert model.model.recompute_blocks is False  # the option lasts one fit
        weights.append(model.weights)
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)


def test_recompute_blocks_is_checked():
    """A bad value names the allowed ones; an MLP, which has no blocks, refuses it."""
    x, y, _ = _batch(SPECS["mlp"])
    model = MatTA(SPECS["mlp"], {"S": 0.5}, backend="torch", seed=0)
    with pytest.raises(OptionError, match="recompute_blocks=True recomputes a Transformer"):
        model.fit(x, y, steps=1, batch_size=6, progress=False, recompute_blocks=True)
    x, y, _ = _batch(SPECS["transformer"])
    with pytest.raises(OptionError, match="recompute_blocks must be True or False"):
        MatTA(SPECS["transformer"], {}, backend="torch").fit(x, y, steps=1, progress=False, recompute_blocks="yes")
