"""ONNX export (``matta.onnx``): the file runs on onnxruntime alone and computes the reference.

Every exported file is run in ONE child process, started once for the module, in which
importing matta, torch, keras, tensorflow or jax fails (a ``sys.meta_path`` blocker installed
before anything else): the file needs nothing but an ONNX runtime. The child answers one
request per model over a pipe, so Hypothesis can draw (and shrink) many models cheaply.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import matta.spec_tests.conftest  # noqa: F401 - registers and loads the suite's Hypothesis profiles
from matta import reference
from matta.errors import BackendError, FormatError, InputError, InputTypeError, OptionError
from matta.extraction import extract
from matta.onnx import DEFAULT_OPSET, OPSETS, build_model, export
from matta.specs import ACTIVATIONS, MLP, Spec, Transformer, spec_from_dict
from matta.spec_tests.assertions import LAYER_NORM_SLACK
from matta.spec_tests.strategies import granularities, specs, weights_for

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("matta", "spec_tests", "torch", "keras", "tensorflow", "jax")
#: |onnxruntime - reference| <= TOL * max(1, |reference|), elementwise; a Transformer's bound is
#: LAYER_NORM_SLACK times larger (see spec_tests.assertions: a LayerNorm over a near-constant active
#: prefix, d_model as small as 2, amplifies rounding; there the float32 reference itself is 5e-5 from
#: the float64 one, and onnxruntime's float32 LayerNormalization 9e-5).
#: float64 is held to the conformance suite's float64 bound (spec_tests.assertions.TOLERANCES): a
#: tiny LayerNorm prefix moves onnxruntime's float64 result by ~1e-8 relative, still far below any bug.
TOL = {"float32": 1e-5, "float64": 1e-9}

CHILD = r"""
import importlib.util, sys
BLOCKED = %r
findable = {name: importlib.util.find_spec(name) is not None for name in BLOCKED}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked in the ONNX runtime process", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import json
import numpy as np
import onnxruntime as ort

blocked = {}
for name in BLOCKED:
    try:
        __import__(name)
        blocked[name] = False
    except ImportError:
        blocked[name] = True
print(json.dumps({"findable": findable, "blocked": blocked}), flush=True)
options = ort.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 1  # tiny models; a shared CPU
for line in sys.stdin:
    request = json.loads(line)
    try:
        session = ort.InferenceSession(request["model"], options, providers=["CPUExecutionProvider"])
        (feed,) = session.get_inputs()
        outputs = []
        for path in request["inputs"]:
            np.save(path + ".out.npy", session.run(None, {feed.name: np.load(path)})[0])
            outputs.append(path + ".out.npy")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        reply = {"outputs": outputs, "loaded": loaded}
    except Exception as exc:
        reply = {"error": repr(exc)}
    print(json.dumps(reply), flush=True)
