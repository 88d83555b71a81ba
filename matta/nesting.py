"""Granularities and the nesting rules (spec rules G1–G4, N1, S1–S4, D1–D2).

A *granularity* says how large every nested dimension is in a sub-network.
Users write it in any of the forms of rule G1; :func:`resolve` turns every form
into one canonical :class:`Granularity`: an absolute size for every nested
dimension key of the spec (``hidden.0``, ``d_model``, ``blocks.3.d_ff``,
``blocks.3.n_heads``) plus the ordered tuple of kept blocks. Everything else in
matta (forward passes, extraction, loss sampling) consumes only that form.

The *slice plan* (:func:`slice_plan`) is the executable form of the slicing
rule S1: for every parameter of the sub-network, which full parameter it comes
from and the prefix slice of each axis. Nested forwards and extraction both
read weights through this one plan, which is why an extracted model equals the
nested sub-network.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar, Union

import numpy as np

from matta.errors import GranularityError, NestingError, describe
from matta.specs import MLP, Parameter, Spec, Transformer

__all__ = [
    "Granularity",
    "sample_mixnmatch",
    "GranularityLike",
    "resolve",
    "full",
    "is_nested",
    "check_chain",
    "sub_spec",
    "slice_plan",
    "Read",
    "Plan",
    "plan",
    "SharedFirstLayer",
    "shared_first_layer",
    "num_params",
    "round_size",
    "sample_between",
    "relative_to",
]

_EPS = 1e-9


@dataclass(frozen=True)
class Granularity:
    """A resolved granularity: the canonical form of rule G1.

    Attributes:
        sizes: ``(dim key, size)`` pairs for every nested dimension of the spec,
            sorted by key. Sizes count units (heads for ``n_heads``). A block
            that depth drops has size 0 on its per-block dimensions.
        blocks: indices of the kept residual blocks, ascending (Transformer);
            empty for the MLP, which has no residual blocks.
    """

    sizes: tuple[tuple[str, int], ...]
    blocks: tuple[int, ...] = ()

    def __getitem__(self, dim: str) -> int:
        for key, value in self.sizes:
            if key == dim:
                return value
        raise KeyError(dim)

    def as_dict(self) -> dict[str, int]:
        """The sizes as a plain ``{dim key: size}`` dict."""
        return dict(self.sizes)

    def to_dict(self, spec: Spec) -> dict[str, Any]:
        """The user-facing form (rule G1, absolute sizes) that :func:`resolve` maps back to ``self``."""
        s = self.as_dict()
        if isinstance(spec, MLP):
            return {"hidden": [s[f"hidden.{i}"] for i in range(len(spec.hidden))]}
        return {
            "d_model": s["d_model"],
            "layers": list(self.blocks),
            "n_heads": [s[f"blocks.{i}.n_heads"] for i in range(spec.n_layers)],
            "d_ff": [s[f"blocks.{i}.d_ff"] for i in range(spec.n_layers)],
        }


GranularityLike = Union[float, Mapping[str, Any], Granularity]


def _full_sizes(spec: Spec) -> dict[str, int]:
    """Full size of every nested dimension key (rule G2)."""
    if isinstance(spec, MLP):
        return {f"hidden.{i}": h for i, h in enumerate(spec.hidden)}
    sizes = {"d_model": spec.d_model}
    for i, (h, f) in enumerate(zip(spec.heads_per_layer, spec.ff_per_layer)):
        sizes[f"blocks.{i}.n_heads"] = h
        sizes[f"blocks.{i}.d_ff"] = f
    return sizes


def full(spec: Spec) -> Granularity:
    """The granularity of the whole model (the TA)."""
    blocks = tuple(range(spec.n_layers)) if isinstance(spec, Transformer) else ()
    return Granularity(tuple(sorted(_full_sizes(spec).items())), blocks)


def round_size(fraction: float, full_size: int, multiple_of: int = 1) -> int:
    """Rule G3: the size a fraction gives.

    The allowed sizes are the multiples of ``multiple_of`` up to ``full_size``,
    and ``full_size`` itself. The size is the allowed size nearest to
    ``fraction * full_size`` (ties round up), and at least
    ``min(multiple_of, full_size)``. So ``1.0`` is always the full size, every
    fraction keeps at least one unit, and the rule is monotone in ``fraction``
    (nested fractions give nested sizes).
    """
    assert 0 < fraction <= 1 and full_size >= 1 and multiple_of >= 1
    target = fraction * full_size
    low = multiple_of * math.floor(target / multiple_of + _EPS)
    high = min(low + multiple_of, full_size)
    k = high if target - low >= high - target - _EPS else low
    return max(min(multiple_of, full_size), min(k, full_size))


def _is_fraction(v: Any) -> bool:
    return isinstance(v, (float, np.floating))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _size(field: str, value: Any, full_size: int, multiple_of: int) -> int:
    """One size from a fraction (rounded, rule G3) or an absolute int (taken as is)."""
    if _is_fraction(value):
        if not (0.0 < float(value) <= 1.0) or math.isnan(value):
            raise GranularityError(f"{field} as a fraction must be in (0, 1]; got {value}")
        return round_size(float(value), full_size, multiple_of)
    if _is_int(value):
        if not 1 <= int(value) <= full_size:
            raise GranularityError(
                f"{field} as an absolute size must be an int in [1, {full_size}]; got {value}"
            )
        return int(value)
    raise GranularityError(
        f"{field} must be a fraction in (0, 1] (a float) or a size in [1, {full_size}] (an int); "
        f"got {value!r} ({type(value).__name__})"
    )


def _per_layer(
    field: str, value: Any, fulls: Sequence[int], multiple_of: int, dropped: Sequence[int] = ()
) -> list[int]:
    """A size per layer from one value or a list of one value per layer (Mix'n'Match, rule G1c).

    A list may give 0 for a block that depth drops (the form :meth:`Granularity.to_dict` writes).
    """
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != len(fulls):
            raise GranularityError(
                f"{field} as a per-layer list must have {len(fulls)} entries (one per layer); got {len(value)}"
            )
        return [
            0 if (i in dropped and _is_int(v) and v == 0) else _size(f"{field}[{i}]", v, f, multiple_of)
            for i, (v, f) in enumerate(zip(value, fulls))
        ]
    return [_size(f"{field}", value, f, multiple_of) for f in fulls]


def resolve(spec: Spec, granularity: GranularityLike) -> Granularity:
    """Turns any form of rule G1 into a :class:`Granularity` of ``spec``.

    Forms (rule G1):

    * a float in ``(0, 1]``: that fraction of every dimension in ``spec.nested``
      (rule G1a); the others stay full;
    * a mapping from dimension name to a fraction (float) or an absolute size
      (int) (rule G1b); dimensions it does not name stay full;
    * a mapping whose per-layer dimensions (``hidden``, ``d_ff``, ``n_heads``) take
      a list with one entry per layer: Mix'n'Match (rule G1c);
    * depth (Transformer, rule D1): ``n_layers`` keeps the first ``n`` blocks;
      ``layers`` keeps an explicit ascending list of block indices;
    * a :class:`Granularity` of this spec (checked and returned).

    Raises:
        GranularityError: for any form, name or size the spec does not allow.
    """
    if isinstance(granularity, Granularity):
        return _check_resolved(spec, granularity)
    if _is_fraction(granularity):
        if not 0.0 < float(granularity) <= 1.0:
            raise GranularityError(f"granularity as a fraction must be in (0, 1]; got {granularity}")
        return resolve(spec, {dim: float(granularity) for dim in spec.nested})
    if not isinstance(granularity, Mapping):
        raise GranularityError(
            "granularity must be a fraction in (0, 1], a dict of per-dimension sizes "
            f"(keys from {describe(_allowed_keys(spec))}) or a matta Granularity; "
            f"got {granularity!r} ({type(granularity).__name__})"
        )
    unknown = [k for k in granularity if k not in _allowed_keys(spec)]
    if unknown:
        raise GranularityError(
            f"unknown granularity key(s) {unknown} for {type(spec).__name__}; "
            f"allowed: {describe(_allowed_keys(spec))}"
        )
    m = spec.multiple_of
    if isinstance(spec, MLP):
        hidden = _per_layer("granularity.hidden", granularity.get("hidden", 1.0), spec.hidden, m)
        return Granularity(tuple(sorted((f"hidden.{i}", h) for i, h in enumerate(hidden))))

    # Transformer
    d_model = _size("granularity.d_model", granularity.get("d_model", 1.0), spec.d_model, m)
    blocks = _blocks(spec, granularity)
    dropped = [i for i in range(spec.n_layers) if i not in blocks]
    heads = _per_layer("granularity.n_heads", granularity.get("n_heads", 1.0), spec.heads_per_layer, 1, dropped)
    ff = _per_layer("granularity.d_ff", granularity.get("d_ff", 1.0), spec.ff_per_layer, m, dropped)
    sizes = {"d_model": d_model}
    for i in range(spec.n_layers):
        kept = i in blocks
        # Rule D2: a dropped block has no width at all, so nesting compares it as 0.
        sizes[f"blocks.{i}.n_heads"] = heads[i] if kept else 0
        sizes[f"blocks.{i}.d_ff"] = ff[i] if kept else 0
    return Granularity(tuple(sorted(sizes.items())), blocks)


def _allowed_keys(spec: Spec) -> tuple[str, ...]:
    return spec.nestable + (("layers",) if isinstance(spec, Transformer) else ())


def _blocks(spec: Transformer, granularity: Mapping[str, Any]) -> tuple[int, ...]:
    """Rule D1: the kept blocks, ascending."""
    if "layers" in granularity and "n_layers" in granularity:
        raise GranularityError("granularity may give n_layers or layers, not both")
    if "layers" in granularity:
        layers = granularity["layers"]
        if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(i) for i in layers):
            raise GranularityError(
                f"granularity.layers must be a non-empty list of block indices in [0, {spec.n_layers - 1}]; "
                f"got {layers!r}"
            )
        layers = tuple(int(i) for i in layers)
        if any(not 0 <= i < spec.n_layers for i in layers) or list(layers) != sorted(set(layers)):
            raise GranularityError(
                f"granularity.layers must be strictly ascending block indices in [0, {spec.n_layers - 1}]; "
                f"got {list(layers)}"
            )
        return layers
    n = _size("granularity.n_layers", granularity.get("n_layers", 1.0), spec.n_layers, 1)
    return tuple(range(n))


def _check_resolved(spec: Spec, g: Granularity) -> Granularity:
    fulls = _full_sizes(spec)
    sizes = g.as_dict()
    if set(sizes) != set(fulls):
        raise GranularityError(
            f"Granularity does not belong to this {type(spec).__name__}: dimension keys {sorted(sizes)} "
            f"but the spec has {sorted(fulls)}"
        )
    for key, value in sizes.items():
        low = 0 if key.startswith("blocks.") else 1
        if not low <= value <= fulls[key]:
            raise GranularityError(f"Granularity size of {key} must be in [{low}, {fulls[key]}]; got {value}")
    if isinstance(spec, Transformer):
        if not g.blocks or list(g.blocks) != sorted(set(g.blocks)) or g.blocks[-1] >= spec.n_layers:
            raise GranularityError(f"Granularity.blocks must be ascending indices < {spec.n_layers}; got {g.blocks}")
        for i in range(spec.n_layers):
            kept = i in g.blocks
            for dim in ("n_heads", "d_ff"):
                if (sizes[f"blocks.{i}.{dim}"] > 0) != kept:
                    raise GranularityError(
                        f"Granularity size of blocks.{i}.{dim} must be > 0 exactly when block {i} is kept"
                    )
    elif g.blocks:
        raise GranularityError("Granularity.blocks must be empty for an MLP (it has no residual blocks)")
    return g


def is_nested(small: Granularity, large: Granularity) -> bool:
    """Rule N1: ``small ⊆ large`` on every axis (and every kept block of ``small`` is kept in ``large``)."""
    s, big = small.as_dict(), large.as_dict()
    return set(s) == set(big) and all(s[k] <= big[k] for k in s) and set(small.blocks) <= set(large.blocks)


def check_chain(spec: Spec, named: Mapping[str, Granularity]) -> list[str]:
    """Rule N1: declared training granularities must form a chain Student ⊆ … ⊆ TA.

    Returns:
        The names ordered from smallest to largest.

    Raises:
        NestingError: naming the first pair that is not nested and the axis where it fails.
    """
    # Ties keep "TA" last, so the full model is always the top of the chain.
    order = sorted(named, key=lambda n: (num_params(spec, named[n]), n == "TA", n))
    for a, b in zip(order, order[1:]):
        if not is_nested(named[a], named[b]):
            sa, sb = named[a].as_dict(), named[b].as_dict()
            bad = [k for k in sa if sa[k] > sb[k]]
            where = f"{bad[0]}: {sa[bad[0]]} > {sb[bad[0]]}" if bad else f"blocks {named[a].blocks} ⊄ {named[b].blocks}"
            raise NestingError(
                f"granularities must be nested (Student ⊆ … ⊆ TA, rule N1), but {a!r} is not inside {b!r} ({where})"
            )
    return order


def sub_spec(spec: Spec, g: Granularity) -> Spec:
    """Rule E2: the spec of the plain model that extraction at ``g`` produces."""
    s = g.as_dict()
    if isinstance(spec, MLP):
        return MLP(
            d_in=spec.d_in,
            hidden=tuple(s[f"hidden.{i}"] for i in range(len(spec.hidden))),
            d_out=spec.d_out,
            activation=spec.activation,
            multiple_of=spec.multiple_of,
            nested=spec.nested,
        )
    return Transformer(
        vocab_size=spec.vocab_size,
        max_len=spec.max_len,
        d_model=s["d_model"],
        n_layers=len(g.blocks),
        n_heads=tuple(s[f"blocks.{i}.n_heads"] for i in g.blocks),
        d_ff=tuple(s[f"blocks.{i}.d_ff"] for i in g.blocks),
        d_head=spec.d_head,
        layer_norm_epsilon=spec.layer_norm_epsilon,
        multiple_of=spec.multiple_of,
        nested=spec.nested,
        tie_embeddings=spec.tie_embeddings,
    )


def _axis_slices(param: Parameter, sizes: Mapping[str, int]) -> tuple[slice, ...]:
    """Rule S1: the prefix ``[0:k * unit]`` on every labelled axis, the whole axis elsewhere."""
    return tuple(slice(None) if a is None else slice(0, sizes[a.dim] * a.unit) for a in param.axes)


def slice_plan(spec: Spec, g: Granularity) -> Iterator[tuple[str, str, tuple[slice, ...]]]:
    """Rules S1 and D2: ``(sub-network name, full name, slices)`` for every sub-network parameter.

    Kept blocks are renumbered ``0..n-1`` in order (rule D2), so the sub-network's
    names are exactly :meth:`sub_spec`'s parameter names. The same reads as :func:`plan`.
    """
    for r in plan(spec, g).reads:
        yield r.name, r.source, r.slices


W = TypeVar("W")


@dataclass(frozen=True)
class Read:
    """One parameter of a sub-network: where it comes from and which prefix it reads (rule S1).

    Attributes:
        name: the sub-network's parameter name (kept blocks renumbered, rule D2).
        source: the full model's parameter name it is read from.
        slices: the prefix of every axis, in rule P2 layout (``slice(None)`` keeps an axis whole).
        shape: the sub-network parameter's shape.
        whole: True when the read is the whole source parameter (no slicing needed).
    """

    name: str
    source: str
    slices: tuple[slice, ...]
    shape: tuple[int, ...]
    whole: bool


@dataclass(frozen=True)
class Plan:
    """The slice plan of one granularity: the sub-network's spec and how each of its weights is read.

    This is the only place slice bounds are computed. A backend's nested forward is its plain
    functional forward of :attr:`spec` over the weights :meth:`read` gives, so the nested
    sub-network and the extracted model run the same function on the same values.

    Attributes:
        spec: the sub-network's spec (:func:`sub_spec`): every size a forward pass needs.
        granularity: the resolved granularity the plan is for.
        reads: one :class:`Read` per parameter of :attr:`spec`, in ``spec.parameters()`` order.
        blocks: the full model's block that each of the sub-network's blocks reads (rule D2:
            sub-network block ``i`` is block ``blocks[i]``); empty for the MLP.
    """

    spec: Spec
    granularity: Granularity
    reads: tuple[Read, ...]
    blocks: tuple[int, ...] = ()

    def read(self, weights: Mapping[str, W], take: Callable[[W, Read], W]) -> dict[str, W]:
        """``{sub-network name: take(weights[source], read)}`` for every read.

        Args:
            weights: the full model's weights in any array type, keyed by spec name.
            take: how the backend executes one read (e.g. ``lambda w, r: w[r.slices]``).
        """
        return {r.name: take(weights[r.source], r) for r in self.reads}


@functools.lru_cache(maxsize=1024)
def plan(spec: Spec, g: Granularity) -> Plan:
    """Rules S1, D1 and D2: the :class:`Plan` of the sub-network of ``spec`` at ``g`` (cached).

    Args:
        spec: the full model's spec.
        g: a resolved granularity of ``spec`` (see :func:`resolve`).
    """
    sizes = g.as_dict()
    renumber = {old: new for new, old in enumerate(g.blocks)}
    reads = []
    for name, param in spec.parameters().items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            if int(index) not in renumber:
                continue
            sub_name = f"blocks.{renumber[int(index)]}.{rest}"
        else:
            sub_name = name
        slices = _axis_slices(param, sizes)
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(slices, param.shape))
        reads.append(Read(sub_name, name, slices, shape, shape == param.shape))
    sub = sub_spec(spec, g)
    assert [r.name for r in reads] == list(sub.parameters()), "a plan reads exactly the sub-network's parameters"
    return Plan(sub, g, tuple(reads), tuple(g.blocks))


@dataclass(frozen=True)
class SharedFirstLayer:
    """An MLP's first layer computed once for several granularities (see :func:`shared_first_layer`).

    Attributes:
        kernel: the read of ``layers.0.kernel`` at the widest first hidden width.
        bias: the read of ``layers.0.bias`` at that width.
        columns: per granularity, in order, the column prefix of the shared first hidden layer
            that is its own first hidden layer (``slice(None)`` for the widest).
    """

    kernel: Read
    bias: Read
    columns: tuple[slice, ...]


def shared_first_layer(spec: MLP, granularities: Sequence[Granularity]) -> SharedFirstLayer:
    """Rule S1 for several MLP sub-networks on one input: the first layer is a prefix of the widest one.

    Every granularity's first layer reads the columns ``[0:k]`` of ``layers.0`` over the same
    full-width input, so ``activation(x @ W0[:, :n] + b0[:n])`` at the widest ``n`` holds each
    one's first hidden layer as its first ``k`` columns (the activation is elementwise).
    """
    assert isinstance(spec, MLP) and granularities, "shared_first_layer is for one or more MLP granularities"
    plans = [plan(spec, g) for g in granularities]
    widest = max(plans, key=lambda p: p.spec.hidden[0])
    reads = {r.name: r for r in widest.reads}
    n = widest.spec.hidden[0]
    columns = tuple(slice(None) if p.spec.hidden[0] == n else slice(0, p.spec.hidden[0]) for p in plans)
    return SharedFirstLayer(reads["layers.0.kernel"], reads["layers.0.bias"], columns)


def num_params(spec: Spec, g: Granularity) -> int:
    """Number of scalar parameters of the sub-network at ``g``."""
    return sub_spec(spec, g).num_params


def sample_between(spec: Spec, small: Granularity, large: Granularity, rng: np.random.Generator) -> Granularity:
    """A random Mix'n'Match granularity ``g`` with ``small ⊆ g ⊆ large`` (rule T3, sandwich sampling).

    Every dimension draws a size uniformly from the integers in ``[small, large]``
    (not rounded to ``multiple_of``); kept blocks are ``small``'s plus each other
    block of ``large`` with probability 1/2.
    """
    assert is_nested(small, large), "sample_between needs small ⊆ large"
    s, big = small.as_dict(), large.as_dict()
    blocks = set(small.blocks) | {b for b in large.blocks if b not in small.blocks and rng.random() < 0.5}
    sizes = {}
    for key in sorted(s):
        low, high = s[key], big[key]
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            if index not in blocks:
                sizes[key] = 0
                continue
            low = max(low, 1)
        sizes[key] = int(rng.integers(low, high + 1))
    return Granularity(tuple(sorted(sizes.items())), tuple(sorted(blocks)))


def _layer_of(key: str) -> str:
    # "hidden.3" -> "hidden.3"; "blocks.2.d_ff" and "blocks.2.n_heads" -> "blocks.2"; "d_model" -> "d_model".
    parts = key.split(".")
    return ".".join(parts[:2])


def sample_mixnmatch(spec: Spec, levels: Sequence[Granularity], rng: np.random.Generator) -> Granularity:
    """A random Mix'n'Match granularity made of trained sizes (rule T5, ``sampling="mixnmatch"``).

    ``levels`` are the trained granularities (declared Students and the TA),
    a nested chain, smallest first. Every layer (an MLP hidden layer, a
    Transformer block with its heads and ``d_ff``, or ``d_model``) draws one
    level uniformly and takes that level's sizes, so the result is a per-layer
    mix of the sizes that training sees, nested between ``levels[0]`` and
    ``levels[-1]`` (rule N1). A block is kept if its drawn level keeps it.
    """
    assert levels, "sample_mixnmatch needs at least one level"
    assert all(is_nested(a, b) for a, b in zip(levels, levels[1:])), "levels must be a nested chain, smallest first"
    dicts = [g.as_dict() for g in levels]
    layers = sorted({_layer_of(k) for k in dicts[0]})
    drawn = {layer: int(rng.integers(len(levels))) for layer in layers}
    sizes = {k: dicts[drawn[_layer_of(k)]][k] for k in sorted(dicts[0])}
    blocks: set[int] = set(levels[0].blocks)
    for layer, level in drawn.items():
        if layer.startswith("blocks."):
            index = int(layer.split(".")[1])
            if index in levels[level].blocks:
                blocks.add(index)
            else:
                assert all(sizes[k] == 0 for k in sizes if _layer_of(k) == layer), "a dropped block has size 0"
    g = Granularity(tuple(sorted(sizes.items())), tuple(sorted(blocks)))
    assert is_nested(levels[0], g) and is_nested(g, levels[-1]), "a Mix'n'Match of trained sizes stays nested (N1)"
    return g


def relative_to(spec: Spec, outer: Granularity, inner: Granularity) -> Granularity:
    """``inner`` written in the terms of the extracted model ``sub_spec(spec, outer)`` (rule E4).

    With ``inner ⊆ outer``, ``extract(extract(W, spec, outer), sub, relative_to(spec, outer, inner))``
    equals ``extract(W, spec, inner)``: kept blocks are renumbered as extraction
    renumbers them (rule D2).
    """
    if not is_nested(inner, outer):
        raise NestingError("relative_to needs inner ⊆ outer (rule N1)")
    s = inner.as_dict()
    if isinstance(spec, MLP):
        return Granularity(inner.sizes)
    renumber = {old: new for new, old in enumerate(outer.blocks)}
    sizes = {"d_model": s["d_model"]}
    for old, new in renumber.items():
        for dim in ("n_heads", "d_ff"):
            sizes[f"blocks.{new}.{dim}"] = s[f"blocks.{old}.{dim}"]
    return Granularity(tuple(sorted(sizes.items())), tuple(renumber[b] for b in inner.blocks))
