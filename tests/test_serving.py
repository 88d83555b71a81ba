"""The serving call (``Backend.serving``): what ``Extracted.predict`` and the frontier's latency run.

It must return ``plain_forward``'s result bit for bit, for every batch size and sequence length
after the first call (a compiled call must not be specialised to the first shape it saw).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from matta import MLP, MatTA, Transformer, frontier
from matta.backend import Backend
from matta.spec_tests.assertions import assert_bitwise_equal

SPECS = [MLP(d_in=12, hidden=[32, 24], d_out=5, activation="gelu"),
         Transformer(vocab_size=17, max_len=10, d_model=16, n_layers=2, n_heads=4, d_ff=32)]


def _inputs(spec, batch, length=None, seed=0):
    rng = np.random.default_rng(seed)
    if isinstance(spec, MLP):
        return rng.standard_normal((batch, spec.d_in)).astype("float32")
    return rng.integers(0, spec.vocab_size, (batch, length or spec.max_len))


def _check_serving_matches(backend_name):
    for spec in SPECS:
        model = MatTA(spec, students={"S": 0.5}, backend=backend_name, seed=2)
        student = model.extract("S")
        serve = student.backend.serving(student.model)
        shapes = [(1, None), (7, None), (3, 4), (1, 1), (32, None)]
        for batch, length in shapes:
            x = _inputs(spec, batch, length, seed=batch)
            where = f"{backend_name} {spec.family} batch {batch} length {length}"
            plain = student.backend.plain_forward(student.model, x)
            assert_bitwise_equal(serve(x), plain, where)
            assert_bitwise_equal(student.predict(x), model.predict(x, "S"), where + " (vs nested)")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_serving_call_equals_plain_forward_bit_for_bit(backend_name):
    _check_serving_matches(backend_name)


@pytest.mark.subprocess
@pytest.mark.parametrize("engine", ["tensorflow", "jax"])
def test_keras_serving_call_equals_plain_forward_bit_for_bit(engine):
    """Each Keras engine in its own process (Keras picks its engine once)."""
    code = "import tests.test_serving as t; t._check_serving_matches('keras')"
    env = {**os.environ, "KERAS_BACKEND": engine}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torch_serves_the_plain_module_without_autograd():
    student = MatTA(SPECS[0], backend="torch", seed=0).extract(0.5)
    out = student.predict(_inputs(SPECS[0], 4))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (4, 5)
    assert all(p.grad is None for p in student.model.parameters())


@pytest.mark.subprocess
def test_keras_on_tensorflow_serves_one_compiled_trace():
    """The TensorFlow call is traced once and serves every batch size."""
    code = (
        "import numpy as np\n"
        "from matta import MLP, MatTA\n"
        "from matta.backends.keras import engine\n"
        "s = MatTA(MLP(d_in=6, hidden=[8], d_out=3), backend='keras').extract(0.5)\n"
        "call = engine.current().compiled_call(s.model, s.spec, 'float32')\n"
        "for n in (1, 5, 9):\n"
        "    call(np.zeros((n, 6), 'float32'))\n"
        "assert call.graph.experimental_get_tracing_count() == 1, call.graph.experimental_get_tracing_count()\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_default_serving_call_is_plain_forward():
    class Plain(Backend):
        name = "plain-test"

        def plain_forward(self, model, x):
            return model * x

    serve = Plain().serving(np.float32(3.0))
    np.testing.assert_array_equal(serve(np.arange(4, dtype="float32")), 3.0 * np.arange(4, dtype="float32"))


def test_frontier_times_the_serving_call():
    calls = []

    class Recorder:
        def predict(self, x):
            calls.append(x.shape)
            return x

    times = frontier.measure_latency({"a": frontier.serving_call(Recorder(), np.zeros((2, 3)))}, rounds=3, warmup=1)
    assert calls == [(2, 3)] * 4 and times["a"] >= 0


def test_an_onnx_export_is_part_of_the_atomic_save_and_its_manifest(tmp_path):
    """Rule E6: ``Extracted.save(onnx=True)`` writes ``model.onnx`` inside the save, listed in its manifest."""
    import json

    model = MatTA(MLP(d_in=4, hidden=[8], d_out=3), students={"S": 0.5}, backend="torch", seed=0)
    files = model.extract("S").save(str(tmp_path / "s"), native=False, onnx=True)
    assert sorted(files) == ["model.onnx", "spec.json", "weights.safetensors"]
    assert sorted(json.loads((tmp_path / "s" / "manifest.json").read_text())["files"]) == sorted(files)
