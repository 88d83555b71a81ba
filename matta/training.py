"""The backend-neutral half of a training run: batches, targets, plans, progress, NaN guard, checkpoint hook.

A backend's ``fit`` loops over :meth:`TrainingRun.batches` (or takes
:meth:`TrainingRun.batch_stream` where its framework runs the loop), computes the
composite loss of each batch's plan in its framework, calls
:meth:`TrainingRun.record` with the loss *before* applying the update, and
applies it only if ``record`` returns; then it calls :meth:`TrainingRun.applied`,
which counts the step and writes a checkpoint when one is due (rule T7). On a
NaN/Inf loss or gradient the backend puts back the weights and optimizer state
from before the last applied update (rule T4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from matta.errors import NonFiniteLossError
from matta.inputs import check_teacher_output
from matta.losses import LossOptions, Schedule, StepPlan, Targets, teacher_probabilities
from matta.specs import Spec, Transformer

__all__ = ["Batch", "TrainingRun", "TeacherLike", "batch_indices", "LEARNING_RATE_SCHEDULES", "learning_rate_scale"]

#: The learning-rate schedules of rule T6.
LEARNING_RATE_SCHEDULES = ("constant", "cosine")

TeacherLike = Union[None, np.ndarray, Callable[[np.ndarray], Any]]


@dataclass
class Batch:
    """One step's inputs, numpy targets and plan."""

    step: int
    x: np.ndarray
    targets: Targets[np.ndarray]
    plan: StepPlan


def batch_indices(num_examples: int, batch_size: int, steps: int, seed: int, start: int = 0) -> Iterator[np.ndarray]:
    """Shuffled mini-batches ``start, …, steps - 1``: each epoch is a fresh permutation; the last short batch is kept.

    Epoch ``e``'s permutation comes from its own generator seeded by ``(seed, e)``, so the
    stream starts at any step without drawing the batches before it (a resumed run, rule T7).
    """
    assert num_examples > 0 and batch_size > 0 and 0 <= start <= steps
    per_epoch = -(-num_examples // batch_size)
    step = start
    while step < steps:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([seed, 104729, epoch]).permutation(num_examples)
        for begin in range(offset * batch_size, num_examples, batch_size):
            if step == steps:
                return
            yield order[begin : begin + batch_size]
            step += 1


def learning_rate_scale(schedule: str, warmup_steps: int, step: int, total_steps: int) -> float:
    """Rule T6: the factor that multiplies the optimizer's learning rate at ``step`` (0-based).

    A linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps``
    steps, then ``constant``: 1, or ``cosine``: ``(1 + cos(π·u)) / 2`` with ``u``
    going from 0 after the warm-up to 1 at ``total_steps`` (so the last step's
    rate is small but not 0). Every fit() call runs its own schedule.
    """
    assert schedule in LEARNING_RATE_SCHEDULES, schedule
    assert 0 <= step < total_steps and warmup_steps >= 0, (step, total_steps, warmup_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    u = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * u))


