"""Tied embeddings in the core (rule P3): spec layout, numpy reference, nesting, extraction, JSON.

Core only: the conformance strategies draw tied and untied specs by default; these tests ask
for tied ones with ``transformers(tied=True)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matta import extract, reference, saving
from matta.errors import SpecError
from matta.nesting import full, plan, relative_to, resolve, sub_spec
from matta.specs import Transformer, spec_from_dict
from matta.weights import initial_weights
from matta.spec_tests.strategies import granularities, inputs_for, nested_pairs, transformers, weights_for

_PROFILE = os.environ.get("MATTA_HYPOTHESIS_PROFILE", "dev")
_EXAMPLES = {"smoke": 5, "dev": 25, "ci": 200, "thorough": 2000}.get(_PROFILE, 25)
examples = settings(max_examples=_EXAMPLES, deadline=None, derandomize=_PROFILE != "thorough")


def _untied(spec: Transformer, w: dict[str, np.ndarray]) -> tuple[Transformer, dict[str, np.ndarray]]:
    """The same model with its tied head written out as a ``head.kernel``."""
    return replace(spec, tie_embeddings=False), {**w, "head.kernel": np.ascontiguousarray(w["embed.tokens"].T)}


@examples
@given(spec=transformers(tied=True), seed=st.integers(0, 2**16))
def test_a_tied_spec_has_no_head_kernel_and_one_matrix_fewer(spec, seed):
    params = spec.parameters()
    untied = replace(spec, tie_embeddings=False)
    assert "head.kernel" not in params and "embed.tokens" in params
    assert set(untied.parameters()) - set(params) == {"head.kernel"}
    assert untied.num_params - spec.num_params == spec.d_model * spec.vocab_size
    # Each tensor draws from its own stream, so tying changes no other initial tensor.
    w, wu = initial_weights(spec, seed), initial_weights(untied, seed)
    assert sorted(w) == sorted(set(wu) - {"head.kernel"})
    assert all(np.array_equal(w[k], wu[k]) for k in w)


@examples
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_reference_head_is_the_token_embedding_transposed_at_every_granularity(data, seed):
    spec = data.draw(transformers(tied=True))
    g = data.draw(granularities(spec))
    w = weights_for(spec, seed)
    x = inputs_for(spec, seed, batch=2)
    spec_u, w_u = _untied(spec, w)
    np.testing.assert_allclose(reference.forward(spec, w, x, g), reference.forward(spec_u, w_u, x, g),
                               rtol=1e-12, atol=1e-12)
    # The head really is the embedding: changing embed.tokens' d_model prefix moves every logit row.
    d = g["d_model"]
    bumped = {**w, "embed.tokens": w["embed.tokens"].copy()}
    bumped["embed.tokens"][:, :d] *= 2.0
    other = {**w_u, "embed.tokens": bumped["embed.tokens"]}   # untied: the head keeps its own kernel
    assert not np.allclose(reference.forward(spec, bumped, x, g), reference.forward(spec_u, other, x, g))


@examples
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_extraction_of_a_tied_spec_is_the_nested_reference(data, seed):
    spec = data.draw(transformers(tied=True))
    g = data.draw(granularities(spec))
    w = weights_for(spec, seed)
    x = inputs_for(spec, seed, batch=2)
    sub, sub_w = extract(w, spec, g)
    assert sub == sub_spec(spec, g) == plan(spec, g).spec and sub.tie_embeddings
    assert sorted(sub_w) == sorted(sub.parameters()) and "head.kernel" not in sub_w
    assert sum(a.size for a in sub_w.values()) == sub.num_params
    assert sub_w["embed.tokens"].shape == (spec.vocab_size, g["d_model"])   # rule S1 on d_model, S4 on vocab
    assert np.array_equal(reference.plain_forward(sub, sub_w, x), reference.forward(spec, w, x, g))


@examples
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_tied_extraction_is_identity_at_full_size_and_composes(data, seed):
    spec = data.draw(transformers(tied=True))
    inner, outer = data.draw(nested_pairs(spec))
    w = weights_for(spec, seed)
    same, w_full = extract(w, spec, full(spec))
    assert same == spec and all(np.array_equal(w_full[k], w[k]) for k in w)
    outer_spec, outer_w = extract(w, spec, outer)
    twice = extract(outer_w, outer_spec, relative_to(spec, outer, inner))
    once = extract(w, spec, inner)
    assert twice[0] == once[0] and sorted(twice[1]) == sorted(once[1])
    assert all(np.array_equal(twice[1][k], once[1][k]) for k in once[1])


@examples
@given(spec=transformers(tied=None))
def test_json_round_trip_keeps_the_flag(spec):
    back = spec_from_dict(json.loads(spec.to_json()))
    assert back == spec and back.tie_embeddings is spec.tie_embeddings
    assert json.loads(spec.to_json())["tie_embeddings"] is spec.tie_embeddings


def test_a_spec_without_the_field_reads_untied():
    data = Transformer(vocab_size=7, max_len=4, d_model=4, n_layers=1, n_heads=2).to_dict()
    del data["tie_embeddings"]
    assert spec_from_dict(data).tie_embeddings is False


@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_tie_embeddings_must_be_a_bool(value):
    with pytest.raises(SpecError, match=r"Transformer\.tie_embeddings must be True or False"):
        Transformer(vocab_size=7, max_len=4, d_model=4, n_layers=1, n_heads=2, tie_embeddings=value)


def test_saved_format_round_trips_a_tied_student(tmp_path):
    spec = Transformer(vocab_size=9, max_len=5, d_model=8, n_layers=2, n_heads=2, tie_embeddings=True)
    sub, sub_w = extract(initial_weights(spec, 3), spec, resolve(spec, {"d_model": 4, "n_heads": 1}))
    saving.write(str(tmp_path), sub, sub_w)
    back, back_w, _ = saving.read(str(tmp_path))
    assert back == sub and back.tie_embeddings and sorted(back_w) == sorted(sub_w)
    assert all(np.array_equal(back_w[k], sub_w[k]) for k in sub_w)
