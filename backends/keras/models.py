"""Keras models of each family: the nested TA (it executes the core's plan) and the plain, extractable model.

The nested model (:class:`NestedModel`) holds one ``keras.Variable`` per spec
parameter in rule P2 layout (Keras' own layout: kernels are ``(d_in, d_out)``). At a
granularity ``g`` it runs :mod:`matta.backends.keras.functional`'s forward of
``plan(spec, g).spec`` over the variables read through that plan (rule S1); it
computes no size or slice bound itself.

The plain model (:func:`plain_model`) runs the same family definition
(:func:`~matta.backends.keras.functional.mlp_graph`,
:func:`~matta.backends.keras.functional.transformer_graph`) on built-in layers and
``keras.ops`` nodes only, so its ``.keras`` file loads with
``keras.saving.load_model`` (safe mode on) in a process that has never imported
matta.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np
from keras import layers

from matta.nesting import Granularity, Read, plan, shared_first_layer
from matta.specs import MLP, Spec, Transformer
from matta.backends.keras import engine
from matta.backends.keras import functional as F

__all__ = ["NestedModel", "plain_model", "plain_variables", "assign_plain", "keras_name"]

#: MLP activations a built-in ``Dense(activation=name)`` computes with the op :func:`functional.activation` uses.
INSIDE_DENSE = ("relu", "tanh", "sigmoid", "silu")


def keras_name(name: str) -> str:
    """A spec parameter or layer name as a Keras name.

    Keras on the PyTorch engine registers variables in a ``torch.nn.ParameterDict``,
    whose keys may not contain dots, so dots become underscores (spec names stay unique).
    """
    return name.replace(".", "_")


class NestedModel(keras.Model):
    """The TA: every spec parameter as a variable; :meth:`run` computes the sub-network at a granularity.

    It is never called through ``keras.Model.__call__`` (a granularity is not a
    tensor); training wraps it in :class:`matta.backends.keras.training.Trainer`.
    """

    def __init__(self, spec: Spec, dtype: str):
        super().__init__(name="matta_nested", dtype=dtype)
        self.spec = spec
        self.compute_dtype_name = dtype
        params = spec.parameters()
        self.param_names = tuple(params)
        self.params = {}
        for name, p in params.items():
            # autocast=False: a float64 model stays float64 under any mixed-precision policy.
            self.params[name] = self.add_weight(
                shape=p.shape, initializer="zeros", dtype=dtype, name=keras_name(name), autocast=False
            )
        assert len({keras_name(n) for n in params}) == len(params), "keras names must stay unique"
        self.built = True

    def run(self, x: Any, granularity: Granularity):
        """The sub-network's output at ``granularity`` (rules S1–S4, D1–D2).

        Args:
            x: MLP features ``(batch, d_in)`` in the model dtype; Transformer int32 ids ``(batch, time)``.
            granularity: a resolved granularity of ``self.spec``.
        """
        return self.run_many(x, (granularity,))[0]

    def run_many(self, x: Any, granularities: Sequence[Granularity]) -> list:
        """The outputs at several granularities on one input, in order; what a training step calls.

        Each output is the family's functional forward of the sub-network's spec,
        ``plan(spec, g).spec``, over the variables read through that plan (rule S1): sizes
        and slice bounds come from the core's plan only.

        The MLP computes its first layer once, at the widest granularity
        (:func:`matta.nesting.shared_first_layer`), and gives each granularity its column
        prefix of it; the engine's autodiff sums the granularities' gradients there, so the
        backward pass also does one weight-gradient matmul for that layer. Same math as one
        :meth:`run` per granularity (the activation is elementwise); the float32 sums may
        round differently, so extraction's bit-exactness is stated for :meth:`run`, which
        calls this with one granularity (no column slice then). The Transformer runs each
        granularity on its own: its embedding lookup, the only work all of them could
        share, is a gather too small to matter (see ``docs/benchmarks.md``).

        Args:
            x: as for :meth:`run`.
            granularities: resolved granularities of ``self.spec``.
        """
        plans = [plan(self.spec, g) for g in granularities]
        dtype = self.compute_dtype_name
        if not isinstance(self.spec, MLP):
            take = _take(_reader(self.params, [_request(r) for p in plans for r in p.reads]))
            return [F.transformer(p.spec, p.read(self.params, take), x, dtype) for p in plans]

        first = shared_first_layer(self.spec, granularities)
        layer0 = (first.kernel, first.bias)
        later = [[r for r in p.reads if r.name not in (first.kernel.name, first.bias.name)] for p in plans]
        take = _take(_reader(self.params, [_request(r) for r in (*layer0, *(r for reads in later for r in reads))]))
        widest = plans[first.columns.index(slice(None))].spec
        h = F.mlp(widest, _read(self.params, layer0, take), x, dtype, stop=1)  # (batch, widest first width)
        # The widest granularity reads h whole: no slice copy, no gradient scatter.
        columns = [None if c == slice(None) else (slice(None), c) for c in first.columns]
        read_h = _reader({"h": h}, [("h", c) for c in columns])
        return [F.mlp(p.spec, _read(self.params, reads, take), read_h("h", c), dtype, start=1)
                for p, reads, c in zip(plans, later, columns)]


def _read(variables: Mapping[str, Any], reads: Sequence[Read], take) -> dict:
    """:meth:`matta.nesting.Plan.read` of some of a plan's reads (the MLP's layers after the shared first one)."""
    return {r.name: take(variables[r.source], r) for r in reads}


def _request(read: Read) -> tuple:
    """``(source, index)`` of a plan's read for :func:`_reader`: ``None`` when it reads the variable whole."""
    return read.source, None if read.whole else read.slices


