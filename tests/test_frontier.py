"""The frontier and selection (``matta.frontier``, ``MatTA.frontier``, ``MatTA.select``).

Pareto marking and budget selection are checked against brute force over random rows
(Hypothesis); the default candidates against the nesting rules; the measured rows of a tiny
torch model against ``num_params``, ``matta.cost.flops`` and ``MatTA.evaluate``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch  # a missing torch is an error, never a skip
from hypothesis import given
from hypothesis import strategies as st

import matta.spec_tests.conftest  # noqa: F401 - registers and loads the suite's Hypothesis profiles
from matta import MLP, MatTA, Transformer, resolve
from matta.cost import flops
from matta.errors import GranularityError, InputError, OptionError
from matta.frontier import (
    METRICS, Budget, Frontier, Row, candidates, label, measure_latency, pareto_mask,
)
from matta.nesting import full, is_nested, num_params, sub_spec

torch.set_num_threads(1)

MLP_SPEC = MLP(d_in=6, hidden=[16, 12, 8], d_out=3)
TF_SPEC = Transformer(vocab_size=11, max_len=8, d_model=8, n_layers=2, n_heads=2, d_ff=16, nested=("d_ff", "n_heads", "d_model"))


def dominated(v: np.ndarray, i: int) -> bool:
    """Brute force: some other row is no worse everywhere and better somewhere (all minimised)."""
    return any(all(v[j] <= v[i]) and any(v[j] < v[i]) for j in range(len(v)) if j != i)


@given(st.integers(1, 12).flatmap(lambda n: st.integers(1, 4).flatmap(
    lambda k: st.lists(st.lists(st.integers(0, 4), min_size=k, max_size=k), min_size=n, max_size=n))))
def test_pareto_mask_is_the_brute_force_definition(rows):
    v = np.array(rows, dtype=float)
    mask = pareto_mask(v)
    assert mask.tolist() == [not dominated(v, i) for i in range(len(v))]
    assert mask.any()  # a finite set always has an optimal row


def random_rows(draw, n: int, metric: str) -> list[Row]:
    g = full(MLP_SPEC)
    rows = []
    for i in range(n):
        metrics = {m: draw(st.sampled_from([0.1, 0.5, 0.9])) for m in ("loss", "accuracy")}
        rows.append(Row(f"r{i}", g, MLP_SPEC, draw(st.integers(1, 5)), draw(st.integers(1, 5)),
                        draw(st.sampled_from([0.1, 0.2, 0.3])), metrics))
    return rows


@st.composite
def frontiers(draw):
    metric = draw(st.sampled_from(["loss", "accuracy"]))
    rows = random_rows(draw, draw(st.integers(1, 10)), metric)
    return Frontier(MLP_SPEC, rows, metric, 1, None, 10, "numpy", 5)


@given(frontiers())
def test_frontier_marks_exactly_the_undominated_rows(front):
    sign = -1.0 if METRICS[front.metric] else 1.0  # accuracy is maximised
    v = np.array([[r.params, r.flops, r.latency_ms, sign * r.metrics[front.metric]] for r in front.rows])
    assert [r.pareto for r in front.rows] == [not dominated(v, i) for i in range(len(v))]


budgets = st.builds(Budget, st.one_of(st.none(), st.integers(1, 6)), st.one_of(st.none(), st.integers(1, 6)),
                    st.one_of(st.none(), st.sampled_from([0.05, 0.1, 0.25, 1.0])))


@given(frontiers(), budgets)
def test_select_fits_every_budget_and_has_the_best_metric(front, budget):
    fits = [r for r in front.rows if (budget.max_params is None or r.params <= budget.max_params)
            and (budget.max_flops is None or r.flops <= budget.max_flops)
            and (budget.max_latency_ms is None or r.latency_ms <= budget.max_latency_ms)]
    if not fits:
        with pytest.raises(OptionError) as info:
            front.select(budget)
        message = str(info.value)
        if budget.max_params is not None:
            assert f"max_params must be >= {min(r.params for r in front.rows):,} parameters" in message
        if budget.max_flops is not None:
            assert f"max_flops must be >= {min(r.flops for r in front.rows):,} FLOPs" in message
        if budget.max_latency_ms is not None:
            assert f"max_latency_ms must be >= {min(r.latency_ms for r in front.rows):.4g} ms" in message
        return
    best = front.select(budget)
    assert best in fits
    key = lambda r: (-1 if METRICS[front.metric] else 1) * r.metrics[front.metric]  # noqa: E731
    assert key(best) == min(key(r) for r in fits)


def test_budgets_refuse_bad_figures():
    for bad in (0, -1, float("nan"), float("inf"), True, "10k"):
        with pytest.raises(OptionError, match="max_params must be a finite number > 0"):
            Budget(max_params=bad)
    with pytest.raises(OptionError, match="keys must be drawn from 'max_params', 'max_flops' or 'max_latency_ms'"):
        Budget.from_dict({"params": 3})


@pytest.mark.parametrize("spec, students", [
    (MLP_SPEC, {"S": 0.25, "M": 0.5}),
    (MLP_SPEC, {"S": {"hidden": [2, 12, 4]}}),
    (TF_SPEC, {"S": 0.5}),
    (TF_SPEC, {"S": {"d_ff": 0.25, "n_heads": 0.5, "n_layers": 1}, "M": {"d_ff": 0.5, "d_model": 1.0}}),
])
def test_candidates_are_the_trained_sizes_fractions_and_a_nested_staircase(spec, students):
    resolved = {n: resolve(spec, g) for n, g in students.items()}
    out = candidates(spec, resolved)
    names = [n for n, _ in out]
    grans = [g for _, g in out]
    assert len(set(grans)) == len(grans) and len(set(names)) == len(names)
    assert [num_params(spec, g) for g in grans] == sorted(num_params(spec, g) for g in grans)
    by_name = dict(out)
    assert by_name["TA"] == full(spec) and all(by_name[n] == g for n, g in resolved.items())
    smallest = min(resolved.values(), key=lambda g: num_params(spec, g))
    levels = sorted(resolved.values(), key=lambda g: num_params(spec, g)) + [full(spec)]
    assert all(is_nested(smallest, g) for g in grans), "every candidate holds the smallest Student's trained units"
    mixes = [g for n, g in out if n.startswith("mix ")]
    chain = [smallest, *mixes, full(spec)]
    assert all(is_nested(a, b) for a, b in zip(chain, chain[1:])), "the Mix'n'Match steps form a nested staircase"
    for g in mixes:  # every layer takes one trained level's sizes
        d = g.as_dict()
        for layer in {k.rsplit(".", 1)[0] if k.startswith("blocks.") else k for k in d}:
            keys = [k for k in d if k == layer or k.startswith(layer + ".")]
            assert any(all(d[k] == lv.as_dict()[k] for k in keys) for lv in levels), (layer, d)
    for n, g in out:
        if n.startswith("uniform "):
            assert g == resolve(spec, float(n.split()[1]))
        if n.startswith("mix "):
            assert n == f"mix {label(spec, g)}"


def test_latency_is_the_median_of_paired_rotating_rounds(monkeypatch):
    clock = [0.0]
    order = []
    cost = {"a": 0.001, "b": 0.003, "c": 0.002}

    def make(name):
        def call():
            order.append(name)
            clock[0] += cost[name] * (10 if len(order) == 4 else 1)  # the first timed call is an outlier
        return call

    monkeypatch.setattr("matta.frontier.time.perf_counter", lambda: clock[0])
    out = measure_latency({n: make(n) for n in cost}, rounds=5, warmup=1)
    assert out == pytest.approx({n: 1e3 * c for n, c in cost.items()})  # the median ignores the outlier
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]  # the order rotates
    with pytest.raises(OptionError, match="rounds must be an integer >= 1"):
        measure_latency({"a": make("a")}, rounds=0)


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype("float32")
    y = rng.integers(0, 3, 40)
    model = MatTA(MLP_SPEC, students={"S": 0.25, "M": 0.5}, backend="torch", device="cpu", seed=1)
    model.fit(x, y, steps=4, batch_size=20, progress=False)
    return model, x, y


def test_frontier_rows_are_the_models_figures(mlp, tmp_path):
    model, x, y = mlp
    front = model.frontier(x, y, batch_size=2, rounds=3)
    names = [r.name for r in front]
    assert {"S", "M", "TA"} <= set(names) and any(n.startswith("mix ") for n in names)
    for r in front:
        assert r.params == model.num_params(r.granularity) == r.spec.num_params
        assert r.spec == sub_spec(model.spec, r.granularity)
        assert r.flops == flops(r.spec)
        assert r.metrics == model.evaluate(x, y, [r.granularity])[str(r.granularity)]
        assert r.latency_ms > 0
    rows = front.to_rows()
    assert [resolve(model.spec, row["granularity"]) for row in rows] == [r.granularity for r in front]
    assert [row["pareto"] for row in rows] == [r.pareto for r in front]
    text = str(front)
    for r in front:
        line = next(line for line in text.splitlines() if re.match(rf"^[* ]\s+{re.escape(r.name)}\s", line))
        assert line.startswith("*") == r.pareto and f"{r.params:,}" in line
    fig = front.plot(str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig is not None


def test_transformer_frontier_counts_flops_at_the_datas_length():
    rng = np.random.default_rng(2)
    model = MatTA(TF_SPEC, students={"S": 0.5}, backend="torch", device="cpu")
    x = rng.integers(0, 11, (6, 5))
    front = model.frontier(x, x, rounds=2)
    assert front.seq_len == 5
    assert all(r.flops == flops(r.spec, seq_len=5) for r in front)
    assert all("bits_per_token" in r.metrics for r in front)


def test_select_respects_budgets_and_picks_the_best_metric(mlp):
    model, x, y = mlp
    front = model.frontier(x, y, rounds=1)
    for max_params in sorted({r.params for r in front}):
        for max_flops in (None, sorted({r.flops for r in front})[1]):
            try:
                g = model.select(x, y, max_params=max_params, max_flops=max_flops)
            except OptionError:
                assert not [r for r in front if r.params <= max_params and (max_flops is None or r.flops <= max_flops)]
                continue
            fits = [r for r in front if r.params <= max_params and (max_flops is None or r.flops <= max_flops)]
            chosen = next(r for r in front if r.granularity == g)
            assert chosen in fits
            assert chosen.metrics["loss"] == min(r.metrics["loss"] for r in fits)
    g = model.select(x, y, max_params=10**9, metric="accuracy")
    assert model.evaluate(x, y, [g])[str(g)]["accuracy"] == max(r.metrics["accuracy"] for r in front)
    assert model.select(x, y, max_latency_ms=1e9, rounds=2) == min(front, key=lambda r: r.metrics["loss"]).granularity


def test_select_names_the_smallest_achievable_figures(mlp):
    model, x, y = mlp
    smallest = min(model.num_params(g) for g in [*model.students.values()])
    with pytest.raises(OptionError) as info:
        model.select(x, y, max_params=1, max_flops=1, max_latency_ms=1e-9, rounds=2)
    message = str(info.value)
    assert f"max_params must be >= {smallest:,} parameters, the smallest achievable ('S')" in message
    assert f"max_flops must be >= {flops(sub_spec(model.spec, model.students['S'])):,} FLOPs" in message
    assert re.search(r"max_latency_ms must be >= [0-9.e-]+ ms, the smallest achievable \('.+'\) at batch size 1", message)


def test_bad_arguments_fail_before_any_work(mlp, monkeypatch):
    model, x, y = mlp

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(model, "extract", no_work)
    monkeypatch.setattr(model, "evaluate", no_work)
    with pytest.raises(OptionError, match="max_latency_ms must be a finite number > 0"):
        model.select(x, y, max_latency_ms=-1)
    with pytest.raises(OptionError, match=r"batch_size must be an integer in \[1, 40\]"):
        model.frontier(x, y, batch_size=41)
    with pytest.raises(OptionError, match="metric must be 'loss' or 'accuracy'; got 'bpc'"):
        model.frontier(x, y, metric="bpc")
    with pytest.raises(InputError):
        model.frontier(x[:, :3], y)
    with pytest.raises(GranularityError, match="granularity name must be 'TA', 'S' or 'M'"):
        model.frontier(x, y, candidates=["XL"])
    with pytest.raises(OptionError, match="rounds must be an integer >= 1"):
        model.frontier(x, y, rounds=0)


def test_the_demo_budget_choices_are_select_per_budget(mlp):
    """The demo scores the candidates once for all its budgets; each choice is MatTA.select's."""
    from types import SimpleNamespace

    from matta.demo.data import Dataset
    from matta.demo.run import budget_choices

    model, x, y = mlp
    ds = Dataset("digits", x, y, x, y)
    cfg = SimpleNamespace(students=model.students)
    rows = budget_choices(model, cfg, ds)
    budgets = sorted({int(1.5 * model.num_params(n)) for n in model.students} | {model.num_params("TA") // 2})
    assert [r["max_params"] for r in rows] == budgets
    for row in rows:
        g = model.select(x[0::2], y[0::2], max_params=row["max_params"])
        assert row["granularity"] == g.to_dict(model.spec)
        assert row["params"] == model.num_params(g) <= row["max_params"]
