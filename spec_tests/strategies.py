"""Hypothesis strategies for the conformance suite: specs, granularities, weights, inputs and step plans.

Sizes are kept tiny but cover the edges the rules care about: width 1, one
head, one layer, odd sizes, ``multiple_of`` rounding, per-layer Mix'n'Match and
depth. Weights and inputs are drawn from a seed (so a failing example prints a
short, reproducible case) rather than element by element.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from matta.losses import NumpyOps, StepPlan, Targets, Term
from matta.nesting import Granularity, full, resolve
from matta.specs import ACTIVATIONS, MLP, Spec, Transformer
from matta.weights import initial_weights

__all__ = [
    "mlps",
    "transformers",
    "specs",
    "granularity_forms",
    "granularities",
    "nested_pairs",
    "weights_for",
    "inputs_for",
    "SHARED_STEPS",
    "step_plan",
    "targets_for",
]

fractions = st.floats(min_value=0.01, max_value=1.0, allow_nan=False)


@st.composite
def mlps(draw: Any, min_classes: int = 1) -> MLP:
    """Random MLP specs: 1–3 hidden layers of width 1–12."""
    hidden = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    return MLP(
        d_in=draw(st.integers(1, 6)),
        hidden=tuple(hidden),
        d_out=draw(st.integers(min_classes, 5)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        multiple_of=draw(st.sampled_from([1, 1, 2, 3])),
    )


@st.composite
def transformers(draw: Any, min_vocab: int = 2, tied: bool | None = None) -> Transformer:
    """Random GPT-2-style specs: 1–3 blocks, 1–3 heads of width 1–4, per-block widths, any nested set.

    Args:
        min_vocab: smallest vocabulary drawn.
        tied: ``tie_embeddings`` of every drawn spec (rule P3), or ``None`` (the default) to
            draw it, so every property of the suite covers tied and untied heads.
    """
    n_layers = draw(st.integers(1, 3))
    per_layer = lambda lo, hi: st.one_of(st.integers(lo, hi), st.lists(st.integers(lo, hi), min_size=n_layers, max_size=n_layers))  # noqa: E731
    return Transformer(
        vocab_size=draw(st.integers(min_vocab, 13)),
        max_len=draw(st.integers(1, 8)),
        d_model=draw(st.integers(1, 9)),
        n_layers=n_layers,
        n_heads=draw(per_layer(1, 3)),
        d_ff=draw(per_layer(1, 10)),
        d_head=draw(st.integers(1, 4)),
        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3])),
        multiple_of=draw(st.sampled_from([1, 1, 2])),
        nested=tuple(draw(st.lists(st.sampled_from(Transformer.nestable), unique=True))),
        tie_embeddings=draw(st.booleans()) if tied is None else tied,
    )


def specs(min_classes: int = 1) -> st.SearchStrategy[Spec]:
    """MLP or Transformer specs."""
    return st.one_of(mlps(min_classes=min_classes), transformers(min_vocab=max(2, min_classes)))


def _size_or_fraction(full: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(1, full), fractions)


@st.composite
def granularity_forms(draw: Any, spec: Spec) -> Any:
    """Any user-facing form of rule G1 (fraction, per-dimension dict, per-layer lists, depth)."""
    kind = draw(st.sampled_from(["fraction", "dict", "per_layer"]))
    if kind == "fraction":
        return draw(fractions)
    if isinstance(spec, MLP):
        if kind == "dict":
            return {"hidden": draw(fractions)}
        return {"hidden": [draw(_size_or_fraction(h)) for h in spec.hidden]}
    form: dict[str, Any] = {}
    if draw(st.booleans()):
        form["d_model"] = draw(_size_or_fraction(spec.d_model))
    for dim, fulls in (("n_heads", spec.heads_per_layer), ("d_ff", spec.ff_per_layer)):
        if draw(st.booleans()):
            form[dim] = draw(fractions) if kind == "dict" else [draw(_size_or_fraction(f)) for f in fulls]
    depth = draw(st.sampled_from(["none", "n_layers", "layers"]))
    if depth == "n_layers":
        form["n_layers"] = draw(_size_or_fraction(spec.n_layers))
    elif depth == "layers":
        kept = draw(st.lists(st.integers(0, spec.n_layers - 1), min_size=1, unique=True))
        form["layers"] = sorted(kept)
    return form


@st.composite
def granularities(draw: Any, spec: Spec) -> Granularity:
    """A resolved granularity of ``spec`` drawn through any form of rule G1."""
    return resolve(spec, draw(granularity_forms(spec)))


@st.composite
def nested_pairs(draw: Any, spec: Spec) -> tuple[Granularity, Granularity]:
    """``(inner, outer)`` with ``inner ⊆ outer`` (rule N1), drawn size by size."""
    outer = draw(granularities(spec))
    o = outer.as_dict()
    blocks = outer.blocks
    if blocks:
        blocks = tuple(sorted(draw(st.lists(st.sampled_from(outer.blocks), min_size=1, unique=True))))
    sizes = {}
    for key, size in o.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) not in blocks:
            sizes[key] = 0
        else:
            sizes[key] = draw(st.integers(1, size))
    return Granularity(tuple(sorted(sizes.items())), blocks), outer


def weights_for(spec: Spec, seed: int, dtype: str = "float64", scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random weights: every tensor (biases, norm scales and offsets too) is non-trivial."""
    rng = np.random.default_rng(seed)
    base = initial_weights(spec, seed, "float64")
    out = {}
    for name, w in base.items():
        noise = rng.standard_normal(w.shape) * scale
        out[name] = (noise + (1.0 if name.endswith(".scale") else 0.0)).astype(dtype)
    return out


