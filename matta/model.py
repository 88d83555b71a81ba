"""The public API: :class:`MatTA` (train one nested model) and :class:`Extracted` (serve one size)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from matta import checkpoints, saving, shipping
from matta.backend import Backend, get_backend
from matta.errors import (
    FormatError, GranularityError, InputError, InputTypeError, MattaError, OptionError, choice, describe, integer,
)
from matta.extraction import extract
from matta.frontier import Budget, Frontier, check_data, check_metric, measure, named
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
        _check_rates(learning_rate, weight_decay)
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
        #: The checkpoint folder :meth:`from_pretrained` read, else ``None``.
        self.pretrained: Optional[str] = None
        #: The last fit's ``{"steps": [...], "epochs": [...]}``, up to its error if it stopped on one.
        self.history: Optional[dict[str, list]] = None

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

    @classmethod
    def from_pretrained(cls, path: str, students: Optional[Mapping[str, GranularityLike]] = None,
                        backend: Union[str, Backend] = "torch", seed: int = 0, **kwargs: Any) -> "MatTA":
        """A MatTA whose TA starts from a GPT-2 checkpoint folder (read by :func:`matta.hf.read_gpt2`).

        A tied checkpoint stays tied (rule P3). The checkpoint folder is remembered, so
        :meth:`Extracted.save_pretrained` of the extracted models copies its tokenizer files.

        Args:
            path: a folder ``save_pretrained`` wrote (``config.json`` + safetensors).
            students: name -> granularity, as for :class:`MatTA`.
            backend: the backend to train on.
            seed: seeds batch order and granularity sampling.
            **kwargs: any other :class:`MatTA` option (``dtype`` defaults to the checkpoint's).

        Raises:
            FormatError, SpecError: the folder is not a GPT-2 checkpoint matta computes.
        """
        from matta import hf

        spec, weights = hf.read_gpt2(path)
        model = cls.from_weights(spec, weights, students, backend, seed=seed, **kwargs)
        model.pretrained = str(path)
        return model

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
        checkpoint_dir: Optional[str] = None,
        checkpoint_every: int = 100,
        keep: int = 3,
        resume: bool = False,
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
            checkpoint_dir: write checkpoints there, one folder per checkpoint (rule T7).
            checkpoint_every: steps between checkpoints (one is also written at the end and after an error).
            keep: how many of the newest checkpoints to keep.
            resume: continue from the newest valid checkpoint in ``checkpoint_dir`` (a fresh
                start if there is none); the MatTA and this call must be configured as the run that wrote it.
            **backend_options: passed to the backend's ``fit`` (e.g. Keras callbacks).

        Returns:
            ``{"steps": [per-step logs], "epochs": [per-epoch validation logs]}``, also kept as :attr:`history`.

        Raises:
            NonFiniteLossError: the loss or a gradient became NaN/Inf; the weights are those before
                the last applied update (rule T4).
            OptionError: ``resume=True`` and the checkpoint was written by a run configured differently.

        Any error leaves the model at the step its history ends with: the history so far is
        :attr:`history` and the error's ``history`` attribute, and with ``checkpoint_dir`` a
        checkpoint of that step is written (when writing it fails too, the earlier ones stay).
        """
        x = check_x(self.spec, x, self.dtype)
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
            x_val = check_x(self.spec, validation_data[0], self.dtype)
            y_val = check_y(self.spec, validation_data[1], self.options.task)
            on_epoch_end = lambda epoch: self.evaluate(x_val, y_val)  # noqa: E731
        resumed, config = None, None
        if checkpoint_dir is not None:
            integer("checkpoint_every", checkpoint_every, 1)
            integer("keep", keep, 1)
            config = self._checkpoint_config(x, y, teacher, int(batch_size), total)
            if resume:
                resumed = checkpoints.newest(checkpoint_dir, self.spec.to_dict())
                if resumed is not None:
                    checkpoints.check_match(resumed, config)
                    self.weights = resumed.weights
                    self._fits = [int(n) for n in resumed.state["fits"]]
        elif resume:
            raise OptionError("resume=True needs checkpoint_dir, the folder of the checkpoints to resume from")
        run = TrainingRun(
            spec=self.spec, x=x, y=y, teacher=teacher, options=self.options, schedule=self.schedule,
            steps=total, batch_size=int(batch_size), seed=self.seed + len(self._fits),
            dtype=self.dtype, progress=total >= 50 if progress is None else bool(progress),
            learning_rate_schedule=self.learning_rate_schedule, warmup_steps=self.warmup_steps,
            steps_per_epoch=steps_per_epoch, on_epoch_end=on_epoch_end,
        )
        if resumed is not None:
            run.start = run.done = run._saved = resumed.step
            run.history = list(resumed.state["history"])
            run.epoch_logs = list(resumed.state["epoch_logs"])
            run.optimizer_state = resumed.optimizer
        if checkpoint_dir is not None:
            fits = list(self._fits)
            run.checkpoint_every = int(checkpoint_every)
            run.checkpoint = lambda done: checkpoints.write(  # noqa: E731
                checkpoint_dir, done,
                {"config": config, "fits": fits, "history": run.history[:done], "epoch_logs": run.epoch_logs},
                self.weights, self.backend.get_optimizer_state(self.model), int(keep))
        try:
            self.backend.fit(
                self.model, run, optimizer=self.optimizer, learning_rate=self.learning_rate,
                weight_decay=self.weight_decay, **backend_options,
            )
        except BaseException as exc:
            self.history = {"steps": run.consistent_history(), "epochs": run.epoch_logs}
            exc.history = self.history
            try:
                run.save_checkpoint()
            except MattaError as save_exc:  # the error that stopped the run is the one to report
                exc.add_note(f"matta: the checkpoint of step {run.done} could not be written: {save_exc}")
            raise
        self._fits.append(total)
        self.history = {"steps": run.history, "epochs": run.epoch_logs}
        return self.history

    def _checkpoint_config(self, x: np.ndarray, y: np.ndarray, teacher: TeacherLike, batch_size: int,
                           steps: int) -> dict[str, Any]:
        """What a resumed fit must share with the one that wrote the checkpoint (rule T7), as JSON values."""
        data = hashlib.sha256()
        for a in (x, y) + ((teacher,) if isinstance(teacher, np.ndarray) else ()):
            data.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
        config = {
            "spec": self.spec.to_dict(),
            "students": {name: g.to_dict(self.spec) for name, g in self.students.items()},
            "loss_options": {name: getattr(self.options, name) for name in LossOptions.names()},
            "seed": self.seed, "dtype": self.dtype, "backend": self.backend.name,
            "learning_rate": self.learning_rate, "weight_decay": self.weight_decay,
            "learning_rate_schedule": self.learning_rate_schedule, "warmup_steps": self.warmup_steps,
            "optimizer": self.optimizer if self.optimizer is None or isinstance(self.optimizer, str) else "custom",
            "batch_size": batch_size, "steps": steps, "data_sha256": data.hexdigest(),
            "teacher": "callable" if callable(teacher) else ("array" if teacher is not None else None),
        }
        return json.loads(json.dumps(config))

    # ------------------------------------------------------------------ inference
    def predict(self, x: Any, granularity: Union[str, GranularityLike] = TA) -> np.ndarray:
        """Output of the nested model at ``granularity`` (sliced at call time).

        Returns:
            MLP: ``(n, d_out)`` logits or predictions; Transformer: ``(n, time, vocab)`` logits.
        """
        g = self.granularity(granularity)
        x = check_x(self.spec, x, self.dtype)
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
        x = check_x(self.spec, x, self.dtype)
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
        out = Extracted(sub_spec, sub_weights, self.backend, device=self.device, info=info)
        out.pretrained = self.pretrained
        return out

    # ------------------------------------------------------------------ choosing and shipping
    def frontier(
        self, x_val: Any, y_val: Any, candidates: Any = None, batch_size: int = 1, *,
        metric: Optional[str] = None, rounds: int = 30, latency: bool = True,
    ) -> Frontier:
        """Parameters, FLOPs, latency and held-out metrics of many models of this run, Pareto rows marked.

        Latency is the median of paired timing rounds of the extracted models on the first
        ``batch_size`` rows of ``x_val``, on this backend (see :mod:`matta.frontier`).

        Args:
            x_val: held-out inputs; a Transformer's FLOPs are per sequence of their length.
            y_val: held-out labels.
            candidates: ``None`` for :func:`matta.frontier.candidates` (Students, TA, uniform
                fractions, Mix'n'Match steps); else a list of names or granularities, or a dict
                of name -> granularity.
            batch_size: examples per timed call, ``1 <= batch_size <= len(x_val)``.
            metric: the metric rows are ranked by; default ``loss`` (``mse`` for regression).
            rounds: paired timing rounds.
            latency: whether to time the models; without it the rows carry no latency, and one
                frontier serves :meth:`~matta.frontier.Frontier.select` for many parameter and
                FLOP budgets.

        Returns:
            A :class:`~matta.frontier.Frontier`: ``print()`` it, ``.to_rows()``, ``.plot()``, ``.select(budget)``.
        """
        metric = check_metric(self.spec, self.options.task, metric)
        x, y = check_data(self, x_val, y_val, batch_size)
        return measure(self, named(self, candidates), x, y, batch_size=int(batch_size), metric=metric, rounds=rounds,
                       latency=latency)

    def select(
        self, x_val: Any, y_val: Any, max_params: Optional[float] = None, max_flops: Optional[float] = None,
        max_latency_ms: Optional[float] = None, batch_size: int = 1, *, candidates: Any = None,
        metric: Optional[str] = None, rounds: int = 30,
    ) -> Granularity:
        """The granularity with the best held-out metric within every given budget.

        Latency is measured only when ``max_latency_ms`` is given. The arguments are those of
        :meth:`frontier`; ``max_flops`` counts per example (a Transformer's: per sequence of
        ``x_val``'s length) and ``max_latency_ms`` per call of ``batch_size`` examples.

        Raises:
            OptionError: a budget that is not a number > 0, or nothing fits; the message then
                names the smallest achievable figure of each budget.
        """
        budget = Budget(max_params, max_flops, max_latency_ms)  # checked before any work
        front = self.frontier(x_val, y_val, candidates, batch_size, metric=metric, rounds=rounds,
                              latency=max_latency_ms is not None)
        return front.select(budget).granularity

    def export_many(
        self, directory: str, targets: Any = None, formats: Any = ("safetensors",), *,
        x_val: Any = None, y_val: Any = None, batch_size: int = 1, metric: Optional[str] = None,
        rounds: int = 30, overwrite: bool = False,
    ) -> dict[str, Any]:
        """Exports several models of this run, one folder each, with ``manifest.json``, atomically.

        Args:
            directory: the export's folder (replaced as a whole, see :mod:`matta.shipping`).
            targets: a list of names (``"S"``, ``"TA"``), granularities (any form of rule G1)
                and budgets (:class:`~matta.frontier.Budget` or a dict of its fields); default
                every Student and the TA.
            formats: drawn from ``"safetensors"``, ``"onnx"``, ``"native"``.
            x_val: held-out inputs: needed by budgets; with them the manifest records metrics and latency.
            y_val: held-out labels.
            batch_size: examples per timed call.
            metric: the metric budgets choose by (default ``loss``; ``mse`` for regression).
            rounds: paired timing rounds.
            overwrite: replace ``directory`` even if it is not an earlier export.

        Returns:
            The manifest as written.
        """
        return shipping.export_many(self, directory, targets, formats, x_val=x_val, y_val=y_val, batch_size=batch_size,
                                    metric=metric, rounds=rounds, overwrite=overwrite)

    # ------------------------------------------------------------------ saving
    def save(self, directory: str, *, overwrite: bool = False) -> list[str]:
        """Saves the whole MatTA atomically: ``model.json`` and the TA's ``weights.safetensors`` (rule E6).

        ``model.json`` holds the spec, the Students, the loss options and every
        constructor option :meth:`load` needs to rebuild the same MatTA (and the
        number of ``fit()`` calls so far, which seeds the next one). An optimizer
        object is code, so it is not saved: a string optimizer name is, and
        :meth:`load` takes ``optimizer=`` for any other. Optimizer state is not
        part of this format.

        Args:
            directory: the save's folder.
            overwrite: replace ``directory`` even if it is not a matta save.

        Returns:
            The file names of the save (all but ``manifest.json``).

        Raises:
            SaveError: ``directory`` is not a matta save (and ``overwrite`` is false), or writing failed.
        """
        named = self.optimizer is None or isinstance(self.optimizer, str)
        config = {
            "format": saving.MODEL_FORMAT,
            "spec": self.spec.to_dict(),
            "students": {name: g.to_dict(self.spec) for name, g in self.students.items()},
            "loss_options": {name: getattr(self.options, name) for name in LossOptions.names()},
            "seed": self.seed,
            "dtype": self.dtype,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "learning_rate_schedule": self.learning_rate_schedule,
            "warmup_steps": self.warmup_steps,
            "fits": [int(n) for n in getattr(self, "_fits", [])],
            "backend": self.backend.name,
            "optimizer": self.optimizer if named else None,
            "custom_optimizer": not named,
        }
        weights = self.weights
        with saving.atomic_save(directory, kind=saving.MODEL_FORMAT, overwrite=overwrite) as folder:
            saving.write_model(folder, config, weights)
        return folder.files

    @classmethod
    def load(
        cls,
        directory: str,
        backend: Union[str, Backend] = "torch",
        *,
        device: Optional[str] = None,
        optimizer: Any = None,
        verify: bool = True,
        allow_nonfinite: bool = False,
    ) -> "MatTA":
        """Rebuilds a MatTA saved by :meth:`save`, on any backend.

        Args:
            directory: the save's folder.
            backend: the backend to build it on (any: weights are framework-neutral).
            device: backend device string.
            optimizer: the optimizer for later ``fit()`` calls; default: the saved
                optimizer name when loading into the backend it was saved from, else AdamW.
            verify: check every file's size and SHA-256 against ``manifest.json``.
            allow_nonfinite: accept weights holding NaN or Inf.

        Raises:
            FormatError: a missing, damaged, hostile or inconsistent file; nothing is built then.
        """
        backend = get_backend(backend)
        spec, config, weights = saving.read_model(directory, verify=verify, allow_nonfinite=allow_nonfinite)
        try:
            students, kwargs, fits = _saved_options(spec, config, next(iter(weights.values())).dtype.name)
        except (MattaError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise FormatError(f"{directory!r}: {saving.MODEL_FILE} does not describe a valid MatTA: {exc}") from None
        if optimizer is None and config.get("backend") == backend.name and isinstance(config.get("optimizer"), str):
            optimizer = config["optimizer"]
        model = cls(spec, students, backend, device=device, optimizer=optimizer, _weights=weights, **kwargs)
        model._fits = fits
        return model


def _saved_options(spec: Spec, config: Mapping[str, Any], dtype: str) -> tuple[dict[str, Granularity], dict[str, Any], list[int]]:
    """Checks a saved ``model.json`` with the checks :class:`MatTA` makes: ``(students, options, fits)``."""
    students = config.get("students")
    if not isinstance(students, dict):
        raise OptionError(f"students must be an object of name -> granularity; got {type(students).__name__}")
    resolved = {}
    for name, g in students.items():
        if not isinstance(name, str) or not name or name == TA:
            raise GranularityError(f"student names must be non-empty strings other than {TA!r}; got {name!r}")
        resolved[name] = resolve(spec, g)
    loss_options = config.get("loss_options")
    if not isinstance(loss_options, dict) or not set(loss_options) <= set(LossOptions.names()):
        raise OptionError(f"loss_options must be an object with keys from {list(LossOptions.names())}")
    options = LossOptions(**loss_options)
    seed = integer("seed", config.get("seed"), 0)
    Schedule(spec, resolved, options, seed)  # rule N1
    if config.get("dtype") != dtype:
        raise OptionError(f"dtype is {config.get('dtype')!r}; the weights are {dtype!r}")
    _check_rates(config.get("learning_rate"), config.get("weight_decay"))
    choice("learning_rate_schedule", config.get("learning_rate_schedule"), LEARNING_RATE_SCHEDULES)
    integer("warmup_steps", config.get("warmup_steps"), 0)
    fits = config.get("fits")
    if not isinstance(fits, list):
        raise OptionError(f"fits must be a list of step counts; got {type(fits).__name__}")
    fits = [integer("fits[]", n, 1) for n in fits]
    kwargs = {name: config[name] for name in ("seed", "dtype", "learning_rate", "weight_decay",
                                              "learning_rate_schedule", "warmup_steps")}
    return resolved, {**kwargs, **loss_options}, fits


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
        self.dtype = next(iter(self.weights.values())).dtype.name
        self.backend = get_backend(backend)
        self.info = dict(info or {})
        self.model = self.backend.build_plain(self.spec, self.weights, device=device)
        self._serve = self.backend.serving(self.model)
        #: The GPT-2 checkpoint folder the TA started from (:meth:`MatTA.from_pretrained`), else ``None``.
        self.pretrained: Optional[str] = None

    @property
    def num_params(self) -> int:
        """Number of scalar parameters."""
        return self.spec.num_params

    def predict(self, x: Any) -> np.ndarray:
        """The plain model's output on ``x``, through the backend's serving call (:meth:`Backend.serving`).

        That call equals ``backend.plain_forward`` bit for bit, so the output is the nested
        sub-network's within the backend's exactness bound (conformance property 2).
        """
        return self._serve(check_x(self.spec, x, self.dtype))

    def evaluate(self, x: Any, y: Any, task: str = "classification") -> dict[str, float]:
        """Metrics as in :meth:`MatTA.evaluate`."""
        y = check_y(self.spec, y, task)
        return metrics(self.spec, task, self.predict(x), y)

    def save(self, directory: str, *, overwrite: bool = False, native: bool = True, onnx: bool = False) -> list[str]:
        """Saves ``spec.json`` + ``weights.safetensors`` and the backend's native file, atomically (rules E5, E6).

        All files, ``manifest.json`` with their checksums included, are written
        into a temporary folder that replaces ``directory`` in one step: the
        folder holds the complete old save or the complete new one, never a mix.

        Args:
            directory: the save's folder.
            overwrite: replace ``directory`` even if it is not a matta save.
            native: also write the backend's own format (``model.pt2``, ``model.keras``).
            onnx: also write ``model.onnx`` (:func:`matta.onnx.export`, built from the spec and weights).

        Returns:
            The file names of the save (all but ``manifest.json``).

        Raises:
            SaveError: ``directory`` is not a matta save (and ``overwrite`` is false), or writing failed.
        """
        with saving.atomic_save(directory, kind=saving.FORMAT, overwrite=overwrite) as folder:
            saving.write_extracted(folder, self.spec, self.weights, {"backend": self.backend.name, **self.info})
            if native:
                self.backend.export(self.model, self.spec, folder.path)
            if onnx:
                from matta import onnx as onnx_format  # imports the onnx package only when asked

                onnx_format.export(self.spec, self.weights, os.path.join(folder.path, "model.onnx"))
        return folder.files

    def save_pretrained(self, path: str, *, pad: bool = False, overwrite: bool = False) -> str:
        """Writes this Transformer as a GPT-2 checkpoint folder that ``transformers`` loads (:func:`matta.hf.write_gpt2`).

        The tokenizer files next to the checkpoint the TA started from (:data:`matta.hf.TOKENIZER_FILES`,
        whichever exist) are copied in, so ``AutoTokenizer`` and ``pipeline`` load the folder as it is.

        Args:
            path: the folder to write (atomically, rule E6).
            pad: zero-pad per-block sizes and missing heads to a uniform GPT-2 (the same function).
            overwrite: replace an existing non-empty folder at ``path``.

        Returns:
            ``path``.

        Raises:
            SpecError: the model is not a GPT-2 (naming the field) and ``pad`` cannot or may not fix it.
        """
        from matta import hf

        return hf.write_gpt2(self.spec, self.weights, path, pad=pad, overwrite=overwrite, tokenizer_from=self.pretrained)

    def __repr__(self) -> str:
        return f"Extracted({type(self.spec).__name__}, num_params={self.num_params}, backend={self.backend.name!r})"


def load(
    directory: str,
    backend: Union[str, Backend] = "torch",
    device: Optional[str] = None,
    *,
    verify: bool = True,
    allow_nonfinite: bool = False,
) -> Extracted:
    """Loads a folder written by :meth:`Extracted.save` into any backend (safetensors + JSON; no pickle).

    Args:
        directory: the save's folder.
        backend: the backend to build the model on.
        device: backend device string.
        verify: check every file's size and SHA-256 against ``manifest.json`` (rule E6).
        allow_nonfinite: accept weights holding NaN or Inf.

    Raises:
        FormatError: a missing, damaged or hostile file; nothing is built then.
    """
    backend = get_backend(backend)
    spec, weights, meta = saving.read(directory, verify=verify, allow_nonfinite=allow_nonfinite)
    info = {k: v for k, v in meta.items() if k == "source"}
    return Extracted(spec, weights, backend, device=device, info=info)


def _check_rates(learning_rate: Any, weight_decay: Any) -> None:
    """``learning_rate`` must be a finite number > 0 and ``weight_decay`` a finite number >= 0."""
    for name, value, low in (("learning_rate", learning_rate, "> 0"), ("weight_decay", weight_decay, ">= 0")):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not (isinstance(value, int) or math.isfinite(value)) or value < 0 or (value == 0 and name == "learning_rate")):
            raise OptionError(f"{name} must be a finite number {low}; got {value!r}")


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
