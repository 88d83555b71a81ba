"""The Keras 3 backend through the public API, on the engine ``KERAS_BACKEND`` names.

Run once per engine, each in its own process (Keras picks its engine once)::

    KERAS_BACKEND=jax .venv/bin/python -m pytest tests/test_keras_backend.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import keras  # a missing keras is an error, never a skip

import matta
from matta import MLP, MatTA, Transformer, reference
from matta.losses import LossOptions, StepPlan, Targets, Term
from matta.nesting import full, resolve
from matta.backends.keras import engine
from matta.spec_tests.assertions import assert_bitwise_equal, assert_close

ENGINE = keras.backend.backend()
MLP_SPEC = MLP(d_in=24, hidden=[64, 48], d_out=7, activation="gelu", multiple_of=8)
LM_SPEC = Transformer(vocab_size=23, max_len=12, d_model=32, n_layers=3, n_heads=4, d_ff=64,
                      nested=("d_ff", "n_heads", "d_model"))
GRANULARITIES = {
    "mlp": ["TA", 0.25, 0.5, {"hidden": [16, 48]}, {"hidden": [0.75, 5]}],
    "transformer": ["TA", 0.25, 0.5, {"d_ff": [16, 64, 32], "n_heads": [1, 4, 2]}, {"layers": [0, 2], "d_model": 16},
                    {"n_layers": 2, "d_ff": 0.5}],
}
#: Engines whose every op runs float64 in float64 (Keras 3 maps float64 to float32 elsewhere; see the docs).
FLOAT64_ENGINES = {"tensorflow"}
DTYPES = ["float32"] + (["float64"] if ENGINE in FLOAT64_ENGINES else [])


def _data(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    if isinstance(spec, MLP):
        centers = np.random.default_rng(99).standard_normal((spec.d_out, spec.d_in)) * 0.7
        y = rng.integers(0, spec.d_out, n)
        return (centers[y] + rng.standard_normal((n, spec.d_in))).astype("float32"), y
    start = rng.integers(0, spec.vocab_size, (n, 1))
    seq = (start + np.arange(spec.max_len + 1)) % spec.vocab_size  # next token = token + 1
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [MLP_SPEC, LM_SPEC], ids=["mlp", "transformer"])
def test_nested_forward_matches_the_reference_and_extraction_is_bit_exact(spec, dtype):
    """Conformance properties 1 and 2 at sizes where BLAS blocking matters (batch 32)."""
    model = MatTA(spec, students={}, backend="keras", dtype=dtype, seed=1)
    x, _ = _data(spec, 32)
    weights = model.weights
    for g in GRANULARITIES[spec.family]:
        where = f"{ENGINE} {spec.family} {dtype} g={g}"
        nested = model.predict(x, g)
        assert nested.dtype == np.dtype(dtype), where
        assert_close(nested, reference.forward(spec, weights, x, model.granularity(g)), dtype, where)
        extracted = model.extract(g)
        assert isinstance(extracted.model, keras.Model)
        assert extracted.num_params == model.num_params(g) and (g == "TA" or extracted.num_params < spec.num_params)
        assert_bitwise_equal(extracted.predict(x), nested, where)


def test_extracted_models_are_built_in_keras_layers_only():
    allowed = {"InputLayer", "Dense", "LayerNormalization", "Embedding", "Reshape"}
    for spec in (MLP_SPEC, LM_SPEC):
        student = MatTA(spec, backend="keras").extract(0.5)
        kinds = {type(layer).__name__ for layer in student.model.layers}
        modules = {type(layer).__module__.split(".")[0] for layer in student.model.layers}
        assert modules == {"keras"}, modules
        assert {"Dense"} <= kinds <= allowed, kinds


@pytest.mark.parametrize("activation", matta.specs.ACTIVATIONS)
def test_extracted_mlp_applies_built_in_activations_inside_dense(activation):
    """relu/tanh/sigmoid/silu ride in ``Dense(activation=...)`` (no extra graph node), bit-exact; GELU is a node."""
    from matta.backends.keras.models import INSIDE_DENSE

    spec = MLP(d_in=24, hidden=[64, 48], d_out=7, activation=activation)
    model = MatTA(spec, backend="keras", seed=3)
    x, _ = _data(spec, 32)
    student = model.extract(0.5)
    dense = [layer for layer in student.model.layers if type(layer).__name__ == "Dense"]
    assert len(dense) == 3, student.model.layers
    names = [keras.activations.serialize(layer.activation) for layer in dense]
    inside = activation in INSIDE_DENSE
    assert names == ([activation, activation, "linear"] if inside else ["linear"] * 3), (activation, names)
    # Graph nodes beyond the layers: one per hidden layer for GELU, none otherwise.
    ops_nodes = [op for op in student.model.operations if not isinstance(op, keras.layers.Layer)]
    assert len(ops_nodes) == (0 if inside else 2), (activation, ops_nodes)
    assert_bitwise_equal(student.predict(x), model.predict(x, 0.5), f"{ENGINE} {activation}")


def test_float64_support_is_probed_and_refused_with_a_matta_error():
    """float64 runs exactly where every op computes in float64; elsewhere a matta error names the op."""
    for spec in (MLP_SPEC, LM_SPEC):
        blocker = engine.float64_blocker(spec)
        if ENGINE in FLOAT64_ENGINES:
            assert blocker is None
            assert MatTA(spec, backend="keras", dtype="float64").predict(_data(spec, 2)[0]).dtype == np.float64
        else:
            assert blocker is not None and blocker.startswith("keras.ops.")
            with pytest.raises(matta.InputTypeError, match=rf"dtype must be 'float32' .*KERAS_BACKEND={ENGINE}: {blocker}"):
                MatTA(spec, backend="keras", dtype="float64")


class _Counter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches, self.epochs, self.logs = 0, 0, []

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1
        self.logs.append(dict(logs))


# Lowering the loss of an MLP is checked for every backend in matta.spec_tests.test_training_and_saving.
@pytest.mark.parametrize("spec", [MLP_SPEC, LM_SPEC], ids=["mlp", "transformer"])
def test_fit_goes_through_keras_lowers_the_loss_and_runs_callbacks(spec):
    x, y = _data(spec, 256)
    x_val, y_val = _data(spec, 64, seed=1)
    model = MatTA(spec, students={"S": 0.25, "M": 0.5}, backend="keras", seed=0, learning_rate=1e-2)
    before = model.evaluate(x_val, y_val)
    counter = _Counter()
    history = model.fit(x, y, steps=40, batch_size=32, validation_data=(x_val, y_val), progress=False,
                        callbacks=[counter])
    after = model.evaluate(x_val, y_val)
    assert len(history["steps"]) == 40 and len(history["epochs"]) == 5  # 256 / 32 = 8 steps an epoch
    assert [s["step"] for s in history["steps"]] == list(range(40))
    assert history["steps"][0]["distill"] == 0.0 and history["steps"][-1]["distill"] == pytest.approx(0.5)
    assert counter.batches == 40 and counter.epochs == 5
    last = counter.logs[-1]
    assert {"loss", "TA_loss", "S_loss", "M_loss", "val_TA_loss", "val_S_accuracy"} <= set(last), last
    assert "step" not in last and "grads_finite" not in last  # internal keys never reach user callbacks
    # Keras shows an epoch's running mean as `loss`; matta keeps every step.
    assert last["loss"] == pytest.approx(np.mean([s["loss"] for s in history["steps"][32:]]), rel=1e-5)
    assert last["val_S_loss"] == pytest.approx(after["S"]["loss"])
    for name in ("TA", "S", "M"):
        assert after[name]["loss"] < 0.75 * before[name]["loss"], (name, before[name], after[name])


@pytest.mark.parametrize("sampling", ["sandwich", "one"])
def test_steps_whose_granularities_vary_train_eagerly_and_follow_the_schedule(sampling):
    """sandwich/one sampling change the granularity set per step; each step must train its own plan."""
    x, y = _data(MLP_SPEC, 64)
    model = MatTA(MLP_SPEC, students={"S": 0.25, "M": 0.5}, backend="keras", sampling=sampling, seed=3)
    history = model.fit(x, y, steps=6, batch_size=16, progress=False)
    for entry in history["steps"]:
        plan = model.schedule.plan(entry["step"], 6)
        assert {k[len("loss/"):] for k in entry if k.startswith("loss/")} == {t.name for t in plan.terms}


VARYING_PLANS = {
    "all": {},  # a static plan: the Transformer still runs it as one group per term
    "mixnmatch-2": {"sampling": "mixnmatch", "num_random": 2},
    "sandwich-1": {"sampling": "sandwich", "num_random": 1},
    "one": {"sampling": "one"},
    "mixnmatch-chain": {"sampling": "mixnmatch", "num_random": 1, "parent": "chain"},
    "mixnmatch-no-stop-gradient": {"sampling": "mixnmatch", "num_random": 1, "stop_gradient": False},
}


# Every plan on the MLP; on the Transformer (slow to compile per plan under JAX) the two with a mix, on
# two blocks: every axis still nests, and each mix is a group of its own.
VARYING_LM_SPEC = Transformer(vocab_size=23, max_len=12, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                              nested=("d_ff", "n_heads", "d_model"))
VARYING_CASES = [("mlp", p) for p in sorted(VARYING_PLANS) if p != "all"] + [
    ("transformer", "all"), ("transformer", "mixnmatch-2"), ("transformer", "mixnmatch-chain")]


@pytest.mark.parametrize("family,plan", VARYING_CASES, ids=[f"{f}-{p}" for f, p in VARYING_CASES])
def test_grouped_steps_equal_one_step_and_the_torch_backend(family, plan, monkeypatch):
    """With stop-gradient a step runs as groups (the Transformer: one term each; the MLP: its every-step terms,
    then each varying term), each compiled under TF and JAX, then one update. The split must not change a step:
    per-term losses equal those of the whole step as one function (float32 rounding of the gradient sums) and
    follow torch's step for step (cross-framework rounding, which Adam carries from step to step); each group
    is traced once."""
    from matta.backends.keras import _TRAINERS
    from matta.backends.keras.training import Trainer

    options = VARYING_PLANS[plan]
    spec = {"mlp": MLP_SPEC, "transformer": VARYING_LM_SPEC}[family]
    x, y = _data(spec, 96)
    parts = {}
    for name in ("torch", "keras", "keras-one-step"):
        with monkeypatch.context() as patch:
            if name == "keras-one-step":
                patch.setattr(Trainer, "split", lambda self, terms: None)  # the whole step as one function
            model = MatTA(spec, students={"S": 0.25, "M": 0.5}, backend=name.split("-")[0], seed=11,
                          learning_rate=3e-3, distill_weight=0.5, ramp_end=2, **options)
            history = model.fit(x, y, steps=6, batch_size=32, progress=False)["steps"]
        parts[name] = [{k: s[k] for k in s if k == "loss" or k.startswith("loss/")} for s in history]
        if name == "keras":
            trainer = _TRAINERS[model.model][1]
            functions, update = dict(trainer.group_functions), trainer.update_function
            drawn = {model.schedule.plan(s, 6).terms for s in range(6)}
            grouped = [terms for terms in drawn if trainer.groups(terms) is not None]
            # The update sums a list of one loss per group: one signature per distinct number of groups.
            group_counts = {1 + len(trainer.groups(terms)[1]) if terms in grouped else 1 for terms in drawn}
    for other, rtol in (("keras-one-step", 2e-6), ("torch", 1e-4)):
        for step, (k, t) in enumerate(zip(parts["keras"], parts[other])):
            assert set(k) == set(t), (plan, other, step, k, t)
            np.testing.assert_allclose([k[n] for n in sorted(k)], [t[n] for n in sorted(t)], rtol=rtol,
                                       err_msg=f"{plan}: keras vs {other}, step {step}")
    if family == "transformer" and options.get("stop_gradient") is not False:
        # One term's activations at a time: the TA alone first, then every other term alone.
        assert len(grouped) == len(drawn) and all(trainer.groups(terms)[0] == terms[:1] for terms in drawn)
    if engine.name() == "torch" or options.get("stop_gradient") is False or not grouped:
        # Eager torch, or parents that are not constants: no step is split (JAX compiles each whole plan).
        assert set(functions) <= (drawn if engine.name() == "jax" else set()), sorted(map(str, functions))
    elif engine.name() == "tensorflow":
        distinct = {(t.granularity, t.weight, t.parent) for terms in grouped for t in terms}
        assert update is not None and 1 <= len(functions) <= len(distinct), (plan, len(functions), len(distinct))
        traces = {str(k): f.experimental_get_tracing_count() for k, f in functions.items()}
        assert set(traces.values()) == {1}, traces
        # The update sums a list of one loss per group: one trace per distinct number of groups (a step
        # that is one group runs eagerly here, without it).
        counts = {1 + len(trainer.groups(terms)[1]) for terms in grouped}
        assert update.experimental_get_tracing_count() == len(counts), counts
    else:
        assert update is not None and functions, sorted(map(str, functions))
        compiled = {str(k): f._cache_size() for k, f in functions.items()}
        assert set(compiled.values()) == {1}, compiled
        assert update._cache_size() == len(group_counts), (update._cache_size(), group_counts)


@pytest.mark.parametrize("options", [{}, {"learning_rate_schedule": "cosine", "warmup_steps": 2}],
                         ids=["constant-rate", "cosine-warmup"])
def test_the_first_steps_equal_the_torch_backend(options):
    """Same weights, batches, plan and optimizer (AdamW), and rule T6's rates → the same losses, within float32 rounding."""
    x, y = _data(MLP_SPEC, 96)
    losses = {}
    for name in ("torch", "keras"):
        kwargs = {"learning_rate": 1e-3, **options}
        model = MatTA(MLP_SPEC, students={"S": 0.25}, backend=name, seed=7, weight_decay=0.01,
                      ramp="linear", ramp_end=2, **kwargs)
        # Two fit() calls: the second reuses Keras' compiled step (constant rate) or retraces it with the
        # new run's schedule (rule T6 restarts per fit); both must still follow torch step for step.
        losses[name] = [s["loss"] for steps in (6, 4)
                        for s in model.fit(x, y, steps=steps, batch_size=32, progress=False)["steps"]]
    np.testing.assert_allclose(losses["keras"], losses["torch"], rtol=2e-5)


