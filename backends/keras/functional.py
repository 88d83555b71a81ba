"""The few ``keras.ops`` computations both model forms share.

An extracted Student is a functional ``keras.Model`` of built-in layers
(``Dense``, ``LayerNormalization``, ``Embedding``, ``Reshape``) plus a few
``keras.ops`` nodes; the nested TA runs its sliced weights through the
functions below. Each function is the exact op sequence of the built-in layer it
stands for (see the Keras source of ``Dense.call``, ``LayerNormalization.call``
and ``Embedding.call``), and the op nodes (attention, GELU, positions) are the
*same* functions called on symbolic tensors. That is why an extracted Student
equals the nested sub-network bit for bit wherever the engine runs the same
kernels on the same shapes (see ``docs/backends/keras-exactness.md``).
"""

from __future__ import annotations

import math

from keras import ops
from keras.backend import standardize_dtype

_GELU_C = math.sqrt(2.0 / math.pi)


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
