"""Fuzzing saved folders (rule E6): every mutated save loads as the original, as what its files say, or raises FormatError.

Mutations: flipped bytes, truncation, appended bytes, JSON edits, a file replaced by
a symlink, a file removed. With the manifest intact, a load returns the original
model or raises :class:`~matta.FormatError`. With the manifest rewritten to match
(or ``verify=False``) the parsers see the damage themselves: a load raises
FormatError or returns exactly what the safetensors library and ``spec_from_dict``
read from the files. Never another exception, never over a second.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import load_file

import matta
from matta import MatTA, Transformer
from matta.specs import spec_from_dict

from tests.test_saving import resign

EXAMPLES = {"smoke": 20, "dev": 100, "ci": 200, "thorough": 2000}[os.environ.get("MATTA_HYPOTHESIS_PROFILE", "dev")]
SPEC = Transformer(vocab_size=7, max_len=4, d_model=4, n_layers=2, n_heads=2, d_ff=8)
ORIGINAL = MatTA(SPEC, students={}, backend="numpy", seed=3).extract()
FILES = ["spec.json", "weights.safetensors", "manifest.json", "weights.npz"]
#: One good save, copied for every example (saving it again each time would mostly time fsync).
GOOD = os.path.join(tempfile.mkdtemp(), "good")
ORIGINAL.save(GOOD)
atexit.register(shutil.rmtree, os.path.dirname(GOOD), True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _json_edit(data, meta):
    path = data.draw(st.sampled_from([["format"], ["spec"], ["spec", "n_layers"], ["spec", "d_model"], ["spec", "n_heads"],
                                      ["spec", "family"], ["spec", "d_ff"], ["num_params"], ["dtype"], ["spec", "extra"]]))
    target = meta
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else {}
    if isinstance(target, dict):
        if data.draw(st.booleans()):
            target[path[-1]] = data.draw(json_values)
        else:
            target.pop(path[-1], None)
    return meta


def mutate(data, folder):
    name = data.draw(st.sampled_from(FILES), label="file")
    path = os.path.join(folder, name)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "json", "symlink", "remove"]), label="mutation")
    raw = bytearray(open(path, "rb").read())
    if kind == "flip" and raw:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        open(path, "wb").write(raw)
    elif kind == "truncate":
        open(path, "wb").write(raw[: data.draw(st.integers(0, len(raw)))])
    elif kind == "append":
        open(path, "wb").write(raw + data.draw(st.binary(min_size=1, max_size=16)))
    elif kind == "json" and name.endswith(".json"):
        meta = json.loads(raw)
        open(path, "w").write(json.dumps(_json_edit(data, meta)))
    elif kind == "symlink":
        os.replace(path, path + ".real")
        os.symlink(path + ".real", path)
    elif kind == "remove":
        os.remove(path)
    return name


def what_the_files_say(folder):
    """The model an independent reader gets from the files (json + spec_from_dict + safetensors), or None."""
    try:
        meta = json.load(open(os.path.join(folder, "spec.json")))
        return spec_from_dict(meta["spec"]), load_file(os.path.join(folder, "weights.safetensors"))
    except Exception:  # noqa: BLE001 - any failure of the independent reader
        return None


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data(), resigned=st.booleans(), verify=st.booleans())
def test_a_mutated_save_loads_as_the_original_or_raises_format_error(data, resigned, verify):
    folder = tempfile.mkdtemp()
    try:
        target = os.path.join(folder, "s")
        shutil.copytree(GOOD, target)
        name = mutate(data, target)
        if resigned and name != "manifest.json" and os.path.exists(os.path.join(target, "manifest.json")):
            resign(target)
        start = time.perf_counter()
        try:
            loaded = matta.load(target, backend="numpy", verify=verify)
        except matta.FormatError:
            loaded = None
        seconds = time.perf_counter() - start
        assert seconds < 1.0, seconds
        if loaded is None:
            return
        if verify and not resigned:
            expected_spec, expected = ORIGINAL.spec, ORIGINAL.weights
        else:
            said = what_the_files_say(target)
            assert said is not None, "matta loaded a save the independent reader refuses"
            expected_spec, expected = said
        assert loaded.spec == expected_spec
        assert loaded.weights.keys() == expected.keys()
        assert all(np.array_equal(loaded.weights[k], expected[k]) for k in expected)
    finally:
        shutil.rmtree(folder)
