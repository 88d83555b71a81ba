"""Training through Keras' own ``model.fit``.

:class:`Trainer` is a ``keras.Model`` that holds the nested TA and overrides
``train_step`` (per engine, as Keras 3 requires for a custom step; the forward
pass and the composite loss inside it are shared ``keras.ops`` code). ``fit``
feeds it a generator of the run's batches, so Keras callbacks, the progress bar
and ``History`` work as usual.

Design choices:

* **The step plan.** The set of granularities a step trains must be static in a
  compiled step (XLA under JAX and TensorFlow needs static shapes, and each
  Mix'n'Match granularity has its own). ``λ(t)`` changes every step but is a
  number, so it travels *in the batch* as a tensor: one compiled function covers
  the whole ramp. When every step trains the same granularities (sampling
  ``"all"``, or only one possible student) the step is compiled once. When the
  set changes between steps (``"mixnmatch"`` and ``"sandwich"`` with random mixes,
  ``"one"`` with several students) Keras runs the step eagerly (``run_eagerly=True``)
  and the step reads its plan from the step index carried in the batch. A plan is
  the terms every step trains plus a few that vary, and the pairs of random mixes
  are too many to compile a step for each (27 mixes of a two-block Transformer
  make 729 ordered pairs). So, under TensorFlow and JAX, each *group* is compiled
  once: the every-step terms as one function (its loss, gradients and outputs),
  each varying term as its own function keyed by its granularity, weight and parent
  (fed the parent's outputs, which rule L4's stop-gradient makes a constant), and
  one function that sums the gradients and applies the optimizer. After at most
  one compilation per distinct granularity, every step runs compiled code (the
  default text demo's Keras-TensorFlow MatTA fit: 302 s eager, 77 s grouped;
  ``docs/benchmarks.md``). With ``stop_gradient=False``, or a parent that is
  itself a varying term (a chain), the whole step runs eagerly as one function
  (JAX: jit-compiled per distinct plan). Pass ``run_eagerly``/``jit_compile`` to
  override where that choice is wrong for you.
* **NaN/Inf (rule T4).** The step applies its update only if its loss and all
  its gradients are finite (``tf.cond`` / ``jax.lax.cond`` / a Python ``if``), and a callback stops ``fit``
  at that step; the backend then raises :class:`matta.errors.NonFiniteLossError`
  through ``TrainingRun.record``. So the weights are those of the last good step. The eager
  torch step reads one fused norm of the gradients first (:func:`grads_finite`), since
  ``keras.ops.isfinite`` there is several passes over every gradient.
* **Host memory (JAX on CPU).** The first ``fit`` raises glibc's malloc thresholds
  (:func:`matta.backends.keras.engine.reuse_step_memory`): XLA allocates a whole
  step's scratch as one block, and above 32 MiB glibc would map it afresh, and
  page-fault it in, on every step.
* **Logs.** The step returns its own loss and per-term parts; the first callback
  records them in ``run.history`` (where the NaN check happens) and rewrites the
  Keras logs into epoch running means, which is what Keras users expect to see
  as ``loss``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence

import keras
import numpy as np
from keras import ops

from matta.errors import OptionError
from matta.losses import TA, LossOptions, StepPlan, Targets, Term, composite_loss
from matta.training import TrainingRun, batch_indices
from matta.backends.keras import engine
from matta.backends.keras.models import NestedModel

__all__ = ["KerasOps", "OPS", "Trainer", "grads_finite", "make_optimizer", "fit"]


class KerasOps:
    """:class:`matta.losses.Ops` over ``keras.ops`` (runs on every Keras engine)."""

    def log_softmax(self, x):
        return ops.log_softmax(x, axis=-1)

    def stop_gradient(self, x):
        return ops.stop_gradient(x)

    def mean(self, x):
        return ops.mean(x)

    def sum_last(self, x):
        return ops.sum(x, axis=-1)

    def take_last(self, x, ids):
        return ops.squeeze(ops.take_along_axis(x, ops.expand_dims(ids, -1), axis=-1), -1)

    def exp(self, x):
        return ops.exp(x)

    def square(self, x):
        return ops.square(x)


OPS = KerasOps()


def step_outputs_and_loss(model: NestedModel, x, targets: Targets, terms: Sequence[Term], distill,
                          options: LossOptions, parents: Optional[Mapping[str, Any]] = None):
    """``(total, parts, outputs)``: the DESIGN §4 loss of ``terms``, each term's part, and its outputs.

    Args:
        parents: outputs of distillation parents computed elsewhere (by name), for terms whose
            parent is not among ``terms``; with rule L4's stop-gradient they are constants.
    """
    # One call for every term: the nested MLP shares its first layer across them (same math).
    outputs = dict(zip((t.name for t in terms), model.run_many(x, [t.granularity for t in terms])))
    total, parts = composite_loss(OPS, {**(parents or {}), **outputs}, targets, StepPlan(-1, tuple(terms), distill),
                                  options)
    return total, parts, outputs


def step_loss(model: NestedModel, x, targets: Targets, terms: Sequence[Term], distill, options: LossOptions):
    """The composite loss of one step (DESIGN §4) and each term's part, in ``keras.ops``."""
    total, parts, _ = step_outputs_and_loss(model, x, targets, terms, distill, options)
    return total, parts


