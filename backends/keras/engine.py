"""Which Keras engine runs (``KERAS_BACKEND``), its module of engine-specific code, and its float64 support.

Everything else in this backend is written once over ``keras.ops``. What cannot be
(gradients, so the train step and rule T4's conditional update, and each engine's own
helpers) lives in one module per engine, :mod:`matta.backends.keras.engines.tensorflow`,
:mod:`~matta.backends.keras.engines.jax` and :mod:`~matta.backends.keras.engines.torch`,
which import their framework at the top; :func:`current` imports the one Keras runs on.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Callable, Optional

import keras
import numpy as np
from keras import ops

from matta.errors import InputTypeError
from matta.specs import MLP, Spec

__all__ = ["ENGINES", "name", "current", "float64_blocker", "check_dtype"]

#: The Keras engines matta runs on, each with its module in ``matta.backends.keras.engines``.
ENGINES = ("tensorflow", "jax", "torch")


def name() -> str:
    """The engine Keras runs on: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    return keras.backend.backend()


def current() -> ModuleType:
    """The module of the engine Keras runs on (``matta.backends.keras.engines.<name>``).

    Raises:
        InputTypeError: Keras runs on an engine matta has no module for.
    """
    return _module(name())


@functools.cache
def _module(engine: str) -> ModuleType:
    if engine not in ENGINES:
        raise InputTypeError(f"KERAS_BACKEND must be 'tensorflow', 'jax' or 'torch' for matta; got {engine!r}")
    return importlib.import_module(f"matta.backends.keras.engines.{engine}")


# ------------------------------------------------------------------------------ float64
@functools.cache
def _probe(engine: str, family: str) -> Optional[str]:
    """Runs every op the family's forward and loss use on float64 inputs; names the first that leaves float64.

    ``engine`` is the key of the cache only: Keras runs on one engine per process.
    """
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
    return _probe(name(), "mlp" if isinstance(spec, MLP) else "transformer")


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
