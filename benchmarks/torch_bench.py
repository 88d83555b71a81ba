"""PyTorch measurements: training step, MatFormer peer pattern and serving, as side-by-side ratios."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Workload, data, interleaved, serving_row, timed
from matta import MLP, MatTA
from matta.nesting import sub_spec
from matta.specs import Spec


def independent_plain(spec: Spec) -> nn.Module:
    """A plain model written without matta's nested code: the baseline a user would write."""
    if isinstance(spec, MLP):
        widths = [spec.d_in, *spec.hidden, spec.d_out]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.GELU(approximate="tanh"))
        return nn.Sequential(*layers)
    from matta.backends.torch.modules import PlainTransformer  # plain nn.Linear/LayerNorm/Embedding layers

    return PlainTransformer(spec)


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.integers(0, len(x), batch_size)
        yield torch.as_tensor(x[index]), torch.as_tensor(y[index])


def training(w: Workload, steps: int, repeats: int) -> dict:
    """One MatTA step (TA + every Student, default loss) against the plain steps of each size,
    and against the MatFormer pattern (a backward per granularity, then one optimizer step)."""
    x, y = data(w.spec, w.num_examples)
    model = MatTA(w.spec, w.students, backend="torch", seed=0)
    model.fit(x, y, steps=2, batch_size=w.batch_size, progress=False)  # warm-up (allocator, kernels)
    names = ["TA", *w.students]
    plains = {}
    for name in names:
        module = independent_plain(sub_spec(w.spec, model.granularity(name)))
        plains[name] = (module, torch.optim.AdamW(module.parameters(), lr=1e-3))
    nested = model.model
    granularities = [model.granularity(n) for n in names]
    peer_opt = torch.optim.AdamW(nested.parameters(), lr=1e-3)

    def matta_step() -> float:
        start = time.perf_counter()
        model.fit(x, y, steps=steps, batch_size=w.batch_size, progress=False)
        return (time.perf_counter() - start) / steps

    def plain_step(name: str) -> float:
        module, opt = plains[name]
        start = time.perf_counter()
        for xb, yb in _batches(x, y, w.batch_size, steps, 1):
            opt.zero_grad(set_to_none=True)
            _cross_entropy(module(xb), yb).backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    def matformer_step() -> float:
        start = time.perf_counter()
        for xb, yb in _batches(x, y, w.batch_size, steps, 2):
            peer_opt.zero_grad(set_to_none=True)
            for g in granularities:
                _cross_entropy(nested(xb, g), yb).backward()
            peer_opt.step()
        return (time.perf_counter() - start) / steps

    fns = {"matta": matta_step, "matformer": matformer_step, **{f"plain:{n}": (lambda n=n: plain_step(n)) for n in names}}
    for fn in fns.values():
        fn()  # one untimed round each
    t = interleaved(fns, repeats)
    plain_sum = sum(t[f"plain:{n}"] for n in names)
    return {
        "workload": w.name, "backend": "torch", "matta_step_s": t["matta"], "plain_sum_s": plain_sum,
        "plain_steps_s": {n: t[f"plain:{n}"] for n in names}, "matformer_step_s": t["matformer"],
        "train_ratio": t["matta"] / plain_sum, "matformer_ratio": t["matta"] / t["matformer"],
    }


def serving(w: Workload, repeats: int, student: str = "S") -> list[dict]:
    """Extracted Student vs an independent plain model of the same size (and vs the nested forward)."""
    x, _ = data(w.spec, max(w.batch_size, 1))
    model = MatTA(w.spec, w.students, backend="torch", seed=0)
    extracted = model.extract(student)
    plain = independent_plain(extracted.spec)
    plain.load_state_dict(_as_independent_state(extracted.model, plain))
    g = model.granularity(student)
    rows = []
    for batch in (1, w.batch_size):
        xb = torch.as_tensor(x[:batch])
        number = 200 if batch == 1 else 20
        with torch.no_grad():
            fns = {
                "extracted": lambda: timed(lambda: extracted.model(xb), number),
                "plain": lambda: timed(lambda: plain(xb), number),
                "nested": lambda: timed(lambda: model.model(xb, g), number),
            }
            rows.append(serving_row(w.name, "torch", batch, fns, repeats))
    return rows


def _as_independent_state(source: nn.Module, target: nn.Module) -> dict:
    """Copies the extracted model's tensors into the independent model (same order of parameters)."""
    src = [p.detach().clone() for p in source.parameters()]
    dst = list(target.state_dict().keys())
    assert len(src) == len(dst), (len(src), len(dst))
    return dict(zip(dst, src))