def targets_for(spec: Spec, seed: int, batch: int, x: np.ndarray, soft: bool) -> Targets:
    """Random hard labels for ``x`` and, with ``soft``, random Teacher probabilities."""
    rng = np.random.default_rng([seed, 2])
    classes = spec.d_out if isinstance(spec, MLP) else spec.vocab_size
    shape = (batch,) if isinstance(spec, MLP) else x.shape
    hard = rng.integers(0, classes, size=shape)
    probs = None
    if soft:
        logits = rng.standard_normal(shape + (classes,))
        probs = np.exp(NumpyOps().log_softmax(logits))
    return Targets(hard=hard, soft=probs)


def inputs_for(spec: Spec, seed: int, batch: int) -> np.ndarray:
    """A random input batch of ``spec``'s kind (features or token ids)."""
    rng = np.random.default_rng([seed, 1])
    if isinstance(spec, MLP):
        return rng.standard_normal((batch, spec.d_in))
    time = int(rng.integers(1, spec.max_len + 1))
    return rng.integers(0, spec.vocab_size, size=(batch, time))


#: Term lists of a step that exercise a backend's shared first layer (the MLP's first hidden layer
#: computed once at the widest term's width): with the TA, without it (the widest term is a
#: Student), and out of size order with a Mix'n'Match granularity widest in the middle.
SHARED_STEPS = {"ta-m-s": ("TA", "M", "S"), "m-s": ("M", "S"), "s-mix-m": ("S", "mix", "M")}


def step_plan(spec: Spec, names: tuple[str, ...], mix: Any) -> StepPlan:
    """A step over named granularities: ``TA``, ``S`` (0.25), ``M`` (0.5) and ``mix`` (the form ``mix``).

    The first term is every other term's parent; weights fall by a quarter per term; λ = 0.4.
    """
    known = {"TA": full(spec), "S": resolve(spec, 0.25), "M": resolve(spec, 0.5), "mix": resolve(spec, mix)}
    terms = tuple(Term(n, known[n], 1.0 - i / 4, None if i == 0 else names[0]) for i, n in enumerate(names))
    return StepPlan(0, terms, 0.4)
