"""The framework-neutral saved format (rule E5): safetensors weights + a JSON spec.

A saved folder holds ``spec.json`` (format tag, spec, dtype and where the model
came from), ``weights.safetensors`` (numpy arrays, rule P2 layout) and, beside
them, the backend's native file (``model.pt2`` for torch, ``model.keras`` for
Keras). :func:`read` never unpickles: safetensors and JSON carry no code.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from matta.errors import FormatError
from matta.specs import Spec, spec_from_dict
from matta.weights import check_weights

__all__ = ["FORMAT", "write", "read"]

FORMAT = "matta.extracted/1"
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"


def write(directory: str, spec: Spec, weights: Mapping[str, np.ndarray], info: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Writes ``spec.json`` and ``weights.safetensors`` into ``directory`` (created if needed)."""
    from safetensors.numpy import save_file

    weights = check_weights(spec, weights)
    os.makedirs(directory, exist_ok=True)
    dtype = next(iter(weights.values())).dtype.name
    meta = {"format": FORMAT, "spec": spec.to_dict(), "dtype": dtype, "num_params": spec.num_params, **(info or {})}
    with open(os.path.join(directory, SPEC_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, os.path.join(directory, WEIGHTS_FILE))
    return [SPEC_FILE, WEIGHTS_FILE]


def read(directory: str) -> tuple[Spec, dict[str, np.ndarray], dict[str, Any]]:
    """Reads a folder written by :func:`write`: ``(spec, weights, metadata)``."""
    from safetensors.numpy import load_file

    spec_path = os.path.join(directory, SPEC_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (spec_path, weights_path):
        if not os.path.isfile(path):
            raise FormatError(f"{directory!r} is not a saved matta model: {os.path.basename(path)} is missing")
    with open(spec_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{spec_path} has format {meta.get('format')!r}; this matta reads {FORMAT!r}")
    spec = spec_from_dict(meta["spec"])
    weights = check_weights(spec, load_file(weights_path))
    return spec, weights, meta
