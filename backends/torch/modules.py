"""PyTorch modules: the plain models of each family, and their nested (call-time sliced) forms.

The plain modules are ordinary ``nn.Linear``/``nn.LayerNorm``/``nn.Embedding``
stacks: what an extracted Student is. The nested modules subclass them and add
``forward(x, granularity)``, which reads every weight through the core's slice
plan (rule S1) and then runs *the same functional ops* the plain module runs
(``F.linear``, ``F.layer_norm``, ``F.embedding``, the shared attention) — which
is why an extracted Student equals the nested sub-network bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from matta.nesting import Granularity
from matta.specs import MLP, Spec, Transformer


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


def prefix(weight: torch.Tensor, rows: int, cols: Optional[int] = None) -> torch.Tensor:
    """Rule S1: the ``[:rows, :cols]`` prefix of a weight, made contiguous.

    Why contiguous: a column-sliced view has a row stride larger than its width,
    and for some shapes PyTorch's CPU GEMM then takes another kernel whose
    float32 sums round differently (seen: 1 ulp on a 4x5 slice of a 4x6 weight).
    The copy makes the nested forward run the exact kernel the extracted plain
    model runs. It costs one Student-sized copy per call and is free when the
    slice is already contiguous (row prefixes, the full TA); autograd flows
    through it to the TA's weight.
    """
    w = weight[:rows] if cols is None else weight[:rows, :cols]
    return w.contiguous()


# ----------------------------------------------------------------------------- MLP
class PlainMLP(nn.Module):
    """A plain MLP: ``Linear -> activation`` per hidden layer, then an output ``Linear``."""

    def __init__(self, spec: MLP):
        super().__init__()
        widths = [spec.d_in, *spec.hidden, spec.d_out]
        self.activation = spec.activation
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = activation(self.activation, x)
        return x  # (batch, d_out)


class NestedMLP(PlainMLP):
    """The TA MLP; ``forward(x, granularity)`` runs the sub-network (rules S1, S4)."""

    def __init__(self, spec: MLP):
        super().__init__(spec)
        self.spec = spec

    def forward(self, x: torch.Tensor, granularity: Optional[Granularity] = None) -> torch.Tensor:  # type: ignore[override]
        if granularity is None:
            return super().forward(x)
        return self.forward_many(x, (granularity,))[0]

    def forward_many(self, x: torch.Tensor, granularities: Sequence[Granularity]) -> list[torch.Tensor]:
        """The sub-networks' outputs at several granularities on one input, sharing the first layer.

        Every granularity reads the first layer's rows as a prefix of the same full-width input,
        so ``activation(x @ W0[:n].T + b0[:n])`` at the widest ``n`` holds each granularity's first
        hidden layer as a column prefix: it is computed once and sliced, and autograd sums the
        granularities' gradients there, so the backward pass also does one weight-gradient matmul
        for that layer. Same math as one :meth:`forward` per granularity (the activation is
        elementwise); the float32 sums may round differently, so extraction's bit-exactness is
        stated for :meth:`forward`, which calls this with one granularity (no slice then).

        Args:
            x: features ``(batch, d_in)``.
            granularities: resolved granularities of ``self.spec``.

        Returns:
            One ``(batch, d_out)`` output per granularity, in order.
        """
        widths = [self._widths(g) for g in granularities]
        widest = max(w[1] for w in widths)
        h = self._layer(0, x, self.spec.d_in, widest)  # (batch, widest)
        # The widest term reads h whole: a no-op slice would still cost a gradient scatter.
        return [self._layers_from(1, h if w[1] == widest else h[:, : w[1]], w) for w in widths]

    def _widths(self, granularity: Granularity) -> list[int]:
        sizes = granularity.as_dict()
        return [self.spec.d_in, *(sizes[f"hidden.{i}"] for i in range(len(self.spec.hidden))), self.spec.d_out]

    def _layer(self, i: int, x: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
        """Layer ``i`` on its ``(d_out, d_in)`` weight prefix, then the activation unless it is the output layer."""
        layer = self.layers[i]
        x = F.linear(x, prefix(layer.weight, d_out, d_in), layer.bias[:d_out])
        return activation(self.activation, x) if i < len(self.layers) - 1 else x

    def _layers_from(self, start: int, x: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
        for i in range(start, len(self.layers)):
            x = self._layer(i, x, widths[i], widths[i + 1])
        return x


# ----------------------------------------------------------------------------- Transformer
class Attention(nn.Module):
    """Projections of one attention layer (separate q, k, v so heads slice as prefixes)."""

    def __init__(self, d_model: int, num_heads: int, d_head: int):
        super().__init__()
        inner = num_heads * d_head
        self.num_heads, self.d_head = num_heads, d_head
        self.query = nn.Linear(d_model, inner)
        self.key = nn.Linear(d_model, inner)
        self.value = nn.Linear(d_model, inner)
        self.output = nn.Linear(inner, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = causal_attention(self.query(x), self.key(x), self.value(x), self.num_heads, self.d_head)
        return self.output(y)


class FeedForward(nn.Module):
    """``up -> GELU -> down``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(activation("gelu", self.up(x)))


