"""Saves cross backends (rule E6): a whole MatTA saved on torch loads on numpy and back; a good save loads on torch."""

from __future__ import annotations

import numpy as np
import torch  # a missing torch is an error, never a skip

import matta
from matta import MLP, MatTA, Transformer

SPEC = Transformer(vocab_size=13, max_len=6, d_model=8, n_layers=2, n_heads=2, d_ff=16, nested=("d_ff", "n_heads"))
X = np.random.default_rng(0).integers(0, 13, (3, 6))


def test_a_whole_matta_moves_torch_to_numpy_and_numpy_to_torch(tmp_path):
    assert torch.get_default_dtype() == torch.float32
    model = MatTA(SPEC, students={"S": 0.5, "M": {"d_ff": [16, 8], "n_heads": [1, 2]}}, backend="torch", seed=2,
                  device="cpu", learning_rate=3e-3, temperature=1.5, sampling="one")
    model.fit(X, X, steps=2, batch_size=3, progress=False)
    model.save(str(tmp_path / "t"))
    on_numpy = MatTA.load(str(tmp_path / "t"), backend="numpy")
    assert on_numpy.students == model.students and on_numpy.options == model.options
    assert on_numpy.learning_rate == 3e-3 and on_numpy.backend.name == "numpy"
    for name in ("TA", "S", "M"):
        np.testing.assert_allclose(on_numpy.predict(X, name), model.predict(X, name), rtol=1e-4, atol=1e-5)
    on_numpy.save(str(tmp_path / "n"))
    back = MatTA.load(str(tmp_path / "n"), backend="torch", device="cpu")
    assert all(np.array_equal(back.weights[k], v) for k, v in model.weights.items())
    assert np.array_equal(back.predict(X, "S"), model.predict(X, "S"))


def test_a_good_extracted_save_loads_on_torch(tmp_path):
    student = MatTA(MLP(d_in=4, hidden=[8], d_out=3), students={"S": 0.5}, backend="numpy").extract("S")
    student.save(str(tmp_path / "s"))
    loaded = matta.load(str(tmp_path / "s"), backend="torch", device="cpu")
    x = np.random.default_rng(1).standard_normal((5, 4)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x), student.predict(x), rtol=1e-5, atol=1e-6)
    assert loaded.save(str(tmp_path / "s")) == ["model.pt2", "spec.json", "weights.safetensors"]
    assert same_weights(matta.load(str(tmp_path / "s"), backend="numpy").weights, student.weights)


def same_weights(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
