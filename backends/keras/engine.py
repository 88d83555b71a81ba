"""What differs between the Keras engines (``KERAS_BACKEND``): gradients, and float64 support.

Everything else in this backend is written once over ``keras.ops``. Keras has no
portable gradient call (a custom ``train_step`` is per engine in Keras 3), so the
three small functions here are the only engine-specific code.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import keras
import numpy as np
from keras import ops

from matta.errors import InputTypeError
from matta.specs import MLP, Spec

__all__ = ["name", "value_and_grad", "float64_blocker", "check_dtype"]


def name() -> str:
    """The engine Keras runs on: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    return keras.backend.backend()


def value_and_grad(variables: Sequence[keras.Variable], fn: Callable[[], tuple[Any, Any]]):
    """Eagerly evaluates ``fn() -> (scalar, aux)`` and its gradient for ``variables``.

    Returns:
        ``(scalar, aux, grads)`` with one gradient per variable (zeros where unused).
    """
    engine = name()
    if engine == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value, aux = fn()
        grads = tape.gradient(value, list(variables))
    elif engine == "jax":
        import jax

        def pure(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn()

        (value, aux), grads = jax.value_and_grad(pure, has_aux=True)([v.value for v in variables])
    elif engine == "torch":
        for v in variables:
            v.value.grad = None
        value, aux = fn()
        value.backward()
        grads = [v.value.grad for v in variables]
        for v in variables:
            v.value.grad = None
    else:  # pragma: no cover - engines Keras may add later
        raise InputTypeError(f"KERAS_BACKEND must be 'tensorflow', 'jax' or 'torch' for matta; got {engine!r}")
    grads = [ops.zeros_like(v.value) if g is None else g for g, v in zip(grads, variables)]
    return value, aux, grads


# ------------------------------------------------------------------------------ float64
_FLOAT64: dict[str, Optional[str]] = {}


def _probe(family: str) -> Optional[str]:
    """Runs every op the family's forward and loss use on float64 inputs; names the first that leaves float64."""
    f = "float64"
    x = ops.convert_to_tensor(np.ones((1, 2, 2, 2)), dtype=f)
    if keras.backend.standardize_dtype(x.dtype) != f:
        return "keras.ops.convert_to_tensor"
    ids = ops.convert_to_tensor(np.zeros((1, 2), "int32"))
    probes: list[tuple[str, Callable[[], Any]]] = [
        ("keras.ops.matmul", lambda: ops.matmul(x, x)),
        ("keras.ops.add", lambda: ops.add(x, x)),
        ("keras.ops.relu", lambda: ops.relu(x)),
        ("keras.ops.gelu", lambda: ops.gelu(x, approximate=True)),
        ("keras.ops.tanh", lambda: ops.tanh(x)),
        ("keras.ops.sigmoid", lambda: ops.sigmoid(x)),
        ("keras.ops.silu", lambda: ops.silu(x)),
        ("keras.ops.log_softmax", lambda: ops.log_softmax(x, axis=-1)),
        ("keras.ops.exp", lambda: ops.exp(x)),
        ("keras.ops.mean", lambda: ops.mean(x)),
        ("keras.ops.sum", lambda: ops.sum(x, axis=-1)),
        ("keras.ops.take_along_axis", lambda: ops.take_along_axis(x, ops.zeros((1, 2, 2, 1), "int32"), axis=-1)),
    ]
    if family == "transformer":
        probes += [
            ("keras.ops.take", lambda: ops.take(x[0, 0], ids, axis=0)),
            ("keras.ops.layer_normalization",
             lambda: ops.layer_normalization(x, x[0, 0, 0], x[0, 0, 0], [-1], 1e-5, rms_scaling=False)),
            ("keras.ops.dot_product_attention", lambda: ops.dot_product_attention(x, x, x, is_causal=True)),
        ]
    for op, probe in probes:
        if keras.backend.standardize_dtype(probe().dtype) != f:
            return op
    return None


def float64_blocker(spec: Spec) -> Optional[str]:
    """The first ``keras.ops`` op that does not compute in float64 on this engine, or ``None``.

    Keras 3 maps float64 to float32 in its type promotion on every engine but
    TensorFlow, so on JAX and PyTorch some ops silently compute in float32. matta
    probes instead of hard-coding a table, so a Keras that fixes this is used as is.
    """
    family = "mlp" if isinstance(spec, MLP) else "transformer"
    key = f"{name()}:{family}"
    if key not in _FLOAT64:
        _FLOAT64[key] = _probe(family)
    return _FLOAT64[key]


def check_dtype(spec: Spec, dtype: str) -> None:
    """Raises :class:`InputTypeError` if this engine cannot run ``spec`` in ``dtype`` exactly."""
    if dtype != "float64":
        return
    op = float64_blocker(spec)
    if op is None:
        return
    hint = " (JAX also needs JAX_ENABLE_X64=1)" if name() == "jax" else ""
    raise InputTypeError(
        f"dtype must be 'float32' for a {type(spec).__name__} on the Keras backend with KERAS_BACKEND={name()}: "
        f"{op} does not compute float64 inputs in float64 there{hint}; got 'float64'. "
        "Use KERAS_BACKEND=tensorflow or backend='torch' for float64."
    )
