"""The backend contract (docs/backends/index.md) and the registry that finds backends lazily.

A backend is any object with the members of :class:`Backend`. matta ships
``"torch"`` and ``"keras"``; a third party registers one through the
``matta.backends`` entry-point group, or passes a module path
(``backend="my_package.my_backend"``) whose module has a ``backend`` attribute.
The core never imports a framework: a backend module is imported only when a
user asks for it by name.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional, Protocol, runtime_checkable

import numpy as np

from matta.errors import BackendError, describe
from matta.losses import LossOptions, StepPlan, Targets
from matta.nesting import Granularity
from matta.specs import Spec
from matta.training import TrainingRun

__all__ = ["Backend", "get_backend", "backend_of", "BUILTIN_BACKENDS"]

#: Built-in backends: name -> module (imported on first use only).
BUILTIN_BACKENDS = {"numpy": "matta.backends.numpy", "torch": "matta.backends.torch", "keras": "matta.backends.keras"}
_CACHE: dict[str, Any] = {}


@runtime_checkable
class Backend(Protocol):
    """What a backend provides. Weights cross the boundary as numpy dicts (rule P2 layout).

    Attributes:
        name: the registry name, e.g. ``"torch"``.
    """

    name: str

    def build(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> Any:
        """A native *nested* model of ``spec`` holding ``weights`` (their dtype is the model's)."""
        ...

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        """The nested model's weights as numpy copies in rule P2 layout."""
        ...

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        """Loads numpy weights into the nested model."""
        ...

    def forward(self, model: Any, x: np.ndarray, granularity: Granularity) -> np.ndarray:
        """The nested model's output at ``granularity``, sliced at call time (rule S1)."""
        ...

    def loss_and_gradients(
        self, model: Any, x: np.ndarray, targets: Targets[np.ndarray], plan: StepPlan, options: LossOptions
    ) -> tuple[float, dict[str, np.ndarray]]:
        """The composite loss of one batch and its gradient for every parameter (rule P2 layout)."""
        ...

    def fit(self, model: Any, run: TrainingRun, *, optimizer: Any = None, learning_rate: float = 1e-3,
            weight_decay: float = 0.0, **kwargs: Any) -> None:
        """Trains ``model`` over ``run.batches()``, calling ``run.record`` before each update."""
        ...

    def build_plain(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> Any:
        """A plain native model of ``spec`` (built-in layers only, no call-time slicing)."""
        ...

    def plain_forward(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Output of a plain model from :meth:`build_plain`."""
        ...

    def export(self, model: Any, spec: Spec, directory: str) -> list[str]:
        """Saves the plain model in the framework's own format; returns the file names written."""
        ...


def get_backend(name: Any) -> Backend:
    """The backend registered as ``name`` (built-in, entry point, or module path), imported now.

    Raises:
        BackendError: unknown name, or the framework failed to import (the
            message says which extra to install).
    """
    if isinstance(name, Backend) and not isinstance(name, str):
        return name
    if not isinstance(name, str):
        raise BackendError(f"backend must be a name ({describe(BUILTIN_BACKENDS)}) or a backend object; got {name!r}")
    if name in _CACHE:
        return _CACHE[name]
    module_name = BUILTIN_BACKENDS.get(name)
    if module_name is None:
        module_name = _entry_point(name)
    if module_name is None and "." in name:
        module_name = name
    if module_name is None:
        raise BackendError(
            f"backend must be {describe(BUILTIN_BACKENDS)}, a registered 'matta.backends' entry point, "
            f"or a module path such as 'my_package.my_backend'; got {name!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = {"torch": "torch", "keras": "keras,tensorflow"}.get(name, "…")
        raise BackendError(
            f"backend {name!r} could not be imported ({exc}); install it with pip install 'matta[{extra}]'"
        ) from exc
    backend = getattr(module, "backend", None)
    if not isinstance(backend, Backend):
        raise BackendError(f"module {module_name!r} has no 'backend' object implementing matta.backend.Backend")
    _CACHE[name] = backend
    return backend


def _entry_point(name: str) -> Optional[str]:
    from importlib.metadata import entry_points

    for ep in entry_points(group="matta.backends"):
        if ep.name == name:
            return ep.value.split(":")[0]
    return None


def backend_of(model: Any) -> str:
    """The backend name of a native model object, without importing any framework.

    Keras is checked before torch: a Keras layer on the torch backend is also a
    ``torch.nn.Module``.
    """
    modules = [c.__module__ for c in type(model).__mro__]
    if any(m == "keras" or m.startswith(("keras.", "tf_keras")) for m in modules):
        return "keras"
    if any(m == "torch" or m.startswith("torch.") for m in modules):
        return "torch"
    raise BackendError(f"cannot tell the backend of a {type(model).__name__}; expected a Keras or torch model")
