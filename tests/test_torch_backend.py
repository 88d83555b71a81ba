"""The PyTorch backend through the public API: training, exactness at real sizes, formats.

What every backend must do (rule T4, saving and the native export, one call for a step's terms,
``backend_of``) is in the conformance suite, ``matta.spec_tests.test_training_and_saving``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import matta
from matta.training import learning_rate_scale
from matta import MLP, MatTA, Transformer, reference
from matta.spec_tests.assertions import assert_bitwise_equal, assert_close

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MLP_SPEC = MLP(d_in=64, hidden=[256, 192], d_out=10, activation="gelu", multiple_of=8)
LM_SPEC = Transformer(vocab_size=50, max_len=32, d_model=64, n_layers=3, n_heads=4, d_ff=256,
                      nested=("d_ff", "n_heads", "d_model"))
GRANULARITIES = {
    "mlp": ["TA", 0.25, 0.5, {"hidden": [64, 192]}, {"hidden": [0.75, 24]}],
    "transformer": ["TA", 0.25, 0.5, {"d_ff": [64, 256, 128], "n_heads": [1, 4, 2]}, {"layers": [0, 2], "d_model": 32},
                    {"n_layers": 2, "d_ff": 0.5}],
}


def _data(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    if isinstance(spec, MLP):
        centers = np.random.default_rng(99).standard_normal((spec.d_out, spec.d_in)) * 0.5  # one task for all splits
        y = rng.integers(0, spec.d_out, n)
        return (centers[y] + rng.standard_normal((n, spec.d_in))).astype("float32"), y
    # A learnable sequence task: the next token is (token + 1) mod vocab.
    start = rng.integers(0, spec.vocab_size, (n, 1))
    seq = (start + np.arange(spec.max_len + 1)) % spec.vocab_size
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", [MLP_SPEC, LM_SPEC], ids=["mlp", "transformer"])
def test_extracted_equals_nested_bit_for_bit_at_real_sizes(spec, dtype, device):
    """Conformance property 2 at sizes where BLAS blocking matters (batch 32), on every available device."""
    model = MatTA(spec, students={}, backend="torch", dtype=dtype, device=device, seed=1)
    x, _ = _data(spec, 32)
    for g in GRANULARITIES[spec.family]:
        nested = model.predict(x, g)
        extracted = model.extract(g)
        assert extracted.num_params == model.num_params(g) < spec.num_params or g == "TA"
        assert_bitwise_equal(extracted.predict(x), nested, f"{spec.family} {dtype} {device} g={g}")
        assert_close(nested, reference.forward(spec, model.weights, x, model.granularity(g)), dtype, f"g={g}")


# The MLP case runs for every backend in matta.spec_tests.test_training_and_saving (the numpy backend's
# finite differences cannot train a Transformer in a test's time).
@pytest.mark.parametrize("spec", [LM_SPEC], ids=["transformer"])
def test_fit_lowers_the_held_out_loss_of_every_granularity(spec):
    x, y = _data(spec, 512)
    x_val, y_val = _data(spec, 128, seed=1)
    model = MatTA(spec, students={"S": 0.25, "M": 0.5}, backend="torch", seed=0, learning_rate=3e-3)
    before = model.evaluate(x_val, y_val)
    history = model.fit(x, y, steps=64, batch_size=32, validation_data=(x_val, y_val), progress=False)
    after = model.evaluate(x_val, y_val)
    assert len(history["steps"]) == 64 and len(history["epochs"]) == 4  # 512 / 32 = 16 steps an epoch
    assert history["steps"][-1]["distill"] == pytest.approx(0.5) and history["steps"][0]["distill"] == 0.0
    for name in ("TA", "S", "M"):
        assert after[name]["loss"] < 0.7 * before[name]["loss"], (name, before[name], after[name])
    assert history["epochs"][-1]["S"]["loss"] == pytest.approx(after["S"]["loss"])


def test_a_teacher_array_or_callable_gives_the_same_run():
    x, y = _data(MLP_SPEC, 128)
    logits = np.random.default_rng(5).standard_normal((128, 10))
    # fit hands the callable the batch in the model's dtype (inputs are cast, then checked finite).
    index = {x[i].astype("float64").tobytes(): i for i in range(len(x))}
    runs = []
    for teacher in (logits, lambda xb: logits[[index[r.tobytes()] for r in xb]]):
        model = MatTA(MLP_SPEC, students={"S": 0.25}, backend="torch", seed=2, dtype="float64")
        model.fit(x, y, steps=5, batch_size=16, teacher=teacher, progress=False)
        runs.append(model.weights)
    for k in runs[0]:
        assert_bitwise_equal(runs[1][k], runs[0][k], k)


def test_optimizer_choices():
    x, y = _data(MLP_SPEC, 64)
    for optimizer in (None, torch.optim.SGD, lambda params: torch.optim.Adam(params, lr=1e-3)):
        model = MatTA(MLP_SPEC, backend="torch", optimizer=optimizer)
        before = model.weights["layers.0.kernel"].copy()
        model.fit(x, y, steps=2, batch_size=32, progress=False)
        assert not np.array_equal(before, model.weights["layers.0.kernel"]), optimizer
    with pytest.raises(matta.OptionError, match="optimizer must be None"):
        MatTA(MLP_SPEC, backend="torch", optimizer="adamw").fit(x, y, steps=1, progress=False)


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0), ("cosine", 3), ("constant", 4)])
def test_learning_rate_schedule_sets_every_step_rate_and_restores_it(schedule, warmup):
    """Rule T6: each update runs at learning_rate x learning_rate_scale(step); the optimizer's rate is put back."""
    x, y = _data(MLP_SPEC, 64)
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    model = MatTA(MLP_SPEC, backend="torch", learning_rate=0.05, learning_rate_schedule=schedule,
                  warmup_steps=warmup, optimizer=Recording)
    for _ in range(2):  # every fit() runs its own schedule
        seen.clear()
        model.fit(x, y, steps=9, batch_size=16, progress=False)
        expected = [0.05 * learning_rate_scale(schedule, warmup, t, 9) for t in range(9)]
        assert [rates[0] for rates in seen] == pytest.approx(expected, rel=1e-12), seen
        assert model.model._matta_optimizer[1].param_groups[0]["lr"] == 0.05
    with pytest.raises(matta.OptionError, match="learning_rate_schedule must be 'constant' or 'cosine'"):
        MatTA(MLP_SPEC, backend="torch", learning_rate_schedule="linear")
    with pytest.raises(matta.OptionError, match="warmup_steps must be an integer >= 0"):
        MatTA(MLP_SPEC, backend="torch", warmup_steps=-1)


