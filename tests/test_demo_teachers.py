"""Teacher caching: saved as safetensors + JSON, reused on a rerun, retrained when the recipe changes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from matta.demo.config import task_configs
from matta.demo import data
from matta.demo.teachers import BatchMemo, get_teacher, teacher_key


@pytest.fixture(scope="module")
def smoke():
    cfg = task_configs("smoke", ["digits"])[0]
    return cfg, data.digits(**cfg.data)


def test_teacher_is_cached_without_pickle_and_reused(tmp_path, smoke):
    cfg, ds = smoke
    first, info = get_teacher(cfg, ds, "torch", str(tmp_path), progress=False, log=lambda m: None)
    assert info["cached"] is False
    folder = info["path"]
    assert sorted(os.listdir(folder)) == ["manifest.json", "spec.json", "teacher.json", "weights.safetensors"]
    again, info2 = get_teacher(cfg, ds, "torch", str(tmp_path), progress=False, log=lambda m: None)
    assert info2["cached"] is True and info2["key"] == info["key"] and info2["path"] == folder
    for k, v in first.weights.items():
        np.testing.assert_array_equal(again.weights[k], v)
    np.testing.assert_array_equal(again.predict(ds.x_test), first.predict(ds.x_test))
    # Only the one Teacher folder: no leftovers of the atomic write.
    assert os.listdir(tmp_path) == [os.path.basename(folder)]


def test_the_teacher_is_reproducible_without_a_cache(smoke):
    cfg, ds = smoke
    a, _ = get_teacher(cfg, ds, "torch", None, progress=False, log=lambda m: None)
    b, _ = get_teacher(cfg, ds, "torch", None, progress=False, log=lambda m: None)
    np.testing.assert_array_equal(a.predict(ds.x_test), b.predict(ds.x_test))


def test_the_teacher_trains_with_its_recipes_learning_rate_schedule(smoke):
    cfg, ds = smoke
    constant, _ = get_teacher(cfg, ds, "torch", None, progress=False, log=lambda m: None)
    cosine_cfg = dataclasses.replace(cfg, teacher_learning_rate_schedule="cosine", teacher_warmup_steps=5)
    cosine, _ = get_teacher(cosine_cfg, ds, "torch", None, progress=False, log=lambda m: None)
    # Same seed, data and steps: only the per-step learning rates differ, so the weights must differ.
    differs = [not np.array_equal(constant.weights[k], cosine.weights[k]) for k in constant.weights]
    assert all(differs), [k for k, d in zip(constant.weights, differs) if not d]


def test_cache_key_changes_with_recipe_data_backend_and_seed(smoke):
    cfg, ds = smoke
    key = teacher_key(cfg, ds, "torch")
    assert teacher_key(cfg, ds, "torch") == key
    assert teacher_key(dataclasses.replace(cfg, teacher_steps=cfg.teacher_steps + 1), ds, "torch") != key
    assert teacher_key(dataclasses.replace(cfg, teacher_learning_rate_schedule="cosine"), ds, "torch") != key
    assert teacher_key(dataclasses.replace(cfg, teacher_warmup_steps=cfg.teacher_warmup_steps + 1), ds, "torch") != key
    assert teacher_key(cfg, data.digits(limit=200), "torch") != key
    assert teacher_key(cfg, ds, "keras") != key
    assert teacher_key(cfg, ds, "torch", seed=1) != key


def test_batch_memo_runs_the_teacher_once_per_batch():
    calls = []

    class Fake:
        def predict(self, x):
            calls.append(len(x))
            return x.astype(np.float32) * 0.5

    memo = BatchMemo(Fake())
    x = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(memo(x), x * 0.5)
    np.testing.assert_array_equal(memo(x.copy()), x * 0.5)
    memo(x[:2])
    assert calls == [3, 2] and memo.hits == 1
