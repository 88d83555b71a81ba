"""The public API: :class:`MatTA` (train one nested model) and :class:`Extracted` (serve one size)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import numpy as np

from matta import saving
from matta.backend import Backend, get_backend
from matta.errors import GranularityError, InputError, InputTypeError, OptionError, choice, describe, integer
from matta.extraction import extract
from matta.inputs import check_same_length, check_teacher_output, check_x, check_y
from matta.losses import TA, LossOptions, NumpyOps, Schedule
from matta.nesting import Granularity, GranularityLike, num_params, resolve
from matta.specs import Spec, Transformer, check_spec
from matta.training import LEARNING_RATE_SCHEDULES, TeacherLike, TrainingRun
from matta.weights import check_dtype, check_weights, initial_weights

__all__ = ["MatTA", "Extracted", "load", "metrics"]

DEFAULT_STUDENTS = {"S": 0.25}


class MatTA:
    """A TA with Students nested inside it, trained together (rules N1, L1–L6).

    Example:
        >>> from matta import MatTA, MLP
        >>> model = MatTA(MLP(d_in=64, hidden=[256, 256], d_out=10), students={"S": 0.25, "M": 0.5})
        >>> model.fit(x, y, epochs=5)                    # doctest: +SKIP
        >>> student = model.extract("S")                 # a plain, smaller model
        >>> student.save("student-s")                    # doctest: +SKIP

    Args:
        spec: an :class:`~matta.MLP` or :class:`~matta.Transformer`: the TA.
        students: name -> granularity (any form of rule G1). ``"TA"`` is reserved
            for the full model; ``{}`` trains the spec alone (a baseline).
        backend: ``"torch"``, ``"keras"`` or a registered/third-party backend.
        seed: seeds the initial weights, batch order and granularity sampling.
        dtype: ``"float32"`` or ``"float64"``.
        device: backend device string (torch: ``"cpu"``, ``"cuda"``; default: CUDA if present).
        optimizer: backend optimizer: ``None`` for AdamW; torch: an optimizer class
            or ``callable(params) -> optimizer``; Keras: an optimizer instance or name.
        learning_rate: learning rate of the default optimizer.
        weight_decay: weight decay of the default optimizer.
        learning_rate_schedule: ``"constant"`` or ``"cosine"`` decay over each
            ``fit()`` call (rule T6). It scales the optimizer's learning rate; on
            Keras it needs the default optimizer.
        warmup_steps: steps of linear learning-rate warm-up at the start of each ``fit()`` (rule T6).
        **loss_options: any field of :class:`~matta.losses.LossOptions`.
    """

    def __init__(
        self,
        spec: Spec,
        students: Optional[Mapping[str, GranularityLike]] = None,
        backend: Union[str, Backend] = "torch",
        seed: int = 0,
        *,
        dtype: str = "float32",
        device: Optional[str] = None,
        optimizer: Any = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        learning_rate_schedule: str = "constant",
        warmup_steps: int = 0,
        _weights: Optional[Mapping[str, np.ndarray]] = None,
        **loss_options: Any,
    ):
        self.spec = check_spec(spec)
        integer("seed", seed, 0)
        self.seed = int(seed)
        self.dtype = check_dtype(dtype)
        unknown = sorted(set(loss_options) - set(LossOptions.names()))
        if unknown:
            raise OptionError(f"unknown option(s) {unknown}; loss options are {list(LossOptions.names())}")
        self.options = LossOptions(**loss_options)
        if isinstance(spec, Transformer) and self.options.task != "classification":
            raise OptionError("task must be 'classification' for a Transformer (next-token prediction)")
        students = DEFAULT_STUDENTS if students is None else students
        if not isinstance(students, Mapping):
            raise InputTypeError(f"students must be a dict of name -> granularity; got {type(students).__name__}")
        self.students: dict[str, Granularity] = {}
        for name, g in students.items():
            if not isinstance(name, str) or not name or name == TA:
                raise GranularityError(f"student names must be non-empty strings other than {TA!r}; got {name!r}")
            self.students[name] = resolve(self.spec, g)
        self.schedule = Schedule(self.spec, self.students, self.options, self.seed)  # checks rule N1
        for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise OptionError(f"{name} must be a number >= 0; got {value!r}")
        choice("learning_rate_schedule", learning_rate_schedule, LEARNING_RATE_SCHEDULES)
        integer("warmup_steps", warmup_steps, 0)
        self.learning_rate_schedule = learning_rate_schedule
        self.warmup_steps = int(warmup_steps)
        self.optimizer = optimizer
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        weights = initial_weights(self.spec, self.seed, self.dtype) if _weights is None else _weights
        weights = check_weights(self.spec, weights)
        weights = {k: v.astype(self.dtype, copy=False) for k, v in weights.items()}
        self.backend = get_backend(backend)
        self.device = device
        self.model = self.backend.build(self.spec, weights, device=device)
        # Steps of each finished fit, in order; the next fit draws its batches from seed + len(_fits).
        self._fits: list[int] = []

    @classmethod
    def from_weights(
        cls,
        spec: Spec,
        weights: Mapping[str, np.ndarray],
        students: Optional[Mapping[str, GranularityLike]] = None,
        backend: Union[str, Backend] = "torch",
        **kwargs: Any,
    ) -> "MatTA":
        """A MatTA holding ``weights`` (e.g. from another backend's ``.weights``).

        The dtype defaults to the weights' dtype.
        """
        weights = check_weights(check_spec(spec), weights)
        kwargs.setdefault("dtype", next(iter(weights.values())).dtype.name)
        return cls(spec, students, backend, _weights=weights, **kwargs)

    # ------------------------------------------------------------------ granularities
    def granularity(self, granularity: Union[str, GranularityLike] = TA) -> Granularity:
        """Resolves ``"TA"``, a student name or any form of rule G1 to a :class:`Granularity`."""
        if isinstance(granularity, str):
            if granularity == TA:
                return self.schedule.ta
            if granularity not in self.students:
                raise GranularityError(
                    f"granularity name must be {describe([TA, *self.students])}; got {granularity!r}"
                )
            return self.students[granularity]
        return resolve(self.spec, granularity)

    def num_params(self, granularity: Union[str, GranularityLike] = TA) -> int:
        """Parameters of the sub-network at ``granularity``."""
        return num_params(self.spec, self.granularity(granularity))

    # ------------------------------------------------------------------ weights
    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The TA's weights as numpy copies, keyed by the spec's parameter names."""
        return self.backend.get_weights(self.model)

    @weights.setter
    def weights(self, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(self.spec, weights)
        self.backend.set_weights(self.model, {k: v.astype(self.dtype, copy=False) for k, v in weights.items()})

    # ------------------------------------------------------------------ training
    def fit(
        self,
        x: Any,
        y: Any,
        *,
        steps: Optional[int] = None,
        epochs: Optional[int] = None,
        batch_size: int = 32,
        teacher: TeacherLike = None,
        validation_data: Optional[tuple[Any, Any]] = None,
        progress: Optional[bool] = None,
        **backend_options: Any,
    ) -> dict[str, list]:
        """Co-trains the TA and the Students with the composite loss (rules L1–L6).

        Args:
            x: inputs (MLP: ``(n, d_in)`` features; Transformer: ``(n, time)`` token ids).
            y: labels (class ids ``(n,)``, next-token ids ``(n, time)``, or regression targets).
            steps: number of optimizer steps; or give ``epochs`` (default one epoch).
            epochs: passes over the data.
            batch_size: examples per step.
            teacher: the Teacher's outputs: an array aligned with ``x`` or a callable
                ``teacher(x_batch) -> array``, of logits or probabilities (option
                ``teacher_output``). ``None`` trains on ``y`` alone.
            validation_data: ``(x_val, y_val)`` evaluated after every epoch.
            progress: show a progress bar (default: when there are 50 steps or more).
            **backend_options: passed to the backend's ``fit`` (e.g. Keras callbacks).

        Returns:
            ``{"steps": [per-step logs], "epochs": [per-epoch validation logs]}``.

        Raises:
            NonFiniteLossError: the loss became NaN/Inf; the weights are those of the last good step.
        """
        x = check_x(self.spec, x)
        y = check_y(self.spec, y, self.options.task)
        n = check_same_length(x=x, y=y)
        if isinstance(self.spec, Transformer) and y.shape != x.shape:
            raise InputError(f"y must have the shape of x {x.shape} (the next token at every position); got {y.shape}")
        if teacher is not None and not callable(teacher):
            time = x.shape[1] if isinstance(self.spec, Transformer) else None
            teacher = check_teacher_output(self.spec, teacher, self.options.teacher_output, n, time)
        if teacher is not None and self.options.task == "regression":
            raise OptionError("teacher is for classification; for regression pass the Teacher's predictions as y")
        integer("batch_size", batch_size, 1)
        steps_per_epoch = math.ceil(n / batch_size)
        if steps is not None and epochs is not None:
            raise OptionError("give steps or epochs, not both")
        for name, value in (("steps", steps), ("epochs", epochs)):
            if value is not None:
                integer(name, value, 1)
        total = int(steps) if steps is not None else int(epochs or 1) * steps_per_epoch
        on_epoch_end = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise InputError("validation_data must be a tuple (x_val, y_val)")
            x_val = check_x(self.spec, validation_data[0])
            y_val = check_y(self.spec, validation_data[1], self.options.task)
            on_epoch_end = lambda epoch: self.evaluate(x_val, y_val)  # noqa: E731
        run = TrainingRun(
            spec=self.spec, x=x, y=y, teacher=teacher, options=self.options, schedule=self.schedule,
            steps=total, batch_size=int(batch_size), seed=self.seed + len(self._fits),
            dtype=self.dtype, progress=total >= 50 if progress is None else bool(progress),
            learning_rate_schedule=self.learning_rate_schedule, warmup_steps=self.warmup_steps,
            steps_per_epoch=steps_per_epoch, on_epoch_end=on_epoch_end,
        )
        self.backend.fit(
            self.model, run, optimizer=self.optimizer, learning_rate=self.learning_rate,
            weight_decay=self.weight_decay, **backend_options,
        )
        self._fits.append(total)
        return {"steps": run.history, "epochs": run.epoch_logs}

    # ------------------------------------------------------------------ inference
    def predict(self, x: Any, granularity: Union[str, GranularityLike] = TA) -> np.ndarray:
        """Output of the nested model at ``granularity`` (sliced at call time).

        Returns:
            MLP: ``(n, d_out)`` logits or predictions; Transformer: ``(n, time, vocab)`` logits.
        """
        g = self.granularity(granularity)
        x = check_x(self.spec, x)
        return self.backend.forward(self.model, x, g)

    def evaluate(
        self, x: Any, y: Any, granularities: Optional[list[Union[str, GranularityLike]]] = None
    ) -> dict[str, dict[str, float]]:
        """Held-out metrics of the TA and every Student (or of ``granularities``).

        Returns:
            ``{name: {metric: value}}``: classification ``loss`` (mean cross-entropy,
            nats) and ``accuracy``, plus ``bits_per_token`` for the Transformer;
            regression ``mse`` and ``mae``.
        """
        x = check_x(self.spec, x)
        y = check_y(self.spec, y, self.options.task)
        check_same_length(x=x, y=y)
        names = [TA, *self.students] if granularities is None else granularities
        out = {}
        for g in names:
            key = g if isinstance(g, str) else str(g)
            out[key] = metrics(self.spec, self.options.task, self.predict(x, g), y)
        return out

    # ------------------------------------------------------------------ extraction
    def extract(self, granularity: Union[str, GranularityLike] = TA) -> "Extracted":
        """A real, smaller model cut out of the TA at ``granularity`` (rules E1–E4)."""
        g = self.granularity(granularity)
        sub_spec, sub_weights = extract(self.weights, self.spec, g)
        name = granularity if isinstance(granularity, str) else None
        info = {"source": {"name": name, "granularity": g.to_dict(self.spec), "spec": self.spec.to_dict()}}
        return Extracted(sub_spec, sub_weights, self.backend, device=self.device, info=info)


class Extracted:
    """A plain model cut out of a MatTA TA: physically smaller tensors, no nesting at run time.

    Attributes:
        spec: the extracted model's spec (same family, sliced sizes).
        weights: its numpy weights.
        model: the native framework model (``torch.nn.Module`` / ``keras.Model``).
        backend: the backend that built ``model``.
    """

    def __init__(
        self,
        spec: Spec,
        weights: Mapping[str, np.ndarray],
        backend: Union[str, Backend] = "torch",
        *,
        device: Optional[str] = None,
        info: Optional[Mapping[str, Any]] = None,
    ):
        self.spec = check_spec(spec)
        self.weights = check_weights(spec, weights)
        self.backend = get_backend(backend)
        self.info = dict(info or {})
        self.model = self.backend.build_plain(self.spec, self.weights, device=device)

    @property
    def num_params(self) -> int:
        """Number of scalar parameters."""
        return self.spec.num_params

    def predict(self, x: Any) -> np.ndarray:
        """The plain model's output on ``x``."""
        return self.backend.plain_forward(self.model, check_x(self.spec, x))

    def evaluate(self, x: Any, y: Any, task: str = "classification") -> dict[str, float]:
        """Metrics as in :meth:`MatTA.evaluate`."""
        y = check_y(self.spec, y, task)
        return metrics(self.spec, task, self.predict(x), y)

    def save(self, directory: str) -> list[str]:
        """Saves ``spec.json`` + ``weights.safetensors`` and the backend's native file.

        Returns:
            The file names written into ``directory``.
        """
        files = saving.write(directory, self.spec, self.weights, {"backend": self.backend.name, **self.info})
        return files + list(self.backend.export(self.model, self.spec, directory))

    def __repr__(self) -> str:
        return f"Extracted({type(self.spec).__name__}, num_params={self.num_params}, backend={self.backend.name!r})"


def load(directory: str, backend: Union[str, Backend] = "torch", device: Optional[str] = None) -> Extracted:
    """Loads a folder written by :meth:`Extracted.save` into any backend (safetensors + JSON; no pickle)."""
    spec, weights, meta = saving.read(directory)
    info = {k: v for k, v in meta.items() if k == "source"}
    return Extracted(spec, weights, backend, device=device, info=info)


def metrics(spec: Spec, task: str, outputs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Held-out metrics from model outputs (see :meth:`MatTA.evaluate`)."""
    if task == "regression":
        err = outputs.astype(np.float64) - y
        return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}
    logp = NumpyOps().log_softmax(outputs.astype(np.float64))
    loss = float(-np.mean(np.take_along_axis(logp, y[..., None], axis=-1)))
    out = {"loss": loss, "accuracy": float(np.mean(outputs.argmax(-1) == y))}
    if isinstance(spec, Transformer):
        out["bits_per_token"] = loss / math.log(2)
    return out
