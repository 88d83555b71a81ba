"""Assertion helpers that name the failing backend, spec and granularity."""

from __future__ import annotations

from typing import Any

import numpy as np

from matta.nesting import Granularity
from matta.specs import Spec, Transformer

#: Reference-agreement tolerances per dtype: |a - b| <= atol * max(1, max|b|) + rtol * |b|.
TOLERANCES = {"float32": (1e-4, 1e-4), "float64": (1e-9, 1e-9)}
#: Loss and gradient tolerances (relative) per dtype, for backends that compute in float32 only.
LOSS_TOL = {"float64": 1e-9, "float32": 2e-5}
#: Gradient against finite differences of the reference loss (relative), per dtype.
FD_TOL = {"float64": 1e-5, "float32": 2e-3}

#: Extra slack for a Transformer's outputs. The suite draws d_model (and its active prefix) as small
#: as 1, where a LayerNorm's features are (nearly) equal: its variance is far below ε, so it divides
#: rounding-level differences between engines by sqrt(ε) (≈ 316 at ε = 1e-5), and engines that keep ε
#: as a float32 constant (TensorFlow in float64) move it by 2.5e-8 relatively. Measured on Keras:
#: 1.5e-4 and 1.8e-4 in float32 (d_model 1) and 2.4e-9 in float64 (d_model 3). A wrong slice or
#: formula errs by orders of magnitude more, so these bounds still catch every real bug.
LAYER_NORM_SLACK = {"float32": 10.0, "float64": 100.0}


def precise_dtype(backend: Any, spec: Spec) -> str:
    """float64 where the backend computes ``spec`` in it (``supports_dtype``), else float32."""
    return "float64" if backend.supports_dtype(spec, "float64") else "float32"


def context(backend: Any = None, spec: Spec | None = None, granularity: Granularity | None = None, **extra: Any) -> str:
    """A one-line description of the case for failure messages."""
    parts = []
    if backend is not None:
        parts.append(f"backend={getattr(backend, 'name', backend)}")
    if spec is not None:
        parts.append(f"spec={spec.to_json()}")
    if granularity is not None and spec is not None:
        parts.append(f"granularity={granularity.to_dict(spec)}")
    parts += [f"{k}={v}" for k, v in extra.items()]
    return "; ".join(parts)


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str, where: str, spec: Spec | None = None) -> None:
    """``actual`` agrees with ``expected`` within the dtype's tolerance; the message names the case.

    With ``spec`` a :class:`~matta.Transformer`, the tolerance grows by :data:`LAYER_NORM_SLACK`.
    """
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} ({where})"
    assert np.all(np.isfinite(actual)), f"non-finite output ({where})"
    atol, rtol = TOLERANCES[dtype]
    if isinstance(spec, Transformer):
        atol, rtol = atol * LAYER_NORM_SLACK[dtype], rtol * LAYER_NORM_SLACK[dtype]
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    bound = atol * scale + rtol * np.abs(expected)
    worst = float(np.max(err - bound, initial=-1.0))
    assert worst <= 0, f"max |error| {float(err.max()):.3g} exceeds {dtype} tolerance (atol={atol}, rtol={rtol}, scale={scale:.3g}) ({where})"


def assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray, where: str) -> None:
    """``actual`` and ``expected`` are identical to the last bit."""
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape} ({where})"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype} ({where})"
    same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    if not same.all():
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        raise AssertionError(f"not bit-exact: {int((~same).sum())} of {same.size} values differ, max |diff| {diff.max():.3g} ({where})")


def assert_weights_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str) -> None:
    """Same parameter names, shapes, dtypes and values to the bit."""
    assert sorted(actual) == sorted(expected), f"parameter names differ: {sorted(set(actual) ^ set(expected))} ({where})"
    for name in expected:
        assert_bitwise_equal(actual[name], expected[name], f"{where}; parameter {name}")