@pytest.mark.parametrize("spec", [MLP_SPEC, LM_SPEC], ids=["mlp", "transformer"])
def test_weights_move_between_torch_and_keras_with_equal_outputs(spec):
    x, y = _data(spec, 64)
    trained = MatTA(spec, students={"S": 0.5}, backend="torch", seed=5)
    trained.fit(x, y, steps=3, batch_size=32, progress=False)
    into_keras = MatTA.from_weights(spec, trained.weights, students={"S": 0.5}, backend="keras")
    for k, w in trained.weights.items():
        assert_bitwise_equal(into_keras.weights[k], w, k)
    for g in ("TA", "S"):
        assert_close(into_keras.predict(x, g), trained.predict(x, g), "float32", f"torch → keras g={g}")
    into_keras.fit(x, y, steps=3, batch_size=32, progress=False)
    back = MatTA.from_weights(spec, into_keras.weights, students={"S": 0.5}, backend="torch")
    for g in ("TA", "S"):
        assert_close(back.predict(x, g), into_keras.predict(x, g), "float32", f"keras → torch g={g}")


@pytest.mark.parametrize("spec", [MLP_SPEC, LM_SPEC], ids=["mlp", "transformer"])
def test_loss_and_gradients_equal_the_torch_backend(spec):
    dtype = DTYPES[-1]
    tol = {"float32": 2e-5, "float64": 1e-10}[dtype]
    torch_backend = matta.backend.get_backend("torch")
    keras_backend = matta.backend.get_backend("keras")
    weights = {k: v.astype(dtype) for k, v in matta.weights.initial_weights(spec, 2, "float64").items()}
    x, y = _data(spec, 6)
    soft = np.exp(matta.losses.NumpyOps().log_softmax(np.random.default_rng(1).standard_normal(y.shape + (
        spec.d_out if isinstance(spec, MLP) else spec.vocab_size,))))
    options = LossOptions(hard_label_weight=0.3, temperature=2.0, stop_gradient=True)
    g = resolve(spec, 0.5)
    plan = StepPlan(0, (Term("TA", full(spec), 1.0, None), Term("S", g, 0.7, "TA")), 0.4)
    targets = Targets(hard=y, soft=soft.astype(dtype))
    results = {}
    for b in (torch_backend, keras_backend):
        results[b.name] = b.loss_and_gradients(b.build(spec, weights, device="cpu"), x, targets, plan, options)
    loss_t, grads_t = results["torch"]
    loss_k, grads_k = results["keras"]
    assert loss_k == pytest.approx(loss_t, rel=tol)
    assert sorted(grads_k) == sorted(grads_t)
    for k in grads_t:
        scale = max(1e-3, float(np.abs(grads_t[k]).max()))
        assert float(np.abs(grads_k[k] - grads_t[k]).max()) <= tol * 10 * scale, k


