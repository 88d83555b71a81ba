"""Batch export (``MatTA.export_many``, ``matta export``): the manifest is true and the models reproduce predict.

Every exported format is reloaded and run: safetensors with ``matta.load``, ONNX with
onnxruntime, the native file with ``torch.export.load``. Exports replace their folder as one
step, and bad arguments are refused before any work.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch  # a missing torch is an error, never a skip

import matta
from matta import MLP, MatTA, Transformer, resolve
from matta.__main__ import main
from matta.cost import flops
from matta.errors import GranularityError, InputError, OptionError, SaveError
from matta.frontier import Budget
from matta.shipping import EXPORT_FORMAT, parse_budget, weights_checksum

torch.set_num_threads(1)

MLP_SPEC = MLP(d_in=5, hidden=[12, 8], d_out=3, activation="gelu")
TF_SPEC = Transformer(vocab_size=11, max_len=6, d_model=8, n_layers=2, n_heads=2, d_ff=16, nested=("d_ff", "n_heads"))


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5)).astype("float32")
    y = rng.integers(0, 3, 30)
    model = MatTA(MLP_SPEC, students={"S": 0.25, "M": 0.5}, backend="torch", device="cpu", seed=3)
    model.fit(x, y, steps=3, batch_size=10, progress=False)
    return model, x, y


@pytest.fixture(scope="module")
def transformer():
    x = np.random.default_rng(1).integers(0, 11, (6, 6))
    model = MatTA(TF_SPEC, students={"S": 0.5}, backend="torch", device="cpu", seed=4)
    model.fit(x, x, steps=2, batch_size=3, progress=False)
    return model, x


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_manifest(out: str, model: MatTA, x: np.ndarray, y=None) -> dict:
    """The manifest lists every file with its true size and SHA-256, and each model's true figures."""
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert manifest["format"] == EXPORT_FORMAT and manifest["matta_version"] == matta.__version__
    assert manifest["source"]["weights_sha256"] == weights_checksum(model.weights)
    on_disk = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, ns in os.walk(out) for n in ns)
    listed = sorted(f for m in manifest["models"] for f in m["files"])
    assert on_disk == sorted(listed + ["manifest.json"])
    seq_len = x.shape[1] if isinstance(model.spec, Transformer) else None
    for m in manifest["models"]:
        for name, entry in m["files"].items():
            path = os.path.join(out, name)
            assert entry == {"size": os.path.getsize(path), "sha256": sha256(path)}, name
        g = resolve(model.spec, m["granularity"])
        assert m["params"] == model.num_params(g)
        assert m["spec"] == matta.extract(model.weights, model.spec, g)[0].to_dict()
        if y is not None:
            assert m["metrics"] == model.evaluate(x, y, [g])[str(g)]
            assert m["latency_ms"] > 0
            assert m["flops"] == flops(matta.specs.spec_from_dict(m["spec"]), seq_len)
    return manifest


