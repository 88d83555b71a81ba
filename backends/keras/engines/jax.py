"""The JAX engine: gradients by ``jax.value_and_grad`` over Keras' stateless scope, rule T4 by ``jax.lax.cond``,
groups as ``jax.jit`` functions, and glibc's malloc tuned for XLA on CPU."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import keras

from matta.losses import Term
from matta.backends.keras.training import Trainer, add_gradients, all_finite

__all__ = ["value_and_grad", "grads_finite", "apply_if_finite", "train_step", "prepare_fit", "snapshot",
           "reuse_step_memory", "malloc_left_alone", "STEP_MEMORY_THRESHOLD", "compiled_call", "transposed"]


def value_and_grad(variables: Sequence[keras.Variable], fn: Callable[[], tuple[Any, Any]],
                   values: Optional[Sequence[Any]] = None, state: Sequence[tuple[keras.Variable, Any]] = ()):
    """``(scalar, aux, gradients)`` of ``fn() -> (scalar, aux)``, one gradient per variable.

    Args:
        values: the variables' values to differentiate at; by default their own (Keras' stateless
            JAX train step passes its state).
        state: further ``(variable, value)`` pairs ``fn`` reads (a train step's non-trainable variables).
    """
    variables = list(variables)

    def pure(current):
        with keras.StatelessScope(state_mapping=list(zip(variables, current)) + list(state)):
            return fn()

    start = [v.value for v in variables] if values is None else list(values)
    (value, aux), grads = jax.value_and_grad(pure, has_aux=True)(start)
    return value, aux, grads


def grads_finite(grads):
    """Rule T4's gradient check: a boolean array, whether every element of every gradient is finite."""
    return all_finite(grads)


def apply_if_finite(trainer: Trainer, loss, grads, trainable, optimizer_vars):
    """Rule T4: ``(grads_ok, weights, optimizer state)``, the old ones after a non-finite loss or gradient."""
    grads_ok = grads_finite(grads)
    # A branch rather than an elementwise jnp.where over every weight and moment, which costs a pass
    # over all of them (docs/benchmarks.md).
    new_trainable, new_optimizer = jax.lax.cond(
        jnp.logical_and(jnp.all(jnp.isfinite(loss)), grads_ok),
        lambda: trainer.optimizer.stateless_apply(optimizer_vars, grads, trainable),
        lambda: (list(trainable), list(optimizer_vars)),
    )
    return grads_ok, new_trainable, new_optimizer


@jax.jit
def _copies(values):
    return [jnp.copy(x) for x in values]


def snapshot(variables: Sequence[keras.Variable]) -> Callable[[], list]:
    """``() -> values``: copies of the variables' values, made in one compiled call.

    A copy, not the arrays themselves: Keras' JAX train step donates the state's buffers, so
    the arrays a variable holds before a step are deleted by it.
    """
    variables = list(variables)
    return lambda: _copies([v.value for v in variables])


def _loss_and_grads(trainer: Trainer, trainable, non_trainable, x, y, terms: tuple[Term, ...], parents):
    """``(loss, parts, outputs, gradients)`` of ``terms`` on ``(x, y)`` at the given variable values."""
    loss, (parts, outputs), grads = value_and_grad(
        trainer.trainable_variables, trainer.loss_fn(x, y, terms, parents), values=trainable,
        state=list(zip(trainer.non_trainable_variables, non_trainable)))
    return loss, parts, outputs, grads


def _group(trainer: Trainer, terms: tuple[Term, ...]):
    """``jit((trainable, non_trainable, x, y, parents, gradients so far) -> (loss, parts, outputs, gradients))`` of ``terms``.

    The gradients so far are donated: the group adds its own into their buffers.
    """
    fn = trainer.group_functions.get(terms)
    if fn is None:
        def group_step(trainable, non_trainable, x, y, parents, acc):
            loss, parts, outputs, grads = _loss_and_grads(trainer, trainable, non_trainable, x, y, terms, parents)
            return loss, parts, outputs, add_gradients(acc, grads)

        fn = trainer.group_functions[terms] = jax.jit(group_step, donate_argnums=5)
    return fn


def _update(trainer: Trainer):
    """``jit``: the sum of the groups' losses, rule T4's check and the update.

    The weights and optimizer state are donated, as in Keras' own compiled step: the update
    writes into their buffers instead of holding a second copy of both.
    """
    if trainer.update_function is None:
        def update(trainable, optimizer_vars, losses, grads):
            loss = sum(losses[1:], losses[0])
            return (loss, *apply_if_finite(trainer, loss, grads, trainable, optimizer_vars))

        object.__setattr__(trainer, "update_function", jax.jit(update, donate_argnums=(0, 1)))
    return trainer.update_function


def train_step(trainer: Trainer, state, data):
    """One MatTA step on Keras' JAX state: jit-compiled whole by Keras (``run_eagerly=False``), else compiled groups.

    Where a step is one group (:meth:`Trainer.groups` is ``None``), that group is compiled per
    distinct plan: JAX's op-by-op dispatch is far slower than a compiled step.
    """
    x, y = data
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    terms = trainer.terms(y)
    if trainer.step_compiled:
        loss, parts, _, grads = _loss_and_grads(trainer, trainable, non_trainable, x, y, terms, {})
        grads_ok, new_trainable, new_optimizer = apply_if_finite(trainer, loss, grads, trainable, optimizer_vars)
    else:
        def group(terms, parents, acc):
            return _group(trainer, terms)(trainable, non_trainable, x, y, parents, acc)

        parts, losses, grads = trainer.run_groups(group, *(trainer.groups(terms) or (terms, ())))
        loss, grads_ok, new_trainable, new_optimizer = _update(trainer)(trainable, optimizer_vars, losses, grads)
    return trainer.logs(loss, parts, y, grads_ok), (new_trainable, non_trainable, new_optimizer, metrics_vars)


def prepare_fit() -> None:
    """Lets a compiled step reuse its scratch memory on CPU (:func:`reuse_step_memory`)."""
    reuse_step_memory()


# ------------------------------------------------------------------------------ host memory (XLA on CPU)
#: glibc's mallopt() parameters (<malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: Freed blocks up to this size stay in the process for the next step instead of going back to the system.
STEP_MEMORY_THRESHOLD = 1 << 30
#: Slack glibc keeps at the top of a heap. glibc unmaps an empty extra heap of a thread's arena unless the
#: pad exceeds the room left in the heap before it (under two 64 MiB heaps), so this keeps such heaps.
_TOP_PAD = 1 << 28
#: Environment variables through which a user configures glibc's malloc; matta then leaves it alone.
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                       "MALLOC_ARENA_MAX")