@pytest.mark.parametrize("sizes", [[(6, 5), (3, 4), (2, 5), (3, 4), (6, 1)], [(3, 4), (2, 2)], [(3, None), (6, 5)]],
                         ids=["with-whole", "prefixes-only", "row-prefix"])
def test_several_prefix_reads_of_one_variable_give_the_slices_and_the_summed_gradient(sizes):
    """What a training step's weight reads compute (``models._reader``; on torch, one autograd node):
    each read is the prefix slice, and the variable's gradient is the sum of every read's zero-padded one."""
    from matta.backends.keras.models import _reader

    rng = np.random.default_rng(1)
    value = rng.standard_normal((6, 5)).astype("float32")
    var = keras.Variable(value, dtype="float32")
    weights = [rng.standard_normal((6, 5)).astype("float32") for _ in sizes]

    def crop(a, s):
        return a[tuple(slice(0, n) for n in s)]

    # The index of each read as a plan gives it: None for the whole variable, else a prefix per axis.
    indices = [None if s == value.shape else tuple(slice(None) if n is None else slice(0, n) for n in s) for s in sizes]

    def fn():
        read = _reader({"w": var}, [("w", i) for i in indices])
        outs = [read("w", i) for i in indices]
        total = sum(keras.ops.sum(keras.ops.multiply(out, crop(c, s))) for out, s, c in zip(outs, sizes, weights))
        return total, outs  # JAX traces fn: the reads are compared once they are values

    _, outs, (grad,) = engine.current().value_and_grad([var], fn)
    for out, s in zip(outs, sizes):
        assert_bitwise_equal(np.asarray(keras.ops.convert_to_numpy(out)), crop(value, s), f"read {s}")
    expected = np.zeros_like(value)
    for s, c in zip(sizes, weights):
        expected[tuple(slice(0, n) for n in s)] += crop(c, s)
    assert_close(np.asarray(keras.ops.convert_to_numpy(grad)), expected, "float32", f"gradient of reads {sizes}")


