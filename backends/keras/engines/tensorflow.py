"""The TensorFlow engine: gradients by ``tf.GradientTape``, rule T4 by ``tf.cond``, groups as ``tf.function`` s."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from matta.losses import Term
from matta.specs import MLP, Spec
from matta.backends.keras.training import Trainer, add_gradients, all_finite

__all__ = ["value_and_grad", "grads_finite", "apply_if_finite", "train_step", "prepare_fit", "snapshot", "compiled_call",
           "transposed"]


def value_and_grad(variables: Sequence[keras.Variable], fn: Callable[[], tuple[Any, Any]]):
    """``(scalar, aux, gradients)`` of ``fn() -> (scalar, aux)``, one dense gradient per variable (zeros where unused).

    Dense, because an embedding's gradient is ``IndexedSlices`` in some groups and not in others:
    the update function then sees one signature and is traced once.
    """
    variables = list(variables)
    with tf.GradientTape() as tape:
        value, aux = fn()
    grads = tape.gradient(value, variables)
    return value, aux, [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]


def grads_finite(grads):
    """Rule T4's gradient check: a boolean tensor, whether every element of every gradient is finite."""
    return all_finite(grads)


def apply_if_finite(trainer: Trainer, loss, grads):
    """Rule T4: applies the update only if ``loss`` and ``grads`` are finite; returns the gradient check."""
    grads_ok = grads_finite(grads)

    def apply():
        trainer.optimizer.apply(grads, trainer.trainable_variables)
        return tf.constant(True)

    tf.cond(tf.logical_and(tf.reduce_all(tf.math.is_finite(loss)), grads_ok), apply, lambda: tf.constant(False))
    return grads_ok


def snapshot(variables: Sequence[keras.Variable]) -> Callable[[], list]:
    """``() -> values``: the variables' values now, read in one graph call instead of two eager ops each.

    The values stay as read: a later assignment to a variable whose value is still referenced
    writes a new buffer (TensorFlow's copy-on-write for resource variables), as for an eager read.
    """
    variables = list(variables)
    return tf.function(lambda: [tf.identity(v.value) for v in variables], autograph=False)


def _loss_and_grads(trainer: Trainer, x, y, terms: tuple[Term, ...], parents):
    """``(loss, parts, outputs, gradients)`` of ``terms`` on ``(x, y)``."""
    loss, (parts, outputs), grads = value_and_grad(trainer.trainable_variables, trainer.loss_fn(x, y, terms, parents))
    return loss, parts, outputs, grads


def _group(trainer: Trainer, terms: tuple[Term, ...]):
    """The compiled ``(x, y, parents, gradients so far) -> (loss, parts, outputs, gradients)`` of ``terms``."""
    fn = trainer.group_functions.get(terms)
    if fn is None:
        _quiet_tracing()

        @tf.function
        def group_step(x, y, parents, acc):
            loss, parts, outputs, grads = _loss_and_grads(trainer, x, y, terms, parents)
            return loss, parts, outputs, add_gradients(acc, grads)

        fn = trainer.group_functions[terms] = group_step
    return fn


def _update(trainer: Trainer):
    """The compiled sum of the groups' losses, rule T4's check and the update."""
    if trainer.update_function is None:
        @tf.function
        def update(losses, grads):
            loss = tf.add_n(losses)
            return loss, apply_if_finite(trainer, loss, grads)

        object.__setattr__(trainer, "update_function", update)
    return trainer.update_function


def train_step(trainer: Trainer, data):
    """One MatTA step: one function (compiled whole by Keras, or eager), or eager over compiled groups (:meth:`Trainer.groups`)."""
    x, y = data
    terms = trainer.terms(y)
    groups = trainer.groups(terms)
    if groups is None:  # the whole step as one function
        loss, parts, _, grads = _loss_and_grads(trainer, x, y, terms, {})
        grads_ok = apply_if_finite(trainer, loss, grads)
    else:
        parts, losses, grads = trainer.run_groups(
            lambda group, parents, acc: _group(trainer, group)(x, y, parents, acc), *groups)
        loss, grads_ok = _update(trainer)(losses, grads)
    return trainer.logs(loss, parts, y, grads_ok)


def prepare_fit() -> None:
    """Nothing: TensorFlow needs no preparation."""


class _TracingFilter:
    """Drops TensorFlow's "frequent retracing" warning about matta's one-trace functions.

    Each compiled group and each plain model's serving call is its own ``tf.function``, traced
    once; TensorFlow counts the traces of every function made from the same Python code together
    and warns of retracing, which here is wrong.
    """

    FUNCTIONS = ("_group.<locals>.group_step", "compiled_call.<locals>.<lambda>")

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(name in message for name in self.FUNCTIONS)


def _quiet_tracing() -> None:
    logger = tf.get_logger()
    if not any(isinstance(f, _TracingFilter) for f in logger.filters):
        logger.addFilter(_TracingFilter())


def compiled_call(model: keras.Model, spec: Spec, dtype: str) -> Callable[[Any], Any]:
    """The plain model's inference call compiled by TensorFlow, with every bit of the eager call.

    One ``tf.function`` traced for any batch size (and any length of token ids). Its
    calls run without Grappler's graph rewrites, because they change the last bit of some outputs
    (the arithmetic optimizer rewrites GELU; float64 matmuls get fused); the setting is TensorFlow's
    thread-local per-call options, so other functions in the process keep their own.
    """
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    _quiet_tracing()
    shape, kind = ([None, spec.d_in], dtype) if isinstance(spec, MLP) else ([None, None], "int32")
    graph = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec(shape, kind)])
    ctx = context.context()
    config = config_pb2.ConfigProto()
    config.ParseFromString(ctx.function_call_options.config_proto_serialized)
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    options = context.FunctionCallOptions(executor_type=ctx.function_call_options.executor_type, config_proto=config)

    def call(x: Any) -> Any:
        default = ctx.function_call_options
        ctx.function_call_options = options
        try:
            return graph(x)
        finally:
            ctx.function_call_options = default

    call.graph = graph  # the traced function, e.g. for its tracing count
    return call


def transposed(x):
    """``x.T`` as a kernel of its own (a tied head's kernel, rule P3); this engine materializes it already."""
    return keras.ops.transpose(x)
