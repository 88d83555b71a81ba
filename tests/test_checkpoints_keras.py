"""Checkpoints, exact resume (rule T7) and a failed fit (rule T4) on the Keras engine ``KERAS_BACKEND`` names.

Run once per engine, each in its own process (Keras picks its engine once)::

    KERAS_BACKEND=jax .venv/bin/python -m pytest tests/test_checkpoints_keras.py
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import keras  # a missing keras is an error, never a skip

import matta
from matta import MatTA, checkpoints
from matta.errors import InputError, NonFiniteLossError

from test_checkpoints import BATCH, SPEC, STEPS, _data, _failing_teacher, _fit, _model, run_killed_and_resumed, uninterrupted

ENGINE = keras.backend.backend()
#: Rule T7's bound on each engine: max |resumed - uninterrupted| / max(1, max |uninterrupted|) over the weights.
#: Measured 0 (bit-identical) on CPU on every engine; docs/reliability.md gives the bound.
RESUME_BOUND = 1e-6


def _assert_within_bound(expected, got):
    for k, w in expected.items():
        scale = max(1.0, float(np.max(np.abs(w))))
        assert float(np.max(np.abs(got[k] - w))) / scale <= RESUME_BOUND, k


def test_a_run_resumed_inside_an_epoch_ends_as_an_uninterrupted_one(tmp_path):
    """Checkpoints every 7 steps; the run stops at step 16; resuming from step 14 (inside an epoch of 5)
    trains the rest of that epoch, then the others, with the same history and epoch logs."""
    whole = _model("keras")
    expected = _fit(whole)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model("keras"), checkpoint_dir=tmp_path, checkpoint_every=7, teacher=None,
             callbacks=[_StopAt(16)])
    assert checkpoints.newest(str(tmp_path), SPEC.to_dict()).step == 16
    os.rename(tmp_path / "step-000000016", tmp_path / "elsewhere")  # resume from step 14
    resumed = _model("keras")
    got = _fit(resumed, checkpoint_dir=tmp_path, resume=True)
    _assert_within_bound(whole.weights, resumed.weights)
    assert [h["step"] for h in got["steps"]] == list(range(STEPS))
    np.testing.assert_allclose([h["loss"] for h in got["steps"]], [h["loss"] for h in expected["steps"]], rtol=1e-5)
    assert len(got["epochs"]) == len(expected["epochs"])
    # A later fit continues the optimizer's step counter and the fit count alike.
    whole.fit(*_data(), steps=5, batch_size=BATCH, progress=False)
    resumed.fit(*_data(), steps=5, batch_size=BATCH, progress=False)
    _assert_within_bound(whole.weights, resumed.weights)


class _StopAt(keras.callbacks.Callback):
    """Interrupts ``fit`` as Ctrl-C would, after ``steps`` steps."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise KeyboardInterrupt


def test_a_matta_error_in_the_teacher_callable_reaches_the_user_as_itself_with_the_history(tmp_path):
    """The fact: on TensorFlow it arrived wrapped in InvalidArgumentError, two updates applied and no history."""
    error = InputError("the teacher is offline")
    model = _model("keras")
    x, y = _data()
    with pytest.raises(InputError) as info:
        model.fit(x, y, steps=10, batch_size=BATCH, progress=False, teacher=_failing_teacher(3, error),
                  checkpoint_dir=tmp_path, checkpoint_every=100)
    assert info.value is error
    assert [h["step"] for h in info.value.history["steps"]] == [0, 1, 2]
    assert model.history == info.value.history
    replay = _model("keras")
    replay.fit(x, y, steps=10, batch_size=BATCH, progress=False, teacher=_failing_teacher(10 ** 9, None),
               checkpoint_dir=tmp_path / "replay", checkpoint_every=3, keep=10)
    ckpt = checkpoints.read(str(tmp_path / "replay" / "step-000000003"), SPEC.to_dict())
    _assert_within_bound(ckpt.weights, model.weights)
    assert os.listdir(tmp_path / "step-000000003")  # the error's checkpoint of step 3


def test_a_non_finite_stop_undoes_the_update_before_it_and_predictions_stay_finite():
    spec = matta.MLP(d_in=16, hidden=[64, 64], d_out=4)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16)).astype("float32"), rng.integers(0, 4, 64)
    kwargs = dict(students={"S": 0.5}, backend="keras", seed=0, optimizer="sgd", learning_rate=1e3, ramp="constant")
    model = MatTA(spec, **kwargs)
    with pytest.raises(NonFiniteLossError) as info:
        model.fit(x, y, steps=100, batch_size=16, progress=False)
    failed_at = int(str(info.value).split("at step ")[1].split(";")[0])
    assert failed_at >= 2
    assert [h["step"] for h in model.history["steps"]] == list(range(failed_at - 1))
    for g in ("TA", "S"):
        assert np.isfinite(model.predict(x, g)).all(), g
    replay = MatTA(spec, **kwargs)
    replay.fit(x, y, steps=failed_at - 1, batch_size=16, progress=False)
    _assert_within_bound(replay.weights, model.weights)


@pytest.mark.subprocess
def test_a_run_killed_at_random_moments_and_resumed_ends_within_the_bound(tmp_path):
    steps = 200
    weights, reached = run_killed_and_resumed("keras", tmp_path, kills=2, steps=steps, seed=11)
    assert 0 < reached[0] < reached[1] < steps, reached
    _assert_within_bound(uninterrupted("keras", steps), weights)
