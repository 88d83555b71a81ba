"""The backend contract (docs/backends/index.md) and the registry that finds backends lazily.

A backend is any object with the members of :class:`Backend`. matta ships
``"numpy"``, ``"torch"`` and ``"keras"``; a third party registers one through the
``matta.backends`` entry-point group, or passes a module path
(``backend="my_package.my_backend"``) whose module has a ``backend`` attribute.
A backend class subclasses :class:`Backend` to inherit the defaults of the
optional members. The core never imports a framework: a backend module is
imported only when a user asks for it by name.
"""

from __future__ import annotations

import importlib
import sys
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from matta.errors import BackendError, describe
from matta.losses import LossOptions, StepPlan, Targets
from matta.nesting import Granularity
from matta.specs import Spec
from matta.training import TrainingRun

__all__ = ["Backend", "get_backend", "backend_of", "BUILTIN_BACKENDS", "FRAMEWORK_PACKAGES"]

#: Built-in backends: name -> module (imported on first use only).
BUILTIN_BACKENDS = {"numpy": "matta.backends.numpy", "torch": "matta.backends.torch", "keras": "matta.backends.keras"}
#: Top-level packages whose classes are the native models of the built-in framework backends, known
#: without importing them. Keras comes first: a Keras layer on the torch engine is a ``torch.nn.Module`` too.
FRAMEWORK_PACKAGES = {"keras": ("keras", "tf_keras"), "torch": ("torch",)}
_CACHE: dict[str, Any] = {}


@runtime_checkable
class Backend(Protocol):
    """What a backend provides. Weights cross the boundary as numpy dicts (rule P2 layout).

    The members after :meth:`export` are optional: a backend class that
    subclasses ``Backend`` inherits the defaults documented on each.

    Attributes:
        name: the registry name, e.g. ``"torch"``.
        exactness_bounds: optional; per :meth:`engine`, the measured bound of
            ``max |extracted - nested| / max(1, max |nested|)`` where the
            backend cannot promise bit-exact extraction (rule E3). An engine
            not listed is bit-exact; the default lists none.
    """

    name: str
    exactness_bounds: Mapping[str, float] = MappingProxyType({})

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
        """Trains ``model`` over ``run.batches()``, calling ``run.record`` before each update and
        ``run.applied`` after it; on a non-finite loss or gradient it puts back the weights and
        optimizer state from before the last applied update and calls ``run.undone`` (rule T4)."""
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

    # Optional members, with their defaults.
    def engine(self) -> str:
        """The engine computing this process's models (Keras: ``KERAS_BACKEND``). Default: :attr:`name`."""
        return self.name

    def supports_dtype(self, spec: Spec, dtype: str) -> bool:
        """Whether :meth:`build` computes ``spec`` in ``dtype`` exactly. Default: every dtype.

        Where this is False, ``build`` must raise matta's own error naming the dtype.
        """
        return True

    def forward_many(self, model: Any, x: np.ndarray, granularities: Sequence[Granularity]) -> list[np.ndarray]:
        """The outputs of :meth:`forward` at each granularity, in one call (a backend may share work
        between them, e.g. an MLP's first layer, rule S1). Default: one :meth:`forward` each."""
        return [self.forward(model, x, g) for g in granularities]

    def serving(self, model: Any) -> Callable[[np.ndarray], np.ndarray]:
        """The call that serves a plain model from :meth:`build_plain`: ``x -> plain_forward(model, x)``
        bit for bit, on the fastest path the backend has that keeps every bit (e.g. a compiled graph).
        :meth:`matta.Extracted.predict` and the frontier's latency run through it. Default:
        :meth:`plain_forward`."""
        return lambda x: self.plain_forward(model, x)

    def export_loader(self, directory: str) -> Optional[str]:
        """Python source that loads what :meth:`export` wrote to ``directory`` with only the framework
        and numpy importable, and defines ``predict(x: numpy.ndarray) -> numpy.ndarray`` (``x`` in the
        model's float dtype, or integer token ids). Default: None, the export has no such loader."""
        return None

    def get_optimizer_state(self, model: Any) -> dict[str, np.ndarray]:
        """The state of the optimizer ``fit`` trains ``model`` with, as named numpy copies (rule T7's
        checkpoints save it). Default: ``{}``, an optimizer without state (plain SGD)."""
        return {}

    def set_optimizer_state(self, model: Any, state: Mapping[str, np.ndarray]) -> None:
        """Loads what :meth:`get_optimizer_state` returned into ``model``'s optimizer; ``fit`` calls it
        with ``run.optimizer_state`` once it has made the optimizer (a resumed run, rule T7).

        Default: accepts only the empty state.

        Raises:
            BackendError: the state does not fit this backend's optimizer.
        """
        if state:
            raise BackendError(f"backend {self.name!r} keeps no optimizer state; got {sorted(state)[:5]}")

    def model_packages(self) -> tuple[str, ...]:
        """Packages whose classes are this backend's native models (:func:`backend_of` reads them).
        Default: the module that defines the backend's class, and its submodules."""
        return (type(self).__module__,)


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
        missing = [m for m in _MEMBERS if backend is not None and not hasattr(backend, m)]
        hint = f" (missing: {', '.join(missing)}; subclass matta.backend.Backend for the optional ones)" if missing else ""
        raise BackendError(f"module {module_name!r} has no 'backend' object implementing matta.backend.Backend{hint}")
    _CACHE[name] = backend
    return backend


def _entry_point(name: str) -> Optional[str]:
    from importlib.metadata import entry_points

    for ep in entry_points(group="matta.backends"):
        if ep.name == name:
            return ep.value.split(":")[0]
    return None


def _loaded() -> Iterator[Backend]:
    """The backends this process has imported already (asking them imports no framework)."""
    for name, module in BUILTIN_BACKENDS.items():
        if module in sys.modules and hasattr(sys.modules[module], "backend"):
            yield get_backend(name)
    yield from list(_CACHE.values())


def backend_of(model: Any) -> str:
    """The backend name of a native model object, without importing any framework.

    The model's most derived class whose module belongs to a backend decides: the built-in
    framework packages (:data:`FRAMEWORK_PACKAGES`, Keras before torch, since a Keras layer on the
    torch engine is also a ``torch.nn.Module``), then each loaded backend's
    :meth:`Backend.model_packages`.

    Raises:
        BackendError: no known backend makes models of this class.
    """
    claims = list(FRAMEWORK_PACKAGES.items()) + [(b.name, tuple(b.model_packages())) for b in _loaded()]
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        for name, packages in claims:
            if any(module == p or module.startswith(p + ".") for p in packages):
                return name
    known = sorted({name for name, _ in claims})
    raise BackendError(f"cannot tell the backend of a {type(model).__name__}; expected a model of one of {known}")


#: The members of the contract, for the message that names the missing ones.
_MEMBERS = sorted({*Backend.__annotations__, *(k for k, v in vars(Backend).items() if callable(v) and not k.startswith("_"))})