def _take(read):
    """:meth:`matta.nesting.Plan.read`'s ``take`` through a :func:`_reader`'s ``read``."""
    return lambda _variable, r: read(*_request(r))


def _reader(tensors: Mapping[str, Any], requests):
    """``read(name, index)``: ``tensors[name][index]``, or the tensor itself when ``index`` is ``None``.

    ``requests`` lists every ``(name, index)`` read up front (``index``: a tuple of slices, rule
    S1, or ``None``). The TA's own term reads every weight whole, and returning the variable
    itself spares a copy of it in the forward pass and a scatter of its gradient in the backward
    pass; values are the same either way, so the extracted model still equals the nested one bit
    for bit. On the torch engine the distinct reads of one tensor, when there are several (a
    training step's terms), go through one ``engines.torch.prefix_reads`` node: the same values, and
    a backward pass that adds each slice's gradient into the whole tensor's in place instead of a
    full-size zero tensor and sum per slice. Elsewhere, and for a tensor read once (a single
    granularity, as :meth:`NestedModel.run` and so extraction's bit-exactness use), it is plain
    indexing.
    """
    shared = {}
    if engine.name() == "torch":
        distinct: dict[str, dict] = {}
        for name, index in requests:
            distinct.setdefault(name, {}).setdefault(_key(index), index)
        for name, indices in distinct.items():
            if len(indices) < 2:
                continue
            tensor = tensors[name]
            value = tensor.value if isinstance(tensor, keras.Variable) else tensor
            outs = engine.current().prefix_reads(value, list(indices.values()))
            shared.update({(name, key): out for key, out in zip(indices, outs)})

    def read(name: str, index):
        out = shared.get((name, _key(index)))
        if out is not None:
            return out
        tensor = tensors[name]
        return tensor if index is None else tensor[index]

    return read


def _key(index):
    # Slices are unhashable before Python 3.12.
    return None if index is None else tuple((s.start, s.stop, s.step) for s in index)


