"""Keras' distribution API (``keras.distribution``) for matta's Keras backend: JAX only.

Set a distribution the Keras way before building the MatTA, and ``fit`` trains under it::

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = MatTA(spec, students, backend="keras")       # variables laid out by the distribution
    model.fit(x, y, batch_size=64)                       # each batch split over the devices

:func:`model_parallel` is a ``ModelParallel`` distribution that shards a Transformer's large
kernels over a ``model`` mesh axis (and batches over a ``batch`` axis). Keras implements
its distribution API on the JAX engine only: on TensorFlow and torch, :func:`check` raises
matta's error naming what to use instead.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import keras

from matta.errors import OptionError
from matta.specs import Spec, Transformer

__all__ = ["active", "check", "model_parallel"]

# The Transformer's large kernels (rule P2 layout ``(in, out)``) and the mesh axis of each of their axes:
# the projections into heads and the FFN's up kernel split their outputs, the projections back to the
# residual stream split their inputs, so each device holds whole heads and a slice of the FFN.
_SHARDED = {
    r".*attention_(query|key|value)_kernel": (None, "model"),
    r".*attention_output_kernel": ("model", None),
    r".*ffn_up_kernel": (None, "model"),
    r".*ffn_down_kernel": ("model", None),
    r".*embed_tokens": (None, "model"),
    r".*head_kernel": ("model", None),
}


def active() -> Optional[Any]:
    """The distribution set with ``keras.distribution.set_distribution``, or ``None``."""
    return keras.distribution.distribution()


def check(spec: Spec, batch_size: Optional[int] = None) -> Optional[Any]:
    """The active distribution, checked: JAX engine, and a batch the data axis splits evenly.

    Raises:
        OptionError: a distribution on another engine, or a ``batch_size`` the devices cannot share.
    """
    dist = active()
    if dist is None:
        return None
    engine = keras.backend.backend()
    if engine != "jax":
        raise OptionError(
            f"keras.distribution is implemented on KERAS_BACKEND=jax only; this process runs {engine!r}. "
            "Use KERAS_BACKEND=jax, or backend='torch' under torchrun (DDP/FSDP), or unset the distribution"
        )
    axis = getattr(dist, "batch_dim_name", None)
    mesh = dist.device_mesh
    shards = mesh.shape[mesh.axis_names.index(axis)] if axis in mesh.axis_names else 1
    if batch_size is not None and batch_size % shards:
        raise OptionError(f"batch_size must be divisible by the {shards} devices of the mesh axis {axis!r}; "
                          f"got {batch_size}")
    return dist


def model_parallel(spec: Spec, devices: Optional[Sequence[str]] = None, model_devices: Optional[int] = None) -> Any:
    """A ``keras.distribution.ModelParallel`` sharding ``spec``'s large kernels over a ``model`` axis.

    Args:
        spec: a :class:`~matta.Transformer` (the TA).
        devices: the devices (default: every device Keras lists).
        model_devices: devices per model replica (default: all of them; the rest form the batch axis).

    Raises:
        OptionError: ``spec`` is not a Transformer, or ``model_devices`` does not divide the devices.
    """
    if not isinstance(spec, Transformer):
        raise OptionError(f"model_parallel shards a Transformer's kernels; got a {type(spec).__name__}")
    devices = list(devices or keras.distribution.list_devices())
    model_devices = len(devices) if model_devices is None else model_devices
    if not isinstance(model_devices, int) or model_devices < 1 or len(devices) % model_devices:
        raise OptionError(f"model_devices must be an integer >= 1 dividing the {len(devices)} devices; got {model_devices!r}")
    for name, param in spec.parameters().items():
        axes = next((a for p, a in _SHARDED.items() if re.fullmatch(p, name.replace(".", "_"))), None)
        if axes is not None and param.shape[axes.index("model")] % model_devices:
            raise OptionError(f"model_devices must divide every sharded size; {name} has "
                              f"{param.shape[axes.index('model')]} on its sharded axis, got model_devices={model_devices}")
    mesh = keras.distribution.DeviceMesh((len(devices) // model_devices, model_devices), ("batch", "model"), devices)
    layout = keras.distribution.LayoutMap(mesh)
    for pattern, axes in _SHARDED.items():
        layout[pattern] = axes
    return keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
