"""Model specs: the two families matta nests, and their parameter layout.

A spec is a small, frozen, JSON-serialisable description of an architecture.
``spec.parameters()`` is the single source of truth for parameter names, shapes
and **axis labels** (spec rule P1): every axis of every tensor either carries
the name of the nested dimension it belongs to or is fixed. Slicing, extraction,
initialisation, saving and every backend read the layout from here.

Layout conventions (spec rule P2): dense kernels are ``(d_in, d_out)`` and are
applied as ``x @ kernel + bias``; embeddings are ``(rows, d_model)``; norm
parameters are ``scale`` and ``offset``. Backends that store another layout
(PyTorch's ``(out, in)``) transpose in ``get_weights``/``set_weights``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Union

from matta.errors import SpecError, choice, describe

__all__ = ["Axis", "Parameter", "MLP", "Transformer", "Spec", "spec_from_dict", "ACTIVATIONS"]

#: Activations every backend implements identically. ``gelu`` is GPT-2's tanh form.
ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu")


@dataclass(frozen=True)
class Axis:
    """The nested dimension an axis belongs to (spec rule P1).

    Attributes:
        dim: key of the nested dimension, e.g. ``"hidden.0"``, ``"d_model"``,
            ``"blocks.2.d_ff"`` or ``"blocks.2.n_heads"``.
        unit: elements per unit of that dimension; ``d_head`` for heads, so a
            granularity keeps whole heads (spec rule G4), else 1.
    """

    dim: str
    unit: int = 1


@dataclass(frozen=True)
class Parameter:
    """One parameter tensor: its full shape and per-axis labels (``None`` = fixed axis)."""

    shape: tuple[int, ...]
    axes: tuple[Union[Axis, None], ...]
    kind: str  # "kernel", "bias", "embedding", "scale", "offset": picks the initialiser

    def __post_init__(self) -> None:
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an integer >= {minimum}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def _int_tuple(name: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SpecError(f"{name} must be a list of integers >= {minimum}; got {value!r}")
    return tuple(_positive_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))


def _nested_field(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not hasattr(value, "__iter__"):
        raise SpecError(f"{name} must be a list drawn from {describe(allowed)}; got {value!r}")
    out = tuple(value)
    for item in out:
        choice(name, item, allowed, SpecError)
    if len(set(out)) != len(out):
        raise SpecError(f"{name} lists a dimension twice: {list(out)}")
    return out


class _SpecBase:
    """Shared JSON and bookkeeping behaviour of the spec families."""

    family: ClassVar[str]
    #: Dimensions a granularity may name for this family (spec rule G2).
    nestable: ClassVar[tuple[str, ...]]

    def parameters(self) -> dict[str, Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """Number of scalar parameters of the full model."""
        total = 0
        for p in self.parameters().values():
            n = 1
            for s in p.shape:
                n *= s
            total += n
        return total

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :func:`spec_from_dict` turns back into an equal spec."""
        out: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json(self) -> str:
        """The spec as a JSON string (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class MLP(_SpecBase):
    """A multi-layer perceptron: the paper's production rankers and classifiers.

    ``x -> [dense -> activation] * len(hidden) -> dense -> outputs``. Each hidden
    width is its own nested dimension ``hidden.i`` (so Mix'n'Match picks a width
    per layer); the input and output widths are the task's and never nested
    (spec rule S4).

    Args:
        d_in: number of input features.
        hidden: widths of the hidden layers (at least one).
        d_out: number of outputs (classes, or regression targets).
        activation: one of ``relu``, ``gelu`` (tanh form), ``tanh``, ``sigmoid``, ``silu``.
        multiple_of: fractional granularities round hidden widths to a multiple
            of this (spec rule G3).
        nested: dimensions a single fraction scales; for the MLP only ``("hidden",)``.
    """

    d_in: int
    hidden: tuple[int, ...]
    d_out: int
    activation: str = "relu"
    multiple_of: int = 1
    nested: tuple[str, ...] = ("hidden",)

    family: ClassVar[str] = "mlp"
    nestable: ClassVar[tuple[str, ...]] = ("hidden",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "d_in", _positive_int("MLP.d_in", self.d_in))
        object.__setattr__(self, "hidden", _int_tuple("MLP.hidden", self.hidden))
        if not self.hidden:
            raise SpecError("MLP.hidden must list at least one hidden width; got []")
        object.__setattr__(self, "d_out", _positive_int("MLP.d_out", self.d_out))
        choice("MLP.activation", self.activation, ACTIVATIONS, SpecError)
        object.__setattr__(self, "multiple_of", _positive_int("MLP.multiple_of", self.multiple_of))
        object.__setattr__(self, "nested", _nested_field("MLP.nested", self.nested, self.nestable))

    @property
    def num_layers(self) -> int:
        """Number of dense layers (hidden layers + the output layer)."""
        return len(self.hidden) + 1

    def parameters(self) -> dict[str, Parameter]:
        """Parameter names, shapes and axis labels (spec rule P1)."""
        params: dict[str, Parameter] = {}
        widths = [self.d_in, *self.hidden, self.d_out]
        dims: list[Union[Axis, None]] = [None, *[Axis(f"hidden.{i}") for i in range(len(self.hidden))], None]
        for i in range(len(widths) - 1):
            params[f"layers.{i}.kernel"] = Parameter((widths[i], widths[i + 1]), (dims[i], dims[i + 1]), "kernel")
            params[f"layers.{i}.bias"] = Parameter((widths[i + 1],), (dims[i + 1],), "bias")
        return params


@dataclass(frozen=True)
class Transformer(_SpecBase):
    """A GPT-2-style decoder-only transformer.

    Learned token and position embeddings, ``n_layers`` pre-LayerNorm residual
    blocks (causal multi-head self-attention, then a GELU feed-forward network),
    a final LayerNorm and an LM head to ``vocab_size`` logits: its own kernel, or
    the token embedding transposed when ``tie_embeddings`` is set (rule P3).

    Nested dimensions (spec rule G2): ``d_model`` (the residual stream, shared by
    all blocks), per block ``n_heads`` (whole heads of fixed width ``d_head``) and
    ``d_ff``, and depth (``n_layers``: which blocks are kept). ``n_heads`` and
    ``d_ff`` may be per-block lists: that is what a Mix'n'Match extraction produces.

    Args:
        vocab_size: number of tokens (never nested).
        max_len: longest sequence (number of learned positions).
        d_model: width of the residual stream.
        n_layers: number of residual blocks.
        n_heads: attention heads, one int for every block or a list per block.
        d_ff: feed-forward width, one int or a list per block; default ``4 * d_model``.
        d_head: width of one head; default ``d_model // n_heads``.
        layer_norm_epsilon: epsilon of every LayerNorm.
        multiple_of: fractional granularities round ``d_ff`` and ``d_model`` to a
            multiple of this (spec rule G3).
        nested: dimensions a single fraction scales, drawn from ``d_ff``,
            ``n_heads``, ``d_model``, ``n_layers``. Default ``("d_ff",)``, as in
            MatFormer.
        tie_embeddings: the LM head is ``embed.tokens`` transposed, one parameter
            (rule P3), as in GPT-2; ``spec.parameters()`` then has no ``head.kernel``.
    """

    vocab_size: int
    max_len: int
    d_model: int
    n_layers: int
    n_heads: Union[int, tuple[int, ...]]
    d_ff: Union[int, tuple[int, ...], None] = None
    d_head: Union[int, None] = None
    layer_norm_epsilon: float = 1e-5
    multiple_of: int = 1
    nested: tuple[str, ...] = ("d_ff",)
    tie_embeddings: bool = False

    family: ClassVar[str] = "transformer"
    nestable: ClassVar[tuple[str, ...]] = ("d_ff", "n_heads", "d_model", "n_layers")

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("vocab_size", _positive_int("Transformer.vocab_size", self.vocab_size))
        set_("max_len", _positive_int("Transformer.max_len", self.max_len))
        set_("d_model", _positive_int("Transformer.d_model", self.d_model))
        set_("n_layers", _positive_int("Transformer.n_layers", self.n_layers))
        set_("n_heads", self._per_layer("n_heads", self.n_heads))
        if self.d_ff is None:
            set_("d_ff", 4 * self.d_model)
        set_("d_ff", self._per_layer("d_ff", self.d_ff))
        if self.d_head is None:
            heads = self.heads_per_layer[0]
            if len(set(self.heads_per_layer)) != 1 or self.d_model % heads:
                raise SpecError(
                    "Transformer.d_head must be given when n_heads does not divide d_model evenly "
                    f"or differs per block; got d_model={self.d_model}, n_heads={self.n_heads}"
                )
            set_("d_head", self.d_model // heads)
        set_("d_head", _positive_int("Transformer.d_head", self.d_head))
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < float(eps) < 1:
            raise SpecError(f"Transformer.layer_norm_epsilon must be a float in (0, 1); got {eps!r}")
        set_("layer_norm_epsilon", float(eps))
        set_("multiple_of", _positive_int("Transformer.multiple_of", self.multiple_of))
        set_("nested", _nested_field("Transformer.nested", self.nested, self.nestable))
        if not isinstance(self.tie_embeddings, bool):
            raise SpecError(f"Transformer.tie_embeddings must be True or False; got {self.tie_embeddings!r}")

    def _per_layer(self, name: str, value: Any) -> Union[int, tuple[int, ...]]:
        if isinstance(value, (list, tuple)):
            values = _int_tuple(f"Transformer.{name}", value)
            if len(values) != self.n_layers:
                raise SpecError(
                    f"Transformer.{name} must be one int or a list of n_layers={self.n_layers} ints; "
                    f"got a list of {len(values)}"
                )
            # A uniform list is stored as one int so that equal models have equal specs.
            return values[0] if len(set(values)) == 1 else values
        return _positive_int(f"Transformer.{name}", value)

    @property
    def heads_per_layer(self) -> tuple[int, ...]:
        """``n_heads`` of every block, as a tuple of length ``n_layers``."""
        h = self.n_heads
        return h if isinstance(h, tuple) else (h,) * self.n_layers

    @property
    def ff_per_layer(self) -> tuple[int, ...]:
        """``d_ff`` of every block, as a tuple of length ``n_layers``."""
        f = self.d_ff
        assert f is not None
        return f if isinstance(f, tuple) else (f,) * self.n_layers

    def parameters(self) -> dict[str, Parameter]:
        """Parameter names, shapes and axis labels (spec rule P1)."""
        dm = Axis("d_model")
        params: dict[str, Parameter] = {
            "embed.tokens": Parameter((self.vocab_size, self.d_model), (None, dm), "embedding"),
            "embed.positions": Parameter((self.max_len, self.d_model), (None, dm), "embedding"),
        }
        for i, (heads, ff) in enumerate(zip(self.heads_per_layer, self.ff_per_layer)):
            b = f"blocks.{i}"
            ha = Axis(f"{b}.n_heads", unit=self.d_head)
            fa = Axis(f"{b}.d_ff")
            inner = heads * self.d_head
            params[f"{b}.norm1.scale"] = Parameter((self.d_model,), (dm,), "scale")
            params[f"{b}.norm1.offset"] = Parameter((self.d_model,), (dm,), "offset")
            for proj in ("query", "key", "value"):
                params[f"{b}.attention.{proj}.kernel"] = Parameter((self.d_model, inner), (dm, ha), "kernel")
                params[f"{b}.attention.{proj}.bias"] = Parameter((inner,), (ha,), "bias")
            params[f"{b}.attention.output.kernel"] = Parameter((inner, self.d_model), (ha, dm), "kernel")
            params[f"{b}.attention.output.bias"] = Parameter((self.d_model,), (dm,), "bias")
            params[f"{b}.norm2.scale"] = Parameter((self.d_model,), (dm,), "scale")
            params[f"{b}.norm2.offset"] = Parameter((self.d_model,), (dm,), "offset")
            params[f"{b}.ffn.up.kernel"] = Parameter((self.d_model, ff), (dm, fa), "kernel")
            params[f"{b}.ffn.up.bias"] = Parameter((ff,), (fa,), "bias")
            params[f"{b}.ffn.down.kernel"] = Parameter((ff, self.d_model), (fa, dm), "kernel")
            params[f"{b}.ffn.down.bias"] = Parameter((self.d_model,), (dm,), "bias")
        params["final_norm.scale"] = Parameter((self.d_model,), (dm,), "scale")
        params["final_norm.offset"] = Parameter((self.d_model,), (dm,), "offset")
        if not self.tie_embeddings:  # rule P3: a tied head is embed.tokens itself
            params["head.kernel"] = Parameter((self.d_model, self.vocab_size), (dm, None), "kernel")
        return params


Spec = Union[MLP, Transformer]
_FAMILIES: dict[str, type] = {"mlp": MLP, "transformer": Transformer}


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Builds a spec from :meth:`to_dict` output (e.g. a saved ``spec.json``)."""
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec dict must be a mapping; got {type(data).__name__}")
    data = dict(data)
    family = data.pop("family", None)
    choice("spec.family", family, tuple(_FAMILIES), SpecError)
    cls = _FAMILIES[family]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(names)}")
    for k, v in data.items():
        if isinstance(v, list):
            data[k] = tuple(v)
    return cls(**data)


def check_spec(spec: Any) -> Spec:
    """Returns ``spec`` if it is an :class:`MLP` or :class:`Transformer`, else raises."""
    if not isinstance(spec, (MLP, Transformer)):
        from matta.errors import InputTypeError

        raise InputTypeError(f"spec must be a matta.MLP or matta.Transformer; got {type(spec).__name__}")
    return spec
