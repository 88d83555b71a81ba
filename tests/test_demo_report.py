"""The report: statistics over seeds, the quality verdicts, metrics.json, the Pareto PNG, the Mix'n'Match chain."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from matta.demo import report


def _entry(kind, params, losses, seeds=(0, 1, 2)):
    return {"kind": kind, "params": params, "granularity": None,
            "per_seed": [{"seed": s, "params": params, "loss": l, "accuracy": 0.9, "latency_ms": 0.1}
                         for s, l in zip(seeds, losses)]}


def _result(mix_loss=0.5, s_loss=(0.6, 0.62, 0.58)):
    return {
        "task": "digits", "config": {}, "data": {}, "teacher": {},
        "models": {
            "Teacher": _entry("teacher", 1000, [0.1], seeds=(None,)),
            "TA": _entry("ta", 400, [0.3, 0.31, 0.29]),
            "mix h[32,16]": _entry("mixnmatch", 150, [mix_loss] * 3),
            "M": _entry("matta_student", 200, [0.45, 0.44, 0.46]),
            "S": _entry("matta_student", 100, list(s_loss)),
            "baseline S": _entry("baseline", 100, [0.7, 0.69, 0.71]),
            "baseline M": _entry("baseline", 200, [0.40, 0.41, 0.39]),
        },
    }


def test_summary_means_stds_and_verdicts():
    res = report.summarize(_result())
    s = res["models"]["S"]
    assert s["mean"]["loss"] == pytest.approx(0.6)
    assert s["std"]["loss"] == pytest.approx(np.std([0.6, 0.62, 0.58], ddof=1))
    assert res["models"]["Teacher"]["std"]["loss"] == 0.0  # one value: no spread
    q = res["quality"]
    assert q["students"]["S"]["holds"] and q["students"]["S"]["seeds_won"] == 3
    assert q["students"]["S"]["relative_improvement"] == pytest.approx((0.7 - 0.6) / 0.7)
    assert not q["students"]["M"]["holds"] and q["students"]["M"]["seeds_won"] == 0  # 0.45 vs 0.40
    assert not q["all_students_beat_baselines"]
    assert q["mixnmatch"]["models"] == ["S", "mix h[32,16]", "M", "TA"]  # by parameters, baselines excluded
    assert q["mixnmatch"]["monotone"] and q["mixnmatch"]["violations"] == []


def test_a_non_monotone_chain_is_reported_with_the_offending_pair():
    q = report.summarize(_result(mix_loss=0.65))["quality"]["mixnmatch"]
    assert not q["monotone"] and q["violations"] == [["S", "mix h[32,16]"]]


def test_metrics_json_schema(tmp_path):
    res = {"digits": report.summarize(_result())}
    path = tmp_path / "r" / "metrics.json"
    report.write_metrics(str(path), res, {"mode": "smoke", "seeds": [0, 1, 2], "wall_seconds": math.nan})
    doc = json.loads(path.read_text())
    assert doc["schema"] == report.SCHEMA
    assert doc["run"]["wall_seconds"] is None  # NaN is not JSON: written as null
    task = doc["tasks"]["digits"]
    assert {"config", "data", "teacher", "models", "quality"} <= set(task)
    for entry in task["models"].values():
        assert {"kind", "params", "per_seed", "mean", "std"} <= set(entry)
        assert entry["kind"] in report.KINDS


def test_pareto_png_is_a_real_image(tmp_path):
    import matplotlib.image

    res = {"digits": report.summarize(_result()), "text": {**report.summarize(_result()), "task": "text"}}
    path = tmp_path / "pareto.png"
    report.plot_pareto(str(path), res)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 2 * image.shape[0]  # two panels side by side
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_rich_table_prints_every_model():
    from rich.console import Console

    console = Console(record=True, width=160)
    report.print_tables({"digits": report.summarize(_result())}, console)
    out = console.export_text()
    for name in ("Teacher", "TA", "mix h[32,16]", "baseline S", "baseline M"):
        assert name in out
    assert "+14.3% (3/3 seeds)" in out and "M: does NOT beat" in out


def test_mixnmatch_chain_is_a_nested_staircase_between_student_and_ta():
    from matta import MLP, Transformer, resolve
    from matta.demo.run import mixnmatch_chain
    from matta.nesting import is_nested, num_params

    spec = MLP(d_in=8, hidden=[64, 64, 64], d_out=3)
    students = {"S": 0.25, "M": 0.5}
    chain = mixnmatch_chain(spec, students)
    widths = [g["hidden"] for _, g in chain]
    assert widths == [[32, 16, 16], [32, 32, 16], [64, 32, 32], [64, 64, 32]]
    gs = [resolve(spec, 0.25)] + [resolve(spec, g) for _, g in chain] + [resolve(spec, 1.0)]
    assert all(is_nested(a, b) for a, b in zip(gs, gs[1:]))
    assert all(num_params(spec, a) < num_params(spec, b) for a, b in zip(gs, gs[1:]))

    tf = Transformer(vocab_size=11, max_len=8, d_model=16, n_layers=2, n_heads=4, nested=("d_ff", "n_heads"))
    labels = [label for label, _ in mixnmatch_chain(tf, students)]
    assert labels == ["mix ff[32,16] heads[2,1]", "mix ff[64,32] heads[4,2]"]

    # With d_model nested, it widens together with the first block, then the next blocks; all stay nested.
    wide = Transformer(vocab_size=11, max_len=8, d_model=16, n_layers=2, n_heads=4, nested=("d_ff", "n_heads", "d_model"))
    chain = mixnmatch_chain(wide, students)
    assert [label for label, _ in chain] == ["mix d8 ff[32,16] heads[2,1]", "mix d16 ff[64,32] heads[4,2]"]
    gs = [resolve(wide, 0.25)] + [resolve(wide, g) for _, g in chain] + [resolve(wide, 1.0)]
    assert all(is_nested(a, b) for a, b in zip(gs, gs[1:])), chain
    assert all(num_params(wide, a) < num_params(wide, b) for a, b in zip(gs, gs[1:])), chain