""" % (BLOCKED,)


class Runtime:
    """The onnxruntime child process: ``run(model_path, inputs)`` returns the outputs."""

    def __init__(self, folder: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
        self.folder, self.count = folder, 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, cwd=folder
        )
        self.hello = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the onnxruntime child exited (code {self.proc.poll()})"
        return json.loads(line)

    def run(self, model: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        paths = []
        for x in inputs:
            self.count += 1
            paths.append(str(self.folder / f"input-{self.count}.npy"))
            np.save(paths[-1], x)
        self.proc.stdin.write(json.dumps({"model": model, "inputs": paths}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        assert "error" not in reply, f"onnxruntime failed on {model}: {reply['error']}"
        assert reply["loaded"] == [], f"the runtime process loaded {reply['loaded']}"
        return [np.load(p) for p in reply["outputs"]]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory):
    rt = Runtime(tmp_path_factory.mktemp("onnxruntime"))
    yield rt
    rt.close()


def _inputs(spec: Spec, seed: int, dtype: str) -> list[np.ndarray]:
    """Two batches of different shapes (batch, and time for a Transformer) for one file."""
    rng = np.random.default_rng([seed, 7])
    if isinstance(spec, MLP):
        return [rng.standard_normal((b, spec.d_in)).astype(dtype) for b in (3, 1)]
    times = (spec.max_len, max(1, spec.max_len // 2))
    return [rng.integers(0, spec.vocab_size, size=(b, t)).astype(np.int64) for b, t in zip((2, 3), times)]


def _assert_matches(actual: np.ndarray, expected: np.ndarray, spec: Spec, dtype: str, where: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.dtype(dtype), (actual.shape, actual.dtype, where)
    tol = TOL[dtype] * (LAYER_NORM_SLACK[dtype] if isinstance(spec, Transformer) else 1.0)
    if isinstance(spec, Transformer) and dtype == "float64":
        # LayerNormalization's statistics stash type is float (the only one the opset allows), so a
        # float64 graph's LayerNorm over a tiny prefix rounds like float32: measured 2e-7 relative.
        tol = 1e-6
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / np.maximum(1.0, np.abs(expected))
    assert float(err.max()) <= tol, f"max relative error {float(err.max()):.3g} > {tol:.3g} ({where})"


def test_the_runtime_process_cannot_import_matta_or_a_framework(runtime: Runtime) -> None:
    """The blocker is what stops the imports: matta (and the frameworks) would be found without it."""
    assert runtime.hello["findable"]["matta"] and runtime.hello["findable"]["torch"], runtime.hello
    assert all(runtime.hello["blocked"].values()), runtime.hello


def test_importing_matta_does_not_import_onnx() -> None:
    code = (
        "import sys, matta, matta.onnx, matta.cost\n"
        "before = 'onnx' in sys.modules\n"
        "import onnx\n"
        "print(before, 'onnx' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "True"], out.stdout


@given(data=st.data())
def test_exported_sub_networks_match_the_reference(runtime: Runtime, tmp_path_factory: pytest.TempPathFactory, data) -> None:
    """Random specs and granularities (Mix'n'Match, depth), extracted, exported, run on two input shapes."""
    spec = data.draw(specs(), "spec")
    g = data.draw(granularities(spec), "granularity")
    dtype = data.draw(st.sampled_from(["float32", "float64"]), "dtype")
    opset = data.draw(st.sampled_from(OPSETS), "opset")
    seed = data.draw(st.integers(0, 2**16), "seed")
    weights = weights_for(spec, seed, dtype)
    sub_spec, sub_weights = extract(weights, spec, g)
    path = export(sub_spec, sub_weights, tmp_path_factory.mktemp("h") / "model.onnx", opset=opset)
    inputs = _inputs(spec, seed, dtype)
    for x, y in zip(inputs, runtime.run(path, inputs)):
        where = f"spec={spec.to_json()}; granularity={g.to_dict(spec)}; opset={opset}; input {x.shape}"
        _assert_matches(y, reference.forward(spec, weights, x, g), spec, dtype, where)


def _fixed_specs() -> list[Spec]:
    mlps = [MLP(d_in=5, hidden=(7, 3), d_out=4, activation=a) for a in ACTIVATIONS]
    gpt = Transformer(vocab_size=17, max_len=9, d_model=8, n_layers=3, n_heads=(2, 1, 4), d_ff=(6, 11, 3), d_head=3)
    return [*mlps, gpt]


def test_every_activation_opset_and_dtype(runtime: Runtime, tmp_path: Path) -> None:
    """Each activation and the Transformer, at every opset, in float32 and float64, on two input shapes."""
    for k, spec in enumerate(_fixed_specs()):
        for opset in OPSETS:
            for dtype in ("float32", "float64"):
                weights = weights_for(spec, k, dtype)
                path = export(spec, weights, tmp_path / f"{k}-{opset}-{dtype}.onnx", opset=opset)
                inputs = _inputs(spec, k, dtype)
                for x, y in zip(inputs, runtime.run(path, inputs)):
                    _assert_matches(y, reference.forward(spec, weights, x), spec, dtype, f"{spec.to_json()} opset {opset}")


def test_a_float64_model_exports_as_float32(runtime: Runtime, tmp_path: Path) -> None:
    """``dtype=`` casts the weights: the file computes the reference of the float32 weights."""
    spec = _fixed_specs()[-1]
    weights = weights_for(spec, 3, "float64")
    path = export(spec, weights, tmp_path / "cast.onnx", dtype="float32")
    inputs = _inputs(spec, 3, "float32")
    as32 = {k: v.astype(np.float32) for k, v in weights.items()}
    for x, y in zip(inputs, runtime.run(path, inputs)):
        _assert_matches(y, reference.forward(spec, as32, x), spec, "float32", "float64 weights cast to float32")


def test_the_graph_is_readable_and_carries_the_spec() -> None:
    import onnx

    spec = _fixed_specs()[-1]
    model = build_model(spec, weights_for(spec, 0, "float32"))
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(names), "every node has a unique name"
    # A node's name starts with its layer's: the first part, or `blocks.<i>.<part>`, of a parameter name.
    layer = lambda name: ".".join(name.split(".")[: 3 if name.startswith("blocks.") else 1])  # noqa: E731
    layers = {layer(name) for name in spec.parameters()} | {"causal"}
    assert {layer(n) for n in names} == layers, sorted({layer(n) for n in names} ^ layers)
    assert {"blocks.2.attention.scores", "blocks.0.ffn.gelu", "final_norm", "head"} <= set(names)
    initializers = {i.name for i in model.graph.initializer}
    assert set(spec.parameters()) <= initializers
    assert [(o.domain, o.version) for o in model.opset_import] == [("", DEFAULT_OPSET)]
    props = {p.key: p.value for p in model.metadata_props}
    assert spec_from_dict(json.loads(props["matta.spec"])) == spec
    assert [i.name for i in model.graph.input] == ["tokens"] and [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "time"]
    onnx.checker.check_model(model, full_check=True)


def test_export_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write leaves the previous file as it was and no temporary file behind."""
    spec = MLP(d_in=2, hidden=(3,), d_out=2)
    path = tmp_path / "sub" / "model.onnx"
    export(spec, weights_for(spec, 0, "float32"), path)
    before = path.read_bytes()

    def broken(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        export(spec, weights_for(spec, 1, "float32"), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]


def test_export_honours_the_umask_and_replaces_a_symlink_never_following_it(tmp_path: Path) -> None:
    spec = MLP(d_in=2, hidden=(3,), d_out=2)
    victim, path = tmp_path / "victim.onnx", tmp_path / "model.onnx"
    victim.write_bytes(b"keep me")
    os.symlink(victim, path)
    old = os.umask(0o022)
    try:
        export(spec, weights_for(spec, 0, "float32"), path)
    finally:
        os.umask(old)
    assert not path.is_symlink() and victim.read_bytes() == b"keep me"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o644


def _bad_cases():
    mlp = MLP(d_in=2, hidden=(3,), d_out=2)
    w = weights_for(mlp, 0, "float32")
    missing = {k: v for k, v in w.items() if k != "layers.1.bias"}
    reshaped = {**w, "layers.0.kernel": np.zeros((3, 3), np.float32)}
    half = {k: v.astype(np.float16) for k, v in w.items()}
    return [
        ("not a spec", dict(spec=mlp.to_dict(), weights=w), InputTypeError, "spec must be a matta.MLP or matta.Transformer"),
        ("missing weight", dict(spec=mlp, weights=missing), InputError, "missing \\['layers.1.bias'\\]"),
        ("wrong shape", dict(spec=mlp, weights=reshaped), InputError, "must have shape \\(2, 3\\)"),
        ("float16 weights", dict(spec=mlp, weights=half), InputTypeError, "'float32' or 'float64'"),
        ("float16 dtype", dict(spec=mlp, weights=w, dtype="float16"), InputTypeError, "dtype must be 'float32' or 'float64'"),
        ("old opset", dict(spec=mlp, weights=w, opset=16), OptionError, "opset must be 17, 18, 19, 20 or 21; got 16"),
        ("opset string", dict(spec=mlp, weights=w, opset="17"), OptionError, "opset must be 17"),
        ("bad path", dict(spec=mlp, weights=w, path=3), InputTypeError, "path must be a str or os.PathLike"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_invalid_targets_raise_matta_errors_before_onnx_is_imported(case, tmp_path: Path, monkeypatch) -> None:
    _, kwargs, error, message = case
    monkeypatch.setitem(sys.modules, "onnx", None)  # any `import onnx` now raises ImportError
    kwargs = {"path": tmp_path / "m.onnx", **kwargs}
    with pytest.raises(error, match=message):
        export(kwargs.pop("spec"), kwargs.pop("weights"), kwargs.pop("path"), **kwargs)
    assert not any(tmp_path.iterdir()), "nothing is written"


def test_missing_onnx_is_a_matta_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MLP(d_in=2, hidden=(3,), d_out=2)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendError, match=r"pip install 'matta\[onnx\]'"):
        export(spec, weights_for(spec, 0, "float32"), tmp_path / "m.onnx")


def test_a_model_over_two_gib_is_refused_before_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ONNX protobuf holds 2 GiB; the check reads the spec's sizes (zero-strided arrays, no memory)."""
    spec = MLP(d_in=2**15, hidden=(2**14,), d_out=1)
    weights = {k: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), p.shape, (0,) * len(p.shape))
               for k, p in spec.parameters().items()}
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(FormatError, match="at most 1.98 GiB"):
        build_model(spec, weights)