def test_the_gradient_check_is_exact_for_huge_finite_and_for_non_finite_gradients():
    """Rule T4's eager gradient check: its fast path (a finite norm) never decides a case wrongly.

    1e30 is finite in float32 but its square overflows, so a norm alone would call these gradients bad.
    """
    grads_finite = lambda grads: bool(engine.current().grads_finite(grads))  # noqa: E731
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype("float32") for s in ((64, 48), (48,), (7,))]
    convert = lambda xs: [keras.ops.convert_to_tensor(a) for a in xs]  # noqa: E731
    assert grads_finite(convert(arrays)) is True
    huge = [a.copy() for a in arrays]
    huge[0][3, 5] = 1e30
    huge[2][:] = -3e38
    assert grads_finite(convert(huge)) is True
    for bad in (np.nan, np.inf, -np.inf):
        for i, index in ((0, (63, 47)), (1, (0,)), (2, (6,))):
            broken = [a.copy() for a in huge]
            broken[i][index] = bad
            assert grads_finite(convert(broken)) is False, (bad, i)


def test_optimizer_and_fit_options():
    x, y = _data(MLP_SPEC, 64)
    for optimizer in (None, "sgd", keras.optimizers.Adam(learning_rate=1e-3)):
        model = MatTA(MLP_SPEC, backend="keras", optimizer=optimizer)
        before = model.weights["layers.0.kernel"].copy()
        model.fit(x, y, steps=2, batch_size=32, progress=False)
        assert not np.array_equal(before, model.weights["layers.0.kernel"]), optimizer
    with pytest.raises(matta.OptionError, match="optimizer must be None"):
        MatTA(MLP_SPEC, backend="keras", optimizer="no-such-optimizer").fit(x, y, steps=1, progress=False)
    with pytest.raises(matta.OptionError, match="optimizer must be None"):
        MatTA(MLP_SPEC, backend="keras", optimizer=3).fit(x, y, steps=1, progress=False)
    with pytest.raises(matta.OptionError, match=r"unknown fit option\(s\) for the keras backend: \['shuffle'\]"):
        MatTA(MLP_SPEC, backend="keras").fit(x, y, steps=1, progress=False, shuffle=True)
    with pytest.raises(matta.OptionError, match="callbacks must be a list of keras.callbacks.Callback"):
        MatTA(MLP_SPEC, backend="keras").fit(x, y, steps=1, progress=False, callbacks=[print])
    with pytest.raises(matta.OptionError, match="learning_rate_schedule / warmup_steps need the default optimizer"):
        MatTA(MLP_SPEC, backend="keras", optimizer="sgd", learning_rate_schedule="cosine").fit(x, y, steps=1,
                                                                                                progress=False)


