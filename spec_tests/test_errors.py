"""Conformance property 6 (docs/backends/index.md): invalid specs, granularities, options and inputs raise matta's own errors.

Each error is a subclass of ``MattaError`` and of ``ValueError``/``TypeError``,
and names the offending field; nothing reaches a framework first.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import matta
from matta.errors import GranularityError, MattaError, SpecError
from matta.nesting import resolve
from matta.specs import MLP, Transformer
from matta.spec_tests.strategies import specs

garbage = st.one_of(
    st.integers(-5, 0), st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans(),
    st.lists(st.integers(-2, 2), max_size=2),
)


def _assert_matta_error(exc: BaseException, field: str) -> None:
    assert isinstance(exc, MattaError), f"{type(exc).__name__} is not a matta error: {exc}"
    assert isinstance(exc, (ValueError, TypeError)), type(exc)
    assert field in str(exc), f"error does not name {field!r}: {exc}"


@given(field=st.sampled_from(["d_in", "d_out", "hidden", "activation", "multiple_of", "nested"]), value=garbage)
def test_bad_mlp_fields_raise_spec_errors(field, value):
    kwargs = dict(d_in=3, hidden=(4,), d_out=2)
    kwargs[field] = value
    try:
        MLP(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the property is about the type
        _assert_matta_error(exc, field)
    else:
        assert _valid(field, value, MLP.nestable), (field, value)


@given(field=st.sampled_from(["vocab_size", "max_len", "d_model", "n_layers", "n_heads", "d_ff", "d_head",
                              "layer_norm_epsilon", "multiple_of", "nested"]), value=garbage)
def test_bad_transformer_fields_raise_spec_errors(field, value):
    kwargs = dict(vocab_size=7, max_len=5, d_model=4, n_layers=2, n_heads=2)
    kwargs[field] = value
    try:
        Transformer(**kwargs)
    except Exception as exc:  # noqa: BLE001
        _assert_matta_error(exc, field)
    else:
        assert _valid(field, value, Transformer.nestable), (field, value)


def _valid(field, value, nestable) -> bool:
    """The few garbage values that are valid: widths lists of ints >= 1, subsets of nestable, default None."""
    if field == "nested":
        return isinstance(value, list) and all(v in nestable for v in value)
    if field in ("d_ff", "d_head") and value is None:
        return True  # the documented defaults
    if field == "layer_norm_epsilon":
        return isinstance(value, float) and 0 < value < 1
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, int) and v >= 1 for v in value)


@given(spec=specs(), value=st.one_of(
    st.floats(max_value=0.0), st.floats(min_value=1.0000001), st.just(float("nan")), st.text(max_size=2),
    st.integers(-3, 0), st.lists(st.floats(0.1, 1.0), max_size=5),
    st.dictionaries(st.sampled_from(["width", "heads", "d_ff", "n_heads", "hidden", "d_model", "n_layers", "layers"]),
                    st.one_of(st.integers(-2, 50), st.floats(-1, 2), st.lists(st.integers(-1, 20), max_size=4)),
                    min_size=1),
))
def test_bad_granularities_raise_granularity_errors(spec, value):
    try:
        g = resolve(spec, value)
    except Exception as exc:  # noqa: BLE001
        assert isinstance(exc, GranularityError), f"{type(exc).__name__}: {exc}"
        assert "granularity" in str(exc).lower()
    else:
        # Only a valid form may resolve: every size then lies within the spec.
        assert isinstance(value, dict) and all(v >= 0 for _, v in g.sizes), (value, g)


def test_errors_name_the_field_and_the_allowed_values():
    with pytest.raises(SpecError, match=r"MLP.activation must be 'relu', 'gelu', 'tanh', 'sigmoid' or 'silu'; got 'swish'"):
        MLP(d_in=3, hidden=[4], d_out=2, activation="swish")
    spec = Transformer(vocab_size=7, max_len=5, d_model=4, n_layers=2, n_heads=2)
    with pytest.raises(GranularityError, match=r"unknown granularity key\(s\) \['heads'\].*'d_ff', 'n_heads', 'd_model', 'n_layers' or 'layers'"):
        resolve(spec, {"heads": 1})
    with pytest.raises(GranularityError, match=r"granularity.d_ff\[1\] as an absolute size must be an int in \[1, 16\]; got 17"):
        resolve(spec, {"d_ff": [4, 17]})
    with pytest.raises(matta.OptionError, match=r"parent must be 'ta' or 'chain'; got 'teacher'"):
        matta.MatTA(MLP(d_in=3, hidden=[4], d_out=2), backend="torch", parent="teacher")
    with pytest.raises(matta.OptionError, match=r"unknown option\(s\) \['temprature'\]; loss options are"):
        matta.MatTA(MLP(d_in=3, hidden=[4], d_out=2), backend="torch", temprature=2.0)
    with pytest.raises(matta.BackendError, match=r"backend must be 'numpy', 'torch' or 'keras'"):
        matta.MatTA(MLP(d_in=3, hidden=[4], d_out=2), backend="mxnet")


def test_bad_inputs_are_caught_before_the_framework():
    model = matta.MatTA(MLP(d_in=3, hidden=[8], d_out=4), students={"S": 0.5}, backend="torch")
    with pytest.raises(matta.InputError, match=r"x must have shape \(batch, d_in=3\); got \(5, 2\)"):
        model.predict(np.zeros((5, 2)))
    with pytest.raises(matta.InputError, match=r"y must hold ids in \[0, 3\]; got values in \[0, 4\]"):
        model.fit(np.zeros((5, 3)), np.array([0, 1, 2, 3, 4]), steps=1)
    with pytest.raises(matta.InputTypeError, match=r"y must hold integer ids"):
        model.fit(np.zeros((5, 3)), np.zeros(5), steps=1)
    with pytest.raises(matta.InputError, match=r"same number of examples"):
        model.fit(np.zeros((5, 3)), np.zeros(4, dtype=int), steps=1)
    with pytest.raises(matta.InputError, match=r"teacher output must have shape \(5, 4\)"):
        model.fit(np.zeros((5, 3)), np.zeros(5, dtype=int), teacher=np.zeros((5, 3)), steps=1)
    with pytest.raises(matta.InputError, match=r"non-negative and sum to 1"):
        matta.MatTA(model.spec, backend="torch", teacher_output="probabilities").fit(
            np.zeros((2, 3)), np.zeros(2, dtype=int), teacher=np.full((2, 4), 0.5), steps=1)
    with pytest.raises(matta.GranularityError, match=r"granularity name must be 'TA' or 'S'; got 'XL'"):
        model.predict(np.zeros((1, 3)), "XL")
    lm = matta.MatTA(Transformer(vocab_size=5, max_len=4, d_model=4, n_layers=1, n_heads=1), backend="torch")
    with pytest.raises(matta.InputError, match=r"1 <= time <= max_len=4"):
        lm.predict(np.zeros((1, 6), dtype=int))
    with pytest.raises(matta.InputError, match=r"x must hold ids in \[0, 4\]"):
        lm.predict(np.full((1, 3), 9))
    with pytest.raises(matta.NestingError, match=r"rule N1"):
        matta.MatTA(MLP(d_in=3, hidden=[8, 8], d_out=4), students={"a": {"hidden": [2, 8]}, "b": {"hidden": [8, 2]}},
                    backend="torch")
