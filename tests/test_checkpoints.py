"""Checkpoints and exact resume (rule T7), and what a failed fit leaves (rule T4), on torch and the core.

Keras: ``tests/test_checkpoints_keras.py``. A run killed with SIGKILL at random moments
is tested in subprocesses at the end of this file.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

import matta
from matta import MLP, MatTA, checkpoints, saving
from matta.errors import FormatError, NonFiniteLossError, OptionError, SaveError
from matta.training import batch_indices
from matta.spec_tests.assertions import assert_bitwise_equal

SPEC = MLP(d_in=8, hidden=[16, 16], d_out=3)
STEPS, BATCH = 23, 8  # 40 examples: 5 steps an epoch, the last one short


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, SPEC.d_in)).astype("float32"), rng.integers(0, SPEC.d_out, n)


def _model(backend="torch", **kwargs):
    options = dict(students={"S": 0.5}, backend=backend, seed=1, learning_rate_schedule="cosine", warmup_steps=3)
    return MatTA(SPEC, **{**options, **kwargs})


def _fit(model, **kwargs):
    x, y = _data()
    return model.fit(x, y, steps=STEPS, batch_size=BATCH, progress=False, validation_data=(x[:8], y[:8]), **kwargs)


def _failing_teacher(fail_at, error):
    """A teacher of zero logits that raises ``error`` when asked for step ``fail_at``'s batch."""
    calls = []

    def teacher(xb):
        if len(calls) == fail_at:
            raise error
        calls.append(len(xb))
        return np.zeros((len(xb), SPEC.d_out), "float32")

    return teacher


def _assert_same_weights(a, b):
    wa, wb = a.weights, b.weights
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert_bitwise_equal(wb[k], wa[k], k)