def _finite(x):
    return ops.all(ops.isfinite(x))


def _all_finite(grads):
    # One reduction per tensor, stacked: a single flag. Compiled (TensorFlow, JAX), this fuses into
    # a pass over each gradient; eager torch pays several passes per tensor (see grads_finite).
    return ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads]))


def grads_finite(grads) -> bool:
    """Rule T4's gradient check for an eager step: whether every element of every gradient is finite.

    Exact, and cheap on a good step: a finite L2 norm of all the gradients means every element is
    finite (an Inf or NaN element makes the sum of squares Inf or NaN), so only a non-finite norm,
    which a huge but finite gradient also gives when its squares overflow, is decided elementwise.
    On the torch engine ``keras.ops.isfinite`` is several full passes per tensor (``==``, ``abs``,
    ``!=``, ``&``, then ``all``): about 17 ms per step of the benchmark's MLP against about 1 ms
    for the fused ``foreach`` norm (one thread).

    Args:
        grads: the step's gradients (engine tensors).
    """
    if engine.name() == "torch":
        import torch

        if bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            return True
    return bool(ops.convert_to_numpy(_all_finite(grads)))


class Trainer(keras.Model):
    """A ``keras.Model`` around the nested TA whose ``train_step`` is one MatTA step."""

    def __init__(self, nested: NestedModel):
        super().__init__(name="matta_trainer", dtype=nested.compute_dtype_name)
        self.nested = nested
        self.run_info: Optional[TrainingRun] = None
        self.static_terms: Optional[tuple[Term, ...]] = None
        # Terms every step of a varying plan trains (compiled as one group), and the compiled groups;
        # set past Keras' attribute tracking, which would wrap the dict and walk the functions in it.
        object.__setattr__(self, "fixed_terms", frozenset())
        object.__setattr__(self, "group_functions", {})
        self.built = True

    def call(self, x):  # pragma: no cover - Keras asks for it; matta never calls the trainer
        raise NotImplementedError("the matta trainer is driven by fit(); use MatTA.predict for outputs")

    # -------------------------------------------------------------- shared, engine-neutral part
    def _terms(self, y) -> tuple[Term, ...]:
        if self.static_terms is not None:
            return self.static_terms
        # Eager only (see the module docstring): the batch carries its step index.
        step = int(np.asarray(ops.convert_to_numpy(y["step"]))[0])
        run = self.run_info
        assert run is not None
        return run.schedule.plan(step, run.steps).terms

    def _loss(self, x, y, terms):
        total, parts, _ = self._group_loss(x, y, terms, {})
        return total, (parts, y["distill"][0])

    def _group_loss(self, x, y, terms, parents):
        run = self.run_info
        assert run is not None
        targets = Targets(hard=y.get("hard"), soft=y.get("soft"), regression=y.get("regression"))
        return step_outputs_and_loss(self.nested, x, targets, terms, y["distill"][0], run.options, parents)

    def _groups(self, terms: tuple[Term, ...]) -> Optional[tuple[tuple[Term, ...], tuple[Term, ...]]]:
        """``(every-step terms, (term, ...))`` of a varying plan, or None where one eager step must run.

        Each varying term becomes a one-term group named ``_VARYING``, so that ``mix0`` and ``mix1``
        of the same granularity share one compiled function.
        """
        run = self.run_info
        assert run is not None
        if not self.fixed_terms or not run.options.stop_gradient:  # empty when every step is the same
            return None
        fixed = tuple(t for t in terms if t in self.fixed_terms)
        names = {t.name for t in fixed}
        varying = tuple(t for t in terms if t not in self.fixed_terms)
        # Every parent must come from the every-step group (a chain parent can be a mix).
        if TA not in names or any(t.parent is not None and t.parent not in names for t in terms):
            return None
        return fixed, varying

    @staticmethod
    def _one_term(term: Term) -> Term:
        return Term(_VARYING, term.granularity, term.weight, term.parent)

    @staticmethod
    def _logs(loss, parts, lam, y, grads_ok):
        logs = {"loss": loss, "distill": lam, "step": y["step"][0], "grads_finite": ops.cast(grads_ok, "int32")}
        logs.update({f"{k}_loss": v for k, v in parts.items()})
        return logs

    # -------------------------------------------------------------- per-engine steps
    def train_step(self, *args):
        impl = {"tensorflow": self._train_step_tf, "jax": self._train_step_jax, "torch": self._train_step_torch}
        return impl[engine.name()](*args)

    def _train_step_tf(self, data):
        import tensorflow as tf

        x, y = data
        terms = self._terms(y)
        groups = self._groups(terms)
        if groups is not None:
            return self._grouped_step_tf(x, y, *groups)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss, (parts, lam) = self._loss(x, y, terms)
        grads = tape.gradient(loss, variables)
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        return self._logs(loss, parts, lam, y, self._apply_if_finite_tf(loss, grads))

    def _apply_if_finite_tf(self, loss, grads):
        """Rule T4: a non-finite loss or gradient leaves weights and optimizer state untouched."""
        import tensorflow as tf

        grads_ok = _all_finite(grads)

        def apply():
            self.optimizer.apply(grads, self.trainable_variables)
            return tf.constant(True)

        tf.cond(tf.logical_and(_finite(loss), grads_ok), apply, lambda: tf.constant(False))
        return grads_ok

    def _train_step_jax(self, state, data):
        import jax

        x, y = data
        terms = self._terms(y)
        if self.static_terms is not None:
            return self._jax_step(state, x, y, terms)  # Keras has jit-compiled this whole step already
        groups = self._groups(terms)
        if groups is not None:
            return self._grouped_step_jax(state, x, y, *groups)
        # Eager run (the plan varies): JAX's op-by-op dispatch is very slow, so compile the step
        # per distinct plan instead (the terms are a static, hashable argument; jax caches by them).
        if getattr(self, "_jax_step_by_plan", None) is None:
            self._jax_step_by_plan = jax.jit(self._jax_step, static_argnums=(3,))
        return self._jax_step_by_plan(state, x, y, terms)

    def _jax_step(self, state, x, y, terms):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        loss, (parts, lam), grads = self._jax_loss_and_grads(trainable, non_trainable, lambda: self._loss(x, y, terms))
        grads_ok, new_trainable, new_optimizer = self._apply_if_finite_jax(loss, grads, trainable, optimizer_vars)
        state = (new_trainable, non_trainable, new_optimizer, metrics_vars)
        return self._logs(loss, parts, lam, y, grads_ok), state

    def _jax_loss_and_grads(self, trainable, non_trainable, loss_fn):
        """``(loss, aux, gradients)`` of ``loss_fn() -> (loss, aux)`` at the given variable values (JAX)."""
        import jax

        def pure(values):
            mapping = list(zip(self.trainable_variables, values)) + list(zip(self.non_trainable_variables, non_trainable))
            with keras.StatelessScope(state_mapping=mapping):
                return loss_fn()

        (loss, aux), grads = jax.value_and_grad(pure, has_aux=True)(trainable)
        return loss, aux, grads

    def _apply_if_finite_jax(self, loss, grads, trainable, optimizer_vars):
        """Rule T4: ``(grads_ok, weights, optimizer state)``, the old ones after a non-finite loss or gradient."""
        import jax
        import jax.numpy as jnp

        grads_ok = _all_finite(grads)
        # A branch rather than an elementwise jnp.where over every weight and moment: the select pass
        # cost the MLP benchmark's step about 0.06 s (0.23 s -> 0.17 s for the TA alone on one CPU thread).
        new_trainable, new_optimizer = jax.lax.cond(
            jnp.logical_and(jnp.isfinite(loss), grads_ok),
            lambda: self.optimizer.stateless_apply(optimizer_vars, grads, trainable),
            lambda: (list(trainable), list(optimizer_vars)),
        )
        return grads_ok, new_trainable, new_optimizer

    # -------------------------------------------------------------- varying plans, one compiled function per group
    def _tf_group(self, terms: tuple[Term, ...]):
        """The compiled ``(x, y, parents) -> (loss, parts, outputs, gradients)`` of ``terms`` (TensorFlow)."""
        fn = self.group_functions.get(terms)
        if fn is None:
            import tensorflow as tf

            _quiet_group_tracing(tf)

            variables = self.trainable_variables

            @tf.function
            def fn(x, y, parents):
                with tf.GradientTape() as tape:
                    total, parts, outputs = self._group_loss(x, y, terms, parents)
                grads = tape.gradient(total, variables)
                # Dense gradients (an embedding's is IndexedSlices in some groups and not others), so
                # the update function sees one signature and is traced once.
                return total, parts, outputs, [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                                               for g, v in zip(grads, variables)]

            self.group_functions[terms] = fn
        return fn

    def _tf_apply(self):
        """The compiled sum of the groups' losses and gradients, rule T4's check and the update (TensorFlow)."""
        fn = self.group_functions.get("apply")
        if fn is None:
            import tensorflow as tf

            @tf.function
            def fn(losses, grad_lists):
                loss = tf.add_n(losses)
                return loss, self._apply_if_finite_tf(loss, [tf.add_n(list(g)) for g in zip(*grad_lists)])

            self.group_functions["apply"] = fn
        return fn

    def _run_groups(self, run_group, fixed, varying):
        """``(parts, losses, gradient lists)`` of the every-step group, then of each varying term.

        ``run_group(terms, parents) -> (loss, parts, outputs, gradients)`` is the engine's compiled group.
        """
        loss, parts, outputs, grads = run_group(fixed, {})
        parts, losses, grad_lists = dict(parts), [loss], [grads]
        for term in varying:
            loss_t, parts_t, _, grads_t = run_group((self._one_term(term),), {term.parent: outputs[term.parent]})
            parts[term.name] = parts_t[_VARYING]
            losses.append(loss_t)
            grad_lists.append(grads_t)
        return parts, losses, grad_lists

    def _grouped_step_tf(self, x, y, fixed, varying):
        parts, losses, grad_lists = self._run_groups(lambda terms, parents: self._tf_group(terms)(x, y, parents),
                                                     fixed, varying)
        loss, grads_ok = self._tf_apply()(losses, grad_lists)
        return self._logs(loss, parts, y["distill"][0], y, grads_ok)

    def _jax_group(self):
        """``jit((trainable, non_trainable, x, y, terms, parents) -> (loss, parts, outputs, gradients))``."""
        fn = self.group_functions.get("jax_group")
        if fn is None:
            import jax

            def group(trainable, non_trainable, x, y, terms, parents):
                def loss_fn():
                    total, parts, outputs = self._group_loss(x, y, terms, parents)
                    return total, (parts, outputs)

                total, (parts, outputs), grads = self._jax_loss_and_grads(trainable, non_trainable, loss_fn)
                return total, parts, outputs, grads

            fn = self.group_functions["jax_group"] = jax.jit(group, static_argnums=(4,))  # jax caches per terms
        return fn

    def _jax_apply(self):
        """``jit``: the sum of the groups' losses and gradients, rule T4's check and the update (JAX)."""
        fn = self.group_functions.get("jax_apply")
        if fn is None:
            import jax

            def apply(trainable, optimizer_vars, losses, grad_lists):
                loss = sum(losses[1:], losses[0])
                grads = [sum(g[1:], g[0]) for g in zip(*grad_lists)]
                return (loss, *self._apply_if_finite_jax(loss, grads, trainable, optimizer_vars))

            fn = self.group_functions["jax_apply"] = jax.jit(apply)
        return fn

    def _grouped_step_jax(self, state, x, y, fixed, varying):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        group = self._jax_group()
        parts, losses, grad_lists = self._run_groups(
            lambda terms, parents: group(trainable, non_trainable, x, y, terms, parents), fixed, varying)
        loss, grads_ok, new_trainable, new_optimizer = self._jax_apply()(trainable, optimizer_vars, losses, grad_lists)
        return self._logs(loss, parts, y["distill"][0], y, grads_ok), (new_trainable, non_trainable, new_optimizer,
                                                                     metrics_vars)

    def _train_step_torch(self, data):
        import torch

        x, y = data
        terms = self._terms(y)
        self.zero_grad()
        loss, (parts, lam) = self._loss(x, y, terms)
        loss.backward()
        variables = self.trainable_variables[:]
        grads = [torch.zeros_like(v.value) if v.value.grad is None else v.value.grad for v in variables]
        grads_ok = grads_finite(grads)
        if bool(torch.isfinite(loss)) and grads_ok:  # rule T4
            with torch.no_grad():
                self.optimizer.apply(grads, variables)
        return self._logs(loss.detach(), {k: v.detach() for k, v in parts.items()}, lam, y, grads_ok)