@dataclass
class TrainingRun:
    """Everything a backend needs to train, already validated.

    Attributes:
        history: one dict per step: ``step``, ``loss``, ``distill`` and each term's part.
        start: steps done before this process (a resumed run, rule T7); batches start there.
        checkpoint: ``hook(steps_done)`` that writes a checkpoint, or ``None``.
        checkpoint_every: steps between checkpoints.
        optimizer_state: the optimizer state a resumed run's backend loads
            (:meth:`matta.backend.Backend.set_optimizer_state`) once it has made its optimizer.
    """

    spec: Spec
    x: np.ndarray
    y: np.ndarray
    teacher: TeacherLike
    options: LossOptions
    schedule: Schedule
    steps: int
    batch_size: int
    seed: int
    dtype: str
    progress: bool = True
    learning_rate_schedule: str = "constant"
    warmup_steps: int = 0
    steps_per_epoch: int = 1
    on_epoch_end: Optional[Callable[[int], Optional[dict]]] = None
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_logs: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0
    checkpoint: Optional[Callable[[int], None]] = None
    checkpoint_every: int = 0
    optimizer_state: Optional[dict[str, np.ndarray]] = None
    _bar: Any = None

    def __post_init__(self) -> None:
        #: Steps of this run whose update is applied (``start`` of them before this process).
        self.done = self.start
        self._saved = self.start

    def batch_targets(self, index: np.ndarray, x: np.ndarray) -> Targets[np.ndarray]:
        """The numpy targets of the examples ``index`` (Teacher outputs made probabilities)."""
        y = self.y[index]
        if self.options.task == "regression":
            return Targets(regression=y.astype(self.dtype, copy=False))
        soft = None
        if self.teacher is not None:
            raw = self.teacher[index] if isinstance(self.teacher, np.ndarray) else self.teacher(x)
            time = x.shape[1] if isinstance(self.spec, Transformer) else None
            raw = check_teacher_output(self.spec, raw, self.options.teacher_output, len(index), time)
            soft = teacher_probabilities(raw, self.options).astype(self.dtype)
        return Targets(hard=y, soft=soft)

    @property
    def schedules_learning_rate(self) -> bool:
        """Whether rule T6 changes the learning rate during this run (else backends leave it alone)."""
        return self.learning_rate_schedule != "constant" or self.warmup_steps > 0

    def learning_rate_scale(self, step: int) -> float:
        """Rule T6 at ``step`` of this run."""
        return learning_rate_scale(self.learning_rate_schedule, self.warmup_steps, step, self.steps)

    def batch_stream(self, start: Optional[int] = None, stop: Optional[int] = None) -> Iterator[Batch]:
        """The run's batches of steps ``start`` (default :attr:`start`) to ``stop`` (default the end), in order.

        Examples, targets, plan, and nothing else: for a backend whose framework runs the
        loop, the progress display and the epoch-end hook itself (Keras' ``fit``);
        :meth:`batches` is this stream with both.
        """
        start = self.start if start is None else start
        indices = batch_indices(len(self.x), self.batch_size, self.steps if stop is None else stop, self.seed, start)
        for step, index in enumerate(indices, start):
            x = self.x[index]
            yield Batch(step, x, self.batch_targets(index, x), self.schedule.plan(step, self.steps))

    def batches(self) -> Iterator[Batch]:
        """:meth:`batch_stream` with a progress bar when asked for, ``on_epoch_end`` after each epoch, and checkpoints."""
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.steps, initial=self.start, desc="matta fit", unit="step", leave=True)
        try:
            for batch in self.batch_stream():
                yield batch
                step = batch.step
                if self.on_epoch_end is not None and (step + 1) % self.steps_per_epoch == 0:
                    logs = self.on_epoch_end((step + 1) // self.steps_per_epoch) or {}
                    self.epoch_logs.append(logs)
                    if self._bar is not None and logs:
                        self._bar.write(" ".join(f"{k}={v:.4g}" for k, v in _flat(logs).items()))
                self.save_checkpoint_if_due()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def check_gradients(self, step: int, finite: bool) -> None:
        """Rule T4 for gradients: a finite loss can still have an overflowing gradient.

        Backends call this after the backward pass and before the update.
        """
        if not finite:
            raise self._non_finite(step, "a gradient became NaN or infinite")

    def _non_finite(self, step: int, what: str) -> NonFiniteLossError:
        if step > self.start:  # rule T4: step - 1's update is undone too
            kept = f"the weights are those after step {step - 2} (step {step - 1}'s update was undone)"
            if step - 1 == 0:
                kept = "the weights are the starting ones (step 0's update was undone)"
        else:
            kept = "the weights are this fit's starting ones (the update was not applied)"
        return NonFiniteLossError(
            f"{what} at step {step}; {kept}. Lower the learning rate, check the inputs, or use float64."
        )

    def applied(self, step: int) -> None:
        """Counts step ``step``'s update as applied. Backends call this after each update.

        :meth:`batches` then writes a checkpoint when one is due (rule T7), after the
        epoch-end hook; a backend on :meth:`batch_stream` calls :meth:`save_checkpoint_if_due`.
        """
        assert step == self.done, (step, self.done)
        self.done = step + 1

    def save_checkpoint_if_due(self) -> None:
        """Writes a checkpoint through the ``checkpoint`` hook every ``checkpoint_every`` steps and at the end (rule T7)."""
        if self.checkpoint is not None and self.done > self.start and self.done != self._saved and (
                self.done % self.checkpoint_every == 0 or self.done == self.steps):
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Writes a checkpoint of the steps done now (if checkpointing is on and it is not written yet)."""
        if self.checkpoint is not None and self.done != self._saved:
            self.checkpoint(self.done)
            self._saved = self.done

    def undone(self) -> None:
        """Rule T4: the backend put back the weights from before the last applied update; the run is one step back."""
        if self.done > self.start:
            self.done -= 1

    def consistent_history(self) -> list[dict[str, float]]:
        """The history of the steps whose updates the model holds (after an error: the steps before it)."""
        del self.history[self.done:]
        return self.history

    def record(self, step: int, loss: float, parts: Optional[dict[str, float]] = None, distill: float = 0.0) -> None:
        """Logs one step's loss; raises :class:`NonFiniteLossError` if it is NaN or infinite.

        Backends call this *before* applying the step's update.
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise self._non_finite(step, f"the training loss became {loss}")
        entry = {"step": step, "loss": loss, "distill": float(distill)}
        entry.update({f"loss/{k}": float(v) for k, v in (parts or {}).items()})
        self.history.append(entry)
        if self._bar is not None:
            self._bar.update(1)
            if step % 10 == 0 or step == self.steps - 1:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


def _flat(logs: dict) -> dict[str, float]:
    out = {}
    for k, v in logs.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in _flat(v).items()})
        else:
            out[k] = v
    return out
