"""``matta.cost.flops`` against hand counts and against the matrix products of the ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import matta.spec_tests.conftest  # noqa: F401 - registers and loads the suite's Hypothesis profiles
from matta.cost import flops
from matta.errors import InputTypeError, OptionError
from matta.extraction import extract
from matta.onnx import build_model
from matta.specs import MLP, Spec, Transformer
from matta.spec_tests.strategies import granularities, specs, weights_for


def test_hand_counts_of_tiny_specs() -> None:
    # 3 -> 4 -> 5 -> 2: 12 + 20 + 10 multiply-adds per example.
    assert flops(MLP(d_in=3, hidden=(4, 5), d_out=2)) == 2 * 42
    # T = 3, D = 2, one head of width 2, d_ff = 3, V = 5, in multiply-adds: query, key, value
    # 3 x (3x2 @ 2x2) = 36; scores 3x2 @ 2x3 = 18; weighted sum 3x3 @ 3x2 = 18; output 3x2 @ 2x2 = 12;
    # FFN 3x2 @ 2x3 + 3x3 @ 3x2 = 36; head 3x2 @ 2x5 = 30.
    gpt = Transformer(vocab_size=5, max_len=4, d_model=2, n_layers=1, n_heads=1, d_ff=3, d_head=2)
    assert flops(gpt, 3) == 2 * (36 + 18 + 18 + 12 + 36 + 30)
    assert flops(gpt) == flops(gpt, seq_len=4) > flops(gpt, 3)


def _graph_flops(spec: Spec, seq_len: int, batch: int = 2) -> float:
    """2 x multiply-adds of every MatMul and Gemm of the exported graph, from the shapes it computes."""
    from onnx.reference import ReferenceEvaluator

    model = build_model(spec, weights_for(spec, 0, "float32"))
    rng = np.random.default_rng(0)
    if isinstance(spec, MLP):
        feed = {"x": rng.standard_normal((batch, spec.d_in)).astype(np.float32)}
    else:
        feed = {"tokens": rng.integers(0, spec.vocab_size, size=(batch, seq_len)).astype(np.int64)}
    values = ReferenceEvaluator(model).run(None, feed, intermediate=True)
    total, seen = 0, set()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, out = values[node.input[0]], values[node.output[0]]
            total += 2 * out.size * a.shape[-1]  # each output element is a dot product of length k
            seen.add(node.op_type)
    assert seen == ({"Gemm"} if isinstance(spec, MLP) else {"MatMul"}), seen
    return total / batch


@given(data=st.data())
def test_flops_equal_the_matrix_products_of_the_onnx_graph(data) -> None:
    """Random specs and granularities (Mix'n'Match, depth): the count is that of the graph's products."""
    spec = data.draw(specs(), "spec")
    sub, _ = extract(weights_for(spec, 0, "float32"), spec, data.draw(granularities(spec), "granularity"))
    seq_len = data.draw(st.integers(1, sub.max_len), "seq_len") if isinstance(sub, Transformer) else None
    assert flops(sub, seq_len) == _graph_flops(sub, seq_len or 1)


@pytest.mark.parametrize(
    "spec, seq_len, error, message",
    [
        (MLP(d_in=2, hidden=(3,), d_out=1), 4, OptionError, "seq_len is for a Transformer"),
        (Transformer(vocab_size=3, max_len=4, d_model=2, n_layers=1, n_heads=1), 5, OptionError, r"\[1, max_len=4\]; got 5"),
        (Transformer(vocab_size=3, max_len=4, d_model=2, n_layers=1, n_heads=1), 0, OptionError, "seq_len must be an integer >= 1"),
        (Transformer(vocab_size=3, max_len=4, d_model=2, n_layers=1, n_heads=1), 2.0, OptionError, "seq_len must be an integer"),
        ({"family": "mlp"}, None, InputTypeError, "spec must be a matta.MLP or matta.Transformer"),
    ],
    ids=["mlp-seq-len", "too-long", "zero", "float", "not-a-spec"],
)
def test_invalid_arguments_are_matta_errors(spec, seq_len, error, message) -> None:
    with pytest.raises(error, match=message):
        flops(spec, seq_len)
