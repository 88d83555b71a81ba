"""PyTorch modules: the plain models of each family, and their nested (call-time sliced) forms.

The plain modules hold ordinary ``nn.Linear``/``nn.LayerNorm``/``nn.Embedding``
parameters (what an extracted Student is, with the usual state-dict names) and
their ``forward`` is the family's function of :mod:`matta.backends.torch.functional`
over those parameters. The nested modules subclass them and add
``forward(x, granularity)``: the same function of the sub-network's spec, over
the weights read through the core's plan (:func:`matta.nesting.plan`, rule S1).
That is why an extracted Student equals the nested sub-network bit for bit.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from matta.backends.torch import functional
from matta.nesting import Granularity, Plan, Read, plan, shared_first_layer
from matta.specs import MLP, Spec, Transformer


def torch_name(name: str) -> tuple[str, bool]:
    """Maps a core parameter name (rule P2) to the module's state-dict key; True if transposed."""
    if name in ("embed.tokens", "embed.positions"):
        return name + ".weight", False
    base, leaf = name.rsplit(".", 1)
    return {"kernel": (base + ".weight", True), "bias": (name, False), "scale": (base + ".weight", False),
            "offset": (base + ".bias", False)}[leaf]


def take(weight: torch.Tensor, read: Read) -> torch.Tensor:
    """Executes one read of the core's plan (rule S1) on a parameter in torch layout.

    A kernel is stored ``(out, in)``, so it takes the plan's slices in reverse order.
    A whole read is the parameter itself. A sliced read is made contiguous.

    Why contiguous: a column-sliced view has a row stride larger than its width,
    and for some shapes PyTorch's CPU GEMM then takes another kernel whose
    float32 sums round differently (seen: 1 ulp on a 4x5 slice of a 4x6 weight).
    The copy makes the nested forward run the exact kernel the extracted plain
    model runs. It costs one Student-sized copy per call and is free when the
    slice is already contiguous (row prefixes); autograd flows through it to
    the TA's weight.
    """
    if read.whole:
        return weight
    _, transposed = torch_name(read.source)
    return weight[read.slices[::-1] if transposed else read.slices].contiguous()


class _SpecModule(nn.Module):
    """A module that holds one parameter per spec parameter and hands them out by spec name."""

    def _bind(self, spec: Spec) -> None:
        self.spec = spec
        # spec name -> (owning submodule, attribute): resolved at call time, so the mapping follows
        # parameters that ``to_empty``, ``to`` or ``load_state_dict(assign=True)`` replace.
        slots = {}
        for name in spec.parameters():
            path, attr = torch_name(name)[0].rsplit(".", 1)
            slots[name] = (self.get_submodule(path), attr)
        self._slots = slots

    def weight(self, name: str) -> torch.Tensor:
        """The parameter of spec name ``name`` in torch layout, as the module holds it now."""
        owner, attr = self._slots[name]
        return getattr(owner, attr)

    def weights(self) -> dict[str, torch.Tensor]:
        """``{spec parameter name: parameter}`` in torch layout (kernels ``(out, in)``), no copies."""
        return {name: getattr(owner, attr) for name, (owner, attr) in self._slots.items()}


class _Reads(Mapping[str, torch.Tensor]):
    """The weights a plan reads (rule S1), each read when the forward asks for it.

    Reading at use, not up front, makes a block's reads see the parameters its module holds
    while it runs: FSDP2 gathers a sharded block's parameters only around the block's call.
    """

    def __init__(self, module: _SpecModule, p: Plan):
        self._module = module
        self._reads = {r.name: r for r in p.reads}

    def __getitem__(self, name: str) -> torch.Tensor:
        r = self._reads[name]
        return take(self._module.weight(r.source), r)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reads)

    def __len__(self) -> int:
        return len(self._reads)