class _Recorder(keras.callbacks.Callback):
    """Records each step in ``run.history`` (NaN check), shows epoch running means, runs validation."""

    def __init__(self, run: TrainingRun):
        super().__init__()
        self.run = run
        self.bad: Optional[tuple[int, float, bool]] = None  # (step, loss, gradients finite)
        self._sums: dict[str, float] = {}
        self._count = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._sums, self._count = {}, 0

    def _rewrite(self, logs: dict) -> None:
        logs.pop("step", None)
        logs.pop("grads_finite", None)
        for k in list(logs):
            if k in self._sums:
                logs[k] = self._sums[k] / max(self._count, 1)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs if logs is not None else {}
        step = int(logs["step"])
        loss = float(logs["loss"])
        grads_ok = bool(int(logs["grads_finite"]))
        if not (math.isfinite(loss) and grads_ok):
            # Stop here; fit() raises through the TrainingRun once Keras has handed back the weights
            # (under JAX they only return to the variables at the end of the epoch loop).
            self.bad = (step, loss, grads_ok)
            self.model.stop_training = True
            self._rewrite(logs)
            return
        parts = {k[: -len("_loss")]: float(v) for k, v in logs.items() if k.endswith("_loss")}
        self.run.record(step, loss, parts, float(logs["distill"]))
        self._count += 1
        for k, v in logs.items():
            if k == "loss" or k.endswith("_loss"):
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._rewrite(logs)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self._rewrite(logs)
        if self.bad is None and self.run.on_epoch_end is not None:
            results = self.run.on_epoch_end(epoch + 1) or {}
            self.run.epoch_logs.append(results)
            for name, metrics in results.items():
                for metric, value in (metrics.items() if isinstance(metrics, dict) else [("", metrics)]):
                    logs[f"val_{name}_{metric}" if metric else f"val_{name}"] = value


