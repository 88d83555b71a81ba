"""Keras models of each family: the nested TA (call-time slicing) and the plain, extractable model.

The nested model (:class:`NestedModel`) holds one ``keras.Variable`` per spec
parameter in rule P2 layout (Keras' own layout: kernels are ``(d_in, d_out)``) and
runs the sub-network at a granularity by reading every weight as a prefix slice
(rule S1) and passing it through :mod:`matta.backends.keras.functional`.

The plain model (:func:`plain_model`) is a functional ``keras.Model`` of built-in
layers and ``keras.ops`` nodes only, so its ``.keras`` file loads with
``keras.saving.load_model`` (safe mode on) in a process that has never imported
matta.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import numpy as np
from keras import layers, ops

from matta.nesting import Granularity
from matta.specs import MLP, Spec, Transformer
from matta.backends.keras import engine
from matta.backends.keras import functional as F

__all__ = ["NestedModel", "plain_model", "plain_variables", "keras_name"]

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

    def run(self, x, granularity: Granularity):
        """The sub-network's output at ``granularity`` (rules S1–S4, D1–D2).

        Args:
            x: MLP features ``(batch, d_in)`` in the model dtype; Transformer int32 ids ``(batch, time)``.
            granularity: a resolved granularity of ``self.spec``.
        """
        return self.run_many(x, (granularity,))[0]

    def run_many(self, x, granularities: Sequence[Granularity]) -> list:
        """The outputs at several granularities on one input, in order; what a training step calls.

        Every MLP granularity reads the first layer's columns as a prefix of the same input, so
        ``activation(x @ W0[:, :n] + b0[:n])`` at the widest ``n`` holds each one's first hidden
        layer as a column prefix: it is computed once and sliced, and the engine's autodiff sums
        the granularities' gradients there, so the backward pass also does one weight-gradient
        matmul for that layer. Same math as one :meth:`run` per granularity (the activation is
        elementwise); the float32 sums may round differently, so extraction's bit-exactness is
        stated for :meth:`run`, which calls this with one granularity (no slice then). The
        Transformer runs each granularity on its own: its embedding lookup, the only work all of
        them could share, is a gather too small to matter (see ``docs/benchmarks.md``).

        Args:
            x: as for :meth:`run`.
            granularities: resolved granularities of ``self.spec``.
        """
        if not isinstance(self.spec, MLP):
            return [self._transformer(x, g) for g in granularities]
        widths = [self._widths(g) for g in granularities]
        widest = max(w[1] for w in widths)
        # The kernel sizes every layer is read at in this call (layer 0 once, at the widest width).
        kernels = [[(self.spec.d_in, widest)], *([(w[i], w[i + 1]) for w in widths] for i in range(1, self.spec.num_layers))]
        p = self.params
        read = _reader({
            **{f"layers.{i}.kernel": (p[f"layers.{i}.kernel"], sizes) for i, sizes in enumerate(kernels)},
            **{f"layers.{i}.bias": (p[f"layers.{i}.bias"], [k[1:] for k in sizes]) for i, sizes in enumerate(kernels)},
        })
        h = self._dense(0, x, self.spec.d_in, widest, read)  # (batch, widest)
        # h is read whole for the widest granularity: no slice copy, no gradient scatter.
        hs = _reader({"h": (h, [(None, w[1]) for w in widths])})
        return [self._dense_from(1, hs("h", None, w[1]), w, read) for w in widths]

    def _widths(self, granularity: Granularity) -> list[int]:
        s = granularity.as_dict()
        return [self.spec.d_in, *(s[f"hidden.{i}"] for i in range(len(self.spec.hidden))), self.spec.d_out]

    def _dense(self, i: int, h, d_in: int, d_out: int, read):
        """MLP layer ``i`` on its ``(d_in, d_out)`` kernel prefix, then the activation unless it is the output layer."""
        h = F.dense(h, read(f"layers.{i}.kernel", d_in, d_out), read(f"layers.{i}.bias", d_out))
        return F.activation(self.spec.activation, h) if i < self.spec.num_layers - 1 else h

    def _dense_from(self, start: int, h, widths: Sequence[int], read):
        for i in range(start, self.spec.num_layers):
            h = self._dense(i, h, widths[i], widths[i + 1], read)
        return h  # (batch, d_out)

    def _transformer(self, x, granularity: Granularity):
        """The Transformer sub-network at ``granularity``: :meth:`run`'s Transformer half."""
        w = self.params
        dtype = self.compute_dtype_name
        s = granularity.as_dict()
        spec = self.spec
        assert isinstance(spec, Transformer)
        d, d_head, eps = s["d_model"], spec.d_head, spec.layer_norm_epsilon
        t = ops.shape(x)[1]
        h = F.embedding(_prefix(w["embed.tokens"], None, d), x, dtype) + F.embedding(
            _prefix(w["embed.positions"], t, d), F.positions(x), dtype
        )
        norm = lambda p, v: F.layer_norm(v, _prefix(w[f"{p}.scale"], d), _prefix(w[f"{p}.offset"], d), eps, dtype)  # noqa: E731
        for i in granularity.blocks:  # rule D1: kept blocks, in order
            p = f"blocks.{i}"
            heads, ff = s[f"{p}.n_heads"], s[f"{p}.d_ff"]
            inner = heads * d_head  # rule G4: whole heads
            a = norm(f"{p}.norm1", h)
            q, k, v = (
                _split_heads(F.dense(a, _prefix(w[f"{p}.attention.{n}.kernel"], d, inner), _prefix(w[f"{p}.attention.{n}.bias"], inner)),
                             heads, d_head)
                for n in ("query", "key", "value")
            )
            y = _merge_heads(F.attention(q, k, v), inner)
            h = h + F.dense(y, _prefix(w[f"{p}.attention.output.kernel"], inner, d), _prefix(w[f"{p}.attention.output.bias"], d))
            a = norm(f"{p}.norm2", h)
            a = F.activation("gelu", F.dense(a, _prefix(w[f"{p}.ffn.up.kernel"], d, ff), _prefix(w[f"{p}.ffn.up.bias"], ff)))
            h = h + F.dense(a, _prefix(w[f"{p}.ffn.down.kernel"], ff, d), _prefix(w[f"{p}.ffn.down.bias"], d))
        h = norm("final_norm", h)
        return F.dense(h, _prefix(w["head.kernel"], d, None))  # (B, T, vocab): outputs never sliced (rule S4)