class _BuiltinLayers:
    """:class:`functional.Layers` that make built-in Keras layers, named after the spec's parameters.

    The plain model's ``.keras`` file must load with ``keras.saving.load_model`` without matta,
    so it holds built-in layers, not the functional forward's weight reads; it runs the same
    family definition with each layer's ``call`` being its op function in :mod:`functional`
    (bit-exactness of extracted vs nested is the conformance suite's guard).
    """

    def __init__(self, dtype: str):
        self.dtype = dtype

    def dense(self, name: str, x, units: int, *, bias: bool = True, activation: Optional[str] = None):
        # Keras' built-in relu/tanh/sigmoid/silu run the very op F.activation runs, so they go inside
        # the Dense layer: an eager call of a functional model pays per graph node (docs/benchmarks.md).
        # GPT-2's tanh GELU has no built-in activation name (Keras' "gelu" is the erf form), so it
        # stays a keras.ops node.
        inside = activation if activation in INSIDE_DENSE else None
        h = layers.Dense(units, activation=inside, use_bias=bias, dtype=self.dtype, name=keras_name(name))(x)
        return h if activation is None or inside else F.activation(activation, h)

    def layer_norm(self, name: str, x, epsilon: float):
        return layers.LayerNormalization(epsilon=epsilon, dtype=self.dtype, name=keras_name(name))(x)

    def embedding(self, name: str, ids, rows: int, width: int):
        return layers.Embedding(rows, width, dtype=self.dtype, name=keras_name(name))(ids)

    def tied_head(self, name: str, table: str, x, units: int):
        # No built-in layer reads another layer's variable, so the plain graph holds the tied head
        # as a Dense whose kernel is a copy of the token table transposed (same function, one more
        # matrix in model.keras); :func:`assign_plain` keeps the copy equal to the table.
        return self.dense(name, x, units, bias=False)

    def split_heads(self, name: str, x, heads: int, d_head: int):
        return layers.Reshape((-1, heads, d_head), dtype=self.dtype, name=keras_name(name))(x)

    def merge_heads(self, name: str, x, width: int):
        return layers.Reshape((-1, width), dtype=self.dtype, name=keras_name(name))(x)


def plain_model(spec: Spec, dtype: str) -> keras.Model:
    """A functional ``keras.Model`` of ``spec`` made of built-in layers and ``keras.ops`` nodes.

    Weights are zeros; load them with :func:`plain_variables`.
    """
    if isinstance(spec, MLP):
        x = keras.Input((spec.d_in,), dtype=dtype, name="features")
        return keras.Model(x, F.mlp_graph(spec, x, _BuiltinLayers(dtype)), name="matta_mlp")
    assert isinstance(spec, Transformer)
    ids = keras.Input((None,), dtype="int32", name="tokens")
    return keras.Model(ids, F.transformer_graph(spec, ids, _BuiltinLayers(dtype)), name="matta_transformer")


def plain_variables(model: keras.Model, spec: Spec) -> dict[str, keras.Variable]:
    """The plain model's variables keyed by the spec's parameter names (rule P2 layout, as Keras stores them)."""
    out = {}
    for name in spec.parameters():
        base, leaf = name.rsplit(".", 1)
        if name in ("embed.tokens", "embed.positions"):
            out[name] = model.get_layer(keras_name(name)).embeddings
            continue
        layer = model.get_layer(keras_name(base))
        attr = {"kernel": "kernel", "bias": "bias", "scale": "gamma", "offset": "beta"}[leaf]
        out[name] = getattr(layer, attr)
    return out


def assign(variables: Mapping[str, keras.Variable], weights: Mapping[str, np.ndarray]) -> None:
    """Copies numpy weights into variables (same names, shapes and dtype)."""
    for name, value in weights.items():
        variables[name].assign(np.ascontiguousarray(value))


def assign_plain(model: keras.Model, spec: Spec, weights: Mapping[str, np.ndarray]) -> None:
    """Copies numpy weights into the plain model; a tied head's kernel gets the token table transposed (rule P3)."""
    assign(plain_variables(model, spec), weights)
    if isinstance(spec, Transformer) and spec.tie_embeddings and "embed.tokens" in weights:
        model.get_layer(keras_name("head")).kernel.assign(np.ascontiguousarray(weights["embed.tokens"].T))