def make_optimizer(optimizer: Any, learning_rate: float, weight_decay: float) -> keras.optimizers.Optimizer:
    """``None`` → AdamW(learning_rate, weight_decay); a Keras optimizer instance; or an optimizer name."""
    if optimizer is None:
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        try:
            opt = keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": learning_rate}})
        except (ValueError, TypeError) as exc:
            raise OptionError(
                f"optimizer must be None (AdamW), a keras.optimizers.Optimizer or a Keras optimizer name "
                f"such as 'adam', 'sgd', 'adamw'; got {optimizer!r}"
            ) from exc
        return opt
    raise OptionError(
        "optimizer must be None (AdamW), a keras.optimizers.Optimizer or a Keras optimizer name; "
        f"got {optimizer!r} ({type(optimizer).__name__})"
    )


_VARYING = "_varying"  # the name of a varying term inside its own compiled group


class _GroupTracingFilter:
    """Drops TensorFlow's "frequent retracing" warning about matta's group functions.

    Each group is its own ``tf.function``, traced once; TensorFlow counts the traces of every
    function made from the same Python code together and warns of retracing, which here is wrong.
    """

    def filter(self, record) -> bool:
        return "Trainer._tf_group" not in record.getMessage()


def _quiet_group_tracing(tf) -> None:
    logger = tf.get_logger()
    if not any(isinstance(f, _GroupTracingFilter) for f in logger.filters):
        logger.addFilter(_GroupTracingFilter())