@pytest.mark.subprocess
@pytest.mark.parametrize("spec", [MLP_SPEC, LM_SPEC], ids=["mlp", "transformer"])
def test_model_keras_loads_and_predicts_without_matta(spec, tmp_path):
    """A `.keras` Student loads with keras.saving.load_model (safe mode) in a process that never imports matta."""
    model = MatTA(spec, students={"S": 0.25}, backend="keras", seed=3)
    student = model.extract({"hidden": [16, 48]} if isinstance(spec, MLP) else {"d_ff": 0.25, "layers": [0, 2], "d_model": 16})
    files = student.save(str(tmp_path))
    assert sorted(files) == ["model.keras", "spec.json", "weights.safetensors"]
    x, _ = _data(spec, 8)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, keras\n"
        f"model = keras.saving.load_model({str(tmp_path / 'model.keras')!r}, safe_mode=True)\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        + ("x = x.astype('float32')\n" if isinstance(spec, MLP) else "x = x.astype('int32')\n")
        + "y = keras.ops.convert_to_numpy(model(x))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        f"np.save({str(tmp_path / 'p.npy')!r}, model.predict(x, verbose=0))\n"
        "assert 'matta' not in sys.modules, 'matta was imported'\n"
        "assert not any(m.startswith('matta') for m in sys.modules), 'matta was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "KERAS_BACKEND": ENGINE}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path), env=env)
    nested = model.predict(x, model.granularity(student.info["source"]["granularity"]))
    # Eager call: the same kernels as the nested forward, so bit for bit.
    assert_bitwise_equal(np.load(tmp_path / "y.npy"), nested, f"{ENGINE} loaded model(x)")
    # model.predict compiles (XLA under JAX/TF): within the documented bound.
    err = float(np.abs(np.load(tmp_path / "p.npy").astype(np.float64) - nested).max())
    assert err <= PREDICT_BOUND * max(1.0, float(np.abs(nested).max())), err