def _reader(requests):
    """``read(name, *sizes)``: :func:`_prefix` of ``requests[name][0]``, for the reads declared up front.

    ``requests`` maps a name to ``(variable or tensor, [sizes of each read])``. On the torch engine
    the distinct reads of one tensor, when there are several (a training step's terms), go through
    one ``engines.torch.prefix_reads`` node: the same values, and a backward pass that adds each
    slice's gradient into the whole tensor's in place instead of a full-size zero tensor and sum
    per slice. Elsewhere, and for a tensor read once (a single granularity, as :meth:`NestedModel.run`
    and so extraction's bit-exactness use), it is plain :func:`_prefix`. A name not in ``requests``
    is read with :func:`_prefix` too.
    """
    shared = {}
    if engine.name() == "torch":
        for name, (tensor, sizes) in requests.items():
            distinct = list(dict.fromkeys(tuple(s) for s in sizes))
            if len(distinct) < 2:
                continue
            value = tensor.value if isinstance(tensor, keras.Variable) else tensor
            shape = tuple(value.shape)
            indices = [None if _whole(shape, s) else tuple(slice(None) if n is None else slice(0, n) for n in s)
                       for s in distinct]
            shared.update({(name, s): out for s, out in zip(distinct, engine.current().prefix_reads(value, indices))})

    def read(name: str, *sizes):
        out = shared.get((name, sizes))
        return _prefix(requests[name][0], *sizes) if out is None else out

    return read


def _whole(shape: tuple, sizes: tuple) -> bool:
    # A traced size (a tensor, e.g. the sequence length) is never taken as whole.
    return all(n is None or (isinstance(n, int) and n == shape[i]) for i, n in enumerate(sizes))