def _fixed_terms(run: TrainingRun) -> frozenset[Term]:
    """The terms of a varying plan that every step trains: the TA and the declared Students it keeps.

    ``"mixnmatch"`` trains every Student each step and ``"sandwich"`` the smallest; ``"one"`` only
    the TA. A Student whose chain parent changes between steps is not the same :class:`Term` at
    every step, so membership (``Term`` equality) sends it to the varying ones then.
    """
    keep = {TA} if run.options.sampling == "one" else {TA, *run.schedule.students}
    return frozenset(t for t in run.schedule.plan(0, run.steps).terms if t.name in keep)


def _static_terms(run: TrainingRun) -> Optional[tuple[Term, ...]]:
    """The terms every step trains, if they are the same at every step (see the module docstring)."""
    o = run.options
    n = len(run.schedule.students)
    constant = o.sampling == "all" or n == 0 or (o.sampling == "one" and n == 1) or (
        o.sampling == "sandwich" and o.num_random == 0
    )
    return run.schedule.plan(0, run.steps).terms if constant else None


def _batches(run: TrainingRun, dtype: str, integer_inputs: bool):
    """The run's batches as ``(x, y)`` with ``y`` a dict of arrays (targets, ``distill`` λ(t), ``step``)."""
    for step, index in enumerate(batch_indices(len(run.x), run.batch_size, run.steps, run.seed)):
        x = run.x[index]
        targets = run.batch_targets(index, x)
        n = len(index)
        y = {
            "step": np.full((n,), step, np.int32),
            "distill": np.full((n,), run.schedule.plan(step, run.steps).distill, dtype),
        }
        if targets.hard is not None:
            y["hard"] = targets.hard.astype(np.int32)
        if targets.soft is not None:
            y["soft"] = targets.soft.astype(dtype)
        if targets.regression is not None:
            y["regression"] = targets.regression.astype(dtype)
        yield (x.astype(np.int32) if integer_inputs else x.astype(dtype)), y


