"""Saved folders (rules E5, E6): atomic and contained writes, the manifest, hostile files, whole-model saves.

Every test runs on the numpy backend (``backend="numpy"``), so it is fast; the
cross-backend loads are in ``tests/test_saving_backends.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file

import matta
from matta import MLP, MatTA, Transformer, saving
from matta.backends.numpy import NumpyBackend

MLP_SPEC = MLP(d_in=5, hidden=[8, 6], d_out=3)
LM_SPEC = Transformer(vocab_size=11, max_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=16)


def extracted(spec=MLP_SPEC, seed=0):
    return MatTA(spec, students={"S": 0.5}, backend="numpy", seed=seed).extract("S")


def same(a, b):
    return a.spec == b.spec and a.weights.keys() == b.weights.keys() and all(
        np.array_equal(a.weights[k], b.weights[k]) for k in a.weights
    )


def resign(folder):
    """Rewrites manifest.json to match the files as they are now, so a damaged file reaches the parsers."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name != "manifest.json" and os.path.isfile(path) and not os.path.islink(path):
            data = open(path, "rb").read()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    kind = json.load(open(os.path.join(folder, "manifest.json")))["kind"]
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"format": "matta.manifest/1", "kind": kind, "files": files}, f)


def edit_json(path, change):
    meta = json.load(open(path))
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


