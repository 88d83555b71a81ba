"""Rule T6 on Keras: the learning-rate schedule of one ``fit()`` run as a Keras ``LearningRateSchedule``.

Keras optimizers read their rate from a schedule called with the optimizer's
own step counter inside the compiled train step, on every engine. The schedule
below computes :func:`matta.training.learning_rate_scale` with ``keras.ops``, so
a Keras run follows the same rates as a torch run step for step.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from matta.training import TrainingRun

__all__ = ["RunLearningRate"]


class RunLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """``base · learning_rate_scale(step)`` with ``step = iterations − start`` (rule T6).

    Args:
        base: the learning rate the schedule scales.
        run: the run whose schedule, warm-up and length it follows.
        start: the optimizer's step counter when the run begins (fit() calls continue it).
    """

    def __init__(self, base: float, run: TrainingRun, start: int):
        self.base = float(base)
        self.schedule = run.learning_rate_schedule
        self.warmup_steps = int(run.warmup_steps)
        self.total_steps = int(run.steps)
        self.start = int(start)

    def __call__(self, iterations):
        step = ops.cast(iterations, "float32") - float(self.start)
        warm = (step + 1.0) / float(max(self.warmup_steps, 1))
        if self.schedule == "constant":
            after = ops.ones_like(step)
        else:
            u = (step - self.warmup_steps) / float(max(1, self.total_steps - self.warmup_steps))
            after = 0.5 * (1.0 + ops.cos(math.pi * u))
        return self.base * ops.where(step < float(self.warmup_steps), warm, after)

    def get_config(self) -> dict:
        return {"base": self.base, "schedule": self.schedule, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "start": self.start}