#: docs/backends/keras-exactness.md: max |model.predict − nested| / max(1, max |nested|), float32.
PREDICT_BOUND = 1e-5


def test_load_a_saved_folder_into_keras_from_either_backend(tmp_path):
    torch_model = MatTA(LM_SPEC, students={"S": 0.5}, backend="torch", seed=8)
    torch_model.extract("S").save(str(tmp_path / "t"))
    loaded = matta.load(str(tmp_path / "t"), backend="keras")
    x, _ = _data(LM_SPEC, 4)
    assert_close(loaded.predict(x), torch_model.predict(x, "S"), "float32", "torch folder → keras")
    loaded.save(str(tmp_path / "k"))
    back = matta.load(str(tmp_path / "k"), backend="torch")
    assert_close(back.predict(x), loaded.predict(x), "float32", "keras folder → torch")


#: After a tiny fit (where matta tunes glibc's malloc, if it does), the minor page faults per call of a
#: jitted function whose XLA scratch block (a (3072, 3072) float32 product, 36 MiB) is above glibc's
#: 32 MiB mmap-threshold cap. XLA's worker threads take turns running it and each has its own malloc
#: arena, so the first calls fault until every arena holds a block: the probe counts after ten calls.
_SCRATCH_PROBE = """
import json, resource
import numpy as np, jax, jax.numpy as jnp
from matta import MLP, MatTA
MatTA(MLP(d_in=4, hidden=[8], d_out=2), backend="keras").fit(np.ones((8, 4), "float32"), np.zeros(8, int),
                                                             steps=1, batch_size=8, progress=False)
f = jax.jit(lambda a, b: jnp.max(a @ b, axis=0) + jnp.min(a @ b, axis=1))  # two reads: the product is kept
a, b = jnp.ones((3072, 8)), jnp.ones((8, 3072))
scratch = f.lower(a, b).compile().memory_analysis().temp_size_in_bytes
for _ in range(10):
    f(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(a, b).block_until_ready()
print(json.dumps({"scratch": scratch, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10}))
"""


