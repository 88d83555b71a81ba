"""Keras on JAX with 2 host devices: ``DataParallel`` and ``ModelParallel`` training equal one device.

One subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set before JAX starts)
trains every case on one device and then under the distribution, with the same seed and global
batch, and writes the largest weight difference relative to the largest weight; the tests read it.
On the other engines a distribution is a matta error (tested where the suite runs that engine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

STEPS = 20

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import keras
    from matta import MLP, MatTA, Transformer
    from matta.backends.keras import distribution
    from matta.errors import OptionError

    STEPS = int(sys.argv[2])
    MLP_SPEC = MLP(d_in=10, hidden=[24, 16], d_out=4, multiple_of=4)
    TF_SPEC = Transformer(vocab_size=11, max_len=6, d_model=16, n_layers=2, n_heads=2, d_ff=32, multiple_of=4)

    def make(spec, sampling):
        rng = np.random.default_rng(3)
        if isinstance(spec, MLP):
            x = rng.standard_normal((64, spec.d_in)).astype("float32")
            y = rng.integers(0, spec.d_out, 64)
        else:
            x = rng.integers(0, spec.vocab_size, (32, spec.max_len))
            y = np.roll(x, -1, axis=1)
        model = MatTA(spec, {"S": 0.5}, backend="keras", seed=1, learning_rate=3e-3, ramp_end=4, sampling=sampling)
        model.fit(x, y, steps=STEPS, batch_size=16, progress=False)
        return model

    devices = keras.distribution.list_devices()
    out = {"devices": len(devices), "cases": {}}
    for family, spec in (("mlp", MLP_SPEC), ("tf", TF_SPEC)):
        for sampling in ("all", "mixnmatch"):
            layouts = {"data": keras.distribution.DataParallel(devices=devices)}
            if family == "tf":
                layouts["model"] = distribution.model_parallel(spec)
            keras.distribution.set_distribution(None)
            want = make(spec, sampling).weights
            for kind, layout in layouts.items():
                keras.distribution.set_distribution(layout)
                model = make(spec, sampling)
                got = model.weights
                keras.distribution.set_distribution(None)
                scale = max(float(np.max(np.abs(w))) for w in want.values())
                err = max(float(np.max(np.abs(got[k] - want[k]))) for k in want) / scale
                shardings = {v.path.split("/")[-1]: str(v.value.sharding.spec) for v in model.model.variables}
                out["cases"][f"{family}-{sampling}-{kind}"] = {"err": err, "shardings": shardings}
    try:
        distribution.model_parallel(Transformer(vocab_size=11, max_len=6, d_model=16, n_layers=1, n_heads=1, d_ff=33))
        out["indivisible"] = None
    except OptionError as exc:
        out["indivisible"] = str(exc)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        make(MLP_SPEC, "all").fit(np.zeros((8, 10), "float32"), np.zeros(8, int), steps=1, batch_size=3)
        out["refused"] = None
    except OptionError as exc:
        out["refused"] = str(exc)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jax")
    (folder / "worker.py").write_text(WORKER)
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, str(folder / "worker.py"), str(folder / "out.json"), str(STEPS)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((folder / "out.json").read_text())


CASES = ["mlp-all-data", "mlp-mixnmatch-data", "tf-all-data", "tf-mixnmatch-data", "tf-all-model", "tf-mixnmatch-model"]


@pytest.mark.subprocess
@pytest.mark.parametrize("case", CASES)
def test_two_jax_devices_train_like_one(results, case):
    """After 20 steps the weights are one device's within 1e-5 of the largest weight."""
    assert results["devices"] == 2
    assert results["cases"][case]["err"] <= 1e-5, results["cases"][case]["err"]


@pytest.mark.subprocess
def test_model_parallel_shards_the_transformers_large_kernels(results):
    """Under ``model_parallel`` the FFN and attention kernels are split over the model axis; norms are not."""
    shardings = results["cases"]["tf-all-model"]["shardings"]
    assert "'model'" in shardings["blocks_0_ffn_up_kernel"] and "'model'" in shardings["blocks_1_attention_output_kernel"]
    assert "'model'" not in shardings["blocks_0_norm1_scale"]
    assert all("'model'" not in s for s in results["cases"]["tf-all-data"]["shardings"].values())


@pytest.mark.subprocess
def test_a_batch_the_devices_cannot_share_is_an_option_error(results):
    """Refused before any framework call, naming the field; so is a kernel the model axis cannot split."""
    assert "batch_size must be divisible by the 2 devices of the mesh axis 'batch'; got 3" in results["refused"]
    assert "blocks.0.ffn.up.kernel has 33 on its sharded axis" in results["indivisible"]


def test_a_distribution_on_an_engine_without_one_is_a_matta_error():
    """On TensorFlow and torch a set distribution is refused at build, naming the engine and what to use."""
    keras = pytest.importorskip("keras")
    from matta import MLP, MatTA
    from matta.errors import OptionError

    engine = keras.backend.backend()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=["cpu:0"]))
    try:
        if engine == "jax":  # one device: trains as without a distribution
            MatTA(MLP(d_in=4, hidden=[8], d_out=2), backend="keras")
        else:
            with pytest.raises(OptionError, match=f"KERAS_BACKEND=jax only; this process runs '{engine}'"):
                MatTA(MLP(d_in=4, hidden=[8], d_out=2), backend="keras")
    finally:
        keras.distribution.set_distribution(None)