_FIT_OPTIONS = ("callbacks", "verbose", "run_eagerly", "jit_compile")


def fit(trainer: Trainer, run: TrainingRun, optimizer: keras.optimizers.Optimizer, integer_inputs: bool,
        **kwargs: Any) -> keras.callbacks.History:
    """Trains through ``trainer.fit`` and raises ``NonFiniteLossError`` (via ``run.record``) on a bad step."""
    unknown = sorted(set(kwargs) - set(_FIT_OPTIONS))
    if unknown:
        raise OptionError(f"unknown fit option(s) for the keras backend: {unknown}; allowed: {list(_FIT_OPTIONS)}")
    callbacks = kwargs.get("callbacks") or []
    if not isinstance(callbacks, (list, tuple)) or not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise OptionError("callbacks must be a list of keras.callbacks.Callback")
    static = _static_terms(run)
    run_eagerly = kwargs.get("run_eagerly", static is None)
    if not run_eagerly and static is None:
        raise OptionError("run_eagerly=False needs the same granularities at every step (sampling='all')")
    trainer.run_info, trainer.static_terms = run, static
    object.__setattr__(trainer, "fixed_terms", frozenset() if static is not None else _fixed_terms(run))
    # compile() drops Keras' compiled train function. The trace depends only on the step's terms, the
    # loss options and these flags, so a later fit() with the same ones reuses it instead of tracing
    # (and, under XLA, compiling) the step again.
    # A rule T6 schedule is a new object per fit() whose rates are baked into the trace; the key holds
    # the object itself (compared by identity), so a scheduled run retraces and a constant-rate one
    # reuses the trace.
    rate = optimizer._learning_rate
    key = (static, run.options, run_eagerly, kwargs.get("jit_compile", "auto"), id(optimizer),
           rate if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule) else None)
    if getattr(trainer, "_matta_compiled", None) != key:
        trainer.compile(optimizer=optimizer, run_eagerly=run_eagerly, jit_compile=kwargs.get("jit_compile", "auto"))
        object.__setattr__(trainer, "_matta_compiled", key)  # untracked by Keras
        trainer.group_functions.clear()  # they hold the optimizer, the options and the schedule too
    if not optimizer.built:
        optimizer.build(trainer.trainable_variables)
    engine.reuse_step_memory()  # JAX on CPU: a step's scratch block would be mapped afresh every step
    recorder = _Recorder(run)
    spe = run.steps_per_epoch
    epochs = math.ceil(run.steps / spe)
    verbose = kwargs.get("verbose", "auto" if run.progress else 0)
    with warnings.catch_warnings():
        # A run of `steps` that is not a whole number of epochs ends inside its last epoch, by design.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = trainer.fit(
            _batches(run, trainer.nested.compute_dtype_name, integer_inputs),
            epochs=epochs, steps_per_epoch=spe, callbacks=[recorder, *callbacks], verbose=verbose, shuffle=False,
        )
    if recorder.bad is not None:
        step, loss, grads_ok = recorder.bad
        run.record(step, loss)  # raises NonFiniteLossError on a non-finite loss
        run.check_gradients(step, grads_ok)  # else the gradient was the problem: raises too
    return history
