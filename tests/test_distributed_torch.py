"""Torch data-parallel training: 2 gloo processes under ``torchrun`` equal one process with the same global batch.

The runs are float64, and weights are compared relative to the model's largest weight: a
parameter whose true gradient is 0 (an attention key bias shifts every score of a query
equally) gets rounding noise as its gradient, which Adam scales up, so its own tiny values
differ between any two summation orders (one process vs two), in relative terms by a lot.

One ``torchrun --standalone --nproc_per_node=2`` launch runs every case (process start-up is
the slow part); each rank writes its weights and rank 0 its history, and the tests compare
them with a one-process fit of the same seed and global batch in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from matta.errors import OptionError

STEPS = 20
BATCH = 16
CASES = {  # name: (family, distributed, sampling)
    "mlp-ddp-all": ("mlp", "ddp", "all"),
    "mlp-ddp-mix": ("mlp", "ddp", "mixnmatch"),
    "tf-ddp-all": ("tf", "ddp", "all"),
    "tf-ddp-mix": ("tf", "auto", "mixnmatch"),
    "mlp-fsdp-all": ("mlp", "fsdp", "all"),
    "tf-fsdp-mix": ("tf", "fsdp", "mixnmatch"),
}
NAN_STEP = 5

WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from case_data import CASES, NAN_STEP, STEPS, BATCH, make
    from matta.errors import NonFiniteLossError, OptionError

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    built = []
    init = torch.nn.parallel.DistributedDataParallel.__init__
    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(bool(self.find_unused_parameters))
    torch.nn.parallel.DistributedDataParallel.__init__ = spy
    import torch.distributed.fsdp as fsdp
    units, shard = [], fsdp.fully_shard
    def spy_shard(module, *args, **kwargs):  # the FSDP units, in the order they are made
        units.append(type(module).__name__)
        return shard(module, *args, **kwargs)
    fsdp.fully_shard = spy_shard

    def save(name, model, history):
        np.savez(os.path.join(out, f"{name}-{rank}.npz"), **model.weights)
        with open(os.path.join(out, f"{name}-{rank}.json"), "w") as f:
            json.dump(history, f)

    for name, (family, strategy, sampling) in CASES.items():
        del units[:]
        model, x, y, teacher = make(family, sampling)
        seen, forward_many = set(), model.model.forward_many
        def counted(inputs, granularities):
            seen.add(int(inputs.shape[0]))
            return forward_many(inputs, granularities)
        if strategy == "ddp":  # DDP runs this module (FSDP trains a copy of it)
            model.model.forward_many = counted
        history = model.fit(x, y, steps=STEPS, batch_size=BATCH, teacher=teacher, progress=False,
                            distributed=strategy)
        save(name, model, history)
        if strategy == "fsdp":
            with open(os.path.join(out, f"{name}-units-{rank}.json"), "w") as f:
                json.dump(units, f)
        if name == "mlp-ddp-all":
            student = model.extract("S")
            exact = bool(np.array_equal(student.predict(x), model.predict(x, "S")))
            with open(os.path.join(out, f"extract-{rank}.json"), "w") as f:
                json.dump({"exact": exact, "rows": sorted(seen)}, f)

    model, x, y, teacher = make("mlp", "all")
    try:
        model.fit(x, y, steps=1, batch_size=BATCH + 1, progress=False)
        refused = None
    except OptionError as exc:
        refused = str(exc)
    if rank == 1:  # rank 1 alone sees a NaN output at step NAN_STEP
        forward_many, calls = model.model.forward_many, []
        def poisoned(inputs, granularities):
            outputs = forward_many(inputs, granularities)
            calls.append(1)
            return [o * float("nan") for o in outputs] if len(calls) == NAN_STEP + 1 else outputs
        model.model.forward_many = poisoned
    try:
        model.fit(x, y, steps=STEPS, batch_size=BATCH, teacher=teacher, progress=False, distributed="ddp")
        stopped = None
    except NonFiniteLossError as exc:
        stopped = str(exc)
    np.savez(os.path.join(out, f"nan-{rank}.npz"), **model.weights)
    with open(os.path.join(out, f"ddp-{rank}.json"), "w") as f:
        json.dump({"find_unused_parameters": built, "stopped": stopped, "refused": refused}, f)
    dist.destroy_process_group()
''')

CASE_DATA = textwrap.dedent('''
    import numpy as np
    from matta import MLP, MatTA, Transformer
    CASES = {cases!r}
    NAN_STEP, STEPS, BATCH = {nan_step}, {steps}, {batch}
    MLP_SPEC = MLP(d_in=10, hidden=[24, 16], d_out=4, multiple_of=4)
    TF_SPEC = Transformer(vocab_size=11, max_len=6, d_model=16, n_layers=2, n_heads=2, d_ff=32, multiple_of=4)

    def make(family, sampling):
        rng = np.random.default_rng(3)
        if family == "mlp":
            spec, n = MLP_SPEC, 75  # 75 % 16 = 11: a short last batch, split 6 + 5
            x = rng.standard_normal((n, spec.d_in)).astype("float32")
            y = rng.integers(0, spec.d_out, n)
            teacher = rng.standard_normal((n, spec.d_out)).astype("float32")
        else:
            spec, n = TF_SPEC, 40
            x = rng.integers(0, spec.vocab_size, (n, spec.max_len))
            y = np.roll(x, -1, axis=1)
            teacher = None
        model = MatTA(spec, students={{"S": 0.5}}, backend="torch", seed=1, learning_rate=3e-3, ramp_end=4,
                      sampling=sampling, dtype="float64")
        return model, x, y, teacher
''')


def _case_module():
    return CASE_DATA.format(cases=CASES, nan_step=NAN_STEP, steps=STEPS, batch=BATCH)


def _make(family, sampling):
    namespace: dict = {}
    exec(_case_module(), namespace)  # the workers' own set-up, so both sides build the same runs
    return namespace["make"](family, sampling)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "case_data.py").write_text(_case_module())
    (folder / "worker.py").write_text(WORKER)
    out = folder / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(folder)])))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(folder / "worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _assert_close(got, want, rtol=1e-5):
    """Every weight within ``rtol`` of the largest weight (the key biases' values are noise, see above)."""
    assert got.keys() == want.keys()
    scale = max(float(np.max(np.abs(w))) for w in want.values())
    for k in want:
        err = float(np.max(np.abs(got[k] - want[k]))) / scale
        assert err <= rtol, (k, err)


@pytest.mark.subprocess
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_train_like_one_with_the_same_global_batch(launched, case):
    """Every rank ends with the weights of one process's fit (1e-5 relative) and rank 0 alone keeps the history."""
    family, _, sampling = CASES[case]
    model, x, y, teacher = _make(family, sampling)
    history = model.fit(x, y, steps=STEPS, batch_size=BATCH, teacher=teacher, progress=False)
    rank0, rank1 = _load(launched / f"{case}-0.npz"), _load(launched / f"{case}-1.npz")
    for k in rank0:
        np.testing.assert_array_equal(rank0[k], rank1[k], err_msg=k)
    _assert_close(rank0, model.weights)
    logged = json.loads((launched / f"{case}-0.json").read_text())
    assert [s["step"] for s in logged["steps"]] == list(range(STEPS))
    np.testing.assert_allclose([s["loss"] for s in logged["steps"]], [s["loss"] for s in history["steps"]],
                               rtol=1e-5)
    assert json.loads((launched / f"{case}-1.json").read_text()) == {"steps": [], "epochs": []}


@pytest.mark.subprocess
def test_fsdp_shards_each_transformer_block_as_its_own_unit(launched):
    """FSDP2 units: one per Transformer block, then the root (embeddings, norms, head); an MLP is one unit."""
    for r in (0, 1):
        assert json.loads((launched / f"tf-fsdp-mix-units-{r}.json").read_text()) == ["Block"] * 2 + ["_Terms"]
        assert json.loads((launched / f"mlp-fsdp-all-units-{r}.json").read_text()) == ["_Terms"]


@pytest.mark.subprocess
def test_each_rank_computes_its_own_share_of_the_global_batch(launched):
    """Rank 0 takes 8 of 16 examples (6 of the short last batch of 11), rank 1 the other 8 (5)."""
    assert json.loads((launched / "extract-0.json").read_text())["rows"] == [6, 8]
    assert json.loads((launched / "extract-1.json").read_text())["rows"] == [5, 8]


@pytest.mark.subprocess
def test_ddp_is_built_without_find_unused_parameters(launched):
    """Every step plan holds the TA term, so DDP needs no unused-parameter search (and would fail without it)."""
    info = json.loads((launched / "ddp-0.json").read_text())
    assert info["find_unused_parameters"] and not any(info["find_unused_parameters"])


@pytest.mark.subprocess
def test_a_nan_on_one_rank_stops_both_ranks_with_the_same_weights(launched):
    """Rule T4 across processes: both ranks raise at the same step and keep the same, finite weights."""
    stops = [json.loads((launched / f"ddp-{r}.json").read_text())["stopped"] for r in (0, 1)]
    assert stops[0] is not None and stops[0] == stops[1]
    assert f"at step {NAN_STEP};" in stops[0]
    w0, w1 = _load(launched / "nan-0.npz"), _load(launched / "nan-1.npz")
    model, x, y, teacher = _make("mlp", "all")
    # Rule T4: the bad step also undoes the update before it, so the weights are those a run of
    # NAN_STEP - 1 steps ends with (the weights step NAN_STEP - 1 computed its finite loss with).
    model.fit(x, y, steps=NAN_STEP - 1, batch_size=BATCH, teacher=teacher, progress=False)
    for k in w0:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
        assert np.all(np.isfinite(w0[k]))
    _assert_close(w0, model.weights)


@pytest.mark.subprocess
def test_a_batch_size_the_processes_cannot_share_equally_is_an_option_error(launched):
    """``batch_size`` is the global batch: one not divisible by the 2 processes is refused on every rank."""
    for r in (0, 1):
        refused = json.loads((launched / f"ddp-{r}.json").read_text())["refused"]
        assert refused is not None and "batch_size must be divisible by the number of processes 2" in refused


@pytest.mark.subprocess
def test_extraction_after_distributed_training_is_bit_exact(launched):
    """The extracted Student equals the trained TA's sub-network bit for bit, on both ranks."""
    assert all(json.loads((launched / f"extract-{r}.json").read_text())["exact"] for r in (0, 1))


def test_distributed_option_is_checked_and_needs_a_launch():
    """A bad strategy names the allowed values; ddp/fsdp outside a launch say how to launch."""
    model, x, y, _ = _make("mlp", "all")
    with pytest.raises(OptionError, match="distributed must be"):
        model.fit(x, y, steps=1, batch_size=BATCH, distributed="horovod")
    with pytest.raises(OptionError, match="torchrun"):
        model.fit(x, y, steps=1, batch_size=BATCH, distributed="ddp")


def test_auto_outside_a_launch_trains_in_this_process():
    """``distributed="auto"`` (the default) and ``None`` train the same, with no process group."""
    runs = []
    for option in ("auto", None):
        model, x, y, teacher = _make("mlp", "all")
        model.fit(x, y, steps=3, batch_size=BATCH, teacher=teacher, progress=False, distributed=option)
        runs.append(model.weights)
    for k in runs[0]:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])


@pytest.mark.subprocess
def test_torchrun_demo_writes_one_report_from_rank_0(tmp_path):
    """``torchrun --nproc_per_node=2 -m matta demo`` trains on both ranks; rank 0 alone prints and writes."""
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "matta", "demo",
         "--tasks", "text", "--smoke", "--no-cache", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("matta demo —") == 1 and result.stdout.count("report: ") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert "text" in json.dumps(metrics) and (out / "pareto.png").is_file()
    assert sorted(p.name for p in (out / "students" / "text").iterdir()) == ["M", "S"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