def _scratch_faults(**env) -> dict:
    keep = lambda k: not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "MATTA_TUNE_MALLOC"))  # noqa: E731
    clean = {k: v for k, v in os.environ.items() if keep(k)}
    out = subprocess.run([sys.executable, "-c", _SCRATCH_PROBE], check=True, capture_output=True, text=True,
                         env={**clean, "KERAS_BACKEND": ENGINE, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_a_jax_step_reuses_its_scratch_memory_instead_of_faulting_it_in_every_step():
    """JAX on CPU: a step's scratch block above 32 MiB stays mapped across steps (engines.jax.reuse_step_memory)."""
    if ENGINE != "jax":  # only XLA allocates a whole step as one host block; the tuning lives in the JAX module
        MatTA(MLP_SPEC, backend="keras").fit(*_data(MLP_SPEC, 8), steps=1, batch_size=8, progress=False)
        assert "matta.backends.keras.engines.jax" not in sys.modules
        return
    from matta.backends.keras.engines import jax as jax_engine

    assert jax_engine.malloc_left_alone({"MATTA_TUNE_MALLOC": "0"}) and jax_engine.malloc_left_alone({"MALLOC_ARENA_MAX": "2"})
    assert jax_engine.malloc_left_alone({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})
    assert not jax_engine.malloc_left_alone({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512", "MATTA_TUNE_MALLOC": "1"})
    applies = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    if applies:
        import jax

        applies = jax.default_backend() == "cpu"
    if not applies:  # only XLA on CPU allocates a whole step as one host block
        MatTA(MLP_SPEC, backend="keras").fit(*_data(MLP_SPEC, 8), steps=1, batch_size=8, progress=False)
        assert jax_engine.reuse_step_memory() is False
        return
    tuned, untouched = _scratch_faults(), _scratch_faults(MATTA_TUNE_MALLOC="0")
    page = 4096
    assert tuned["scratch"] > 32 * 2**20 and untouched["scratch"] == tuned["scratch"], (tuned, untouched)
    # glibc's own policy maps the block afresh on every call: a fault per page of it.
    assert untouched["faults"] > 0.9 * tuned["scratch"] / page, untouched
    assert tuned["faults"] < 0.05 * tuned["scratch"] / page, tuned


def test_a_whole_matta_saved_on_torch_or_numpy_loads_on_keras(tmp_path):
    """Rule E6: MatTA.save is framework-neutral; a good save loads on Keras and back."""
    for source in ("torch", "numpy"):
        model = MatTA(MLP_SPEC, students={"S": 0.25, "M": 0.5}, backend=source, seed=6, temperature=3.0)
        model.save(str(tmp_path / source))
        loaded = MatTA.load(str(tmp_path / source), backend="keras")
        x, _ = _data(MLP_SPEC, 4)
        assert loaded.students == model.students and loaded.options == model.options
        assert_close(loaded.predict(x, "S"), model.predict(x, "S"), "float32", f"{source} MatTA → keras")
    loaded.save(str(tmp_path / "k"))
    back = MatTA.load(str(tmp_path / "k"), backend="numpy")
    assert all(np.array_equal(back.weights[k], v) for k, v in model.weights.items())