def malloc_left_alone(environ: Mapping[str, str]) -> bool:
    """Whether matta must not touch glibc's malloc: ``MATTA_TUNE_MALLOC=0``, or the environment configures it.

    The environment configures it through ``MALLOC_*`` variables or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``.
    """
    if environ.get("MATTA_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return True
    return any(k in environ for k in _MALLOC_ENVIRONMENT) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


@functools.cache
def reuse_step_memory() -> bool:
    """Lets glibc reuse a compiled JAX step's scratch memory on CPU instead of mapping it anew every step.

    XLA on CPU allocates all of a step's intermediate buffers as one block per
    execution and frees it when the step ends. glibc serves a block above its mmap
    threshold with a fresh ``mmap`` and unmaps it on ``free``; the threshold
    follows the largest block freed so far but never past 32 MiB. So a step whose
    scratch block is larger page-faults on every page of it, every step (measured in
    ``docs/benchmarks.md``). This raises the mmap and trim thresholds to
    :data:`STEP_MEMORY_THRESHOLD`, so freed blocks stay in the heap for the next
    step, and the top pad, because XLA's worker threads allocate in their own
    arenas, whose extra 64 MiB heaps glibc otherwise unmaps once empty. The worker
    threads take turns, so the first few steps still fault, until each arena holds
    a block; a block that does not fit a thread heap (64 MiB) is still mapped every
    time a worker thread runs the step.

    This is process-wide, runs once (at the first ``fit``), only on CPU with glibc,
    and never with ``MATTA_TUNE_MALLOC=0`` or when the environment configures
    glibc's malloc itself (:func:`malloc_left_alone`). The cost: freed memory up to
    :data:`STEP_MEMORY_THRESHOLD` stays with the process for reuse instead of going
    back to the system.

    Returns:
        Whether the thresholds are raised.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or malloc_left_alone(os.environ):
        return False
    if jax.default_backend() != "cpu":  # accelerators keep a step's buffers in device memory
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting it stops glibc's own trim adjustment, so the trim threshold
    # and top pad are set only once it took (alone, their defaults would give the block back every step).
    return bool(mallopt(_M_MMAP_THRESHOLD, STEP_MEMORY_THRESHOLD)) and all(
        mallopt(option, value) for option, value in ((_M_TRIM_THRESHOLD, STEP_MEMORY_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    )


def compiled_call(model: Any, spec: Any, dtype: str) -> None:
    """None: ``jax.jit`` fuses a Transformer's ops and changes the last bit of some outputs, so the eager call serves (the TensorFlow module has a compiled one)."""
    return None


def transposed(x):
    """``x.T`` as a kernel of its own (a tied head's kernel, rule P3); this engine materializes it already."""
    return keras.ops.transpose(x)
