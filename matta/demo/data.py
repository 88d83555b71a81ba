"""The two demo data sets, both offline: scikit-learn's digits and Python's own pydoc topics.

Splits are fixed (they do not depend on the run's seed) so that every seed and
every backend is scored on exactly the same held-out examples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from matta.errors import InputError

__all__ = [
    "Dataset",
    "digits",
    "text",
    "VOCAB",
    "encode",
    "decode",
    "topic_split",
    "windows",
    "fingerprint",
]

#: The fixed split seed; deliberately not the run seed (see the module docstring).
SPLIT_SEED = 20250529

#: Character vocabulary of the text task: index 0 is "unknown", then newline and printable ASCII.
#: A fixed alphabet (not one read off the corpus) keeps token ids identical for any text.
VOCAB = "\x00\n" + "".join(chr(c) for c in range(32, 127))


@dataclass
class Dataset:
    """One task's train and held-out arrays.

    Attributes:
        name: ``"digits"`` or ``"text"``.
        x_train, y_train: training inputs and labels (class ids, or next-token ids).
        x_test, y_test: held-out inputs and labels.
        info: JSON-ready facts about the data (sizes, the held-out documents, ...).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def fingerprint(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (shape, dtype and bytes): part of a Teacher's cache key."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """8x8 images (flattened to 64) moved by ``(dy, dx)`` pixels, filling with blank (0) pixels."""
    img = images.reshape(-1, 8, 8)
    out = np.zeros_like(img)
    ys, yd = (slice(0, 8 - dy), slice(dy, 8)) if dy >= 0 else (slice(-dy, 8), slice(0, 8 + dy))
    xs, xd = (slice(0, 8 - dx), slice(dx, 8)) if dx >= 0 else (slice(-dx, 8), slice(0, 8 + dx))
    out[:, yd, xd] = img[:, ys, xs]
    return out.reshape(images.shape)


def digits(test_fraction: float = 0.3, limit: Optional[int] = None, shifts: int = 0) -> Dataset:
    """Scikit-learn's 1,797 8x8 handwritten digits, pixels scaled to [0, 1], a stratified fixed split.

    Args:
        test_fraction: share of every class held out.
        limit: keep only this many training examples (for tiny smoke runs).
        shifts: also train on copies of the training images moved by up to this many
            pixels in each direction (a transfer set the Teacher labels; 1 gives 9x the
            images). With ~1,250 images, every model otherwise memorises the training
            set within a few hundred steps and held-out log-loss measures overfitting
            rather than what the Students learnt. Held-out images are never shifted.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype("float32")
    y = bunch.target.astype("int64")
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    # Stratified by class so the held-out accuracy is not skewed by a lucky class mix.
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test.extend(rng.permutation(idx)[: int(round(test_fraction * len(idx)))])
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    if limit is not None:
        train_idx = train_idx[:limit]
    test_idx = np.flatnonzero(is_test)
    x_train, y_train = x[train_idx], y[train_idx]
    if shifts:
        moves = [(dy, dx) for dy in range(-shifts, shifts + 1) for dx in range(-shifts, shifts + 1) if dy or dx]
        x_train = np.concatenate([x_train] + [shifted(x[train_idx], dy, dx) for dy, dx in moves])
        y_train = np.concatenate([y_train] * (len(moves) + 1))
    return Dataset(
        "digits", x_train, y_train, x[test_idx], y[test_idx],
        info={"source": "sklearn.datasets.load_digits", "train_images": len(train_idx), "shifts": shifts,
              "train": len(x_train), "test": len(test_idx),
              "features": int(x.shape[1]), "classes": 10},
    )


def encode(s: str) -> np.ndarray:
    """Characters -> token ids in :data:`VOCAB` (anything outside it maps to 0, "unknown")."""
    table = {ch: i for i, ch in enumerate(VOCAB)}
    return np.fromiter((table.get(ch, 0) for ch in s), dtype=np.int64, count=len(s))


def decode(ids: np.ndarray) -> str:
    """Token ids -> characters (0 becomes ``"?"``)."""
    return "".join("?" if i == 0 else VOCAB[i] for i in np.asarray(ids).ravel())


def topic_split(topics: dict[str, str], test_fraction: float) -> tuple[list[str], list[str]]:
    """Splits documents (not characters) into train and held-out names.

    Documents are visited in a fixed random order and moved to the held-out side
    until it holds at least ``test_fraction`` of all characters, so no held-out
    text was ever seen in training, not even a neighbouring window.
    """
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1); got {test_fraction}")
    names = sorted(topics)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
    total = sum(len(topics[n]) for n in names)
    held, size = [], 0
    for i in order:
        if size >= test_fraction * total:
            break
        held.append(names[i])
        size += len(topics[names[i]])
    held_set = set(held)
    return [n for n in names if n not in held_set], sorted(held)


def windows(ids: np.ndarray, length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Input/next-token windows ``(x[t : t+length], x[t+1 : t+length+1])`` every ``stride`` tokens."""
    starts = np.arange(0, len(ids) - length - 1 + 1, stride)
    idx = starts[:, None] + np.arange(length)[None, :]
    return ids[idx], ids[idx + 1]


def _join(topics: dict[str, str], names: list[str]) -> np.ndarray:
    # Documents are separated by a blank line, like the help pages themselves.
    return encode("\n\n".join(topics[n].strip() for n in names) + "\n")


def text(
    seq_len: int = 64,
    test_fraction: float = 0.12,
    stride: Optional[int] = None,
    max_chars: Optional[int] = None,
) -> Dataset:
    """Character-level language modelling on ``pydoc_data.topics`` (~465k chars of English).

    The split is by document (help topic). Training windows overlap by half
    (``stride = seq_len // 2`` by default); held-out windows do not overlap, so
    every held-out character is scored once.

    Args:
        seq_len: tokens per window (the Transformer's ``max_len``).
        test_fraction: share of characters held out (whole topics).
        stride: step between training windows.
        max_chars: cap on the characters used from each side (for tiny smoke runs).
    """
    from pydoc_data.topics import topics

    train_names, test_names = topic_split(dict(topics), test_fraction)
    train_ids, test_ids = _join(topics, train_names), _join(topics, test_names)
    if max_chars is not None:
        train_ids, test_ids = train_ids[:max_chars], test_ids[: max(max_chars // 4, seq_len + 2)]
    x_train, y_train = windows(train_ids, seq_len, stride or max(1, seq_len // 2))
    x_test, y_test = windows(test_ids, seq_len, seq_len)
    return Dataset(
        "text", x_train, y_train, x_test, y_test,
        info={"source": "pydoc_data.topics", "vocab_size": len(VOCAB), "seq_len": seq_len,
              "train_chars": int(len(train_ids)), "test_chars": int(len(test_ids)),
              "train_documents": len(train_names), "test_documents": test_names,
              "unknown_chars_share": float(np.mean(np.concatenate([train_ids, test_ids]) == 0))},
    )