# ---------------------------------------------------------------------- the format
def test_a_save_round_trips_and_its_weights_are_standard_safetensors(tmp_path):
    model = extracted(LM_SPEC)
    files = model.save(str(tmp_path / "s"))
    assert files == ["numpy-spec.json", "spec.json", "weights.npz", "weights.safetensors"]
    assert sorted(os.listdir(tmp_path / "s")) == sorted(files + ["manifest.json"])
    manifest = json.load(open(tmp_path / "s" / "manifest.json"))
    assert manifest["kind"] == "matta.extracted/1" and sorted(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        data = (tmp_path / "s" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    reference_read = load_file(str(tmp_path / "s" / "weights.safetensors"))  # the safetensors library itself
    assert all(np.array_equal(reference_read[k], model.weights[k]) for k in model.weights)
    assert same(matta.load(str(tmp_path / "s"), backend="numpy"), model)
    assert os.listdir(tmp_path) == ["s"]  # no temporary folder left beside it


def test_saving_over_a_save_leaves_nothing_of_the_old_one(tmp_path):
    class OtherBackend(NumpyBackend):
        name = "other"

        def export(self, model, spec, directory):
            (open(os.path.join(directory, "model.other"), "wb")).write(b"native")
            return ["model.other"]

    target = str(tmp_path / "s")
    extracted().save(target)
    assert "weights.npz" in os.listdir(target)
    model = MatTA(MLP_SPEC, students={"S": 0.5}, backend=OtherBackend(), seed=1).extract("S")
    assert model.save(target) == ["model.other", "spec.json", "weights.safetensors"]
    assert sorted(os.listdir(target)) == ["manifest.json", "model.other", "spec.json", "weights.safetensors"]


def test_a_symlink_planted_in_the_target_is_never_followed(tmp_path):
    target, victim = tmp_path / "s", tmp_path / "victim.txt"
    victim.write_text("keep me")
    extracted().save(str(target))
    os.remove(target / "spec.json")
    os.symlink(victim, target / "spec.json")
    with pytest.raises(matta.FormatError, match="not a plain file|symbolic link"):
        matta.load(str(target), backend="numpy")
    with pytest.raises(matta.FormatError, match="symbolic link"):
        matta.load(str(target), backend="numpy", verify=False)
    extracted(seed=2).save(str(target))
    assert victim.read_text() == "keep me"
    assert not os.path.islink(target / "spec.json")
    assert same(matta.load(str(target), backend="numpy"), extracted(seed=2))


def test_a_target_that_is_not_a_matta_save_is_refused_unless_overwrite(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(matta.SaveError, match="not a matta save; pass overwrite=True"):
        extracted().save(str(folder))
    assert os.listdir(folder) == ["cat.jpg"]
    link = tmp_path / "link"
    os.symlink(folder, link)
    with pytest.raises(matta.SaveError, match="symbolic link"):
        extracted().save(str(link))
    extracted().save(str(link), overwrite=True)  # replaces the link, never what it points to
    assert os.listdir(folder) == ["cat.jpg"] and not os.path.islink(link)
    (tmp_path / "file").write_text("x")
    with pytest.raises(matta.SaveError, match="is a file"):
        extracted().save(str(tmp_path / "file"))
    extracted().save(str(folder), overwrite=True)
    assert "cat.jpg" not in os.listdir(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    extracted().save(str(empty))  # an empty folder is fine
    assert same(matta.load(str(empty), backend="numpy"), extracted())


def test_a_spec_json_from_another_save_is_refused(tmp_path):
    """Same parameter shapes, other activation: only the manifest ties spec.json to the weights."""
    relu = MatTA(MLP_SPEC, students={}, backend="numpy", seed=0).extract()
    tanh = MatTA(MLP(d_in=5, hidden=[8, 6], d_out=3, activation="tanh"), students={}, backend="numpy", seed=1).extract()
    relu.save(str(tmp_path / "relu"))
    tanh.save(str(tmp_path / "tanh"))
    os.replace(tmp_path / "tanh" / "spec.json", tmp_path / "relu" / "spec.json")
    with pytest.raises(matta.FormatError, match="spec.json"):
        matta.load(str(tmp_path / "relu"), backend="numpy")


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    target = tmp_path / "s"
    extracted().save(str(target))
    for name in ("weights.safetensors", "weights.npz"):
        path = target / name
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
        with pytest.raises(matta.FormatError, match=f"{name} does not match its SHA-256"):
            matta.load(str(target), backend="numpy")
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    assert same(matta.load(str(target), backend="numpy"), extracted())


def test_a_missing_manifest_is_refused_unless_verify_is_off(tmp_path):
    target = tmp_path / "s"
    extracted().save(str(target))
    os.remove(target / "manifest.json")
    with pytest.raises(matta.FormatError, match="manifest.json is missing.*verify=False"):
        matta.load(str(target), backend="numpy")
    assert same(matta.load(str(target), backend="numpy", verify=False), extracted())


# ---------------------------------------------------------------------- hostile spec.json
HOSTILE_JSON = {
    "list": b"[1, 2, 3]",
    "null": b"null",
    "number": b"3",
    "string": b'"mlp"',
    "invalid": b'{"format": "matta.extracted/1", "spec": ',
    "not utf-8": b'{"format": "\xff\xfe"}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "deeply nested spec": b'{"format": "matta.extracted/1", "spec": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
    "spec is a list": b'{"format": "matta.extracted/1", "spec": []}',
    "no spec": b'{"format": "matta.extracted/1"}',
    "other format": b'{"format": "matta.extracted/9", "spec": {}}',
}


@pytest.mark.parametrize("content", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
@pytest.mark.parametrize("verify", [True, False], ids=["resigned", "verify-off"])
def test_a_hostile_spec_json_raises_format_error(tmp_path, content, verify):
    target = tmp_path / "s"
    extracted().save(str(target))
    (target / "spec.json").write_bytes(content)
    if verify:
        resign(target)
    with pytest.raises(matta.FormatError):
        matta.load(str(target), backend="numpy", verify=verify)


SPEC_EDITS = {
    "field of a wrong type": lambda m: m["spec"].update(hidden={"a": 1}),
    "unknown field": lambda m: m["spec"].update(colour="red"),
    "huge width": lambda m: m["spec"].update(hidden=[10**30, 3]),
    "activation a list": lambda m: m["spec"].update(activation=["relu"]),
    "wider than the file": lambda m: m["spec"].update(hidden=[9, 6]),
    "parameter count": lambda m: m.update(num_params=m["num_params"] + 1),
    "dtype": lambda m: m.update(dtype="float64"),
}


@pytest.mark.parametrize("edit", SPEC_EDITS.values(), ids=SPEC_EDITS.keys())
def test_a_spec_that_disagrees_with_the_weights_raises_format_error(tmp_path, edit):
    target = tmp_path / "s"
    extracted().save(str(target))
    edit_json(target / "spec.json", edit)
    resign(target)
    with pytest.raises(matta.FormatError):
        matta.load(str(target), backend="numpy")


@pytest.mark.parametrize("n_layers", [10**6, 10**12])
def test_an_absurd_depth_fails_fast_without_allocating(tmp_path, n_layers):
    """A 600-byte spec.json claiming a million blocks is refused before its layout is built."""
    target = tmp_path / "s"
    extracted(LM_SPEC).save(str(target))
    edit_json(target / "spec.json", lambda m: m["spec"].update(n_layers=n_layers))
    resign(target)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(matta.FormatError, match=f"n_layers={n_layers}"):
        matta.load(str(target), backend="numpy")
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    files = sum(os.path.getsize(target / f) for f in os.listdir(target))
    assert peak < 4 * files + (1 << 20), peak
    assert seconds < 1.0, seconds


# ---------------------------------------------------------------------- hostile safetensors
def _header(path):
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(path, header, body):
    head = json.dumps(header).encode()
    open(path, "wb").write(len(head).to_bytes(8, "little") + head + body)


def _edit_header(change):
    def apply(path):
        header, body = _header(path)
        change(header)
        _with_header(path, header, body)
    return apply


def _raw(content):
    def apply(path):
        open(path, "wb").write(content(open(path, "rb").read()))
    return apply


SAFETENSORS_DAMAGE = {
    "empty": _raw(lambda d: b""),
    "truncated length": _raw(lambda d: d[:5]),
    "truncated header": _raw(lambda d: d[:40]),
    "truncated data": _raw(lambda d: d[:-4]),
    "header length past the end": _raw(lambda d: (len(d) * 2).to_bytes(8, "little") + d[8:]),
    "header length of 2**63": _raw(lambda d: (2**63).to_bytes(8, "little") + d[8:]),
    "header not json": _raw(lambda d: d[:8] + b"\x00" * (len(d) - 8)),
    "header a list": lambda p: _with_header(p, [], b""),
    "offsets past the data": _edit_header(lambda h: h["layers.0.bias"].update(data_offsets=[0, 10**9])),
    "negative offsets": _edit_header(lambda h: h["layers.0.bias"].update(data_offsets=[-4, 0])),
    "shape lies about the size": _edit_header(lambda h: h["layers.0.bias"].update(shape=[10**9])),
    "overlapping tensors": _edit_header(lambda h: h["layers.1.bias"].update(data_offsets=h["layers.0.bias"]["data_offsets"])),
    "unknown dtype": _edit_header(lambda h: h["layers.0.bias"].update(dtype="I32")),
    "mixed dtypes": _edit_header(lambda h: h["layers.0.bias"].update(dtype="F64", shape=[h["layers.0.bias"]["shape"][0] // 2])),
    "a missing tensor": _edit_header(lambda h: h.pop("layers.0.bias")),
    "an extra tensor": _edit_header(lambda h: h.update({"evil": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})),
    "a wrong shape": _edit_header(lambda h: h["layers.0.kernel"].update(shape=list(reversed(h["layers.0.kernel"]["shape"])))),
    "bad metadata": _edit_header(lambda h: h.update(__metadata__={"a": 1})),
    "a bool shape": _edit_header(lambda h: h["layers.0.bias"].update(shape=[True])),
}


@pytest.mark.parametrize("damage", SAFETENSORS_DAMAGE.values(), ids=SAFETENSORS_DAMAGE.keys())
def test_a_damaged_safetensors_file_raises_format_error(tmp_path, damage):
    target = tmp_path / "s"
    extracted().save(str(target))
    damage(str(target / "weights.safetensors"))
    resign(target)
    start = time.perf_counter()
    with pytest.raises(matta.FormatError):
        matta.load(str(target), backend="numpy")
    assert time.perf_counter() - start < 1.0


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    model = extracted()
    weights = {k: v.copy() for k, v in model.weights.items()}
    weights["layers.1.kernel"][0, 0] = np.nan
    saving.write(str(tmp_path / "s"), model.spec, weights)
    with pytest.raises(matta.FormatError, match="NaN or Inf; pass allow_nonfinite=True"):
        matta.load(str(tmp_path / "s"), backend="numpy")
    loaded = matta.load(str(tmp_path / "s"), backend="numpy", allow_nonfinite=True)
    assert np.isnan(loaded.weights["layers.1.kernel"][0, 0])


def test_a_fifo_or_folder_in_place_of_a_file_raises_format_error(tmp_path):
    target = tmp_path / "s"
    extracted().save(str(target))
    os.remove(target / "spec.json")
    os.mkfifo(target / "spec.json")  # opening it for reading must not block
    for verify in (True, False):
        with pytest.raises(matta.FormatError, match="not a plain file"):
            matta.load(str(target), backend="numpy", verify=verify)
    os.remove(target / "spec.json")
    os.mkdir(target / "spec.json")
    with pytest.raises(matta.FormatError, match="not a plain file"):
        matta.load(str(target), backend="numpy", verify=False)


@pytest.mark.parametrize("manifest", [
    b"[]", b'{"format": "matta.manifest/1", "kind": "matta.extracted/1", "files": []}',
    b'{"format": "matta.manifest/1", "kind": "pickle", "files": {}}',
    b'{"format": "matta.manifest/1", "kind": "matta.extracted/1", "files": {"../../etc/passwd": {"size": 1, "sha256": "00"}}}',
    b'{"format": "matta.manifest/1", "kind": "matta.extracted/1", "files": {"spec.json": {"size": -1, "sha256": "x"}}}',
    b'{"format": "matta.manifest/1", "kind": "matta.extracted/1", "files": {}}',
], ids=["list", "files a list", "unknown kind", "path outside", "bad entry", "lists nothing"])
def test_a_hostile_manifest_raises_format_error(tmp_path, manifest):
    target = tmp_path / "s"
    extracted().save(str(target))
    (target / "manifest.json").write_bytes(manifest)
    with pytest.raises(matta.FormatError):
        matta.load(str(target), backend="numpy")


# ---------------------------------------------------------------------- options and inputs
@pytest.mark.parametrize("field, value", [
    ("learning_rate", float("inf")), ("learning_rate", float("nan")), ("learning_rate", 0.0), ("learning_rate", -1e-3),
    ("learning_rate", True), ("weight_decay", float("inf")), ("weight_decay", -1.0),
])
def test_a_non_finite_zero_or_negative_rate_is_an_option_error(field, value):
    with pytest.raises(matta.OptionError, match=field):
        MatTA(MLP_SPEC, backend="numpy", **{field: value})


def test_input_is_checked_finite_after_the_cast_to_the_model_dtype():
    model = MatTA(MLP_SPEC, students={"S": 0.5}, backend="numpy")
    x = np.full((2, 5), 1e300)  # finite in float64, Inf in float32
    with pytest.raises(matta.InputError, match="finite as float32"):
        model.predict(x)
    with pytest.raises(matta.InputError, match="finite as float32"):
        model.fit(x, np.zeros(2, int), steps=1)
    with pytest.raises(matta.InputError, match="finite as float32"):
        model.extract("S").predict(x)
    model64 = MatTA(MLP_SPEC, backend="numpy", dtype="float64")
    assert np.isfinite(model64.predict(np.full((2, 5), 1e-3))).all()
    with pytest.raises(matta.InputError, match="finite as float64"):
        model64.predict(np.full((2, 5), np.inf))


# ---------------------------------------------------------------------- the whole MatTA
def test_a_whole_matta_round_trips_with_every_option_and_trains_on_identically(tmp_path):
    spec = MLP(d_in=3, hidden=[4], d_out=2)
    kwargs = dict(students={"S": 0.5, "M": {"hidden": [3]}}, seed=5, dtype="float64", learning_rate=0.05,
                  weight_decay=0.01, learning_rate_schedule="cosine", warmup_steps=1, temperature=3.0,
                  sampling="sandwich", num_random=1, student_weights={"S": 2.0}, ramp="cosine", ramp_end=3)
    x, y = np.random.default_rng(0).standard_normal((6, 3)), np.arange(6) % 2
    model = MatTA(spec, backend="numpy", **kwargs)
    model.fit(x, y, steps=2, batch_size=3, progress=False)
    assert model.save(str(tmp_path / "m")) == ["model.json", "weights.safetensors"]
    loaded = MatTA.load(str(tmp_path / "m"), backend="numpy")
    assert loaded.spec == model.spec and loaded.students == model.students and loaded.options == model.options
    for name in ("seed", "dtype", "learning_rate", "weight_decay", "learning_rate_schedule", "warmup_steps"):
        assert getattr(loaded, name) == getattr(model, name), name
    assert all(np.array_equal(loaded.weights[k], v) for k, v in model.weights.items())
    # The next fit draws the same batches and granularities: the same MatTA.
    model.fit(x, y, steps=2, batch_size=3, progress=False)
    loaded.fit(x, y, steps=2, batch_size=3, progress=False)
    assert all(np.array_equal(loaded.weights[k], v) for k, v in model.weights.items())


def test_a_whole_matta_save_and_an_extracted_save_are_not_confused(tmp_path):
    model = MatTA(MLP_SPEC, students={"S": 0.5}, backend="numpy")
    model.save(str(tmp_path / "m"))
    model.extract("S").save(str(tmp_path / "e"))
    with pytest.raises(matta.FormatError, match="MatTA.load"):
        matta.load(str(tmp_path / "m"), backend="numpy")
    with pytest.raises(matta.FormatError, match="matta.load"):
        MatTA.load(str(tmp_path / "e"), backend="numpy")
    model.save(str(tmp_path / "e"))  # a save of either kind may replace the other
    assert MatTA.load(str(tmp_path / "e"), backend="numpy").students == model.students


MODEL_EDITS = {
    "students a list": lambda c: c.update(students=[]),
    "a student too big": lambda c: c["students"].update(S={"hidden": [99, 3]}),
    "students not nested": lambda c: c["students"].update(S={"hidden": [2, 6]}, M={"hidden": [4, 2]}),
    "unknown loss option": lambda c: c["loss_options"].update(colour=1),
    "bad loss option": lambda c: c["loss_options"].update(temperature=-1),
    "learning rate 0": lambda c: c.update(learning_rate=0),
    "dtype": lambda c: c.update(dtype="float64"),
    "fits": lambda c: c.update(fits=[0]),
    "seed": lambda c: c.update(seed="x"),
}


@pytest.mark.parametrize("edit", MODEL_EDITS.values(), ids=MODEL_EDITS.keys())
def test_a_hostile_model_json_raises_format_error(tmp_path, edit):
    MatTA(MLP_SPEC, students={"S": 0.5, "M": 0.75}, backend="numpy").save(str(tmp_path / "m"))
    edit_json(tmp_path / "m" / "model.json", edit)
    resign(tmp_path / "m")
    with pytest.raises(matta.FormatError, match="model.json"):
        MatTA.load(str(tmp_path / "m"), backend="numpy")
