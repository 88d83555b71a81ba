"""The compute cost of a forward pass, from the spec alone.

:func:`flops` counts the floating-point operations of the matrix products, two
per multiply-add, which is the usual way to compare model sizes: the cost of
norms, activations, softmax and additions grows with the activations' size, not
with the weights', and is left out.
"""

from __future__ import annotations

from typing import Any, Optional

from matta.errors import OptionError, integer
from matta.specs import MLP, Spec, check_spec

__all__ = ["flops"]


def flops(spec: Spec, seq_len: Optional[int] = None) -> int:
    """Floating-point operations (2 per multiply-add) of one forward pass of the plain model ``spec``.

    MLP, per example, over the widths ``w = [d_in, *hidden, d_out]``:
    ``sum_i 2 * w[i] * w[i + 1]``.

    Transformer, per sequence of ``T = seq_len`` tokens, with ``D = d_model``, ``V = vocab_size``
    and per block ``H`` heads of width ``d_head`` (``A = H * d_head``) and ``F = d_ff``:
    ``sum_blocks [2T·D·3A (query, key, value) + 2T·T·A (scores) + 2T·T·A (weighted sum)
    + 2T·A·D (output projection) + 2T·D·F·2 (FFN up and down)] + 2T·D·V (head)``.
    The attention terms count the whole ``T x T`` score matrix, as a dense causal attention
    computes it (masking half of it afterwards).

    Not counted: biases, LayerNorms, activations, softmax, the causal mask, the ``1/sqrt(d_head)``
    scaling, residual additions and embedding lookups.

    For a sub-network, pass its spec (``plan(spec, g).spec``, or the spec :func:`matta.extract`
    returns).

    Args:
        spec: a matta spec.
        seq_len: Transformer only: the sequence length, ``1 <= seq_len <= max_len``; default ``max_len``.

    Returns:
        The count, an ``int``.
    """
    spec = check_spec(spec)
    if isinstance(spec, MLP):
        if seq_len is not None:
            raise OptionError(f"seq_len is for a Transformer; an MLP counts per example, so it must be None; got {seq_len!r}")
        widths = [spec.d_in, *spec.hidden, spec.d_out]
        return sum(2 * a * b for a, b in zip(widths, widths[1:]))
    t = _seq_len(spec.max_len if seq_len is None else seq_len, spec.max_len)
    d = spec.d_model
    total = 2 * t * d * spec.vocab_size  # head
    for heads, ff in zip(spec.heads_per_layer, spec.ff_per_layer):
        a = heads * spec.d_head
        total += 2 * t * d * 3 * a  # query, key and value projections
        total += 2 * 2 * t * t * a  # scores q·k and the probability-weighted sum of values
        total += 2 * t * a * d  # output projection
        total += 2 * 2 * t * d * ff  # FFN up and down
    return total


def _seq_len(value: Any, max_len: int) -> int:
    integer("seq_len", value, 1)
    if value > max_len:
        raise OptionError(f"seq_len must be an integer in [1, max_len={max_len}]; got {value!r}")
    return int(value)
