"""ONNX export from the core: one graph builder for the Students of every backend.

:func:`export` writes an ONNX file for a plain model (an extracted spec and its
numpy weights, rule E1) with the ``onnx`` package alone, so a Student trained on
any backend exports the same way and runs on any ONNX runtime. ``onnx`` is
imported inside the functions that need it: ``import matta`` never loads it.

The graph computes :func:`matta.reference.plain_forward`:

* MLP: input ``x`` ``(batch, d_in)`` of the graph's float type, output ``output``
  ``(batch, d_out)``; each layer is one ``Gemm`` named ``layers.<i>.dense``,
  then its activation (``gelu`` is GPT-2's tanh form, ``silu`` is ``x * sigmoid(x)``).
* Transformer: input ``tokens`` int64 ``(batch, time)`` with ``1 <= time <= max_len``,
  output ``logits`` ``(batch, time, vocab_size)``; learned positions, pre-LayerNorm
  blocks with their own heads and ``d_ff``, causal attention scaled by ``1/sqrt(d_head)``,
  a final LayerNorm and the head (a tied head, rule P3, is a ``Transpose`` of the
  ``embed.tokens`` initializer). Batch and time are dynamic.

Every initializer carries the spec's parameter name and every node a name that
starts with its layer's (``blocks.0.attention.scores``), so the graph reads like
the spec. The spec itself is stored in the model's metadata (``matta.spec``).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from matta import saving
from matta.errors import BackendError, FormatError, InputTypeError, choice
from matta.specs import MLP, Spec, Transformer, check_spec
from matta.weights import check_dtype, check_weights

__all__ = ["OPSETS", "DEFAULT_OPSET", "build_model", "export"]

#: ONNX opsets the graph is built for and tested at (``LayerNormalization`` needs 17).
OPSETS = (17, 18, 19, 20, 21)
#: The opset :func:`export` writes unless told otherwise: the oldest that has ``LayerNormalization``.
DEFAULT_OPSET = 17
#: Largest file a single ONNX protobuf can hold (weights are stored inside the file, not as external data).
_MAX_BYTES = 2**31 - 2**24

PathLike = Union[str, "os.PathLike[str]"]


def _check(spec: Any, weights: Any, opset: Any, dtype: Any) -> tuple[Spec, dict[str, np.ndarray], int, str]:
    """Validates every argument before ``onnx`` is imported; returns them normalised."""
    spec = check_spec(spec)
    weights = check_weights(spec, weights)
    if isinstance(opset, numbers.Integral) and not isinstance(opset, bool):
        opset = int(opset)  # numpy integers too
    opset = choice("opset", opset, OPSETS)
    dtype = check_dtype(next(iter(weights.values())).dtype if dtype is None else dtype)
    size = sum(w.size for w in weights.values()) * np.dtype(dtype).itemsize
    if size > _MAX_BYTES:
        raise FormatError(
            f"the weights take {size / 2**30:.2f} GiB as {dtype}; an ONNX file written by matta holds at most "
            f"{_MAX_BYTES / 2**30:.2f} GiB (one protobuf, no external data)"
        )
    return spec, weights, opset, dtype


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise BackendError(f"ONNX export needs the onnx package ({exc}); install it with pip install 'matta[onnx]'") from exc
    return onnx


class _Graph:
    """Collects named nodes and initializers; a node has one output, named like the node unless given."""

    def __init__(self, onnx: Any, dtype: str) -> None:
        self.onnx = onnx
        self.dtype = np.dtype(dtype)
        self.nodes: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self.elem = onnx.helper.np_dtype_to_tensor_dtype(self.dtype)  # the float type's ONNX element type

    def constant(self, name: str, value: Any, dtype: Any = None) -> str:
        """An initializer (a weight, or a constant of the graph) named ``name``; added once."""
        if name not in self.initializers:
            array = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
            self.initializers[name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, out: Optional[str] = None, **attributes: Any) -> str:
        """Appends one node ``name`` computing ``op_type(*inputs)`` into ``out`` (default ``name``); returns ``out``."""
        out = out or name
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=name, **attributes))
        return out

    def dense(self, x: str, prefix: str, bias: bool = True, out: Optional[str] = None) -> str:
        """``x @ kernel (+ bias)`` over the last axis of a 3-D tensor (rule P2 layout)."""
        if not bias:
            return self.op("MatMul", [x, f"{prefix}.kernel"], prefix, out)
        y = self.op("MatMul", [x, f"{prefix}.kernel"], f"{prefix}.matmul")
        return self.op("Add", [y, f"{prefix}.bias"], prefix, out)

    def gelu(self, x: str, prefix: str) -> str:
        """GPT-2's tanh GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, as in the reference."""
        c = self.constant("gelu.sqrt_2_over_pi", math.sqrt(2.0 / math.pi))
        k = self.constant("gelu.0.044715", 0.044715)
        half, one, three = self.constant("gelu.0.5", 0.5), self.constant("gelu.1", 1.0), self.constant("gelu.3", 3.0)
        cube = self.op("Pow", [x, three], f"{prefix}.cube")
        inner = self.op("Add", [x, self.op("Mul", [k, cube], f"{prefix}.cube_scaled")], f"{prefix}.inner")
        t = self.op("Tanh", [self.op("Mul", [c, inner], f"{prefix}.inner_scaled")], f"{prefix}.tanh")
        return self.op("Mul", [self.op("Mul", [half, x], f"{prefix}.half"), self.op("Add", [one, t], f"{prefix}.one_plus")], prefix)

    def activation(self, name: str, x: str, prefix: str) -> str:
        """The activations of :data:`matta.specs.ACTIVATIONS`, named ``<prefix>``."""
        if name == "gelu":
            return self.gelu(x, prefix)
        if name == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x], f"{prefix}.sigmoid")], prefix)
        op_type = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}[name]  # specs validate the name
        return self.op(op_type, [x], prefix)

    def layer_norm(self, x: str, prefix: str, epsilon: float) -> str:
        """Rule S3: LayerNorm over the last axis with the (sliced) scale and offset.

        ``stash_type`` stays at its default (float): the opset allows no other for the statistics,
        so a float64 graph's LayerNorm may round like float32 (the tests bound it; docs/onnx.md).
        """
        return self.op("LayerNormalization", [x, f"{prefix}.scale", f"{prefix}.offset"], prefix, axis=-1, epsilon=float(epsilon))


