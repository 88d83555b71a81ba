"""``matta distill``: a pretrained GPT-2 checkpoint in, GPT-2 Students out.

:func:`distill` reads a GPT-2 checkpoint folder as the TA (:func:`matta.hf.read_gpt2`),
tokenizes text files with the tokenizer saved in that folder (``tokenizer.json``, read
by the ``tokenizers`` package from the local file only), cuts the tokens into
sequences and holds out a fixed share of them, co-trains the TA and its Students
(on a Teacher checkpoint's logits when one is given), and writes every Student and
the TA as GPT-2 checkpoints with the tokenizer files, plus ``metrics.json``. Every
input is checked, with a matta error, before any training starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from matta import hf, saving
from matta.errors import FormatError, GranularityError, InputError, OptionError, SpecError, integer
from matta.losses import TA
from matta.nesting import plan, resolve

__all__ = ["distill", "parse_students", "tokenize", "sequences", "HELD_OUT", "METRICS_FILE"]

#: The share of the sequences held out for the reported loss (the last ones of the text).
HELD_OUT = 0.1
METRICS_FILE = "metrics.json"
TOKENIZER_FILE = "tokenizer.json"


def parse_students(text: str) -> dict[str, Any]:
    """``"S=0.25,M=0.5"`` as ``{"S": 0.25, "M": 0.5}``: granularities in a form of rule G1.

    A value is a fraction (of the spec's nested dimensions, ``d_ff`` by default) or
    per-dimension sizes joined by ``+``: ``S=d_ff:0.25+n_heads:0.5`` (fractions, or whole sizes
    such as ``n_layers:6``).

    Raises:
        OptionError: an entry is not of these forms, or a name repeats.
    """
    out: dict[str, Any] = {}
    for item in (part.strip() for part in str(text).split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        g = _granularity(value) if sep else None
        if not name or g is None:
            raise OptionError(f"--students must be NAME=FRACTION or NAME=DIM:SIZE[+DIM:SIZE...], comma-separated, "
                              f"e.g. S=0.25,M=0.5 or S=d_ff:0.25+n_heads:0.5; got {item!r}")
        if name in out or name == TA:
            raise OptionError(f"--students names must be unique and not {TA!r}; got {name!r} twice or reserved")
        out[name] = g
    return out


def _granularity(text: str) -> Any:
    """A fraction, or ``{dim: size}`` from ``dim:size+dim:size``; ``None`` if ``text`` is neither."""
    def number(v: str) -> Any:
        try:
            return int(v) if v.strip().isdigit() else float(v)
        except ValueError:
            return None

    if ":" not in text:
        value = number(text)
        return value if isinstance(value, float) else None
    parts = [p.partition(":") for p in text.split("+")]
    sizes = {dim.strip(): number(v) for dim, _, v in parts}
    return None if any(v is None for v in sizes.values()) or len(sizes) != len(parts) else sizes


def tokenize(checkpoint: str, files: Sequence[str], vocab_size: int) -> np.ndarray:
    """The token ids of the concatenated text ``files``, by the tokenizer saved in ``checkpoint``.

    Raises:
        FormatError: ``checkpoint`` has no ``tokenizer.json``, or it does not load.
        InputError: a text file is missing or not UTF-8, or an id lies outside ``vocab_size``.
    """
    path = os.path.join(checkpoint, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FormatError(f"{checkpoint!r} has no {TOKENIZER_FILE}: matta distill tokenizes the text with the "
                          "tokenizer saved next to the checkpoint (tokenizer.save_pretrained writes it)")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises its own exception type for a damaged file
        raise FormatError(f"{path} is not a tokenizers file: {exc}") from None
    texts = []
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--text {name!r} is not a readable UTF-8 text file: {exc}") from None
    ids = np.asarray(tokenizer.encode("\n".join(texts), add_special_tokens=False).ids, dtype=np.int64)
    if ids.size and int(ids.max()) >= vocab_size:
        raise InputError(f"{path} gives token id {int(ids.max())}, outside the checkpoint's vocab_size={vocab_size}: "
                         "the tokenizer does not belong to this checkpoint")
    return ids


def sequences(ids: np.ndarray, seq_len: int, held_out: float = HELD_OUT) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_held, y_held)``: consecutive ``seq_len`` windows, ``y`` the next token of ``x``.

    The last ``held_out`` share of the windows (at least one) is held out, so held-out text follows
    the training text and never overlaps it.

    Raises:
        InputError: the text gives fewer than two windows (one to train on, one held out).
    """
    n = (len(ids) - 1) // seq_len
    if n < 2:
        raise InputError(f"the text is {len(ids)} tokens long; matta distill needs at least 2 * seq_len + 1 = "
                         f"{2 * seq_len + 1} (one sequence to train on, one held out): give more text or a smaller --seq-len")
    windows = ids[: n * seq_len + 1]
    x = windows[:-1].reshape(n, seq_len)
    y = windows[1:].reshape(n, seq_len)
    held = max(1, round(n * held_out))
    return x[:-held], y[:-held], x[-held:], y[-held:]


@dataclass(frozen=True)
class _Row:
    name: str
    params: int
    loss_before: float
    loss: float


def distill(
    ta: str,
    text: Sequence[str],
    students: Mapping[str, Any],
    steps: int,
    out: str,
    *,
    teacher: Optional[str] = None,
    backend: str = "torch",
    seq_len: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    learning_rate: float = 1e-4,
    overwrite: bool = False,
    progress: bool = True,
    echo: Any = print,
) -> dict[str, Any]:
    """Distills a pretrained GPT-2 into nested GPT-2 Students and writes them as checkpoints.

    Args:
        ta: the TA's GPT-2 checkpoint folder, with ``tokenizer.json``.
        text: UTF-8 text files to train on (concatenated; the last :data:`HELD_OUT` share is held out).
        students: name -> granularity (rule G1), e.g. from :func:`parse_students`.
        steps: optimizer steps.
        out: the output folder: ``TA/`` and one folder per Student (GPT-2 checkpoints with the
            tokenizer files) and ``metrics.json``, written atomically.
        teacher: a GPT-2 checkpoint folder whose logits are the distillation targets (same
            vocabulary); ``None`` trains on the text alone.
        backend: ``"torch"`` or ``"keras"``.
        seq_len: tokens per sequence (default ``min(128, n_positions)``).
        batch_size: sequences per step.
        seed: seeds batch order and granularity sampling.
        learning_rate: the default optimizer's learning rate.
        overwrite: replace ``out`` even if it is not empty.
        progress: show a progress bar.
        echo: where the table goes (``print``, or ``None`` for silence).

    Returns:
        What ``metrics.json`` holds.

    Raises:
        FormatError, SpecError: a checkpoint is missing, not a GPT-2, or has no tokenizer.
        InputError: the text is shorter than two sequences, or the Teacher does not fit the TA.
        GranularityError: a Student cannot be written as a GPT-2 checkpoint.
        SaveError: ``out`` exists and is not empty (without ``overwrite``), or writing failed.
    """
    from matta.model import MatTA

    integer("--steps", steps, 1)
    integer("--batch-size", batch_size, 1)
    integer("--seed", seed, 0)
    if not text:
        raise InputError("--text needs at least one text file")
    ta_path = os.fspath(ta)
    saving.check_target(out, overwrite=overwrite)
    spec, weights = hf.read_gpt2(ta_path)
    seq_len = min(128, spec.max_len) if seq_len is None else seq_len
    integer("--seq-len", seq_len, 1)
    if seq_len > spec.max_len:
        raise OptionError(f"--seq-len must be at most the checkpoint's n_positions={spec.max_len}; got {seq_len}")
    granularities = {name: resolve(spec, g) for name, g in students.items()}
    for name, g in granularities.items():
        try:
            hf.check_gpt2(plan(spec, g).spec)
        except SpecError as exc:
            raise GranularityError(f"Student {name!r} cannot be written as a GPT-2 checkpoint: {exc}") from None
    teacher_model = None
    if teacher is not None:
        teacher_model = hf.teacher(teacher, backend)
        t = teacher_model.spec
        if t.vocab_size != spec.vocab_size or t.max_len < seq_len:
            raise InputError(f"the Teacher {teacher!r} (vocab_size={t.vocab_size}, n_positions={t.max_len}) must share "
                             f"the TA's vocab_size={spec.vocab_size} and have n_positions >= --seq-len={seq_len}")
    ids = tokenize(ta_path, list(text), spec.vocab_size)
    x, y, x_held, y_held = sequences(ids, seq_len)

    model = MatTA.from_pretrained(ta_path, students=granularities, backend=backend, seed=seed,
                                  learning_rate=learning_rate)
    before = model.evaluate(x_held, y_held)
    model.fit(x, y, steps=steps, batch_size=batch_size, teacher=teacher_model, progress=progress)
    after = model.evaluate(x_held, y_held)
    names = [TA, *granularities]
    rows = [_Row(n, model.num_params(n), before[n]["loss"], after[n]["loss"]) for n in names]
    metrics = {
        "ta": os.path.abspath(ta_path),
        "teacher": None if teacher is None else os.path.abspath(teacher),
        "text": [os.path.abspath(t) for t in text],
        "backend": model.backend.name,
        "tokens": int(len(ids)),
        "seq_len": seq_len,
        "train_sequences": int(len(x)),
        "held_out_sequences": int(len(x_held)),
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "learning_rate": learning_rate,
        "models": {
            r.name: {"folder": r.name, "params": r.params, "granularity": model.granularity(r.name).to_dict(spec),
                     "held_out_loss": r.loss, "held_out_perplexity": math.exp(r.loss),
                     "held_out_loss_before": r.loss_before, "held_out_perplexity_before": math.exp(r.loss_before)}
            for r in rows
        },
    }
    with saving.atomic_folder(out, overwrite=overwrite) as folder:
        for n in names:
            model.extract(n).save_pretrained(os.path.join(folder.path, n))
        folder.write_json(METRICS_FILE, metrics)
    if echo is not None:
        echo(table(rows))
        echo(f"wrote {os.path.abspath(out)}")
    return metrics


def table(rows: Sequence[_Row]) -> str:
    """The terminal table: parameters and held-out loss and perplexity before and after distillation."""
    head = ("model", "params", "loss before", "loss", "perplexity")
    body = [(r.name, f"{r.params:,}", f"{r.loss_before:.4f}", f"{r.loss:.4f}", f"{math.exp(r.loss):.2f}") for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), *(line(b) for b in body)])
