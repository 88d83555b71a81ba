"""Extraction (rules E1–E4): cut a real, smaller model out of the TA's weights.

Extraction works on numpy weights only and returns *copies* of exactly the
sliced parameters (never a copy of the whole TA, never a view into it), so a
Student can be saved or served while the TA is freed. A TA mapped from a file
(:func:`matta.hf.read_gpt2`) has each tensor's pages handed back once its last
slice is copied, so extracting holds the Student plus one TA tensor, not the
TA's pages that the slices touched.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from matta.nesting import GranularityLike, plan, resolve
from matta.specs import Spec
from matta.weights import check_weights, file_mapping, release_pages

__all__ = ["extract"]


def extract(
    weights: Mapping[str, np.ndarray], spec: Spec, granularity: GranularityLike
) -> tuple[Spec, dict[str, np.ndarray]]:
    """Rule E1: the spec and weights of the plain model at ``granularity``.

    Properties (tested in ``spec_tests``): extraction at the full granularity is
    the identity (E3); it composes, ``extract(extract(W, g1), g2) == extract(W, g2)``
    for ``g2 ⊆ g1`` where ``g2`` is written in the sub-spec's terms (E4); the
    result's parameter count is ``num_params(spec, g)``.

    Args:
        weights: the full model's weights, keyed by the spec's parameter names.
        spec: the full model's spec.
        granularity: any form of rule G1.

    Returns:
        ``(sub_spec, sub_weights)``: a spec of the same family with the sliced
        sizes (kept blocks renumbered, rule D2) and C-contiguous copies.
    """
    weights = check_weights(spec, weights)
    g = resolve(spec, granularity)
    p = plan(spec, g)
    maps = {r.name: file_mapping(weights[r.source]) for r in p.reads}
    last = {id(m): r.name for r in p.reads if (m := maps[r.name]) is not None}  # q, k and v share c_attn's map

    def take(w: np.ndarray, r) -> np.ndarray:
        out = np.array(w[r.slices], copy=True, order="C")
        if last.get(id(maps[r.name])) == r.name:
            release_pages(maps[r.name])
        return out

    return p.spec, p.read(weights, take)
