"""Training and saving through the public API (``MatTA``, ``matta.load``), for every backend given by ``--backends``.

* a non-finite loss stops training with the weights before the last applied update (rule T4);
* ``fit`` lowers the held-out loss of every granularity and logs every step and epoch;
* a step's terms in one call (``forward_many``, ``loss_and_gradients``: a backend may share the MLP's first
  layer between them) equal one call per term;
* a saved folder (rule E5) loads back without unpickling, and the backend's native export loads and runs in a
  process that never imports matta;
* ``backend_of`` names the backend of its nested and plain models.

Sizes are tiny: the numpy backend trains by finite differences.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import matta
from matta import MLP, MatTA, Transformer
from matta.backend import backend_of
from matta.losses import LossOptions, NumpyOps, StepPlan, Targets, Term, composite_loss
from matta.weights import initial_weights
from matta.spec_tests.assertions import assert_bitwise_equal, assert_close, precise_dtype
from matta.spec_tests.strategies import SHARED_STEPS, step_plan

#: Small enough for the numpy backend's finite differences (67 weights).
MLP_SPEC = MLP(d_in=4, hidden=[8], d_out=3)


def _data(spec, n, seed=0):
    """A learnable task: separable classes (MLP), or next token = token + 1 (Transformer)."""
    rng = np.random.default_rng(seed)
    if isinstance(spec, MLP):
        centers = np.random.default_rng(99).standard_normal((spec.d_out, spec.d_in)) * 3  # one task for all splits
        y = rng.integers(0, spec.d_out, n)
        return (centers[y] + rng.standard_normal((n, spec.d_in))).astype("float32"), y
    start = rng.integers(0, spec.vocab_size, (n, 1))
    seq = (start + np.arange(spec.max_len + 1)) % spec.vocab_size
    return seq[:, :-1], seq[:, 1:]


def test_a_non_finite_loss_stops_training_with_the_last_good_weights(backend):
    """Rule T4: a step whose loss or gradient is not finite is not applied, the update before it is undone,
    and fit stops there with the history of the steps the model holds."""
    spec = MLP_SPEC
    x, y = _data(spec, 64)
    # The first update moves every weight by about the learning rate: the next forward overflows float32.
    kwargs = dict(students={"S": 0.5}, backend=backend, seed=0, learning_rate=1e30,
                  ramp="constant")  # λ must not depend on the run length: the replay is shorter
    model = MatTA(spec, **kwargs)
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point (numpy backend)
        with pytest.raises(matta.NonFiniteLossError,
                           match=r"at step (\d+); the weights are (those after step \d+|the starting ones) "
                                 r"\(step \d+'s update was undone\)") as info:
            model.fit(x, y, steps=5, batch_size=32, progress=False)
    failed_at = int(str(info.value).split("at step ")[1].split(";")[0])
    assert failed_at >= 1
    kept = failed_at - 1  # the updates the model holds: step failed_at - 1's was undone
    assert [h["step"] for h in info.value.history["steps"]] == list(range(kept))
    assert model.history["steps"] == info.value.history["steps"]
    # Re-run exactly the kept steps: the weights must equal what the failed run left.
    replay = MatTA(spec, **kwargs)
    if kept:
        replay.fit(x, y, steps=kept, batch_size=32, progress=False)
    for k, w in replay.weights.items():
        assert np.all(np.isfinite(model.weights[k])), k
        assert_bitwise_equal(model.weights[k], w, k)
    assert np.all(np.isfinite(model.predict(x)))


def test_fit_lowers_the_held_out_loss_of_every_granularity(backend):
    """On an MLP: one rate for SGD (the numpy backend) and Adam (torch, Keras) alike."""
    spec = MLP_SPEC
    x, y = _data(spec, 64)
    x_val, y_val = _data(spec, 32, seed=1)
    model = MatTA(spec, students={"S": 0.25, "M": 0.5}, backend=backend, seed=0, learning_rate=0.3)
    before = model.evaluate(x_val, y_val)
    history = model.fit(x, y, steps=16, batch_size=16, validation_data=(x_val, y_val), progress=False)
    after = model.evaluate(x_val, y_val)
    assert len(history["steps"]) == 16 and len(history["epochs"]) == 4  # 64 / 16 = 4 steps an epoch
    assert [s["step"] for s in history["steps"]] == list(range(16))
    assert history["steps"][-1]["distill"] == pytest.approx(0.5) and history["steps"][0]["distill"] == 0.0
    for name in ("TA", "S", "M"):
        assert after[name]["loss"] < 0.7 * before[name]["loss"], (name, before[name], after[name])
    assert history["epochs"][-1]["S"]["loss"] == pytest.approx(after["S"]["loss"])


@pytest.mark.parametrize("names", SHARED_STEPS.values(), ids=SHARED_STEPS.keys())
def test_a_steps_terms_in_one_call_equal_one_call_per_term(backend, names):
    """``forward_many`` equals ``forward`` per granularity; with stop-gradient on (rule L3) the step's loss
    and gradients are the sums of those of its terms, each run as its own step."""
    spec = MLP(d_in=3, hidden=[8, 4], d_out=3, activation="tanh")
    plan, options = step_plan(spec, names, {"hidden": [0.75, 1]}), LossOptions(temperature=2.0)
    dtype = precise_dtype(backend, spec)
    model = backend.build(spec, initial_weights(spec, 4, dtype), device="cpu")
    x, y = _data(spec, 8)
    x = x.astype(dtype)
    granularities = [t.granularity for t in plan.terms]
    for t, out in zip(plan.terms, backend.forward_many(model, x, granularities)):
        assert_close(out, backend.forward(model, x, t.granularity), dtype, f"output {t.name} of {names}")

    loss, grads = backend.loss_and_gradients(model, x, Targets(hard=y), plan, options)
    outputs = {t.name: backend.forward(model, x, t.granularity).astype(np.float64) for t in plan.terms}
    expected, _ = composite_loss(NumpyOps(), outputs, Targets(hard=y), plan, options)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    by_name = {t.name: t for t in plan.terms}
    summed = {k: np.zeros(g.shape) for k, g in grads.items()}
    for t in plan.terms:
        # Term t alone; its parent enters with weight 0, so only t's own term has a gradient.
        alone = (t,) if t.parent is None else (Term(t.parent, by_name[t.parent].granularity, 0.0, None), t)
        _, part = backend.loss_and_gradients(model, x, Targets(hard=y), StepPlan(plan.step, alone, plan.distill),
                                             options)
        for k in summed:
            summed[k] += part[k]
    for k, g in grads.items():
        assert_close(g, summed[k], dtype, f"gradient {k} of {names}")


def test_a_saved_folder_loads_without_pickle_and_its_export_without_matta(backend, tmp_path, monkeypatch):
    """Rule E5: safetensors + JSON load into matta without unpickling; the backend's native export
    (``export_loader``) loads and predicts in a process that never imports matta."""
    spec = Transformer(vocab_size=7, max_len=5, d_model=4, n_layers=3, n_heads=2, d_ff=8,
                       nested=("d_ff", "n_heads", "d_model"))
    model = MatTA(spec, students={"S": {"d_ff": 0.25, "layers": [0, 2]}}, backend=backend, seed=3)
    x, _ = _data(spec, 5)
    student = model.extract("S")
    files = student.save(str(tmp_path))
    assert {"spec.json", "weights.safetensors"} <= set(files) and len(files) == len(set(files)), files
    # The folder holds exactly the files written plus the manifest that checks them (rule E6).
    assert sorted([*files, "manifest.json"]) == sorted(os.listdir(tmp_path)), (files, os.listdir(tmp_path))
    meta = json.loads((tmp_path / "spec.json").read_text())
    assert meta["spec"]["n_layers"] == 2 and meta["source"]["name"] == "S" and meta["num_params"] == student.num_params

    def refuse(*args, **kwargs):
        raise AssertionError("matta.load must never unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = matta.load(str(tmp_path), backend=backend)
    assert_bitwise_equal(loaded.predict(x), student.predict(x), "matta.load")
    monkeypatch.undo()

    loader = backend.export_loader(str(tmp_path))
    if loader is None:  # the backend declares no native format that loads without matta
        return
    np.save(tmp_path / "x.npy", x)
    code = (
        loader
        + "import sys, numpy as np\n"
        + f"np.save({str(tmp_path / 'y.npy')!r}, predict(np.load({str(tmp_path / 'x.npy')!r})))\n"
        + "assert not any(m == 'matta' or m.startswith('matta.') for m in sys.modules), 'matta was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    assert_close(np.load(tmp_path / "y.npy"), student.predict(x), "float32", f"{backend.name} native export")


def test_backend_of_names_the_backend_of_its_models(backend):
    spec = MLP_SPEC
    weights = initial_weights(spec, 0, "float32")
    assert backend_of(backend.build(spec, weights, device="cpu")) == backend.name
    assert backend_of(backend.build_plain(spec, weights, device="cpu")) == backend.name
    with pytest.raises(matta.BackendError, match="cannot tell the backend of a object"):
        backend_of(object())
