"""Conformance property 4 (docs/backends/index.md; rules E1–E4, G1–G4, N1): extraction on numpy weights, no backend needed."""

from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from matta import reference
from matta.extraction import extract
from matta.nesting import (
    Granularity,
    check_chain,
    full,
    is_nested,
    num_params,
    plan,
    relative_to,
    resolve,
    round_size,
    shared_first_layer,
    sub_spec,
)
from matta.specs import MLP, spec_from_dict
from matta.spec_tests.assertions import assert_bitwise_equal, assert_weights_equal, context
from matta.spec_tests.strategies import granularities, granularity_forms, inputs_for, mlps, nested_pairs, specs, weights_for


@given(spec=specs(), seed=st.integers(0, 2**16))
def test_extraction_at_full_size_is_the_identity(spec, seed):
    """Rule E3."""
    weights = weights_for(spec, seed)
    for g in (full(spec), 1.0, {}):
        sub, sub_weights = extract(weights, spec, g)
        assert sub == spec, context(spec=spec)
        assert_weights_equal(sub_weights, weights, context(spec=spec, g=g))
        assert not any(np.shares_memory(sub_weights[k], weights[k]) for k in weights), "extraction must copy"


@given(data=st.data(), spec=specs(), seed=st.integers(0, 2**16))
def test_extraction_composes(data, spec, seed):
    """Rule E4: extract(extract(W, g1), g2) == extract(W, g2) for g2 ⊆ g1."""
    inner, outer = data.draw(nested_pairs(spec))
    weights = weights_for(spec, seed)
    mid_spec, mid_weights = extract(weights, spec, outer)
    twice_spec, twice = extract(mid_weights, mid_spec, relative_to(spec, outer, inner))
    once_spec, once = extract(weights, spec, inner)
    where = context(spec=spec, granularity=inner, outer=outer.to_dict(spec))
    assert twice_spec == once_spec, where
    assert_weights_equal(twice, once, where)


@given(data=st.data(), spec=specs(), seed=st.integers(0, 2**16))
def test_extracted_weights_have_the_sub_specs_shapes_and_counts(data, spec, seed):
    """Rules E1–E2: copies shaped as sub_spec's parameters; counts agree and are monotone in nesting."""
    inner, outer = data.draw(nested_pairs(spec))
    weights = weights_for(spec, seed)
    sub, sub_weights = extract(weights, spec, outer)
    assert sub == sub_spec(spec, outer)
    params = sub.parameters()
    assert sorted(sub_weights) == sorted(params)
    for name, w in sub_weights.items():
        assert w.shape == params[name].shape and w.flags.c_contiguous, (name, w.shape)
        assert not np.shares_memory(w, weights[name] if name in weights else np.empty(0))
    count = sum(w.size for w in sub_weights.values())
    assert count == num_params(spec, outer) == sub.num_params <= spec.num_params
    assert num_params(spec, inner) <= num_params(spec, outer)


@given(data=st.data(), spec=specs(), seed=st.integers(0, 2**16))
def test_reference_forward_at_g_is_the_extracted_plain_model(data, spec, seed):
    """Rule S1: the sub-network at g is the plain model of the extracted weights, to the bit."""
    g = data.draw(granularities(spec))
    weights = weights_for(spec, seed)
    x = inputs_for(spec, seed, batch=3)
    sub, sub_weights = extract(weights, spec, g)
    nested = reference.forward(spec, weights, x, g)
    plain = reference.plain_forward(sub, sub_weights, x)
    assert_bitwise_equal(plain, nested, context(spec=spec, granularity=g))


@given(data=st.data(), spec=specs())
def test_every_form_resolves_to_a_granularity_that_round_trips(data, spec):
    """Rule G1: every form gives sizes in [1, full] (0 for dropped blocks) and to_dict resolves back."""
    form = data.draw(granularity_forms(spec))
    g = resolve(spec, form)
    assert resolve(spec, g.to_dict(spec)) == g
    assert resolve(spec, g) == g
    assert is_nested(g, full(spec))
    fulls = full(spec).as_dict()
    for key, size in g.as_dict().items():
        dropped = key.startswith("blocks.") and int(key.split(".")[1]) not in g.blocks
        assert (size == 0) if dropped else (1 <= size <= fulls[key]), (key, size, form)
    assert spec_from_dict(sub_spec(spec, g).to_dict()) == sub_spec(spec, g)


