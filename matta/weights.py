"""Weights as plain numpy dicts: validation and initialisation.

matta's framework-neutral weight format is ``dict[str, numpy.ndarray]`` keyed by
the spec's parameter names, in the layout of rule P2. Backends convert to and
from it; the reference forward, extraction and the saved format use it as is.
"""

from __future__ import annotations

import math
import mmap
import sys
from typing import Any, Mapping, Optional

import numpy as np

from matta.errors import InputError, InputTypeError, choice
from matta.specs import MLP, Spec

__all__ = ["DTYPES", "check_dtype", "check_weights", "initial_weights", "file_mapping", "release_pages"]

#: Floating dtypes every backend supports.
DTYPES = ("float32", "float64")


def check_dtype(dtype: Any) -> str:
    """Returns the dtype's name if it is one of :data:`DTYPES`, else raises."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return choice("dtype", name, DTYPES, InputTypeError)


#: ``madvise`` advice that reclaims a range's clean pages and keeps its content (Linux 5.4+);
#: Python names it only when built against headers that have it.
_MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform.startswith("linux") else None)


def file_mapping(array: np.ndarray) -> Optional[mmap.mmap]:
    """The memory map of a file that ``array`` views (e.g. a tensor of :func:`matta.hf.read_gpt2`), or None."""
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def release_pages(mapping: mmap.mmap) -> None:
    """Hands the clean pages of a file mapping back to the OS; they load again when read.

    Pages written through a copy-on-write map keep their values (``MADV_PAGEOUT`` never
    discards content, unlike ``MADV_DONTNEED``). Where the OS cannot (another system, an old
    kernel, a file this process may not write), nothing happens: it only lowers peak memory.
    """
    if _MADV_PAGEOUT is None or mapping.closed:
        return
    try:
        mapping.madvise(_MADV_PAGEOUT)
    except (OSError, ValueError):
        pass


def check_weights(spec: Spec, weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Checks that ``weights`` has exactly the spec's parameters, shapes and one float dtype.

    Returns:
        The same arrays as a new dict (no copies).
    """
    if not isinstance(weights, Mapping):
        raise InputTypeError(f"weights must be a dict of numpy arrays; got {type(weights).__name__}")
    params = spec.parameters()
    missing = [k for k in params if k not in weights]
    extra = [k for k in weights if k not in params]
    if missing or extra:
        raise InputError(
            f"weights do not match the {type(spec).__name__} spec: missing {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}"
        )
    out: dict[str, np.ndarray] = {}
    dtypes = set()
    for name, param in params.items():
        w = weights[name]
        if not isinstance(w, np.ndarray):
            raise InputTypeError(f"weights[{name!r}] must be a numpy.ndarray; got {type(w).__name__}")
        if w.shape != param.shape:
            raise InputError(f"weights[{name!r}] must have shape {param.shape}; got {w.shape}")
        check_dtype(w.dtype.name)
        dtypes.add(w.dtype.name)
        out[name] = w
    if len(dtypes) > 1:
        raise InputTypeError(f"weights must all have one dtype from {DTYPES}; got {sorted(dtypes)}")
    return out


def initial_weights(spec: Spec, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Initial weights, identical on every backend for the same ``seed``.

    MLP kernels are He-normal (``std = sqrt(2 / fan_in)``); transformer kernels
    and embeddings are ``N(0, 0.02)`` with the residual output projections scaled
    by ``1 / sqrt(2 * n_layers)`` as in GPT-2; biases and offsets are 0, scales 1.
    Each tensor draws from its own stream keyed by its name, so adding a layer
    does not change the others.
    """
    dtype = check_dtype(dtype)
    out: dict[str, np.ndarray] = {}
    for index, (name, param) in enumerate(spec.parameters().items()):
        rng = np.random.default_rng([seed, index])
        if param.kind in ("bias", "offset"):
            w = np.zeros(param.shape)
        elif param.kind == "scale":
            w = np.ones(param.shape)
        elif isinstance(spec, MLP):
            w = rng.standard_normal(param.shape) * math.sqrt(2.0 / param.shape[0])
        else:
            std = 0.02
            if name.endswith(("attention.output.kernel", "ffn.down.kernel")):
                std /= math.sqrt(2 * spec.n_layers)
            w = rng.standard_normal(param.shape) * std
        out[name] = w.astype(dtype)
    return out