def _mlp(g: _Graph, spec: MLP) -> tuple[list[Any], list[Any]]:
    helper, elem = g.onnx.helper, g.elem
    h = "x"
    for i in range(spec.num_layers):
        last = i == spec.num_layers - 1
        h = g.op("Gemm", [h, f"layers.{i}.kernel", f"layers.{i}.bias"], f"layers.{i}.dense", "output" if last else None)
        if not last:
            h = g.activation(spec.activation, h, f"layers.{i}.{spec.activation}")
    inputs = [helper.make_tensor_value_info("x", elem, ["batch", spec.d_in])]
    outputs = [helper.make_tensor_value_info("output", elem, ["batch", spec.d_out])]
    return inputs, outputs


def _transformer(g: _Graph, spec: Transformer) -> tuple[list[Any], list[Any]]:
    helper, elem = g.onnx.helper, g.elem
    i64 = np.int64
    zero, first_two = g.constant("const.0", [0], i64), g.constant("const.0_1", [0, 1], i64)
    # Embeddings: tokens plus the first `time` learned positions.
    tokens = g.op("Gather", ["embed.tokens", "tokens"], "embed.tokens.lookup", axis=0)  # (B, T, D)
    time = g.op("Shape", ["tokens"], "embed.time", start=1, end=2)  # [T]
    positions = g.op("Slice", ["embed.positions", zero, time, zero], "embed.positions.first_time")  # (T, D)
    h = g.op("Add", [tokens, positions], "embed")
    # Causal mask: True above the diagonal (a position attends to itself and the past), cut to (T, T).
    future = g.constant("causal.future", np.triu(np.ones((spec.max_len, spec.max_len), dtype=bool), k=1), bool)
    ends = g.op("Concat", [time, time], "causal.ends", axis=0)
    mask = g.op("Slice", [future, g.constant("const.0_0", [0, 0], i64), ends, first_two], "causal.mask")  # (T, T)
    minus_inf = g.constant("attention.minus_inf", -np.inf)
    scale = g.constant("attention.sqrt_d_head", math.sqrt(spec.d_head))
    for i, heads in enumerate(spec.heads_per_layer):
        p = f"blocks.{i}"
        a = g.layer_norm(h, f"{p}.norm1", spec.layer_norm_epsilon)
        split = g.constant(f"{p}.attention.split_shape", [0, 0, heads, spec.d_head], i64)
        merge = g.constant(f"{p}.attention.merge_shape", [0, 0, heads * spec.d_head], i64)
        qkv = {}
        for proj, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            y = g.dense(a, f"{p}.attention.{proj}")  # (B, T, H * Dh)
            y = g.op("Reshape", [y, split], f"{p}.attention.{proj}.heads")  # (B, T, H, Dh)
            qkv[proj] = g.op("Transpose", [y], f"{p}.attention.{proj}.transposed", perm=perm)
        scores = g.op("MatMul", [qkv["query"], qkv["key"]], f"{p}.attention.scores")  # (B, H, T, T)
        scores = g.op("Div", [scores, scale], f"{p}.attention.scaled")
        scores = g.op("Where", [mask, minus_inf, scores], f"{p}.attention.causal")
        probs = g.op("Softmax", [scores], f"{p}.attention.probs", axis=-1)
        ctx = g.op("MatMul", [probs, qkv["value"]], f"{p}.attention.context")  # (B, H, T, Dh)
        ctx = g.op("Transpose", [ctx], f"{p}.attention.context.transposed", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge], f"{p}.attention.context.merged")  # (B, T, H * Dh)
        h = g.op("Add", [h, g.dense(ctx, f"{p}.attention.output")], f"{p}.attention.residual")
        a = g.layer_norm(h, f"{p}.norm2", spec.layer_norm_epsilon)
        a = g.gelu(g.dense(a, f"{p}.ffn.up"), f"{p}.ffn.gelu")
        h = g.op("Add", [h, g.dense(a, f"{p}.ffn.down")], f"{p}.ffn.residual")
    h = g.layer_norm(h, "final_norm", spec.layer_norm_epsilon)
    if spec.tie_embeddings:  # rule P3: the head's kernel is the token table transposed, one initializer
        g.op("Transpose", ["embed.tokens"], "head.kernel", perm=[1, 0])
    g.dense(h, "head", bias=False, out="logits")
    inputs = [helper.make_tensor_value_info("tokens", g.onnx.TensorProto.INT64, ["batch", "time"])]
    outputs = [helper.make_tensor_value_info("logits", elem, ["batch", "time", spec.vocab_size])]
    return inputs, outputs