def test_weights_round_trip_and_from_weights():
    model = MatTA(LM_SPEC, backend="torch", seed=4)
    clone = MatTA.from_weights(LM_SPEC, model.weights, students={"S": 0.5}, backend="torch")
    x, _ = _data(LM_SPEC, 4)
    assert_bitwise_equal(clone.predict(x, 0.5), model.predict(x, 0.5), "from_weights")
    assert clone.dtype == "float32"
    clone.weights = {k: np.zeros_like(v) for k, v in model.weights.items()}
    assert all(not v.any() for v in clone.weights.values())


def test_backend_of_checks_keras_before_torch():
    from matta.backend import backend_of

    assert backend_of(torch.nn.Linear(2, 2)) == "torch"
    fake_keras = type("Layer", (torch.nn.Module,), {"__module__": "keras.src.layers.layer"})
    assert backend_of(fake_keras()) == "keras"
    with pytest.raises(matta.BackendError):
        backend_of(object())


def test_teacher_logits_and_probabilities_train_identically():
    """Rule L1 end to end: teacher_output='logits' and the same Teacher as probabilities give one run."""
    from matta.losses import LossOptions, teacher_probabilities

    x, y = _data(MLP_SPEC, 64)
    logits = np.random.default_rng(1).standard_normal((64, 10)) * 3
    probs = teacher_probabilities(logits, LossOptions())
    runs = []
    for kind, teacher in (("logits", logits), ("probabilities", probs)):
        model = MatTA(MLP_SPEC, students={"S": 0.25}, backend="torch", dtype="float64", teacher_output=kind)
        model.fit(x, y, steps=4, batch_size=16, teacher=teacher, progress=False)
        runs.append(model.weights)
    for k in runs[0]:
        assert_close(runs[1][k], runs[0][k], "float64", k)


def test_regression_task_trains_with_mse():
    """Rule L1 (regression): MSE task and MSE distillation; evaluate reports mse and mae."""
    spec = MLP(d_in=4, hidden=[32], d_out=2, activation="tanh")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 4)).astype("float32")
    y = np.stack([x[:, 0] - x[:, 1], np.sin(x[:, 2])], axis=1)
    model = MatTA(spec, students={"S": 0.25}, backend="torch", task="regression", learning_rate=1e-2)
    before = model.evaluate(x, y)
    model.fit(x, y, steps=100, batch_size=32, progress=False)
    after = model.evaluate(x, y)
    assert set(after["TA"]) == {"mse", "mae"}
    assert after["TA"]["mse"] < 0.3 * before["TA"]["mse"] and after["S"]["mse"] < 0.5 * before["S"]["mse"], (before, after)