# ----------------------------------------------------------------------------- MLP
class PlainMLP(_SpecModule):
    """A plain MLP: ``Linear -> activation`` per hidden layer, then an output ``Linear``."""

    def __init__(self, spec: MLP):
        super().__init__()
        widths = [spec.d_in, *spec.hidden, spec.d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self._bind(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.mlp(self.spec, self.weights(), x)  # (batch, d_out)


class NestedMLP(PlainMLP):
    """The TA MLP; ``forward(x, granularity)`` runs the sub-network (rules S1, S4)."""

    def forward(self, x: torch.Tensor, granularity: Optional[Granularity] = None) -> torch.Tensor:  # type: ignore[override]
        if granularity is None:
            return super().forward(x)
        p = plan(self.spec, granularity)
        return functional.mlp(p.spec, p.read(self.weights(), take), x)

    def forward_many(self, x: torch.Tensor, granularities: Sequence[Granularity]) -> list[torch.Tensor]:
        """The sub-networks' outputs at several granularities on one input, sharing the first layer.

        Every granularity's first layer is a prefix of the widest one's over the same input
        (:func:`matta.nesting.shared_first_layer`), so that layer is computed once and each
        granularity reads its own columns of it; autograd sums the granularities' gradients
        there, so the backward pass also does one weight-gradient matmul for that layer. Same
        math as one :meth:`forward` per granularity (the activation is elementwise); the float32
        sums may round differently, so extraction's bit-exactness is stated for :meth:`forward`.

        Args:
            x: features ``(batch, d_in)``.
            granularities: resolved granularities of ``self.spec``.

        Returns:
            One ``(batch, d_out)`` output per granularity, in order.
        """
        shared = shared_first_layer(self.spec, granularities)
        w = self.weights()
        first = {r.name: take(w[r.source], r) for r in (shared.kernel, shared.bias)}
        h = functional.mlp(self.spec, first, x, stop=1)  # (batch, widest first hidden width)
        outputs = []
        for g, columns in zip(granularities, shared.columns):
            p = plan(self.spec, g)
            rest = {r.name: take(w[r.source], r) for r in p.reads if r.name not in first}
            # The widest term reads h whole: a no-op slice would still cost a gradient scatter.
            outputs.append(functional.mlp(p.spec, rest, h if columns == slice(None) else h[:, columns], start=1))
        return outputs


# ----------------------------------------------------------------------------- Transformer
class Attention(nn.Module):
    """Projections of one attention layer (separate q, k, v so heads slice as prefixes, rule S2)."""

    def __init__(self, d_model: int, inner: int):
        super().__init__()
        self.query = nn.Linear(d_model, inner)
        self.key = nn.Linear(d_model, inner)
        self.value = nn.Linear(d_model, inner)
        self.output = nn.Linear(inner, d_model)


class FeedForward(nn.Module):
    """``up -> GELU -> down``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)


class Block(nn.Module):
    """The parameters of a pre-LayerNorm residual block (run by :func:`functional.block`).

    ``block(run, h)`` returns ``run(h)``: the nested forward calls each kept block's module,
    so hooks registered on it (FSDP2's per-block gather and reshard) run around its work.
    With ``recompute``, the block keeps only its input for the backward pass and runs
    again there (activation checkpointing), inside those hooks.
    """

    def __init__(self, d_model: int, inner: int, d_ff: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.attention = Attention(d_model, inner)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.ffn = FeedForward(d_model, d_ff)

    def forward(self, run, h: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        if recompute and torch.is_grad_enabled():
            return checkpoint(run, h, use_reentrant=False)
        return run(h)


class Embeddings(nn.Module):
    """Learned token and position embeddings."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)


class PlainTransformer(_SpecModule):
    """A plain GPT-2-style decoder (per-block heads and FFN widths allowed).

    A tied spec (rule P3) has no ``head`` module: the forward multiplies by
    ``embed.tokens.weight``, so the model holds one parameter for both uses and
    ``torch.export`` sees it once.
    """

    def __init__(self, spec: Transformer):
        super().__init__()
        eps = spec.layer_norm_epsilon
        self.embed = Embeddings(spec.vocab_size, spec.max_len, spec.d_model)
        self.blocks = nn.ModuleList(
            Block(spec.d_model, h * spec.d_head, f, eps) for h, f in zip(spec.heads_per_layer, spec.ff_per_layer)
        )
        self.final_norm = nn.LayerNorm(spec.d_model, eps=eps)
        if not spec.tie_embeddings:  # a tied head is the token embedding's own parameter (rule P3)
            self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        self._bind(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.transformer(self.spec, self.weights(), x)  # (B, T, vocab)


class NestedTransformer(PlainTransformer):
    """The TA transformer; ``forward(x, granularity)`` runs the sub-network (rules S1–S4, D1–D2).

    Attributes:
        recompute_blocks: recompute each block's activations in the backward pass instead of
            keeping them (the ``recompute_blocks`` fit option): a step then holds one block's
            activations per term plus each block's input, for long sequences.
    """

    recompute_blocks = False

    def forward(self, x: torch.Tensor, granularity: Optional[Granularity] = None) -> torch.Tensor:  # type: ignore[override]
        if granularity is None:
            return super().forward(x)
        p = plan(self.spec, granularity)
        return functional.transformer(p.spec, _Reads(self, p), x, call=lambda i, run, h: self.blocks[p.blocks[i]](run, h, self.recompute_blocks))

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
