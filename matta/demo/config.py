"""Sizes and recipes of the demo's modes: ``smoke`` (tests), ``default`` (<= 5 min on 2 CPU cores), ``full``.

Everything a run does is decided here, so a report's ``config`` section (this
dataclass as JSON) plus the seed reproduces it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from matta.errors import OptionError

__all__ = ["MODES", "TaskConfig", "task_configs"]

MODES = ("smoke", "default", "full")


@dataclass(frozen=True)
class TaskConfig:
    """One task's recipe.

    Attributes:
        task: ``"digits"`` or ``"text"``.
        data: keyword arguments of the data loader (:mod:`matta.demo.data`).
        teacher: keyword arguments of the Teacher's spec (``MLP`` or ``Transformer``).
        teacher_steps: optimizer steps of the Teacher (trained alone on the true labels).
        teacher_learning_rate: its AdamW learning rate.
        teacher_learning_rate_schedule: its rule T6 schedule (``"constant"`` or ``"cosine"``).
        teacher_warmup_steps: its rule T6 warm-up steps.
        ta: keyword arguments of the TA's spec; Students are prefix slices of it.
        students: Student name -> fraction of every nested dimension.
        steps: optimizer steps of every MatTA run and every baseline.
        batch_size: examples per step.
        learning_rate: AdamW learning rate of MatTA runs and baselines.
        weight_decay: AdamW weight decay of MatTA runs and baselines.
        learning_rate_schedule: rule T6 schedule of MatTA runs and baselines (``"constant"`` or ``"cosine"``).
        loss: MatTA loss options (:class:`matta.LossOptions`); baselines get the same.
        latency_repeats: paired timing rounds of single-example serving calls (the median is reported).
        export_native: write the backend's native file (``model.pt2`` / ``model.keras``) too.
    """

    task: str
    data: dict[str, Any]
    teacher: dict[str, Any]
    teacher_steps: int
    teacher_learning_rate: float
    ta: dict[str, Any]
    students: dict[str, float]
    steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    learning_rate_schedule: str = "constant"
    teacher_weight_decay: float = 0.0
    teacher_learning_rate_schedule: str = "constant"
    teacher_warmup_steps: int = 0
    loss: dict[str, Any] = field(default_factory=dict)
    latency_repeats: int = 50
    export_native: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-ready data."""
        return dataclasses.asdict(self)


# The base recipe (options of rules L4–L6); each task's tuned variant below (chosen in docs/results.md).
_LOSS = dict(temperature=2.0, distill_weight=0.5, ramp="linear", ramp_start=0, ramp_end=None)
# Digits (tuned in docs/results.md): τ 1, per-layer Mix'n'Match mixes trained every step (rule T5) so the
# Mix'n'Match frontier is monotone, and M weighted 2 because it shares its units with S and the mixes.
_DIGITS_LOSS = dict(_LOSS, temperature=1.0, sampling="mixnmatch", num_random=1, student_weights={"M": 2.0})
# Text: the same with λ 0.2 (the Teacher is far better than the TA here, so the Students lean on its labels),
# 2 mixes per step and each Student weighted 2 against the TA's 1: every term shares the smallest Student's
# weights, so under one Adam step a Student weighted like the others is pulled towards the TA's optimum.
_TEXT_LOSS = dict(_DIGITS_LOSS, distill_weight=0.2, num_random=2, student_weights={"S": 2.0, "M": 2.0})
# The study's text M is three quarters of the TA, nearly the TA's own sub-problem, so it is weighted 4: the
# weight at which it comes closest to its baseline (docs/results.md).
_TEXT_FULL_LOSS = dict(_TEXT_LOSS, student_weights={"S": 2.0, "M": 4.0})

