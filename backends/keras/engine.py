"""What differs between the Keras engines (``KERAS_BACKEND``): gradients, float64 support, JAX's host memory,
torch's gradient of several prefix reads of one tensor, and torch's strided transposes.

Everything else in this backend is written once over ``keras.ops``. Keras has no
portable gradient call (a custom ``train_step`` is per engine in Keras 3), so the
small functions here are the only engine-specific code.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any, Callable, Mapping, Optional, Sequence

import keras
import numpy as np
from keras import ops

from matta.errors import InputTypeError
from matta.specs import MLP, Spec

__all__ = ["name", "value_and_grad", "prefix_reads", "transposed", "float64_blocker", "check_dtype", "reuse_step_memory"]


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


# ------------------------------------------------------------------------------ prefix reads (torch)
_PREFIX_READS: dict[str, Any] = {}


def transposed(x):
    """``x.T`` laid out as a kernel of its own (a tied head's kernel, rule P3).

    On torch, ``ops.transpose`` is a strided view, and a GEMM over it rounds differently
    from the same GEMM over the contiguous kernel the plain model's ``Dense`` holds; a
    contiguous copy makes both run the same kernel. The other engines materialize it already.
    """
    t = ops.transpose(x)
    return t.contiguous() if name() == "torch" else t


def prefix_reads(value, indices: Sequence[Optional[tuple]]) -> tuple:
    """Eager torch only: ``value[index]`` for each index (``None``: all of it) as one autograd node.

    The values are the same views plain indexing gives, so a forward pass is unchanged. The
    gradient is what differs: PyTorch's backward of a slice makes a zero tensor of the full shape,
    copies the slice's gradient into it and adds that to the other reads' gradients, so every
    Student-sized read of a TA kernel costs two full-size passes (for the benchmark's MLP, 2048 x
    2048 kernels: about 12 ms of a 140 ms step on one thread). This node adds each slice's gradient
    into the whole read's gradient in place instead, and needs a full-size zero tensor only when
    nothing reads the tensor whole. The whole read's gradient is modified in place: callers feed
    every read to an op whose backward makes that gradient afresh (a matmul, a broadcasting add,
    a slice), never to one that passes it through shared with another input.

    Args:
        value: a torch tensor (a variable's ``.value`` or an activation).
        indices: for each read, a tuple of slices, or ``None`` for the whole tensor.

    Returns:
        One tensor per index, in order.
    """
    if "fn" not in _PREFIX_READS:
        import torch

        class PrefixReads(torch.autograd.Function):
            @staticmethod
            def forward(ctx, value, *indices):
                ctx.indices = indices
                ctx.shape, ctx.dtype, ctx.device = value.shape, value.dtype, value.device
                return tuple(value.view_as(value) if i is None else value[i] for i in indices)

            @staticmethod
            def backward(ctx, *grads):
                whole = [g for i, g in zip(ctx.indices, grads) if i is None and g is not None]
                if whole and 0 not in whole[0].stride():
                    total = whole[0]
                else:  # no whole read (or an expanded gradient, which cannot be written to)
                    total = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
                    if whole:
                        total += whole[0]
                for i, g in zip(ctx.indices, grads):
                    if i is not None and g is not None:
                        total[i] += g
                return (total, *(None for _ in ctx.indices))

        _PREFIX_READS["fn"] = PrefixReads.apply
    return _PREFIX_READS["fn"](value, *indices)


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


# ------------------------------------------------------------------------------ host memory (JAX on CPU)
#: glibc's mallopt() parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: Freed blocks up to this size stay in the process for the next step instead of going back to the system.
STEP_MEMORY_THRESHOLD = 1 << 30
#: Slack glibc keeps at the top of a heap. glibc unmaps an empty extra heap of a thread's arena unless the
#: pad exceeds the room left in the heap before it (under two 64 MiB heaps), so this keeps such heaps.
_TOP_PAD = 1 << 28
#: Environment variables through which a user configures glibc's malloc; matta then leaves it alone.
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                       "MALLOC_ARENA_MAX")
_STEP_MEMORY: dict[str, bool] = {}


def malloc_left_alone(environ: Mapping[str, str]) -> bool:
    """Whether matta must not touch glibc's malloc: ``MATTA_TUNE_MALLOC=0``, or the environment configures it.

    The environment configures it through ``MALLOC_*`` variables or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``.
    """
    if environ.get("MATTA_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return True
    return any(k in environ for k in _MALLOC_ENVIRONMENT) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def reuse_step_memory() -> bool:
    """Lets glibc reuse a compiled JAX step's scratch memory on CPU instead of mapping it anew every step.

    XLA on CPU allocates all of a step's intermediate buffers as one block per
    execution and frees it when the step ends. glibc serves a block above its mmap
    threshold with a fresh ``mmap`` and unmaps it on ``free``; the threshold
    follows the largest block freed so far but never past 32 MiB. So a step whose
    scratch block is larger page-faults on every page of it, every step: for the
    benchmark's MLP (TA and two Students, 38.6 MiB of scratch) about 9,900 faults
    and 17-21 ms of system time in a 120-160 ms step, while the plain TA's 29 MiB
    block stays under the cap and is reused. This raises the mmap and trim
    thresholds to :data:`STEP_MEMORY_THRESHOLD`, so freed blocks stay in the heap
    for the next step, and the top pad, because XLA's worker threads allocate in
    their own arenas, whose extra 64 MiB heaps glibc otherwise unmaps once empty.
    The worker threads take turns, so the first few steps still fault, until each
    arena holds a block; a block that does not fit a thread heap (64 MiB) is still
    mapped every time a worker thread runs the step.

    This is process-wide, runs once (at the first ``fit``), only under
    ``KERAS_BACKEND=jax`` on CPU with glibc, and never with ``MATTA_TUNE_MALLOC=0``
    or when the environment configures glibc's malloc itself
    (:func:`malloc_left_alone`). The cost: freed memory up to
    :data:`STEP_MEMORY_THRESHOLD` stays with the process for reuse instead of going
    back to the system.

    Returns:
        Whether the thresholds are raised (now or by an earlier call).
    """
    if "done" not in _STEP_MEMORY:
        _STEP_MEMORY["done"] = _raise_malloc_thresholds()
    return _STEP_MEMORY["done"]


def _raise_malloc_thresholds() -> bool:
    if name() != "jax" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if malloc_left_alone(os.environ):
        return False
    import jax

    if jax.default_backend() != "cpu":  # accelerators keep a step's buffers in device memory
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting it stops glibc's own trim adjustment, so the trim threshold
    # and top pad are set only once it took (alone, their defaults would give the block back every step).
    return bool(mallopt(_M_MMAP_THRESHOLD, STEP_MEMORY_THRESHOLD)) and all(
        mallopt(option, value) for option, value in ((_M_TRIM_THRESHOLD, STEP_MEMORY_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    )
