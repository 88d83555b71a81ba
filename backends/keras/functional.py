"""The Keras functional forward of each model family, and the ``keras.ops`` functions it is made of.

:func:`mlp` and :func:`transformer` compute a model of ``spec`` from a mapping of its
weights (spec parameter names, rule P2 layout: kernels ``(d_in, d_out)``, Keras' own).
Every size comes from ``spec``. The nested TA calls them with the sub-network's spec
``plan(spec, g).spec`` and the weights the plan reads (rule S1), so no slice bound is
computed here.

Each family is defined once, by :func:`mlp_graph` and :func:`transformer_graph`, over a
:class:`Layers`: how each named layer computes. :class:`WeightLayers` runs the op
functions below on a weights mapping; the plain model
(:func:`matta.backends.keras.models.plain_model`) passes one that makes built-in Keras
layers instead. Each op function is the exact op sequence of the built-in layer it
stands for (see the Keras source of ``Dense.call``, ``LayerNormalization.call``,
``Embedding.call`` and ``Reshape.call``), and the op nodes of the plain graph
(attention, GELU, positions, residual adds) are the *same* functions called on
symbolic tensors. That is why an extracted model equals the nested sub-network bit
for bit wherever the engine runs the same kernels on the same shapes (see
``docs/backends/keras-exactness.md``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Protocol

from keras import ops
from keras.backend import standardize_dtype

from matta.specs import MLP, Transformer
from matta.backends.keras import engine

__all__ = [
    "Layers",
    "WeightLayers",
    "mlp",
    "mlp_graph",
    "transformer",
    "transformer_graph",
    "dense",
    "layer_norm",
    "embedding",
    "positions",
    "split_heads",
    "merge_heads",
    "activation",
    "attention",
]

_GELU_C = math.sqrt(2.0 / math.pi)


# ------------------------------------------------------------------ the ops


def dense(x, kernel, bias=None):
    """``keras.layers.Dense.call`` without activation: ``x @ kernel + bias`` (rule P2)."""
    x = ops.matmul(x, kernel)
    if bias is not None:
        x = ops.add(x, bias)
    return x


def layer_norm(x, scale, offset, epsilon: float, dtype: str):
    """``keras.layers.LayerNormalization.call`` over the last axis (rule S3: the active prefix)."""
    # The built layer turns axis=-1 into [-1]; passing the same value keeps the same code path.
    return ops.cast(ops.layer_normalization(x, scale, offset, [-1], epsilon, rms_scaling=False), dtype)


def embedding(table, ids, dtype: str):
    """``keras.layers.Embedding.call``: a row gather."""
    if ids.dtype != "int32" and ids.dtype != "int64":
        ids = ops.cast(ids, "int32")
    return ops.cast(ops.take(table, ids, axis=0), dtype)


def positions(ids):
    """Position ids ``0..T-1`` per row, built from the token ids so the graph needs no custom layer."""
    return ops.cumsum(ops.ones_like(ids), axis=1) - 1


def split_heads(x, heads: int, d_head: int):
    """``keras.layers.Reshape((-1, heads, d_head))``: ``(batch, time, heads * d_head)`` to per-head."""
    return ops.reshape(x, (ops.shape(x)[0], -1, heads, d_head))


def merge_heads(x, width: int):
    """``keras.layers.Reshape((-1, width))``: the heads back side by side."""
    return ops.reshape(x, (ops.shape(x)[0], -1, width))


def activation(name: str, x):
    """The activations of ``matta.specs.ACTIVATIONS`` (``gelu`` is GPT-2's tanh form)."""
    if name == "relu":
        return ops.relu(x)
    if name == "gelu":
        if standardize_dtype(x.dtype) == "float64":
            # Written out: TensorFlow's gelu rounds its constants to float32 (about 1e-9 error in
            # float64; float64 runs only on TensorFlow). Same formula as matta.reference.activation.
            return 0.5 * x * (1.0 + ops.tanh(_GELU_C * (x + 0.044715 * (x * x * x))))
        # One op: a fused kernel on torch, one jitted function on JAX, and one node (not seven) in
        # the extracted graph, which an eager functional call pays per node. The nested forward
        # calls this same function, so the two forms still run the same kernels.
        return ops.gelu(x, approximate=True)
    if name == "tanh":
        return ops.tanh(x)
    if name == "sigmoid":
        return ops.sigmoid(x)
    assert name == "silu", name
    return ops.silu(x)


def attention(q, k, v):
    """Causal attention on ``(batch, time, heads, d_head)`` tensors; scale ``1/sqrt(d_head)``.

    ``keras.ops.dot_product_attention`` is the engine's own fused kernel (PyTorch's
    ``scaled_dot_product_attention``, ``jax.nn.dot_product_attention``, a TF
    composition), the same one the extracted graph calls.
    """
    return ops.dot_product_attention(q, k, v, is_causal=True)


# The op, for the Layers methods whose keyword is named ``activation``.
_activate = activation


# ------------------------------------------------------------------ the families


def mlp(spec: MLP, weights: Mapping[str, Any], x: Any, dtype: str, start: int = 0, stop: Optional[int] = None):
    """The MLP of ``spec`` on ``weights``: dense layers ``start`` to ``stop - 1`` (all by default).

    Args:
        spec: the (sub-)network's spec; every width comes from it.
        weights: ``layers.{i}.kernel`` ``(d_in, d_out)`` and ``layers.{i}.bias`` for the layers run.
        x: ``(batch, d_in)`` features, or layer ``start``'s input when ``start > 0``.
        dtype: the compute dtype (the family forwards share one signature).
        start: first dense layer to run (the nested TA computes layer 0 once for several
            granularities and feeds each one's columns to ``start=1``).
        stop: one past the last dense layer to run.
    """
    return mlp_graph(spec, x, WeightLayers(weights, dtype), start, stop)


def transformer(spec: Transformer, weights: Mapping[str, Any], ids: Any, dtype: str):
    """The GPT-2-style Transformer of ``spec`` on ``weights``: logits ``(batch, time, vocab)``.

    Args:
        spec: the (sub-)network's spec; every size comes from it.
        weights: every parameter of ``spec.parameters()``, rule P2 layout.
        ids: int32 token ids ``(batch, time)``.
        dtype: the compute dtype.
    """
    return transformer_graph(spec, ids, WeightLayers(weights, dtype))


def mlp_graph(spec: MLP, x, layers: Layers, start: int = 0, stop: Optional[int] = None):
    """The MLP's definition over ``layers``: ``[dense -> activation] * len(hidden) -> dense``."""
    widths = [*spec.hidden, spec.d_out]
    stop = spec.num_layers if stop is None else stop
    h = x
    for i in range(start, stop):
        hidden = i < spec.num_layers - 1
        h = layers.dense(f"layers.{i}", h, widths[i], activation=spec.activation if hidden else None)
    return h


def transformer_graph(spec: Transformer, ids, layers: Layers):
    """The Transformer's definition over ``layers``: embeddings, pre-norm blocks, final norm, head."""
    eps, d_head = spec.layer_norm_epsilon, spec.d_head
    h = layers.embedding("embed.tokens", ids, spec.vocab_size, spec.d_model)
    h = h + layers.embedding("embed.positions", positions(ids), spec.max_len, spec.d_model)
    for i, (heads, ff) in enumerate(zip(spec.heads_per_layer, spec.ff_per_layer)):
        p = f"blocks.{i}"
        inner = heads * d_head  # rule G4: whole heads
        a = layers.layer_norm(f"{p}.norm1", h, eps)
        q, k, v = (
            layers.split_heads(f"{p}.attention.{n}_heads", layers.dense(f"{p}.attention.{n}", a, inner), heads, d_head)
            for n in ("query", "key", "value")
        )
        y = layers.merge_heads(f"{p}.attention.merge", attention(q, k, v), inner)
        h = h + layers.dense(f"{p}.attention.output", y, spec.d_model)
        a = layers.layer_norm(f"{p}.norm2", h, eps)
        a = layers.dense(f"{p}.ffn.up", a, ff, activation="gelu")
        h = h + layers.dense(f"{p}.ffn.down", a, spec.d_model)
    h = layers.layer_norm("final_norm", h, eps)
    if spec.tie_embeddings:  # rule P3: the head is the token table transposed
        return layers.tied_head("head", "embed.tokens", h, spec.vocab_size)
    return layers.dense("head", h, spec.vocab_size, bias=False)  # outputs never sliced (rule S4)


class Layers(Protocol):
    """How a family definition computes each named layer (``name``: the spec's parameter prefix).

    Sizes are the spec's; a layer over given weights reads them from its weights instead.
    """

    def dense(self, name: str, x, units: int, *, bias: bool = True, activation: Optional[str] = None): ...

    def layer_norm(self, name: str, x, epsilon: float): ...

    def embedding(self, name: str, ids, rows: int, width: int): ...

    def tied_head(self, name: str, table: str, x, units: int):
        """The head ``name`` of a tied spec: ``x @ table.T`` for the embedding ``table`` (rule P3)."""
        ...

    def split_heads(self, name: str, x, heads: int, d_head: int): ...

    def merge_heads(self, name: str, x, width: int): ...


class WeightLayers:
    """:class:`Layers` over a mapping of weights: each layer is its op function above on its named weights."""

    def __init__(self, weights: Mapping[str, Any], dtype: str):
        self.weights = weights
        self.dtype = dtype

    def dense(self, name: str, x, units: int, *, bias: bool = True, activation: Optional[str] = None):
        h = dense(x, self.weights[f"{name}.kernel"], self.weights[f"{name}.bias"] if bias else None)
        return h if activation is None else _activate(activation, h)

    def layer_norm(self, name: str, x, epsilon: float):
        return layer_norm(x, self.weights[f"{name}.scale"], self.weights[f"{name}.offset"], epsilon, self.dtype)

    def embedding(self, name: str, ids, rows: int, width: int):
        return embedding(self.weights[name], ids, self.dtype)

    def tied_head(self, name: str, table: str, x, units: int):
        return dense(x, engine.current().transposed(self.weights[table]))

    def split_heads(self, name: str, x, heads: int, d_head: int):
        return split_heads(x, heads, d_head)

    def merge_heads(self, name: str, x, width: int):
        return merge_heads(x, width)