_DIGITS = {
    "smoke": TaskConfig(
        task="digits", data={"limit": 300},
        teacher={"d_in": 64, "hidden": [64], "d_out": 10}, teacher_steps=40, teacher_learning_rate=3e-3,
        ta={"d_in": 64, "hidden": [32, 32], "d_out": 10}, students={"S": 0.25, "M": 0.5},
        steps=30, batch_size=64, learning_rate=3e-3, learning_rate_schedule="cosine", loss=_DIGITS_LOSS,
        latency_repeats=3, export_native=False,
    ),
    "default": TaskConfig(
        task="digits", data={"shifts": 1},
        teacher={"d_in": 64, "hidden": [512, 512], "d_out": 10}, teacher_steps=1500, teacher_learning_rate=1e-3,
        teacher_weight_decay=1e-2,
        ta={"d_in": 64, "hidden": [128, 128], "d_out": 10}, students={"S": 0.0625, "M": 0.125},
        steps=1500, batch_size=64, learning_rate=1e-2, weight_decay=0.05, learning_rate_schedule="cosine",
        loss=_DIGITS_LOSS, latency_repeats=50,
    ),
}
_DIGITS["full"] = dataclasses.replace(_DIGITS["default"], latency_repeats=200)

_TEXT = {
    "smoke": TaskConfig(
        task="text", data={"seq_len": 16, "max_chars": 20000},
        teacher={"vocab_size": 97, "max_len": 16, "d_model": 32, "n_layers": 1, "n_heads": 2},
        teacher_steps=20, teacher_learning_rate=3e-3,
        ta={"vocab_size": 97, "max_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "nested": ["d_ff", "n_heads"]},
        students={"S": 0.25, "M": 0.5}, steps=15, batch_size=16, learning_rate=3e-3, loss=_TEXT_LOSS,
        latency_repeats=3, export_native=False,
    ),
    "default": TaskConfig(
        task="text", data={"seq_len": 32},
        # 800 cosine Teacher steps and 400 Student steps: the fewest at which every model learns more than the
        # character frequencies, in about a minute (docs/results.md).
        teacher={"vocab_size": 97, "max_len": 32, "d_model": 128, "n_layers": 2, "n_heads": 4},
        teacher_steps=800, teacher_learning_rate=3e-3, teacher_learning_rate_schedule="cosine", teacher_warmup_steps=50,
        ta={"vocab_size": 97, "max_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 4,
            "nested": ["d_ff", "n_heads", "d_model"]},
        students={"S": 0.25, "M": 0.5}, steps=400, batch_size=32, learning_rate=3e-3, loss=_TEXT_LOSS,
        latency_repeats=20,
    ),
}
# The study: the default's TA, M at 3/4 of it, 2.5x the training steps and a Teacher far stronger than the TA
# (twice the blocks, 3,000 cosine steps; docs/results.md). The default keeps M at 1/2, so that its Keras run
# stays inside the main job's 5-minute budget (docs/results.md).
_TEXT["full"] = dataclasses.replace(
    _TEXT["default"], teacher={**_TEXT["default"].teacher, "n_layers": 4}, teacher_steps=3000,
    teacher_learning_rate_schedule="cosine", teacher_warmup_steps=100, steps=1000, latency_repeats=50,
    students={"S": 0.25, "M": 0.75}, loss=_TEXT_FULL_LOSS,
)

TASKS = ("digits", "text")


def task_configs(mode: str, tasks: Optional[list[str]] = None, steps: Optional[int] = None) -> list[TaskConfig]:
    """The recipes of ``mode`` for ``tasks`` (default both), optionally with ``steps`` overridden."""
    if mode not in MODES:
        raise OptionError(f"mode must be one of {list(MODES)}; got {mode!r}")
    tasks = list(TASKS) if tasks is None else tasks
    out = []
    for t in tasks:
        if t not in TASKS:
            raise OptionError(f"task must be one of {list(TASKS)}; got {t!r}")
        cfg = (_DIGITS if t == "digits" else _TEXT)[mode]
        if steps is not None:
            cfg = dataclasses.replace(cfg, steps=int(steps))
        out.append(cfg)
    return out


def writes_files() -> bool:
    """Whether this process writes the demo's files: rank 0 of a ``torchrun`` launch, or the only process.

    Every rank of a launch runs the whole demo (its training steps are collective); one report is written.
    """
    return os.environ.get("RANK", "0") == "0"
