"""The torch forward of each model family, as a function of a spec and a mapping of weights.

``mlp(spec, weights, x)`` and ``transformer(spec, weights, x)`` are the only
forward passes of the torch backend. The plain modules call them over their own
parameters; the nested modules call them with the sub-network's spec and the
weights read through the core's plan (rule S1), so the nested sub-network and
the extracted model run the same function on the same values.

Every size comes from ``spec``. ``weights`` maps the spec's parameter names
(rule P1) to tensors in torch layout: a kernel is ``(out, in)``, as
``nn.Linear.weight`` stores it (rule P2's ``(in, out)`` transposed), every other
parameter has its rule P2 shape. So a plain module passes its parameters with no
copy.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from matta.specs import MLP, Transformer

__all__ = ["mlp", "transformer", "activation", "causal_attention"]

Weights = Mapping[str, torch.Tensor]
#: How the transformer runs its block ``i`` on ``h``: ``call(i, run, h)`` returns ``run(h)``.
BlockCall = Callable[[int, Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activations of ``matta.specs.ACTIVATIONS`` (``gelu`` is the tanh form, as in GPT-2)."""
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    assert name == "silu", name
    return F.silu(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, d_head: int) -> torch.Tensor:
    """Causal multi-head attention on projected ``(batch, time, heads * d_head)`` tensors."""
    b, t, _ = q.shape
    q, k, v = (a.view(b, t, num_heads, d_head).transpose(1, 2) for a in (q, k, v))  # (B, H, T, Dh)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
    return y.transpose(1, 2).reshape(b, t, num_heads * d_head)  # (B, T, H*Dh)


def mlp(spec: MLP, weights: Weights, x: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """The dense layers ``start`` to ``stop - 1`` of the MLP ``spec`` (default: all of them).

    Args:
        spec: the model's spec (a sub-network's spec for a nested forward).
        weights: ``layers.{i}.kernel`` ``(out, in)`` and ``layers.{i}.bias`` for the layers run.
        x: features ``(batch, d_in)``, or, for ``start > 0``, the activated output of
            layer ``start - 1`` (how a first layer shared by several sub-networks feeds each).
        start: the first layer run.
        stop: one past the last layer run; ``None`` runs to the output layer.

    Returns:
        ``(batch, d_out)``, or the activated output of layer ``stop - 1``.
    """
    last = spec.num_layers - 1
    for i in range(start, spec.num_layers if stop is None else stop):
        x = F.linear(x, weights[f"layers.{i}.kernel"], weights[f"layers.{i}.bias"])
        if i < last:
            x = activation(spec.activation, x)
    return x


def layer_norm(spec: Transformer, weights: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    """The LayerNorm ``name`` over ``spec.d_model`` features (rule S3: a sub-network's active prefix)."""
    return F.layer_norm(x, (spec.d_model,), weights[f"{name}.scale"], weights[f"{name}.offset"], spec.layer_norm_epsilon)


def dense(weights: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    """The dense layer ``name``: ``x @ kernel + bias`` with the kernel stored ``(out, in)``."""
    return F.linear(x, weights[f"{name}.kernel"], weights[f"{name}.bias"])


def block(spec: Transformer, weights: Weights, i: int, h: torch.Tensor) -> torch.Tensor:
    """Pre-LayerNorm residual block ``i`` of ``spec``: causal attention, then the GELU feed-forward."""
    p = f"blocks.{i}"
    a = layer_norm(spec, weights, f"{p}.norm1", h)
    q, k, v = (dense(weights, f"{p}.attention.{n}", a) for n in ("query", "key", "value"))
    h = h + dense(weights, f"{p}.attention.output", causal_attention(q, k, v, spec.heads_per_layer[i], spec.d_head))
    a = layer_norm(spec, weights, f"{p}.norm2", h)
    return h + dense(weights, f"{p}.ffn.down", activation("gelu", dense(weights, f"{p}.ffn.up", a)))


def transformer(spec: Transformer, weights: Weights, x: torch.Tensor, call: Optional[BlockCall] = None) -> torch.Tensor:
    """The GPT-2-style decoder ``spec``.

    Args:
        spec: the model's spec (a sub-network's spec for a nested forward: its kept blocks
            renumbered ``0..n-1``, rule D2).
        weights: every parameter of ``spec``; ``head.kernel`` is ``(vocab, d_model)``. A tied
            spec has no ``head.kernel``: its head is ``embed.tokens`` (rule P3), which torch
            already stores ``(vocab, d_model)``.
        x: token ids ``(batch, time)`` with ``time <= spec.max_len``.
        call: runs each block; the nested module calls the block's own module with it, so
            hooks on that module (FSDP2's per-block unshard) run around the block. ``weights``
            is then read inside the call.

    Returns:
        Logits ``(batch, time, vocab_size)``.
    """
    h = F.embedding(x, weights["embed.tokens"]) + weights["embed.positions"][: x.shape[1]]  # (B, T, d_model)
    for i in range(spec.n_layers):
        h = block(spec, weights, i, h) if call is None else call(i, lambda a, i=i: block(spec, weights, i, a), h)
    h = layer_norm(spec, weights, "final_norm", h)
    head = weights["embed.tokens"] if spec.tie_embeddings else weights["head.kernel"]  # rule P3
    return F.linear(h, head)  # (B, T, vocab): the head has no bias