class Block(nn.Module):
    """A pre-LayerNorm residual block."""

    def __init__(self, d_model: int, num_heads: int, d_head: int, d_ff: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.attention = Attention(d_model, num_heads, d_head)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.ffn = FeedForward(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Embeddings(nn.Module):
    """Learned token and position embeddings."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x) + self.positions.weight[: x.shape[1]]


class PlainTransformer(nn.Module):
    """A plain GPT-2-style decoder (per-block heads and FFN widths allowed)."""

    def __init__(self, spec: Transformer):
        super().__init__()
        eps = spec.layer_norm_epsilon
        self.embed = Embeddings(spec.vocab_size, spec.max_len, spec.d_model)
        self.blocks = nn.ModuleList(
            Block(spec.d_model, h, spec.d_head, f, eps) for h, f in zip(spec.heads_per_layer, spec.ff_per_layer)
        )
        self.final_norm = nn.LayerNorm(spec.d_model, eps=eps)
        self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, d_model)
        for block in self.blocks:
            h = block(h)
        return self.head(self.final_norm(h))  # (B, T, vocab)


class NestedTransformer(PlainTransformer):
    """The TA transformer; ``forward(x, granularity)`` runs the sub-network (rules S1–S4, D1–D2)."""

    def __init__(self, spec: Transformer):
        super().__init__(spec)
        self.spec = spec

    def forward(self, x: torch.Tensor, granularity: Optional[Granularity] = None) -> torch.Tensor:  # type: ignore[override]
        if granularity is None:
            return super().forward(x)
        s = granularity.as_dict()
        d = s["d_model"]
        eps = self.spec.layer_norm_epsilon
        d_head = self.spec.d_head
        norm = lambda m, h: F.layer_norm(h, (d,), prefix(m.weight, d), prefix(m.bias, d), eps)  # noqa: E731 - rule S3
        tokens = self.embed.tokens.weight
        h = F.embedding(x, prefix(tokens, tokens.shape[0], d)) + prefix(self.embed.positions.weight, x.shape[1], d)
        for i in granularity.blocks:  # rule D1: kept blocks, in order
            block = self.blocks[i]
            heads, ff = s[f"blocks.{i}.n_heads"], s[f"blocks.{i}.d_ff"]
            inner = heads * d_head  # rule G4: whole heads
            att = block.attention
            a = norm(block.norm1, h)
            q, k, v = (F.linear(a, prefix(p.weight, inner, d), p.bias[:inner]) for p in (att.query, att.key, att.value))
            y = causal_attention(q, k, v, heads, d_head)
            h = h + F.linear(y, prefix(att.output.weight, d, inner), att.output.bias[:d])
            a = norm(block.norm2, h)
            a = activation("gelu", F.linear(a, prefix(block.ffn.up.weight, ff, d), block.ffn.up.bias[:ff]))
            h = h + F.linear(a, prefix(block.ffn.down.weight, d, ff), block.ffn.down.bias[:d])
        h = norm(self.final_norm, h)
        return F.linear(h, prefix(self.head.weight, self.head.weight.shape[0], d))  # (B, T, vocab): outputs never sliced (rule S4)

    def forward_many(self, x: torch.Tensor, granularities: Sequence[Granularity]) -> list[torch.Tensor]:
        """One :meth:`forward` per granularity (the MLP's shared first layer has no counterpart worth it here).

        The embedding lookup is the only work every granularity could share, and it is a
        gather, a tiny part of a step (see ``docs/benchmarks.md``).
        """
        return [self.forward(x, g) for g in granularities]


def plain_module(spec: Spec) -> nn.Module:
    """An uninitialised plain module of ``spec`` (on the meta device; weights come from the caller)."""
    with torch.device("meta"):
        return PlainMLP(spec) if isinstance(spec, MLP) else PlainTransformer(spec)


def nested_module(spec: Spec) -> nn.Module:
    """An uninitialised nested module of ``spec`` (on the meta device)."""
    with torch.device("meta"):
        return NestedMLP(spec) if isinstance(spec, MLP) else NestedTransformer(spec)


def torch_name(name: str) -> tuple[str, bool]:
    """Maps a core parameter name (rule P2) to the module's state-dict key; True if transposed."""
    if name in ("embed.tokens", "embed.positions"):
        return name + ".weight", False
    base, leaf = name.rsplit(".", 1)
    return {"kernel": (base + ".weight", True), "bias": (name, False), "scale": (base + ".weight", False),
            "offset": (base + ".bias", False)}[leaf]


