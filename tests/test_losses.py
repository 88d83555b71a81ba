"""Rules L1–L6 and T1–T6 on hand-computed examples (numpy reference ops)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from matta.errors import OptionError
from matta.losses import LossOptions, NumpyOps, Schedule, StepPlan, Targets, Term, composite_loss, ramp
from matta.nesting import full, is_nested, resolve, sample_mixnmatch
from matta.specs import MLP, Transformer
from matta.training import learning_rate_scale

OPS = NumpyOps()
SPEC = MLP(d_in=2, hidden=[8, 8], d_out=3)


def _log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_ramp_shapes():
    """Rule L5: constant, linear and cosine between ramp_start and ramp_end."""
    lin = LossOptions(ramp="linear", ramp_start=10, ramp_end=20, distill_weight=0.8)
    assert [ramp(lin, t, 100) for t in (0, 9, 10, 15, 20, 99)] == [0.0, 0.0, 0.0, pytest.approx(0.4), 0.8, 0.8]
    cos = LossOptions(ramp="cosine", ramp_start=0, ramp_end=10, distill_weight=1.0)
    assert ramp(cos, 5, 100) == pytest.approx(0.5) and ramp(cos, 2, 100) == pytest.approx((1 - math.cos(0.2 * math.pi)) / 2)
    const = LossOptions(ramp="constant", ramp_start=3, distill_weight=0.5)
    assert [ramp(const, t, 100) for t in (0, 2, 3, 50)] == [0.0, 0.0, 0.5, 0.5]
    default = LossOptions()  # ramp_end defaults to a tenth of the run
    assert ramp(default, 50, 1000) == pytest.approx(0.25) and ramp(default, 100, 1000) == 0.5


def test_composite_loss_by_hand():
    """The composite loss (rules L1–L6) with hard labels, chain parent and τ = 2."""
    z_ta, z_a, z_b = np.array([[2.0, 0.0, -1.0]]), np.array([[1.0, 0.5, 0.0]]), np.array([[0.0, 0.0, 1.0]])
    y = np.array([0])
    opts = LossOptions(parent="chain", temperature=2.0, ta_weight=0.5)
    g = full(SPEC)
    plan = StepPlan(0, (Term("TA", g, 0.5, None), Term("a", g, 1.0, "TA"), Term("b", g, 2.0, "a")), 0.25)
    total, parts = composite_loss(OPS, {"TA": z_ta, "a": z_a, "b": z_b}, Targets(hard=y), plan, opts)
    ce = lambda z: -_log_softmax(z)[0, 0]  # noqa: E731

    def kl(parent, child):
        p, q = _log_softmax(parent / 2), _log_softmax(child / 2)
        return 4 * float((np.exp(p) * (p - q)).sum())

    expected_a = 1.0 * (0.75 * ce(z_a) + 0.25 * kl(z_ta, z_a))
    expected_b = 2.0 * (0.75 * ce(z_b) + 0.25 * kl(z_a, z_b))
    assert parts["TA"] == pytest.approx(0.5 * ce(z_ta))
    assert parts["a"] == pytest.approx(expected_a) and parts["b"] == pytest.approx(expected_b)
    assert total == pytest.approx(0.5 * ce(z_ta) + expected_a + expected_b)


def test_soft_labels_and_hard_label_mixing():
    """Rule L1: soft cross-entropy to Teacher probabilities, mixed with hard labels by β."""
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    p = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    y = np.array([2, 1])
    plan = StepPlan(0, (Term("TA", full(SPEC), 1.0, None),), 0.0)
    soft = -np.mean((p * _log_softmax(z)).sum(-1))
    hard = -np.mean(_log_softmax(z)[[0, 1], y])
    for beta in (0.0, 0.3, 1.0):
        total, _ = composite_loss(OPS, {"TA": z}, Targets(hard=y, soft=p), plan, LossOptions(hard_label_weight=beta))
        assert total == pytest.approx((1 - beta) * soft + beta * hard)


def test_regression_uses_mse_for_task_and_distillation():
    """Rule L1 (regression): MSE to targets; distillation is MSE to the parent, without τ."""
    plan = StepPlan(0, (Term("TA", full(SPEC), 1.0, None), Term("S", full(SPEC), 1.0, "TA")), 0.5)
    z_ta, z_s, y = np.array([[1.0], [2.0]]), np.array([[0.0], [1.0]]), np.array([[1.0], [1.0]])
    total, parts = composite_loss(OPS, {"TA": z_ta, "S": z_s}, Targets(regression=y), plan,
                                  LossOptions(task="regression", temperature=3.0))
    assert parts["TA"] == pytest.approx(0.5)
    assert parts["S"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def _schedule(sampling: str, parent: str = "ta", **kw) -> Schedule:
    students = {"S": resolve(SPEC, 0.25), "M": resolve(SPEC, 0.5)}
    return Schedule(SPEC, students, LossOptions(sampling=sampling, parent=parent, **kw), seed=3)


def test_sampling_all_trains_every_granularity_largest_first():
    """Rules T1–T2."""
    plan = _schedule("all", parent="chain").plan(5, 100)
    assert [t.name for t in plan.terms] == ["TA", "M", "S"]
    assert [t.parent for t in plan.terms] == [None, "TA", "M"]
    assert [t.parent for t in _schedule("all").plan(5, 100).terms] == [None, "TA", "TA"]


def test_sampling_one_draws_a_student_per_step_reproducibly():
    schedule = _schedule("one")
    names = [schedule.plan(t, 100).terms[1].name for t in range(40)]
    assert set(names) == {"S", "M"} and all(len(schedule.plan(t, 100).terms) == 2 for t in range(5))
    assert names == [_schedule("one").plan(t, 100).terms[1].name for t in range(40)], "plans depend on seed and step only"


def test_sandwich_draws_nested_mix_n_match_between_smallest_and_ta():
    """Rule T3."""
    schedule = _schedule("sandwich", num_random=2)
    seen = set()
    for t in range(30):
        terms = schedule.plan(t, 100).terms
        names = [x.name for x in terms]
        assert names[0] == "TA" and "S" in names and len(terms) == 4 and "M" not in names
        for term in terms:
            assert is_nested(schedule.students["S"], term.granularity) and is_nested(term.granularity, schedule.ta)
        seen |= {x.granularity for x in terms if x.name.startswith("mix")}
    assert len(seen) > 10, "random Mix'n'Match granularities should vary"


def test_mixnmatch_trains_every_student_and_per_layer_mixes_of_their_sizes():
    """Rule T5: TA + every Student + num_random mixes whose layers each take one trained size."""
    schedule = _schedule("mixnmatch", num_random=2)
    levels = [schedule.students["S"], schedule.students["M"], schedule.ta]
    trained = {key: {g.as_dict()[key] for g in levels} for key in levels[0].as_dict()}
    seen = set()
    for t in range(40):
        terms = schedule.plan(t, 100).terms
        names = [x.name for x in terms]
        assert names[0] == "TA" and {"S", "M", "mix0", "mix1"} <= set(names) and len(terms) == 5, names
        for term in terms:
            sizes = term.granularity.as_dict()
            assert all(sizes[k] in trained[k] for k in sizes), (t, term)
            assert is_nested(schedule.students["S"], term.granularity) and is_nested(term.granularity, schedule.ta)
        seen |= {x.granularity for x in terms if x.name.startswith("mix")}
    # 3 levels on 2 layers: 9 mixes, and 40 steps of 2 draws see nearly all of them.
    assert len(seen) >= 7, seen


MODES = [("all", {}), ("one", {}), ("sandwich", {"num_random": 2}), ("sandwich", {"num_random": 0}),
         ("mixnmatch", {"num_random": 1}), ("mixnmatch", {"num_random": 0})]


@pytest.mark.parametrize("parent", ["ta", "chain"])
@pytest.mark.parametrize("sampling,kw", MODES, ids=[f"{m}-{kw}" for m, kw in MODES])
def test_static_and_fixed_terms_follow_the_plans(sampling, kw, parent):
    """Rule T2: static_terms are every step's terms exactly when no step draws; fixed_terms train at every step
    they are planned with (by name, always; as the same Term, always under parent="ta")."""
    schedule = _schedule(sampling, parent=parent, **kw)
    plans = [schedule.plan(t, 100).terms for t in range(40)]
    static, fixed = schedule.static_terms(), schedule.fixed_terms()
    if static is None:
        assert len(set(plans)) > 1, plans
    else:
        assert all(terms == static for terms in plans)
    assert "TA" in {t.name for t in fixed}
    for terms in plans:
        assert {t.name for t in fixed} <= {t.name for t in terms}
        if parent == "ta":
            assert fixed <= set(terms), (fixed, terms)
    kept = {"all": {"S", "M"}, "one": set(), "sandwich": {"S"}, "mixnmatch": {"S", "M"}}[sampling]
    assert {t.name for t in fixed} == {"TA"} | kept


def test_one_student_under_one_sampling_is_static():
    schedule = Schedule(SPEC, {"S": resolve(SPEC, 0.25)}, LossOptions(sampling="one"), seed=3)
    assert schedule.static_terms() == schedule.plan(7, 100).terms and [t.name for t in schedule.static_terms()] == ["TA", "S"]


def test_a_subclass_sampling_mode_decides_plan_static_and_fixed_terms_in_step_students():
    """A mode defined by overriding ``step_students`` (kept + drawn) reaches plan, static_terms and fixed_terms."""

    class SmallestPlusOne(Schedule):
        def step_students(self, rng):
            declared, _ = super().step_students(rng)  # sampling "all": every Student, smallest first
            return declared[:1], [declared[1 + int(rng.integers(len(declared) - 1))]]

    students = {"S": resolve(SPEC, 0.25), "M": resolve(SPEC, 0.5), "L": resolve(SPEC, 0.75)}
    schedule = SmallestPlusOne(SPEC, students, LossOptions(), seed=1)
    names = [[t.name for t in schedule.plan(t, 100).terms] for t in range(30)]
    assert {tuple(n) for n in names} == {("TA", "M", "S"), ("TA", "L", "S")}
    assert schedule.static_terms() is None
    assert {t.name for t in schedule.fixed_terms()} == {"TA", "S"}


def test_mixnmatch_on_a_transformer_moves_each_block_as_one_layer_and_keeps_dropped_blocks_dropped():
    """Rule T5 with depth: a block takes the heads and d_ff of one level, and is kept only if that level keeps it."""
    spec = Transformer(vocab_size=11, max_len=8, d_model=16, n_layers=3, n_heads=4, d_ff=32,
                       nested=["d_ff", "n_heads", "n_layers"])
    small = resolve(spec, {"n_heads": 1, "d_ff": 8, "layers": [0]})
    middle = resolve(spec, {"n_heads": 2, "d_ff": 16, "layers": [0, 2]})
    levels = [small, middle, full(spec)]
    for t in range(50):
        g = sample_mixnmatch(spec, levels, np.random.default_rng(t))
        sizes = g.as_dict()
        for block in range(3):
            pair = (sizes[f"blocks.{block}.n_heads"], sizes[f"blocks.{block}.d_ff"])
            assert pair in {(lv.as_dict()[f"blocks.{block}.n_heads"], lv.as_dict()[f"blocks.{block}.d_ff"])
                            for lv in levels}, (t, g)
            assert (block in g.blocks) == (pair != (0, 0)), (t, g)
        assert 0 in g.blocks and is_nested(small, g) and is_nested(g, levels[-1])


def test_learning_rate_schedules():
    """Rule T6: linear warm-up, then constant or a half cosine that ends near (not at) zero."""
    assert [learning_rate_scale("constant", 0, t, 10) for t in range(10)] == [1.0] * 10
    assert [learning_rate_scale("constant", 4, t, 10) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [learning_rate_scale("cosine", 0, t, 100) for t in range(100)]
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.5) and 0 < cos[-1] < 1e-3
    assert all(a > b for a, b in zip(cos, cos[1:])), "cosine decays every step"
    warm = [learning_rate_scale("cosine", 10, t, 110) for t in range(110)]
    assert warm[:10] == [pytest.approx((t + 1) / 10) for t in range(10)] and warm[10] == 1.0
    assert warm[60] == pytest.approx(0.5)


def test_option_errors_name_the_field():
    with pytest.raises(OptionError, match="sampling must be 'all', 'sandwich', 'one' or 'mixnmatch'"):
        LossOptions(sampling="random")
    with pytest.raises(OptionError, match=r"temperature must be a number in \(0.0, inf\]"):
        LossOptions(temperature=0)
    with pytest.raises(OptionError, match="ramp_end must be >= ramp_start=5"):
        LossOptions(ramp_start=5, ramp_end=2)
    with pytest.raises(OptionError, match=r"student_weights names unknown student\(s\) \['X'\]"):
        _schedule("all", student_weights={"X": 1.0})


def test_student_weights_and_ta_weight_reach_the_plan():
    """Rule L6."""
    plan = _schedule("all", student_weights={"S": 2.5}, ta_weight=0.3).plan(0, 10)
    assert {t.name: t.weight for t in plan.terms} == {"TA": 0.3, "M": 1.0, "S": 2.5}


def test_teacher_logits_are_softmaxed_at_temperature_one():
    """Rule L1: logits and the probabilities they give are the same Teacher."""
    from matta.losses import teacher_probabilities

    logits = np.array([[1.0, 2.0, -1.0]])
    probs = teacher_probabilities(logits, LossOptions(teacher_output="logits"))
    assert probs == pytest.approx(np.exp(_log_softmax(logits)))
    assert teacher_probabilities(probs, LossOptions(teacher_output="probabilities")) is probs
