"""The numpy backend: the reference spec behind the backend contract.

It exists for two reasons. It puts the numpy reference into the conformance
suite as a target like any other (``pytest --pyargs matta.spec_tests --backends=numpy``), and
it is the smallest complete example of a backend for a third party to copy:
every member of :class:`matta.backend.Backend` in about a hundred lines.

Gradients are central finite differences of the reference loss, so it trains
only toy models; with stop-gradient on, the parent's outputs are computed once
from the unperturbed weights, which is exactly what ``sg`` means (rule L3).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from matta import reference
from matta.backend import Backend
from matta.errors import NonFiniteLossError, OptionError
from matta.losses import LossOptions, NumpyOps, StepPlan, Targets, composite_loss
from matta.nesting import Granularity
from matta.specs import Spec
from matta.training import TrainingRun

__all__ = ["NumpyBackend", "NumpyModel", "backend"]

OPS = NumpyOps()


class NumpyModel:
    """A spec and its weights: both the nested and the plain model of this backend."""

    def __init__(self, spec: Spec, weights: Mapping[str, np.ndarray]):
        self.spec = spec
        self.weights = {k: np.array(v, copy=True) for k, v in weights.items()}


class NumpyBackend(Backend):
    """The reference as a backend (see :class:`matta.backend.Backend`)."""

    name = "numpy"
    #: Finite-difference step of the gradients.
    epsilon = 1e-6

    def build(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> NumpyModel:
        _cpu_only(device)
        return NumpyModel(spec, weights)

    def get_weights(self, model: NumpyModel) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in model.weights.items()}

    def set_weights(self, model: NumpyModel, weights: Mapping[str, np.ndarray]) -> None:
        for k, v in weights.items():
            model.weights[k][...] = v

    def forward(self, model: NumpyModel, x: np.ndarray, granularity: Granularity) -> np.ndarray:
        return reference.forward(model.spec, model.weights, x, granularity)

    def _loss(self, spec: Spec, weights: Mapping[str, np.ndarray], x: np.ndarray, targets: Targets, plan: StepPlan,
              options: LossOptions, frozen: Optional[dict[str, np.ndarray]] = None) -> float:
        outputs = {t.name: reference.forward(spec, weights, x, t.granularity) for t in plan.terms}
        if frozen is not None:
            # Stop-gradient (rule L3): a parent enters the distillation term with its unperturbed output.
            parents = {t.parent for t in plan.terms if t.parent is not None}
            outputs.update({f"{name}#sg": frozen[name] for name in parents})
            plan = StepPlan(plan.step, tuple(
                t if t.parent is None else type(t)(t.name, t.granularity, t.weight, f"{t.parent}#sg") for t in plan.terms
            ), plan.distill)
        return float(composite_loss(OPS, outputs, targets, plan, options)[0])

    def loss_and_gradients(self, model: NumpyModel, x: np.ndarray, targets: Targets, plan: StepPlan,
                           options: LossOptions) -> tuple[float, dict[str, np.ndarray]]:
        spec, w = model.spec, model.weights
        frozen = None
        if options.stop_gradient:
            frozen = {t.name: reference.forward(spec, w, x, t.granularity) for t in plan.terms}
        loss = self._loss(spec, w, x, targets, plan, options, frozen)
        grads = {}
        for name, value in w.items():
            grad = np.zeros(value.shape, dtype=np.float64)
            flat, out = value.reshape(-1), grad.reshape(-1)
            for i in range(flat.size):
                keep = flat[i]
                flat[i] = keep + self.epsilon
                up = self._loss(spec, w, x, targets, plan, options, frozen)
                flat[i] = keep - self.epsilon
                down = self._loss(spec, w, x, targets, plan, options, frozen)
                flat[i] = keep
                out[i] = (up - down) / (2 * self.epsilon)
            grads[name] = grad.astype(value.dtype)
        return loss, grads

    def fit(self, model: NumpyModel, run: TrainingRun, *, optimizer: Any = None, learning_rate: float = 1e-3,
            weight_decay: float = 0.0, **kwargs: Any) -> None:
        if optimizer not in (None, "sgd") or kwargs:
            raise OptionError(f"the numpy backend trains with optimizer=None or 'sgd' only; got {optimizer!r}, {sorted(kwargs)}")
        self.set_optimizer_state(model, run.optimizer_state or {})
        before, pending = None, False  # rule T4: the weights before the last (or the unfinished) update
        try:
            for batch in run.batches():
                loss, grads = self.loss_and_gradients(model, batch.x, batch.targets, batch.plan, run.options)
                run.record(batch.step, loss, None, batch.plan.distill)
                run.check_gradients(batch.step, all(np.all(np.isfinite(g)) for g in grads.values()))
                before, pending = {k: v.copy() for k, v in model.weights.items()}, True
                rate = learning_rate * run.learning_rate_scale(batch.step)  # rule T6
                for k, g in grads.items():
                    model.weights[k] -= rate * (g + weight_decay * model.weights[k])
                pending = False
                run.applied(batch.step)
        except BaseException as exc:
            # An error inside an update leaves the step before it; a non-finite step undoes the last update.
            if before is not None and (pending or isinstance(exc, NonFiniteLossError)):
                model.weights.update(before)
                if not pending:
                    run.undone()
            raise

    def build_plain(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> NumpyModel:
        _cpu_only(device)
        return NumpyModel(spec, weights)

    def plain_forward(self, model: NumpyModel, x: np.ndarray) -> np.ndarray:
        return reference.plain_forward(model.spec, model.weights, x)

    def export(self, model: NumpyModel, spec: Spec, directory: str) -> list[str]:
        """The numpy backend's native format is matta's own: ``weights.npz`` + the spec, no pickle."""
        np.savez(os.path.join(directory, "weights.npz"), **model.weights)
        with open(os.path.join(directory, "numpy-spec.json"), "w") as f:
            json.dump(spec.to_dict(), f)
        return ["weights.npz", "numpy-spec.json"]


def _cpu_only(device: Optional[str]) -> None:
    if device not in (None, "cpu"):
        raise OptionError(f"device must be None or 'cpu' for the numpy backend; got {device!r}")


backend = NumpyBackend()