@given(n=st.integers(1, 30), batch=st.integers(1, 12), steps=st.integers(0, 40), data=st.data())
def test_the_batch_order_starts_at_any_step_as_the_tail_of_the_whole_order(n, batch, steps, data):
    start = data.draw(st.integers(0, steps))
    whole = list(batch_indices(n, batch, steps, seed=3))
    tail = list(batch_indices(n, batch, steps, seed=3, start=start))
    assert len(whole) == steps
    assert len(tail) == steps - start
    for a, b in zip(whole[start:], tail):
        np.testing.assert_array_equal(a, b)
    per_epoch = -(-n // batch)
    for epoch in range(steps // per_epoch):  # every whole epoch is a permutation of the examples
        np.testing.assert_array_equal(np.sort(np.concatenate(whole[epoch * per_epoch:(epoch + 1) * per_epoch])), np.arange(n))


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    """Checkpoints every 7 steps, a stop at step 16 (KeyboardInterrupt in the teacher), a resume mid-epoch
    from the checkpoint of step 14: same weights, Adam state, learning rates, history and epoch logs."""
    teacher = _failing_teacher(10 ** 9, None)
    whole = _model()
    expected = _fit(whole, teacher=teacher)
    broken = _model()
    with pytest.raises(KeyboardInterrupt) as info:
        _fit(broken, checkpoint_dir=tmp_path, checkpoint_every=7, keep=2, teacher=_failing_teacher(16, KeyboardInterrupt()))
    # The stop leaves a consistent step: 16 updates, their history, and a checkpoint of that step.
    assert [h["step"] for h in info.value.history["steps"]] == list(range(16))
    assert broken.history == info.value.history
    assert sorted(os.listdir(tmp_path)) == ["step-000000014", "step-000000016"]  # keep=2
    replay = _model()
    replay.fit(*_data(), steps=STEPS, batch_size=BATCH, progress=False, teacher=teacher)  # a longer run's first 16 steps
    # Resume from step 14: drop the newer checkpoint.
    saving._remove(str(tmp_path / "step-000000016"))
    resumed = _model()
    got = _fit(resumed, checkpoint_dir=tmp_path, resume=True, teacher=teacher)
    _assert_same_weights(whole, resumed)
    assert got == expected
    assert resumed.history == expected
    assert sorted(os.listdir(tmp_path))[-1] == "step-000000023"  # the end is checkpointed
    # A later fit continues as after the uninterrupted one (the next fit's seed counts this one).
    whole.fit(*_data(), steps=5, batch_size=BATCH, progress=False)
    resumed.fit(*_data(), steps=5, batch_size=BATCH, progress=False)
    _assert_same_weights(whole, resumed)


def test_a_checkpoint_holds_the_optimizer_state_as_named_tensors_and_json(tmp_path):
    model = _model()
    _fit(model, checkpoint_dir=tmp_path, checkpoint_every=10)
    folder = tmp_path / "step-000000023"
    assert sorted(os.listdir(folder)) == ["manifest.json", "optimizer.safetensors", "state.json", "weights.safetensors"]
    assert saving.folder_kind(folder) == saving.CHECKPOINT_FORMAT
    ckpt = checkpoints.read(str(folder), SPEC.to_dict())
    assert ckpt.step == STEPS and len(ckpt.state["history"]) == STEPS
    state = model.backend.get_optimizer_state(model.model)
    assert sorted(ckpt.optimizer) == sorted(state) and any(k.endswith("/exp_avg_sq") for k in state)
    for k, v in state.items():
        assert_bitwise_equal(np.asarray(ckpt.optimizer[k]), v, k)
    for k, v in model.weights.items():
        assert_bitwise_equal(ckpt.weights[k], v, k)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage):
    whole = _model()
    _fit(whole)
    _fit(_model(), checkpoint_dir=tmp_path, checkpoint_every=10)
    newest = tmp_path / "step-000000023"
    target = newest / ("manifest.json" if damage == "manifest" else "weights.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    resumed = _model()
    with pytest.warns(checkpoints.CheckpointWarning, match="step-000000023"):
        _fit(resumed, checkpoint_dir=tmp_path, resume=True)
    _assert_same_weights(whole, resumed)


def test_resuming_a_run_configured_differently_is_an_option_error(tmp_path):
    _fit(_model(), checkpoint_dir=tmp_path, checkpoint_every=10)
    for kwargs, fit_kwargs, field in (({"learning_rate": 0.01}, {}, "learning_rate"), ({"seed": 2}, {}, "seed"),
                                      ({"students": {"S": 0.25}}, {}, "students"), ({}, {"steps": 30}, "steps")):
        model = _model(**kwargs)
        x, y = _data()
        with pytest.raises(OptionError, match=rf"resume=True: the checkpoint .* configured differently \(.*{field}.* differ"):
            model.fit(x, y, **{"steps": STEPS, **fit_kwargs}, batch_size=BATCH, progress=False,
                      checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(OptionError, match="data_sha256"):
        _model().fit(*_data(seed=1), steps=STEPS, batch_size=BATCH, progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(OptionError, match="resume=True needs checkpoint_dir"):
        _model().fit(*_data(), steps=STEPS, progress=False, resume=True)
    with pytest.raises(OptionError, match="checkpoint_every"):
        _model().fit(*_data(), steps=STEPS, progress=False, checkpoint_dir=tmp_path, checkpoint_every=0)


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    whole, fresh = _model(), _model()
    _fit(whole)
    _fit(fresh, checkpoint_dir=tmp_path / "none-yet", resume=True)
    _assert_same_weights(whole, fresh)


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_valid_and_raises(tmp_path, monkeypatch):
    real_write = os.write

    def full_disk(fd, data):
        if "step-000000020" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    model = _model()
    with pytest.raises(SaveError, match="step-000000020") as info:
        _fit(model, checkpoint_dir=tmp_path, checkpoint_every=10)
    assert info.value.errno == errno.ENOSPC
    assert [h["step"] for h in info.value.history["steps"]] == list(range(20))
    assert sorted(os.listdir(tmp_path)) == ["step-000000010"]  # no half-written folder
    monkeypatch.setattr(os, "write", real_write)
    assert checkpoints.newest(str(tmp_path), SPEC.to_dict()).step == 10
    whole, resumed = _model(), _model()
    _fit(whole)
    _fit(resumed, checkpoint_dir=tmp_path, resume=True)
    _assert_same_weights(whole, resumed)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_a_failing_teacher_leaves_the_steps_before_it_and_their_history(backend, tmp_path):
    """A teacher callable failing at step 3: three updates applied, three history entries, a checkpoint of step 3."""
    # Tiny: the numpy backend trains by finite differences.
    spec_model = MatTA(MLP(d_in=4, hidden=[4], d_out=3), students={}, backend=backend, seed=1)
    x, y = np.random.default_rng(0).normal(size=(40, 4)), np.random.default_rng(1).integers(0, 3, 40)
    error = matta.errors.InputError("the teacher is offline")
    with pytest.raises(matta.errors.InputError, match="offline") as info:
        spec_model.fit(x, y, steps=6, batch_size=BATCH, progress=False, checkpoint_dir=tmp_path, checkpoint_every=100,
                       teacher=_failing_teacher(3, error))
    assert info.value is error
    assert [h["step"] for h in info.value.history["steps"]] == [0, 1, 2]
    replay = MatTA(MLP(d_in=4, hidden=[4], d_out=3), students={}, backend=backend, seed=1)
    replay.fit(x, y, steps=3, batch_size=BATCH, progress=False, teacher=_failing_teacher(10 ** 9, None))
    _assert_same_weights(replay, spec_model)
    assert os.listdir(tmp_path) == ["step-000000003"]


def test_sgd_at_a_huge_rate_stops_with_finite_predictions_on_the_training_data(tmp_path):
    """The fact: SGD at lr 1e3 stopped with the weights of the step whose loss was non-finite, and most
    predictions non-finite. Rule T4 undoes the update before the failing step: every prediction is finite."""
    import torch

    spec = MLP(d_in=16, hidden=[64, 64], d_out=4)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16)).astype("float32"), rng.integers(0, 4, 64)
    kwargs = dict(students={"S": 0.5}, backend="torch", seed=0, optimizer=torch.optim.SGD, learning_rate=1e3,
                  ramp="constant")  # λ must not depend on the run length: the replay is shorter
    model = MatTA(spec, **kwargs)
    with pytest.raises(NonFiniteLossError, match="the training loss became nan") as info:
        model.fit(x, y, steps=100, batch_size=16, progress=False, checkpoint_dir=tmp_path, checkpoint_every=100)
    failed_at = int(str(info.value).split("at step ")[1].split(";")[0])
    kept = failed_at - 1
    assert kept >= 1
    assert [h["step"] for h in model.history["steps"]] == list(range(kept))
    for g in ("TA", "S"):
        assert np.isfinite(model.predict(x, g)).all(), g
    # Without the undo the model would hold the weights the failing step's loss came from.
    unguarded = MatTA(spec, **kwargs)
    unguarded.fit(x, y, steps=failed_at, batch_size=16, progress=False)
    assert not np.isfinite(unguarded.predict(x)).all()
    # The error's checkpoint holds the weights the model is left with.
    assert os.listdir(tmp_path) == [checkpoints.folder_name(kept)]
    ckpt = checkpoints.read(str(tmp_path / checkpoints.folder_name(kept)), spec.to_dict())
    for k, w in model.weights.items():
        assert_bitwise_equal(ckpt.weights[k], w, k)


# ---------------------------------------------------------------------- SIGKILL at random moments
_TRAIN = r"""
import sys, numpy as np
import matta
from matta import MLP, MatTA
backend, directory, out = sys.argv[1:4]
if backend == "torch":
    import torch
    torch.set_num_threads(1)
spec = MLP(d_in=8, hidden=[32, 32], d_out=3)
rng = np.random.default_rng(0)
x, y = rng.normal(size=(200, 8)).astype("float32"), rng.integers(0, 3, 200)
model = MatTA(spec, students={"S": 0.5}, backend=backend, seed=1, learning_rate_schedule="cosine", warmup_steps=5)
model.fit(x, y, steps=STEPS, batch_size=16, progress=False, checkpoint_dir=directory, checkpoint_every=10, keep=2,
          resume=True)
matta.saving.write(out, spec, model.weights)
"""


def _newest_step(directory) -> int:
    names = sorted(n for n in os.listdir(directory) if n.startswith("step-")) if directory.exists() else []
    return int(names[-1][len("step-"):]) if names else 0


def run_killed_and_resumed(backend, tmp_path, kills, steps, seed):
    """Trains in a subprocess killed with SIGKILL ``kills`` times, each time resumed; then to the end.

    Each kill comes at a random moment after the process wrote three new checkpoints (so every
    resume starts further on): inside a step, between steps, or inside a checkpoint's write. The
    moment is drawn within the time between the last two, which holds no start-up or compilation,
    so it falls before the run's end however fast the machine trains.

    Returns:
        The final weights, and the newest checkpoint's step after each kill.
    """
    script = tmp_path / "train.py"
    script.write_text(_TRAIN.replace("STEPS", str(steps)))
    directory, out = tmp_path / "ckpt", tmp_path / "out"
    rng = random.Random(seed)
    reached = []
    for _ in range(kills):
        newest = _newest_step(directory)
        proc = subprocess.Popen([sys.executable, str(script), backend, str(directory), str(out)])
        written = []  # when each of the three checkpoints appeared
        while len(written) < 3:
            assert proc.poll() is None, "the training process ended before its third checkpoint"
            step = _newest_step(directory)
            if step > newest:
                newest = step
                written.append(time.perf_counter())
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, written[2] - written[1]))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists(), "the run ended before it was killed: give it more steps"
        reached.append(_newest_step(directory))
    subprocess.run([sys.executable, str(script), backend, str(directory), str(out)], check=True)
    _, weights, _ = saving.read(str(out))
    return weights, reached


def uninterrupted(backend, steps):
    """The same run as the subprocess's, in this process, never interrupted."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)).astype("float32"), rng.integers(0, 3, 200)
    model = MatTA(MLP(d_in=8, hidden=[32, 32], d_out=3), students={"S": 0.5}, backend=backend, seed=1,
                  learning_rate_schedule="cosine", warmup_steps=5)
    model.fit(x, y, steps=steps, batch_size=16, progress=False)
    return model.weights


@pytest.mark.subprocess
def test_a_run_killed_at_random_moments_and_resumed_ends_bit_identical_on_torch(tmp_path):
    steps = 200
    weights, reached = run_killed_and_resumed("torch", tmp_path, kills=3, steps=steps, seed=7)
    assert 0 < reached[0] < reached[1] < reached[2] < steps, reached
    expected = uninterrupted("torch", steps)
    for k, w in expected.items():
        assert_bitwise_equal(weights[k], w, k)