@given(spec=specs(), fraction=st.floats(0.01, 1.0))
def test_a_fraction_scales_exactly_the_nested_dimensions(spec, fraction):
    """Rule G1a: one fraction scales the dimensions in ``spec.nested`` by rule G3; the rest stay full."""
    resolved = resolve(spec, fraction)
    g = resolved.as_dict()
    fulls = full(spec).as_dict()
    if not isinstance(spec, MLP):
        depth = round_size(fraction, spec.n_layers) if "n_layers" in spec.nested else spec.n_layers
        assert resolved.blocks == tuple(range(depth))
    for key, size in g.items():
        dim = "hidden" if isinstance(spec, MLP) else key.split(".")[-1]
        if key.startswith("blocks.") and int(key.split(".")[1]) not in resolved.blocks:
            assert size == 0, (key, size)  # rule D2
        elif dim in spec.nested:
            multiple = 1 if dim == "n_heads" else spec.multiple_of
            assert size == round_size(fraction, fulls[key], multiple), (key, size)
        else:
            assert size == fulls[key], (key, size)


@given(full_size=st.integers(1, 5000), multiple=st.integers(1, 64), a=st.floats(0.001, 1.0), b=st.floats(0.001, 1.0))
def test_rounding_is_bounded_monotone_and_a_multiple(full_size, multiple, a, b):
    """Rule G3."""
    lo, hi = sorted((a, b))
    k_lo, k_hi = round_size(lo, full_size, multiple), round_size(hi, full_size, multiple)
    assert 1 <= k_lo <= k_hi <= full_size
    for k in (k_lo, k_hi):
        assert k % multiple == 0 or k == full_size
    assert round_size(1.0, full_size, multiple) == full_size


@given(data=st.data(), spec=specs())
def test_declared_granularities_must_form_a_chain(data, spec):
    """Rule N1: check_chain accepts a nested pair and rejects a pair that is not nested either way."""
    from matta.errors import NestingError

    inner, outer = data.draw(nested_pairs(spec))
    assert check_chain(spec, {"a": inner, "b": outer, "TA": full(spec)})[-1] == "TA"
    a, b = data.draw(granularities(spec)), data.draw(granularities(spec))
    if is_nested(a, b) or is_nested(b, a):
        check_chain(spec, {"a": a, "b": b})
    else:
        try:
            check_chain(spec, {"a": a, "b": b})
        except NestingError as exc:
            assert "rule N1" in str(exc)
        else:
            raise AssertionError("a non-nested pair was accepted")


def test_relative_to_renumbers_kept_blocks():
    """Rule D2, worked example: blocks (0, 2) of a 3-block TA become (0, 1)."""
    from matta.specs import Transformer

    spec = Transformer(vocab_size=5, max_len=4, d_model=4, n_layers=3, n_heads=2, d_ff=8)
    outer = resolve(spec, {"layers": [0, 2]})
    inner = resolve(spec, {"layers": [2], "d_ff": 0.5})
    rel = relative_to(spec, outer, inner)
    assert rel.blocks == (1,)
    assert rel.as_dict() == {"d_model": 4, "blocks.0.n_heads": 0, "blocks.0.d_ff": 0, "blocks.1.n_heads": 2, "blocks.1.d_ff": 4}
    assert isinstance(rel, Granularity)


@given(data=st.data(), spec=specs(), seed=st.integers(0, 2**16))
def test_the_plan_reads_exactly_the_sub_networks_parameters(data, spec, seed):
    """Rule S1: each read's slice of its source has the sub-network parameter's shape; ``whole`` is exact."""
    g = data.draw(granularities(spec))
    p = plan(spec, g)
    weights = weights_for(spec, seed)
    params = p.spec.parameters()
    assert p.spec == sub_spec(spec, g) and [r.name for r in p.reads] == list(params)
    for r in p.reads:
        assert weights[r.source][r.slices].shape == r.shape == params[r.name].shape, r
        assert r.whole == (r.shape == weights[r.source].shape), r
    assert plan(spec, g) is p, "plans are cached per (spec, granularity)"


@given(data=st.data(), spec=mlps(), seed=st.integers(0, 2**16))
def test_the_shared_first_layer_holds_every_granularitys_first_layer(data, spec, seed):
    """Rule S1 for several MLP sub-networks on one input: the widest first layer's column prefixes."""
    gs = [data.draw(granularities(spec)) for _ in range(data.draw(st.integers(1, 3)))]
    weights = weights_for(spec, seed)
    x = inputs_for(spec, seed, 3)
    shared = shared_first_layer(spec, gs)
    h = x @ weights["layers.0.kernel"][shared.kernel.slices] + weights["layers.0.bias"][shared.bias.slices]
    for g, columns in zip(gs, shared.columns):
        own = {r.name: weights[r.source][r.slices] for r in plan(spec, g).reads}
        np.testing.assert_allclose(h[:, columns], x @ own["layers.0.kernel"] + own["layers.0.bias"], rtol=1e-12)
        assert (columns == slice(None)) == (h[:, columns].shape[1] == h.shape[1])