def _prefix(variable, *sizes):
    """``variable[:sizes[0], :sizes[1], ...]`` (``None`` keeps an axis whole), the variable itself when whole.

    ``variable`` may also be a tensor (the MLP's shared first hidden layer, sliced per granularity).

    The TA's own term reads every weight whole; skipping the no-op slice spares a copy of the
    kernel in the forward pass and a scatter of its gradient in the backward pass. Values are
    the same either way, so the extracted model still equals the nested one bit for bit.
    """
    if _whole(tuple(variable.shape), sizes):
        return variable
    return variable[tuple(slice(None) if n is None else slice(0, n) for n in sizes)]


def _split_heads(x, heads: int, d_head: int):
    # What keras.layers.Reshape((-1, heads, d_head)) does in the plain graph.
    return ops.reshape(x, (ops.shape(x)[0], -1, heads, d_head))


def _merge_heads(x, inner: int):
    return ops.reshape(x, (ops.shape(x)[0], -1, inner))


def plain_model(spec: Spec, dtype: str) -> keras.Model:
    """A functional ``keras.Model`` of ``spec`` made of built-in layers and ``keras.ops`` nodes.

    Weights are zeros; load them with :func:`plain_variables`.
    """
    if isinstance(spec, MLP):
        x = keras.Input((spec.d_in,), dtype=dtype, name="features")
        h = x
        widths = [*spec.hidden, spec.d_out]
        # Keras' built-in relu/tanh/sigmoid/silu run the very op F.activation runs, so they go inside
        # the Dense layer: an eager call of a functional model pays per graph node, and a separate
        # activation node cost 3-24 % at batch 1 (docs/benchmarks.md). GPT-2's tanh GELU has no built-in
        # activation name (Keras' "gelu" is the erf form), so it stays a keras.ops node.
        inside = spec.activation in INSIDE_DENSE
        for i, width in enumerate(widths):
            hidden = i < len(widths) - 1
            act = spec.activation if hidden and inside else None
            h = layers.Dense(width, activation=act, dtype=dtype, name=keras_name(f"layers.{i}"))(h)
            if hidden and not inside:
                h = F.activation(spec.activation, h)
        return keras.Model(x, h, name="matta_mlp")

    assert isinstance(spec, Transformer)
    eps, d, d_head = spec.layer_norm_epsilon, spec.d_model, spec.d_head
    ids = keras.Input((None,), dtype="int32", name="tokens")
    tokens = layers.Embedding(spec.vocab_size, d, dtype=dtype, name="embed_tokens")(ids)
    pos = layers.Embedding(spec.max_len, d, dtype=dtype, name="embed_positions")(F.positions(ids))
    h = tokens + pos
    norm = lambda name: layers.LayerNormalization(epsilon=eps, dtype=dtype, name=keras_name(name))  # noqa: E731
    for i, (heads, ff) in enumerate(zip(spec.heads_per_layer, spec.ff_per_layer)):
        p = f"blocks.{i}"
        inner = heads * d_head
        a = norm(f"{p}.norm1")(h)
        q, k, v = (
            layers.Reshape((-1, heads, d_head), dtype=dtype, name=keras_name(f"{p}.attention.{n}_heads"))(
                layers.Dense(inner, dtype=dtype, name=keras_name(f"{p}.attention.{n}"))(a)
            )
            for n in ("query", "key", "value")
        )
        y = layers.Reshape((-1, inner), dtype=dtype, name=keras_name(f"{p}.attention.merge"))(F.attention(q, k, v))
        h = h + layers.Dense(d, dtype=dtype, name=keras_name(f"{p}.attention.output"))(y)
        a = norm(f"{p}.norm2")(h)
        a = F.activation("gelu", layers.Dense(ff, dtype=dtype, name=keras_name(f"{p}.ffn.up"))(a))
        h = h + layers.Dense(d, dtype=dtype, name=keras_name(f"{p}.ffn.down"))(a)
    h = norm("final_norm")(h)
    logits = layers.Dense(spec.vocab_size, use_bias=False, dtype=dtype, name="head")(h)
    return keras.Model(ids, logits, name="matta_transformer")


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