def build_model(
    spec: Spec, weights: Mapping[str, np.ndarray], *, opset: int = DEFAULT_OPSET, dtype: Optional[str] = None
) -> Any:
    """The ONNX model (an ``onnx.ModelProto``, checked) of the plain model ``spec`` with ``weights``.

    Args:
        spec: a matta spec; for a Student, the spec :func:`matta.extract` returns.
        weights: its numpy weights, keyed by the spec's parameter names (rule P2 layout).
        opset: the ONNX opset, one of :data:`OPSETS`.
        dtype: the graph's float type, ``"float32"`` or ``"float64"``; default the weights' dtype.

    Raises:
        InputTypeError: ``spec`` is not a matta spec, or a dtype is not ``float32``/``float64``.
        InputError: ``weights`` do not match ``spec``.
        OptionError: ``opset`` is not one of :data:`OPSETS`.
        FormatError: the weights exceed what one ONNX protobuf holds (2 GiB).
    """
    spec, weights, opset, dtype = _check(spec, weights, opset, dtype)
    onnx = _import_onnx()
    import matta

    g = _Graph(onnx, dtype)
    for name, w in weights.items():
        g.constant(name, w)
    inputs, outputs = (_mlp if isinstance(spec, MLP) else _transformer)(g, spec)
    graph = onnx.helper.make_graph(g.nodes, f"matta.{spec.family}", inputs, outputs, list(g.initializers.values()))
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(
        graph, opset_imports=opsets, producer_name="matta", producer_version=matta.__version__,
        ir_version=onnx.helper.find_min_ir_version_for(opsets),
        doc_string=f"matta {spec.family} exported by matta.onnx.export",
    )
    onnx.helper.set_model_props(model, {"matta.spec": spec.to_json()})
    onnx.checker.check_model(model, full_check=True)
    return model


def export(
    spec: Spec, weights: Mapping[str, np.ndarray], path: PathLike, *, opset: int = DEFAULT_OPSET, dtype: Optional[str] = None
) -> str:
    """Writes the ONNX file of the plain model ``spec`` with ``weights`` to ``path``, atomically.

    The file is written with :func:`matta.saving.atomic_file` (rule E6): to a temporary file
    beside ``path``, flushed and renamed over it, so ``path`` never holds a partial model; a
    symlink at ``path`` is replaced, never followed. Parent folders are created.

    Args:
        spec: a matta spec; for a Student, the spec :func:`matta.extract` returns.
        weights: its numpy weights, keyed by the spec's parameter names (rule P2 layout).
        path: the file to write (conventionally ``*.onnx``).
        opset: the ONNX opset, one of :data:`OPSETS`; default :data:`DEFAULT_OPSET`.
        dtype: the graph's float type, ``"float32"`` or ``"float64"``; default the weights' dtype.

    Returns:
        ``path`` as a string.

    Raises:
        InputTypeError: ``path`` is not a path (and the errors of :func:`build_model`).
        SaveError: writing failed (e.g. a full disk); the old file is then unchanged.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = os.fspath(path)
    model = build_model(spec, weights, opset=opset, dtype=dtype)
    with saving.atomic_file(path) as f:
        f.write(model.SerializeToString())
    return path
