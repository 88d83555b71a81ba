"""The PyTorch engine: gradients by ``backward()``, rule T4 by a fused gradient norm and a Python ``if``,
and one autograd node for several prefix reads of one tensor. Keras runs the torch step eagerly."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import keras
import torch
from keras import ops

from matta.backends.keras.training import Trainer, all_finite

__all__ = ["value_and_grad", "grads_finite", "apply_if_finite", "train_step", "prepare_fit", "snapshot", "prefix_reads",
           "compiled_call", "transposed"]


def value_and_grad(variables: Sequence[keras.Variable], fn: Callable[[], tuple[Any, Any]]):
    """``(scalar, aux, gradients)`` of ``fn() -> (scalar, aux)``, one gradient per variable (zeros where unused).

    The variables' ``.grad`` are cleared before and after, so nothing accumulates across calls.
    """
    variables = list(variables)
    _clear_grads(variables)
    value, aux = fn()
    value.backward()
    return value, aux, _take_grads(variables)


def _clear_grads(variables: Sequence[keras.Variable]) -> None:
    for v in variables:
        v.value.grad = None


def _take_grads(variables: Sequence[keras.Variable]) -> list:
    """The gradients the backward passes left in ``.grad`` (zeros where none), then cleared."""
    grads = [torch.zeros_like(v.value) if v.value.grad is None else v.value.grad for v in variables]
    _clear_grads(variables)
    return grads


def snapshot(variables: Sequence[keras.Variable]) -> Callable[[], list]:
    """``() -> values``: copies of the variables' values (eager clones; the optimizer updates in place)."""
    variables = list(variables)
    return lambda: [v.value.detach().clone() for v in variables]


def grads_finite(grads) -> bool:
    """Rule T4's gradient check: whether every element of every gradient is finite.

    Exact, and cheap on a good step: a finite L2 norm of all the gradients means every element is
    finite (an Inf or NaN element makes the sum of squares Inf or NaN), so only a non-finite norm,
    which a huge but finite gradient also gives when its squares overflow, is decided elementwise.
    The norm is one fused ``foreach`` kernel; ``keras.ops.isfinite`` on torch is several full passes
    per tensor (``==``, ``abs``, ``!=``, ``&``, then ``all``; measured in ``docs/benchmarks.md``).
    """
    if bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
        return True
    return bool(ops.convert_to_numpy(all_finite(grads)))


def apply_if_finite(trainer: Trainer, loss, grads) -> bool:
    """Rule T4: applies the update only if ``loss`` and ``grads`` are finite; returns the gradient check."""
    grads_ok = grads_finite(grads)
    if bool(torch.isfinite(loss)) and grads_ok:
        with torch.no_grad():
            trainer.optimizer.apply(grads, trainer.trainable_variables[:])
    return grads_ok


def _backward(trainer: Trainer, x, y, terms, parents):
    """``(loss, parts, outputs, None)`` of ``terms`` on ``(x, y)``: the backward adds their gradients into ``.grad``.

    Gradients accumulate in the variables' ``.grad`` from group to group (torch's own running
    sum, in place), so no gradient list is returned; the backward frees the group's graph.
    """
    loss, (parts, outputs) = trainer.loss_fn(x, y, terms, parents)()
    loss.backward()
    return loss.detach(), parts, {k: v.detach() for k, v in outputs.items()}, None


def train_step(trainer: Trainer, data):
    """One MatTA step, eager: its groups one after another (:meth:`Trainer.groups`) or the step whole, then one update."""
    x, y = data
    terms = trainer.terms(y)
    variables = trainer.trainable_variables
    _clear_grads(variables)
    groups = trainer.groups(terms)
    if groups is None:
        loss, parts, _, _ = _backward(trainer, x, y, terms, {})
    else:
        parts, losses, _ = trainer.run_groups(lambda group, parents, _: _backward(trainer, x, y, group, parents),
                                              *groups)
        loss = sum(losses[1:], losses[0])
    grads_ok = apply_if_finite(trainer, loss, _take_grads(variables))
    return trainer.logs(loss, {k: v.detach() for k, v in parts.items()}, y, grads_ok)


def prepare_fit() -> None:
    """Nothing: PyTorch needs no preparation."""


class _PrefixReads(torch.autograd.Function):
    """``value[index]`` for several indices as one autograd node (see :func:`prefix_reads`)."""

    @staticmethod
    def forward(ctx, value, *indices):
        ctx.indices = indices
        ctx.shape, ctx.dtype, ctx.device = value.shape, value.dtype, value.device
        return tuple(value.view_as(value) if i is None else value[i] for i in indices)

    @staticmethod
    def backward(ctx, *grads):
        whole = [g for i, g in zip(ctx.indices, grads) if i is None and g is not None]
        if whole and 0 not in whole[0].stride():
            total = whole[0]
        else:  # no whole read (or an expanded gradient, which cannot be written to)
            total = torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
            if whole:
                total += whole[0]
        for i, g in zip(ctx.indices, grads):
            if i is not None and g is not None:
                total[i] += g
        return (total, *(None for _ in ctx.indices))


def prefix_reads(value: torch.Tensor, indices: Sequence[Optional[tuple]]) -> tuple:
    """``value[index]`` for each index (``None``: all of it) as one autograd node.

    The values are the same views plain indexing gives, so a forward pass is unchanged. The
    gradient is what differs: PyTorch's backward of a slice makes a zero tensor of the full shape,
    copies the slice's gradient into it and adds that to the other reads' gradients, so every
    Student-sized read of a TA kernel costs two full-size passes (measured in
    ``docs/benchmarks.md``). This node adds each slice's gradient into the whole read's gradient
    in place instead, and needs a full-size zero tensor only when nothing reads the tensor whole.
    The whole read's gradient is modified in place: callers feed every read to an op whose
    backward makes that gradient afresh (a matmul, a broadcasting add, a slice), never to one that
    passes it through shared with another input.

    Args:
        value: a torch tensor (a variable's ``.value`` or an activation).
        indices: for each read, a tuple of slices, or ``None`` for the whole tensor.

    Returns:
        One tensor per index, in order.
    """
    return _PrefixReads.apply(value, *indices)


def compiled_call(model: Any, spec: Any, dtype: str) -> None:
    """None: the torch engine has no compiled call that keeps every bit here, so the eager call serves (the TensorFlow module has a compiled one)."""
    return None


def transposed(x):
    """``x.T`` laid out as a kernel of its own (a tied head's kernel, rule P3).

    ``ops.transpose`` is a strided view on torch, and a GEMM over it rounds differently from the
    same GEMM over the contiguous kernel the plain model's ``Dense`` holds; a contiguous copy
    makes both run the same kernel.
    """
    return keras.ops.transpose(x).contiguous()
