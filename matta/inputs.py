"""Validation of user arrays (x, y, teacher outputs) before any framework sees them."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from matta.errors import InputError, InputTypeError
from matta.specs import MLP, Spec, Transformer

__all__ = ["check_x", "check_y", "check_teacher_output", "check_same_length"]


def _array(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()  # a framework tensor on the CPU
    try:
        array = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read
        raise InputTypeError(f"{name} must be array-like; got {type(value).__name__}") from exc
    if array.dtype == object:
        raise InputTypeError(f"{name} must be a numeric array; got an object array (ragged or mixed types?)")
    return array


def check_x(spec: Spec, x: Any, dtype: Optional[str] = None) -> np.ndarray:
    """MLP: float features ``(batch, d_in)``. Transformer: int token ids ``(batch, time)``, ``time <= max_len``.

    Args:
        spec: the model's spec.
        x: the inputs.
        dtype: the model's dtype; MLP float features are cast to it first and
            must be finite after the cast (float64 ``1e300`` is Inf in float32).
    """
    x = _array("x", x)
    if isinstance(spec, MLP):
        if x.ndim != 2 or x.shape[1] != spec.d_in:
            raise InputError(f"x must have shape (batch, d_in={spec.d_in}); got {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise InputTypeError(f"x must hold real numbers; got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.floating):
            if dtype is not None:
                with np.errstate(over="ignore"):  # an overflow becomes Inf, refused just below
                    x = x.astype(dtype, copy=False)
            if not np.all(np.isfinite(x)):
                where = "" if dtype is None else f" as {dtype}, the model's dtype (larger values become Inf)"
                raise InputError(f"x must be finite{where}; it holds NaN or Inf")
        return x
    assert isinstance(spec, Transformer)
    if x.ndim != 2 or not 1 <= x.shape[1] <= spec.max_len:
        raise InputError(f"x must be token ids of shape (batch, time) with 1 <= time <= max_len={spec.max_len}; got {x.shape}")
    _check_ids("x", x, spec.vocab_size)
    return x.astype(np.int64, copy=False)


def _check_ids(name: str, ids: np.ndarray, num_classes: int) -> None:
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputTypeError(f"{name} must hold integer ids in [0, {num_classes - 1}]; got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise InputError(f"{name} must hold ids in [0, {num_classes - 1}]; got values in [{ids.min()}, {ids.max()}]")


def check_y(spec: Spec, y: Any, task: str) -> np.ndarray:
    """Labels: class ids ``(batch,)`` / next-token ids ``(batch, time)``, or regression targets ``(batch, d_out)``."""
    y = _array("y", y)
    if isinstance(spec, Transformer):
        if y.ndim != 2:
            raise InputError(f"y must be next-token ids of shape (batch, time); got {y.shape}")
        _check_ids("y", y, spec.vocab_size)
        return y.astype(np.int64, copy=False)
    if task == "regression":
        if y.ndim == 1 and spec.d_out == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != spec.d_out:
            raise InputError(f"y for regression must have shape (batch, d_out={spec.d_out}); got {y.shape}")
        if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y)):
            raise InputError("y for regression must be finite real numbers")
        return y
    if y.ndim != 1:
        raise InputError(f"y for classification must be class ids of shape (batch,); got {y.shape}")
    _check_ids("y", y, spec.d_out)
    return y.astype(np.int64, copy=False)


def check_teacher_output(spec: Spec, value: Any, kind: str, num_examples: int, time: int | None) -> np.ndarray:
    """Teacher outputs for a batch: logits or probabilities ``(batch, d_out)`` / ``(batch, time, vocab)``."""
    value = _array("teacher", value)
    width = spec.d_out if isinstance(spec, MLP) else spec.vocab_size
    shape = (num_examples, width) if time is None else (num_examples, time, width)
    if value.shape != shape:
        raise InputError(f"teacher output must have shape {shape}; got {value.shape}")
    if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
        raise InputError("teacher output must be finite floats")
    if kind == "probabilities":
        if value.min() < 0 or not np.allclose(value.sum(-1), 1.0, atol=1e-3):
            raise InputError(
                "teacher output with teacher_output='probabilities' must be non-negative and sum to 1 "
                "over the last axis; pass teacher_output='logits' for unnormalised scores"
            )
    return value


def check_same_length(**arrays: np.ndarray) -> int:
    """All arrays have the same first dimension; returns it."""
    lengths = {k: len(v) for k, v in arrays.items() if v is not None}
    if len(set(lengths.values())) > 1:
        raise InputError(f"inputs must have the same number of examples; got {lengths}")
    (n,) = set(lengths.values()) or {0}
    if n == 0:
        raise InputError("inputs must hold at least one example")
    return n