def run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_every_format_reproduces_predict_and_the_manifest_is_true(mlp, tmp_path):
    model, x, y = mlp
    budget_params = model.num_params("M")
    out = str(tmp_path / "ship")
    manifest = model.export_many(out, ["S", Budget(max_params=budget_params), {"hidden": [12, 8]}],
                                 formats=("safetensors", "onnx", "native"), x_val=x, y_val=y, rounds=3)
    assert manifest == check_manifest(out, model, x, y)
    assert manifest["measured_on"]["batch_size"] == 1 and manifest["measured_on"]["data"]["examples"] == 30
    by_folder = {m["folder"]: m for m in manifest["models"]}
    assert by_folder["TA"]["targets"] == [{"granularity": "TA"}]  # the full hidden widths are the TA
    picked = model.select(x, y, max_params=budget_params)
    assert any({"budget": {"max_params": budget_params}} in m["targets"]
               and resolve(model.spec, m["granularity"]) == picked for m in manifest["models"])
    for m in manifest["models"]:
        folder = os.path.join(out, m["folder"])
        expected = model.predict(x, resolve(model.spec, m["granularity"]))
        loaded = matta.load(folder, backend="torch", device="cpu")  # checks the folder's own manifest too
        np.testing.assert_allclose(loaded.predict(x), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(run_onnx(os.path.join(folder, "model.onnx"), x), expected, rtol=1e-5, atol=1e-5)
        program = torch.export.load(os.path.join(folder, "model.pt2")).module()
        with torch.no_grad():
            native = program(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(native, expected, rtol=1e-6, atol=1e-6)


def test_a_transformer_exports_per_sequence_figures_and_reloads(transformer, tmp_path):
    model, x = transformer
    out = str(tmp_path / "ship")
    manifest = model.export_many(out, formats=["onnx", "safetensors"], x_val=x, y_val=x, batch_size=2, rounds=2)
    check_manifest(out, model, x, x)
    assert manifest["measured_on"]["flops_per"] == "sequence of 6 tokens"
    assert [m["name"] for m in manifest["models"]] == ["S", "TA"]
    for m in manifest["models"]:
        expected = model.predict(x, m["name"])
        folder = os.path.join(out, m["folder"])
        np.testing.assert_allclose(matta.load(folder, backend="numpy").predict(x), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run_onnx(os.path.join(folder, "model.onnx"), x.astype(np.int64)), expected,
                                   rtol=1e-4, atol=1e-5)


def test_without_data_the_manifest_has_no_measurements(mlp, tmp_path):
    model, _, _ = mlp
    out = str(tmp_path / "ship")
    manifest = model.export_many(out, "S", formats="onnx")
    check_manifest(out, model, np.zeros((1, 5)))
    (m,) = manifest["models"]
    assert m["metrics"] is None and m["latency_ms"] is None and manifest["measured_on"]["data"] is None
    assert sorted(m["files"]) == ["S/model.onnx"] and m["flops"] == flops(matta.extract(model.weights, model.spec, model.students["S"])[0])


def test_an_export_replaces_its_folder_in_one_step(mlp, tmp_path, monkeypatch):
    model, x, y = mlp
    out = str(tmp_path / "ship")
    model.export_many(out, ["S", "M"])
    before = {p: open(os.path.join(d, p), "rb").read() for d, _, ns in os.walk(out) for p in ns}
    import matta.shipping as shipping

    real, calls = shipping._write_model, []

    def fail_second(extracted, path, formats):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(extracted, path, formats)

    monkeypatch.setattr(shipping, "_write_model", fail_second)
    with pytest.raises(SaveError, match="previous save there is unchanged"):
        model.export_many(out, ["TA", "S"])
    assert {p: open(os.path.join(d, p), "rb").read() for d, _, ns in os.walk(out) for p in ns} == before
    assert sorted(os.listdir(tmp_path)) == ["ship"], "no temporary folder is left behind"
    monkeypatch.setattr(shipping, "_write_model", real)
    manifest = model.export_many(out, ["TA"])  # an earlier export is replaced without overwrite=True
    assert sorted(os.listdir(out)) == ["TA", "manifest.json"] and [m["name"] for m in manifest["models"]] == ["TA"]


def test_bad_arguments_fail_before_any_work(mlp, tmp_path, monkeypatch):
    model, x, y = mlp

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(model, "extract", no_work)
    monkeypatch.setattr(model, "evaluate", no_work)
    out = str(tmp_path / "ship")
    with pytest.raises(OptionError, match="formats must be drawn from 'safetensors', 'onnx' or 'native'; got 'pickle'"):
        model.export_many(out, formats=("safetensors", "pickle"))
    with pytest.raises(OptionError, match="max_params must be a finite number > 0"):
        model.export_many(out, [{"max_params": -5}], x_val=x, y_val=y)
    with pytest.raises(OptionError, match="budgets choose by held-out metric"):
        model.export_many(out, [Budget(max_params=100)])
    with pytest.raises(GranularityError, match="granularity name must be 'TA', 'S' or 'M'; got 'XL'"):
        model.export_many(out, ["XL"])
    with pytest.raises(InputError, match="give both x_val and y_val"):
        model.export_many(out, ["S"], x_val=x)
    assert not os.path.exists(out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(SaveError, match="not a matta export"):
        model.export_many(str(tmp_path / "notes"), ["S"])
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_budget_option_parsing():
    assert parse_budget("params=10k,50k") == [Budget(max_params=10_000), Budget(max_params=50_000)]
    assert parse_budget("latency_ms=0.2") == [Budget(max_latency_ms=0.2)]
    assert parse_budget("flops=1.5M") == [Budget(max_flops=1.5e6)]
    for bad, message in (("size=3", "KEY 'params', 'flops' or 'latency_ms'"), ("params=", "at least one value"),
                         ("params=-3", "numbers > 0"), ("params=ten", "numbers > 0")):
        with pytest.raises(OptionError, match=message):
            parse_budget(bad)


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_the_export_command_end_to_end(family, mlp, transformer, tmp_path, capsys):
    if family == "mlp":
        model, x, y = mlp
        formats, budget = "safetensors,native", f"params={model.num_params('S')},10k"
    else:
        (model, x), y = transformer, transformer[1]
        formats, budget = "safetensors,onnx", f"params={model.num_params('S') / 1000}k"
    saved, data, out = str(tmp_path / "saved"), str(tmp_path / "val.npz"), str(tmp_path / "out")
    model.save(saved)
    np.savez(data, x=x, y=y)
    rc = main(["export", saved, "--budget", budget, "--budget", "latency_ms=1000", "--format", formats,
               "--out", out, "--data", data, "--rounds", "2"])
    assert rc == 0, capsys.readouterr().err
    manifest = check_manifest(out, MatTA.load(saved, backend="torch"), x, y)
    saved_manifest = json.loads(open(os.path.join(saved, "manifest.json")).read())
    assert manifest["source"]["weights_sha256"] == saved_manifest["files"]["weights.safetensors"]["sha256"]
    assert manifest["source"]["path"] == os.path.abspath(saved)
    assert manifest["measured_on"]["data"]["file"] == os.path.abspath(data)
    targets = [t for m in manifest["models"] for t in m["targets"]]
    assert {"budget": {"max_params": float(model.num_params("S"))}} in targets
    assert {"budget": {"max_latency_ms": 1000.0}} in targets
    small = next(m for m in manifest["models"] if {"budget": {"max_params": float(model.num_params("S"))}} in m["targets"])
    assert small["name"] == "S" and small["params"] == model.num_params("S")
    for m in manifest["models"]:
        loaded = matta.load(os.path.join(out, m["folder"]), backend="torch", device="cpu")
        np.testing.assert_allclose(loaded.predict(x), model.predict(x, resolve(model.spec, m["granularity"])),
                                   rtol=1e-5, atol=1e-6)
    assert f"wrote {os.path.join(out, 'manifest.json')}" in capsys.readouterr().out


def test_the_export_command_reports_errors(mlp, tmp_path, capsys):
    model, x, y = mlp
    saved, data = str(tmp_path / "saved"), str(tmp_path / "val.npz")
    model.save(saved)
    np.savez(data, x=x, y=y)
    out = str(tmp_path / "out")
    cases = [
        (["export", "/no/such/model", "--format", "pickle", "--out", out], "formats must be drawn from"),
        (["export", "/no/such/model", "--rounds", "0", "--out", out], "--rounds must be an integer >= 1"),
        (["export", saved, "--budget", "size=3", "--out", out], "--budget must be KEY=VALUE"),
        (["export", saved, "--budget", "params=10k", "--out", out], "give --data FILE.npz"),
        (["export", saved, "--budget", "params=1", "--data", data, "--out", out, "--rounds", "1"],
         f"max_params must be >= {model.num_params('S'):,} parameters, the smallest achievable ('S')"),
        (["export", saved, "--student", "XL", "--out", out], "granularity name must be 'TA', "),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("matta export: error: ") and message in err, err
    np.savez(data, x=x)
    assert main(["export", saved, "--data", data, "--out", out]) == 1
    assert "must hold arrays x and y; it lacks ['y']" in capsys.readouterr().err
    assert not os.path.exists(out)
