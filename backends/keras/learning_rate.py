"""Rule T6 on Keras: the learning-rate schedule of one ``fit()`` run as a Keras ``LearningRateSchedule``.

Keras optimizers read their rate from a schedule called with the optimizer's
own step counter inside the compiled train step, on every engine. The rates
come from :func:`matta.training.learning_rate_scale` itself (one table per
run, looked up by step), so a Keras run follows the same rates as a torch run
step for step and the formula lives in one place.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from matta.training import TrainingRun

__all__ = ["RunLearningRate"]


class RunLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """``base · run.learning_rate_scale(step)`` with ``step = iterations − start`` (rule T6).

    Args:
        base: the learning rate the schedule scales.
        run: the run whose schedule, warm-up and length it follows.
        start: the optimizer's step counter at the run's step 0 (fit() calls continue it).
    """

    def __init__(self, base: float, run: TrainingRun, start: int):
        self.start = int(start)
        # (steps,): one rate per step of this run.
        self.rates = np.array([base * run.learning_rate_scale(t) for t in range(run.steps)], dtype="float32")

    def __call__(self, iterations):
        step = ops.clip(ops.cast(iterations, "int32") - self.start, 0, len(self.rates) - 1)
        return ops.take(ops.convert_to_tensor(self.rates), step)

    def get_config(self) -> dict:
        return {"start": self.start, "rates": self.rates.tolist()}
