"""The Keras 3 backend of matta (``backend="keras"``), on TensorFlow, JAX or PyTorch.

Written once over ``keras.ops``; ``KERAS_BACKEND`` picks the engine (Keras reads it
once per process). Implements :class:`matta.backend.Backend`:

* the nested TA is :class:`~matta.backends.keras.models.NestedModel` (one variable
  per spec parameter, rule P2 layout); ``forward`` and ``loss_and_gradients`` run
  the functional forward of ``matta.nesting.plan(spec, g).spec`` over the variables
  read through that plan, so every size and slice bound comes from the core;
* training goes through Keras' own ``Model.fit``
  (:mod:`matta.backends.keras.training`), so Keras callbacks work;
* extracted models are functional ``keras.Model`` s of built-in layers, saved as
  ``model.keras`` that ``keras.saving.load_model`` opens without matta.

float64 works wherever the engine computes every op the model uses in float64
(TensorFlow; see :func:`matta.backends.keras.engine.check_dtype`); elsewhere
``build`` raises :class:`matta.errors.InputTypeError` naming the op.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

import keras
import numpy as np
from keras import ops

from matta.backend import FRAMEWORK_PACKAGES, Backend
from matta.errors import BackendError, OptionError
from matta.losses import LossOptions, StepPlan, Targets
from matta.nesting import Granularity
from matta.specs import MLP, Spec
from matta.training import TrainingRun
from matta.backends.keras import distribution, engine
from matta.backends.keras.learning_rate import RunLearningRate
from matta.backends.keras.models import NestedModel, assign, assign_plain, plain_model, plain_variables
from matta.backends.keras.training import KerasOps, Trainer, fit, make_optimizer, step_loss

__all__ = ["KerasBackend", "KerasOps", "backend"]

# One trainer (and so one optimizer state) per nested model, kept across fit() calls like the torch backend.
_TRAINERS: "weakref.WeakKeyDictionary[NestedModel, tuple[Any, Trainer, keras.optimizers.Optimizer]]" = (
    weakref.WeakKeyDictionary()
)


def _state_name(variable: keras.Variable) -> str:
    """An optimizer variable's name without the optimizer's own (``adam_w_3/…``), which counts optimizers made."""
    return variable.path.split("/", 1)[-1]


def _dtype_of(weights: Mapping[str, np.ndarray]) -> str:
    return next(iter(weights.values())).dtype.name


def _device_scope(device: Optional[str]):
    if device is None:
        import contextlib

        return contextlib.nullcontext()
    if not isinstance(device, str):
        raise OptionError(f"device must be None or a device string such as 'cpu' or 'gpu:0'; got {device!r}")
    try:
        return keras.device(device)
    except (ValueError, RuntimeError) as exc:
        raise OptionError(f"device must be a device of this Keras engine such as 'cpu' or 'gpu:0'; got {device!r}") from exc


class KerasBackend(Backend):
    """matta's Keras 3 backend (see :class:`matta.backend.Backend` for the contract)."""

    name = "keras"

    def engine(self) -> str:
        """The Keras engine of this process: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
        return keras.backend.backend()

    def supports_dtype(self, spec: Spec, dtype: str) -> bool:
        """Whether this engine computes ``spec`` in ``dtype`` exactly (float64: TensorFlow only, see the docs)."""
        return dtype != "float64" or engine.float64_blocker(spec) is None

    # -------------------------------------------------------------- nested model
    def build(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> NestedModel:
        dtype = _dtype_of(weights)
        engine.check_dtype(spec, dtype)
        distribution.check(spec)  # a keras.distribution lays out the variables built here (JAX only)
        with _device_scope(device):
            model = NestedModel(spec, dtype)
        self.set_weights(model, weights)
        return model

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        variables = model.params if isinstance(model, NestedModel) else plain_variables(model, model._matta_spec)
        return {k: np.array(ops.convert_to_numpy(v.value), copy=True) for k, v in variables.items()}

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        if isinstance(model, NestedModel):
            assign(model.params, weights)
        else:
            assign_plain(model, model._matta_spec, weights)

    def _input(self, spec: Spec, dtype: str, x: np.ndarray):
        if isinstance(spec, MLP):
            return ops.convert_to_tensor(np.asarray(x, dtype=dtype), dtype=dtype)
        return ops.convert_to_tensor(np.asarray(x, dtype=np.int32), dtype="int32")

    def forward(self, model: NestedModel, x: np.ndarray, granularity: Granularity) -> np.ndarray:
        out = model.run(self._input(model.spec, model.compute_dtype_name, x), granularity)
        return np.asarray(ops.convert_to_numpy(out))

    def forward_many(self, model: NestedModel, x: np.ndarray, granularities: Sequence[Granularity]) -> list[np.ndarray]:
        """One ``run_many`` call: the nested MLP computes its first layer once for every granularity."""
        outs = model.run_many(self._input(model.spec, model.compute_dtype_name, x), list(granularities))
        return [np.asarray(ops.convert_to_numpy(out)) for out in outs]

    def _targets(self, dtype: str, targets: Targets[np.ndarray]) -> Targets[Any]:
        convert = lambda a, dt: None if a is None else ops.convert_to_tensor(np.asarray(a, dtype=dt), dtype=dt)  # noqa: E731
        return Targets(hard=convert(targets.hard, "int32"), soft=convert(targets.soft, dtype),
                       regression=convert(targets.regression, dtype))

    def loss_and_gradients(self, model: NestedModel, x: np.ndarray, targets: Targets[np.ndarray], plan: StepPlan,
                           options: LossOptions) -> tuple[float, dict[str, np.ndarray]]:
        dtype = model.compute_dtype_name
        xt, tt = self._input(model.spec, dtype, x), self._targets(dtype, targets)

        def fn():
            total, _ = step_loss(model, xt, tt, plan.terms, plan.distill, options)  # the training step's own loss
            return total, None

        names = model.param_names
        value, _, grads = engine.current().value_and_grad([model.params[n] for n in names], fn)
        out = {n: np.array(ops.convert_to_numpy(g), copy=True) for n, g in zip(names, grads)}
        return float(ops.convert_to_numpy(value)), out

    def fit(self, model: NestedModel, run: TrainingRun, *, optimizer: Any = None, learning_rate: float = 1e-3,
            weight_decay: float = 0.0, **kwargs: Any) -> None:
        """Trains with ``keras.Model.fit``; ``kwargs`` may hold ``callbacks``, ``verbose``, ``run_eagerly``, ``jit_compile``."""
        if run.schedules_learning_rate and optimizer is not None:
            raise OptionError(
                "learning_rate_schedule / warmup_steps need the default optimizer on Keras (optimizer=None); "
                "give your own Keras optimizer a keras.optimizers.schedules.LearningRateSchedule instead"
            )
        distribution.check(model.spec, run.batch_size)
        cached = _TRAINERS.get(model)
        if cached is not None and cached[0] is optimizer:
            trainer, opt = cached[1], cached[2]
        else:
            opt = make_optimizer(optimizer, learning_rate, weight_decay)
            trainer = Trainer(model)
            _TRAINERS[model] = (optimizer, trainer, opt)
        if run.schedules_learning_rate:
            # Rule T6 on the optimizer's own step counter: this run's step run.start is its current value
            # (read once a resumed run's state is in).
            opt.learning_rate = schedule = RunLearningRate(learning_rate, run, start=0)
        if run.optimizer_state is not None:  # a resumed run (rule T7)
            if not opt.built:
                opt.build(trainer.trainable_variables)
            self.set_optimizer_state(model, run.optimizer_state)
        if run.schedules_learning_rate:
            schedule.start = int(ops.convert_to_numpy(opt.iterations)) - run.start
        fit(trainer, run, opt, integer_inputs=not isinstance(model.spec, MLP), **kwargs)

    # -------------------------------------------------------------- optimizer state (rule T7)
    def get_optimizer_state(self, model: NestedModel) -> dict[str, np.ndarray]:
        """``<index>/<variable path>`` for each of the optimizer's variables (the step counter included)."""
        cached = _TRAINERS.get(model)
        if cached is None or not cached[2].built:
            return {}
        return {_state_name(v): np.array(ops.convert_to_numpy(v.value), copy=True) for v in cached[2].variables}

    def set_optimizer_state(self, model: NestedModel, state: Mapping[str, np.ndarray]) -> None:
        """Assigns :meth:`get_optimizer_state`'s arrays to the built optimizer's variables, matched by name and shape."""
        cached = _TRAINERS.get(model)
        variables = list(cached[2].variables) if cached is not None and cached[2].built else []
        names = [_state_name(v) for v in variables]
        if sorted(names) != sorted(state):
            raise BackendError(f"the optimizer state does not fit this optimizer: it holds {sorted(state)[:4]}…, "
                               f"the optimizer's variables are {names[:4]}…")
        for name, v in zip(names, variables):
            if tuple(np.shape(state[name])) != tuple(v.shape):
                raise BackendError(f"optimizer state {name!r} has shape {np.shape(state[name])}; the variable has {v.shape}")
            v.assign(np.asarray(state[name]).astype(v.dtype))

    # -------------------------------------------------------------- plain models
    def build_plain(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> keras.Model:
        dtype = _dtype_of(weights)
        engine.check_dtype(spec, dtype)
        with _device_scope(device):
            model = plain_model(spec, dtype)
        # Read back by get_weights/set_weights; not saved in model.keras (that file holds built-in layers only).
        object.__setattr__(model, "_matta_spec", spec)
        object.__setattr__(model, "_matta_dtype", dtype)
        self.set_weights(model, weights)
        return model

    def plain_forward(self, model: keras.Model, x: np.ndarray) -> np.ndarray:
        out = model(self._input(model._matta_spec, model._matta_dtype, x), training=False)
        return np.asarray(ops.convert_to_numpy(out))

    def serving(self, model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
        """The engine's compiled call where it is bit-exact (TensorFlow: ``tf.function``), else the eager one.

        See ``compiled_call`` in :mod:`matta.backends.keras.engines.tensorflow`.
        """
        spec, dtype = model._matta_spec, model._matta_dtype
        call = engine.current().compiled_call(model, spec, dtype)
        if call is None:
            return super().serving(model)
        return lambda x: np.asarray(ops.convert_to_numpy(call(self._input(spec, dtype, x))))

    def export(self, model: keras.Model, spec: Spec, directory: str) -> list[str]:
        """Writes ``model.keras``: built-in layers and ``keras.ops`` only, loadable without matta (safe mode on)."""
        model.save(os.path.join(directory, "model.keras"))
        return ["model.keras"]

    def export_loader(self, directory: str) -> str:
        """Loads ``model.keras`` with ``keras.saving.load_model`` in safe mode (token ids as int32)."""
        return (
            "import numpy as np, keras\n"
            f"_model = keras.saving.load_model({os.path.join(directory, 'model.keras')!r}, safe_mode=True)\n"
            "def predict(x):\n"
            "    x = x.astype('int32') if np.issubdtype(x.dtype, np.integer) else x\n"
            "    return np.asarray(keras.ops.convert_to_numpy(_model(x, training=False)))\n"
        )

    def model_packages(self) -> tuple[str, ...]:
        return FRAMEWORK_PACKAGES["keras"]


backend = KerasBackend()
