"""The numpy reference forward pass: the executable form of the slicing rules.

``forward(spec, weights, x, granularity)`` is, by construction, the plain model
of the core's plan for ``(spec, g)`` applied to the weights it reads (rule
S1). Every backend's nested forward and every extracted model is judged against
it in ``spec_tests``. It favours clarity over speed.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from matta.inputs import check_x
from matta.nesting import GranularityLike, plan, resolve
from matta.specs import MLP, Spec, Transformer
from matta.weights import check_weights

__all__ = ["forward", "plain_forward", "activation", "layer_norm", "causal_attention"]


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """The activations of :data:`matta.specs.ACTIVATIONS`; ``gelu`` is GPT-2's tanh approximation."""
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        c = np.asarray(math.sqrt(2.0 / math.pi), x.dtype)
        return 0.5 * x * (1 + np.tanh(c * (x + np.asarray(0.044715, x.dtype) * x**3)))
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if name == "silu":
        return x / (1 + np.exp(-x))
    raise AssertionError(f"unknown activation {name!r}")  # specs validate this first


def layer_norm(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, epsilon: float) -> np.ndarray:
    """Rule S3: LayerNorm over the last axis, which is the *active prefix* of a sliced ``d_model``."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.asarray(epsilon, x.dtype)) * scale + offset


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, d_head: int) -> np.ndarray:
    """Causal multi-head attention on projected ``q, k, v`` of shape ``(batch, time, heads * d_head)``."""
    b, t, _ = q.shape
    split = lambda a: a.reshape(b, t, num_heads, d_head).transpose(0, 2, 1, 3)  # noqa: E731 (B, H, T, Dh)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / np.asarray(math.sqrt(d_head), q.dtype)  # (B, H, T, T)
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, num_heads * d_head)  # (B, T, H*Dh)


def plain_forward(spec: Spec, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Forward pass of the full (unsliced) model ``spec`` with ``weights``."""
    w = weights
    if isinstance(spec, MLP):
        h = x.astype(w["layers.0.kernel"].dtype, copy=False)
        for i in range(spec.num_layers):
            h = h @ w[f"layers.{i}.kernel"] + w[f"layers.{i}.bias"]
            if i < spec.num_layers - 1:
                h = activation(spec.activation, h)
        return h  # (batch, d_out)

    assert isinstance(spec, Transformer)
    t = x.shape[1]
    h = w["embed.tokens"][x] + w["embed.positions"][:t]  # (B, T, d_model)
    eps = spec.layer_norm_epsilon
    for i, heads in enumerate(spec.heads_per_layer):
        p = f"blocks.{i}"
        a = layer_norm(h, w[f"{p}.norm1.scale"], w[f"{p}.norm1.offset"], eps)
        q, k, v = (a @ w[f"{p}.attention.{n}.kernel"] + w[f"{p}.attention.{n}.bias"] for n in ("query", "key", "value"))
        h = h + causal_attention(q, k, v, heads, spec.d_head) @ w[f"{p}.attention.output.kernel"] + w[
            f"{p}.attention.output.bias"
        ]
        a = layer_norm(h, w[f"{p}.norm2.scale"], w[f"{p}.norm2.offset"], eps)
        a = activation("gelu", a @ w[f"{p}.ffn.up.kernel"] + w[f"{p}.ffn.up.bias"])
        h = h + a @ w[f"{p}.ffn.down.kernel"] + w[f"{p}.ffn.down.bias"]
    h = layer_norm(h, w["final_norm.scale"], w["final_norm.offset"], eps)
    # Rule P3: a tied head is the token embedding transposed (its d_model prefix under rule S1).
    head = w["embed.tokens"].T if spec.tie_embeddings else w["head.kernel"]
    return h @ head  # (B, T, vocab)


def forward(spec: Spec, weights: Mapping[str, np.ndarray], x: np.ndarray, granularity: GranularityLike = 1.0) -> np.ndarray:
    """The reference output of the sub-network at ``granularity`` (rules S1–S4, D1–D2).

    Args:
        spec: the full model's spec.
        weights: the full model's weights (numpy, rule P2 layout).
        x: MLP: features ``(batch, d_in)``; Transformer: token ids ``(batch, time)``.
        granularity: any form of rule G1; default the full model.

    Returns:
        MLP: ``(batch, d_out)``; Transformer: logits ``(batch, time, vocab_size)``.
        The dtype is the weights' dtype.
    """
    weights = check_weights(spec, weights)
    x = check_x(spec, x)
    g = resolve(spec, granularity)
    # Contiguous copies: numpy's matmul takes another code path for strided views, and the
    # reference must give the same bits as the plain model of the extracted weights.
    p = plan(spec, g)
    return plain_forward(p.spec, p.read(weights, lambda w, r: np.ascontiguousarray(w[r.slices])), x)
