"""Training through Keras' own ``model.fit``: the engine-neutral part.

:class:`Trainer` is a ``keras.Model`` that holds the nested TA; its ``train_step`` is
its engine's (Keras 3 needs a custom step per engine; :mod:`matta.backends.keras.engines`
holds one module per engine, each with its one gradient function), while the forward
pass, the composite loss, the grouping of a step's terms and the logs are written here
once over ``keras.ops``. ``fit`` feeds Keras the run's own batch stream
(:meth:`matta.training.TrainingRun.batch_stream`), so Keras callbacks, the progress bar
and ``History`` work as usual, and every backend trains the same batches and plans.

Design choices:

* **The step plan.** The set of granularities a step trains must be static in a
  compiled step (XLA under JAX and TensorFlow needs static shapes, and each
  Mix'n'Match granularity has its own). ``λ(t)`` changes every step but is a
  number, so it travels *in the batch* as a tensor: one compiled function covers
  the whole ramp. When the schedule draws no Student
  (:meth:`matta.losses.Schedule.static_terms`, rule T2) every step trains the same
  terms, and a step whose plan trains other terms stops ``fit`` with
  :class:`matta.errors.OptionError`; otherwise each step trains the plan the batch
  stream gave it, and the pairs of random mixes are too many to compile a step for
  each (27 mixes of a two-block Transformer make 729 ordered pairs).
* **Groups: one term's activations at a time.** With rule L3's stop-gradient, a
  term's loss reaches the weights only through its own output, so a step runs as
  *groups*, one after another, each its own compiled function (its loss, gradients
  and outputs) that frees its activations before the next one runs, then one
  compiled update that sums the gradients, checks rule T4 and applies the
  optimizer (:meth:`Trainer.groups`): the first group holds the TA (the MLP's, the
  Students every step trains too), and every later term is a group keyed by its
  granularity and weight, fed its parent's outputs as a constant. Keras then runs
  the step eagerly (``run_eagerly=True``) around compiled groups, and after at most
  one compilation per distinct granularity every step runs compiled code. A step
  that is one group (a static MLP plan) is compiled whole by Keras. With
  ``stop_gradient=False`` a parent's graph is needed by its children and the whole
  step is one group: compiled by Keras for a static plan, else eager under
  TensorFlow and compiled per distinct plan under JAX. Pass
  ``run_eagerly``/``jit_compile`` to override where that choice is wrong for you
  (``run_eagerly=False`` compiles a static plan whole, holding every term's
  activations until one backward).
* **NaN/Inf (rule T4).** The step applies its update only if its loss and all
  its gradients are finite (each engine's ``apply_if_finite``), and a callback
  stops ``fit`` at that step; another puts back its copy of the weights and
  optimizer state from before the update before it, and the backend raises
  :class:`matta.errors.NonFiniteLossError` through ``TrainingRun.record``.
* **Checkpoints (rule T7).** That callback also writes the run's checkpoints
  (``TrainingRun.save_checkpoint_if_due``) after each step and after the
  recorder's epoch end, where Keras' ``ModelCheckpoint`` would.
* **Logs.** The step returns its own loss and per-term parts; the first callback
  records them in ``run.history`` (where the NaN check happens) and rewrites the
  Keras logs into epoch running means, which is what Keras users expect to see
  as ``loss``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import keras
import numpy as np
from keras import ops

from matta.errors import OptionError
from matta.losses import TA, LossOptions, StepPlan, Targets, Term, composite_loss
from matta.specs import MLP
from matta.training import TrainingRun
from matta.backends.keras import engine
from matta.backends.keras.models import NestedModel

__all__ = ["KerasOps", "OPS", "Trainer", "add_gradients", "all_finite", "make_optimizer", "fit"]


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
    """``(total, parts, outputs)``: the composite loss of ``terms`` (rules L1–L6), each term's part, and its outputs.

    Args:
        parents: outputs of distillation parents computed elsewhere (by name), for terms whose
            parent is not among ``terms``; with rule L3's stop-gradient they are constants.
    """
    # One call for every term: the nested MLP shares its first layer across them (same math).
    outputs = dict(zip((t.name for t in terms), model.run_many(x, [t.granularity for t in terms])))
    total, parts = composite_loss(OPS, {**(parents or {}), **outputs}, targets, StepPlan(-1, tuple(terms), distill),
                                  options)
    return total, parts, outputs


def step_loss(model: NestedModel, x, targets: Targets, terms: Sequence[Term], distill, options: LossOptions):
    """The composite loss of one step (rules L1–L6) and each term's part, in ``keras.ops``."""
    total, parts, _ = step_outputs_and_loss(model, x, targets, terms, distill, options)
    return total, parts


def all_finite(grads):
    """Rule T4's gradient check as one boolean tensor: whether every element of every gradient is finite.

    One reduction per tensor, stacked: a single flag. Compiled (TensorFlow, JAX) it fuses into a
    pass over each gradient.
    """
    return ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads]))


def add_gradients(so_far, grads):
    """``grads`` added to the gradients ``so_far`` of the step's earlier groups (``None`` for its first group)."""
    return grads if so_far is None else [a + g for a, g in zip(so_far, grads)]


#: The name of a later term inside its own compiled group, and of its parent there (:meth:`Trainer.run_groups`).
_DRAWN, _PARENT = "_drawn", "_parent"


class Trainer(keras.Model):
    """A ``keras.Model`` around the nested TA whose ``train_step`` is one MatTA step on its engine.

    Attributes:
        run_info: the run ``fit`` trains.
        static_terms: the terms of every step when the schedule draws none (rule T2).
        step_compiled: whether Keras compiles the whole step (``run_eagerly=False``), so it runs as one function.
        fixed_terms: the terms every step trains (the MLP's first group, :meth:`groups`).
        group_functions: the engine's compiled groups, by their terms.
        update_function: the engine's compiled sum of the groups' gradients and rule T4's update.
        snapshot: ``(ids of the variables, the engine's copy function)``, reused by every ``fit``.
    """

    def __init__(self, nested: NestedModel):
        super().__init__(name="matta_trainer", dtype=nested.compute_dtype_name)
        self.nested = nested
        self.run_info: Optional[TrainingRun] = None
        self.static_terms: Optional[tuple[Term, ...]] = None
        self.step_compiled = False  # whether Keras compiles the whole step (run_eagerly=False)
        # Set past Keras' attribute tracking, which would wrap the containers and walk the functions in them.
        object.__setattr__(self, "fixed_terms", frozenset())
        object.__setattr__(self, "group_functions", {})
        object.__setattr__(self, "update_function", None)
        object.__setattr__(self, "snapshot", ((), list))
        object.__setattr__(self, "planned", {})  # step -> terms, from the batch stream, until the step runs
        self.built = True

    def call(self, x):  # pragma: no cover - Keras asks for it; matta never calls the trainer
        raise NotImplementedError("the matta trainer is driven by fit(); use MatTA.predict for outputs")

    def train_step(self, *args):
        """Keras' step (``(data)``, or ``(state, data)`` under JAX): the engine module's ``train_step``."""
        return engine.current().train_step(self, *args)

    def forget_compiled(self) -> None:
        """Drops the compiled groups and update: they hold the optimizer, the loss options and the rate schedule."""
        self.group_functions.clear()
        object.__setattr__(self, "update_function", None)

    def terms(self, y) -> tuple[Term, ...]:
        """The terms of the step whose batch targets are ``y``: the static ones, else those the stream planned."""
        if self.static_terms is not None:
            return self.static_terms
        # Eager only (see the module docstring): the batch carries its step index.
        return self.planned.pop(int(np.asarray(ops.convert_to_numpy(y["step"]))[0]))

    def group_loss(self, x, y, terms: tuple[Term, ...], parents: Mapping[str, Any]):
        """``(total, parts, outputs)`` of ``terms`` on the batch ``(x, y)``, given outside parents' outputs."""
        run = self.run_info
        assert run is not None
        targets = Targets(hard=y.get("hard"), soft=y.get("soft"), regression=y.get("regression"))
        return step_outputs_and_loss(self.nested, x, targets, terms, y["distill"][0], run.options, parents)

    def loss_fn(self, x, y, terms: tuple[Term, ...], parents: Mapping[str, Any]) -> Callable[[], tuple[Any, Any]]:
        """``() -> (total, (parts, outputs))`` of :meth:`group_loss`, for an engine's ``value_and_grad``."""

        def fn():
            total, parts, outputs = self.group_loss(x, y, terms, parents)
            return total, (parts, outputs)

        return fn

    def groups(self, terms: tuple[Term, ...]) -> Optional[tuple[tuple[Term, ...], tuple[Term, ...]]]:
        """:meth:`split`, or ``None`` where Keras compiles the whole step (``run_eagerly=False``).

        A compiled function cannot call the groups' own compiled functions one after another.
        """
        return None if self.step_compiled else self.split(terms)

    def split(self, terms: tuple[Term, ...]) -> Optional[tuple[tuple[Term, ...], tuple[Term, ...]]]:
        """``(first group, later terms)``: the step's terms as groups run one after another, or ``None`` for one function.

        With rule L3's stop-gradient a term's loss reaches the weights only through its own
        output (its parent's output enters as a constant), so each group runs forward and
        backward on its own and frees its activations before the next one runs: the step holds
        one group's activations, not every term's (the torch backend's term-by-term backward).
        The first group holds the TA; each later term is a group of its own, in the plan's order
        (largest first, rule T1), so every parent ran in an earlier group. The Transformer's TA
        is a group alone. The MLP's first group is the TA with the Students every step trains:
        they share its first layer (:meth:`NestedModel.run_many`), and its activations are small
        next to its weights, so a static MLP plan stays one function.
        """
        run = self.run_info
        assert run is not None
        if not run.options.stop_gradient:
            return None
        if isinstance(self.nested.spec, MLP):
            first = tuple(t for t in terms if t in self.fixed_terms)
        else:
            first = terms[:1]
        names = {t.name for t in first}
        if TA not in names or any(t.parent is not None and t.parent not in names for t in first):
            return None
        later = tuple(t for t in terms if t not in first)
        return (first, later) if later else None

    def run_groups(self, run_group: Callable, first: tuple[Term, ...], later: tuple[Term, ...]):
        """``(parts, losses, gradients)``: the first group, then each later term, the gradients summed as they come.

        Each later term runs as a one-term group named ``_DRAWN`` whose parent is named
        ``_PARENT``, so that terms of the same granularity and weight (``mix0`` and ``mix1``, or a
        chain's Student under different parents) share one compiled function. The running sum
        of the gradients goes into each group, which adds its own (in place where the engine
        can): one gradient list is alive between groups, not one per group.

        Args:
            run_group: the engine's ``(terms, parents, gradients so far or None) -> (loss, parts, outputs, gradients)``.
        """
        loss, parts, outputs, grads = run_group(first, {}, None)
        parents = {t.parent for t in later}
        kept = {name: out for name, out in outputs.items() if name in parents}  # the outputs later terms distil from
        parts, losses = dict(parts), [loss]
        for term in later:
            one = Term(_DRAWN, term.granularity, term.weight, _PARENT)
            loss_t, parts_t, outputs_t, grads = run_group((one,), {_PARENT: kept[term.parent]}, grads)
            if term.name in parents:  # a chain's parent
                kept[term.name] = outputs_t[_DRAWN]
            parts[term.name] = parts_t[_DRAWN]
            losses.append(loss_t)
        return parts, losses, grads

    @staticmethod
    def logs(loss, parts, y, grads_ok):
        """The step's Keras logs: loss, parts, λ(t), step index and rule T4's gradient flag (read by the recorder)."""
        logs = {"loss": loss, "distill": y["distill"][0], "step": y["step"][0],
                "grads_finite": ops.cast(grads_ok, "int32")}
        logs.update({f"{k}_loss": v for k, v in parts.items()})
        return logs


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
        if step < self.run.done:  # TensorFlow's logs of a step counted already, when the stream ends early
            self._rewrite(logs)
            return
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
        self.run.applied(step)
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


class _Resumable(keras.callbacks.Callback):
    """Rule T4's undo and rule T7's checkpoints, as a Keras callback after the recorder.

    Before each step it copies the weights and the optimizer state (accessing ``self.model``
    brings JAX's state back to the variables first, as Keras' own ``ModelCheckpoint`` does);
    the copy from before the last good step is kept until the next step is known good, so a
    non-finite step can put back the weights from before the update before it. It costs up to
    two copies of the weights and the optimizer state.
    """

    def __init__(self, run: TrainingRun, recorder: _Recorder):
        super().__init__()
        self.run, self.recorder = run, recorder
        self.variables: tuple = ()  # what the copies are of, fixed for a fit (the optimizer is built first)
        self.previous: Optional[list] = None  # values before the last applied update
        self.current: Optional[list] = None  # values before the running step's update

    def on_train_begin(self, logs=None):
        trainer = self.model
        self.variables = (*trainer.trainable_variables, *trainer.non_trainable_variables, *trainer.optimizer.variables)
        key = tuple(map(id, self.variables))  # by identity: a Keras variable's == is elementwise
        if trainer.snapshot[0] != key:  # the engine's one-call copy of these variables, built once per trainer
            object.__setattr__(trainer, "snapshot", (key, engine.current().snapshot(self.variables)))

    def on_train_batch_begin(self, batch, logs=None):
        self.previous, self.current = self.current, self.model.snapshot[1]()

    def on_train_batch_end(self, batch, logs=None):
        # Every step: the variables then hold the steps counted done when an error stops fit.
        self.model  # noqa: B018 - brings JAX's state back to the variables
        if self.recorder.bad is None and self.run.done % self.run.steps_per_epoch != 0:
            self.run.save_checkpoint_if_due()

    def on_epoch_end(self, epoch, logs=None):
        if self.recorder.bad is None:  # after the recorder's epoch-end hook: the checkpoint holds its logs
            self.run.save_checkpoint_if_due()

    def undo(self) -> bool:
        """Puts back the copy from before the last applied update; whether there was one (rule T4)."""
        if self.previous is None:
            return False
        for v, value in zip(self.variables, self.previous):
            v.assign(value)
        self.previous = self.current = None
        return True


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


def _keras_batches(trainer: Trainer, run: TrainingRun, dtype: str, integer_inputs: bool, off_plan: list[int],
                   failures: list[Exception], start: int, stop: int) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """``run.batch_stream(start, stop)`` as Keras batches ``(x, y)``, ``y`` a dict of arrays (targets, ``distill`` λ(t), ``step``).

    A varying plan's terms wait in ``trainer.planned`` for their step. Under a static plan, a step
    that plans other terms ends the stream before it trains; its index goes to ``off_plan``. An
    error making a batch (a failing teacher callable) ends the stream too and goes to ``failures``,
    so that ``fit`` raises that same error, not the engine's wrapping of it.
    """
    stream = run.batch_stream(start, stop)
    while True:
        try:
            batch = next(stream)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - re-raised as itself by fit()
            failures.append(exc)
            trainer.stop_training = True  # else Keras starts the next epoch on the batches it peeked
            return
        terms = batch.plan.terms
        if trainer.static_terms is None:
            trainer.planned[batch.step] = terms
        elif terms != trainer.static_terms:
            off_plan.append(batch.step)
            trainer.stop_training = True
            return
        targets, n = batch.targets, len(batch.x)
        y = {"step": np.full((n,), batch.step, np.int32), "distill": np.full((n,), batch.plan.distill, dtype)}
        if targets.hard is not None:
            y["hard"] = targets.hard.astype(np.int32)
        if targets.soft is not None:
            y["soft"] = targets.soft.astype(dtype)
        if targets.regression is not None:
            y["regression"] = targets.regression.astype(dtype)
        yield (batch.x.astype(np.int32) if integer_inputs else batch.x.astype(dtype)), y


def _off_plan(run: TrainingRun, step: int, static: tuple[Term, ...]) -> OptionError:
    planned = [t.name for t in run.schedule.plan(step, run.steps).terms]
    return OptionError(
        f"sampling: step {step} plans the terms {planned}, but the schedule's static_terms() are "
        f"{[t.name for t in static]}, the terms the compiled step trains at every step (rule T2); "
        "a Schedule whose step_students() draws no Student must plan the same terms at every step"
    )


_FIT_OPTIONS = ("callbacks", "verbose", "run_eagerly", "jit_compile")


def fit(trainer: Trainer, run: TrainingRun, optimizer: keras.optimizers.Optimizer, integer_inputs: bool,
        **kwargs: Any) -> keras.callbacks.History:
    """Trains through ``trainer.fit`` and raises ``NonFiniteLossError`` (via ``run.record``) on a bad step.

    Raises:
        OptionError: a bad fit option, or a step of a static plan (rule T2) that plans other terms.
    """
    unknown = sorted(set(kwargs) - set(_FIT_OPTIONS))
    if unknown:
        raise OptionError(f"unknown fit option(s) for the keras backend: {unknown}; allowed: {list(_FIT_OPTIONS)}")
    callbacks = kwargs.get("callbacks") or []
    if not isinstance(callbacks, (list, tuple)) or not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise OptionError("callbacks must be a list of keras.callbacks.Callback")
    static = run.schedule.static_terms()
    if static is not None and run.schedule.plan(0, run.steps).terms != static:
        raise _off_plan(run, 0, static)
    trainer.run_info, trainer.static_terms = run, static
    object.__setattr__(trainer, "fixed_terms", frozenset(static) if static is not None else run.schedule.fixed_terms())
    # Keras compiles the step when every step is one function; a step of several groups runs them
    # eagerly, each compiled on its own (Trainer.split).
    run_eagerly = kwargs.get("run_eagerly", static is None or trainer.split(static) is not None)
    if not run_eagerly and static is None:
        raise OptionError("run_eagerly=False needs the same granularities at every step (sampling='all')")
    trainer.step_compiled = not run_eagerly
    trainer.planned.clear()
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
        trainer.forget_compiled()
    if not optimizer.built:
        optimizer.build(trainer.trainable_variables)
    engine.current().prepare_fit()
    recorder = _Recorder(run)
    resumable = _Resumable(run, recorder)
    spe = run.steps_per_epoch
    epochs = math.ceil(run.steps / spe)
    verbose = kwargs.get("verbose", "auto" if run.progress else 0)
    off_plan: list[int] = []
    failures: list[Exception] = []
    # Keras epochs are of one length: a run resumed inside an epoch (rule T7) trains the rest of it first.
    first = run.start // spe
    parts = [(first, first + 1, spe - run.start % spe, run.start, min((first + 1) * spe, run.steps))]
    if run.start % spe == 0 or parts[0][4] == run.steps:
        parts = [(first, epochs, spe, run.start, run.steps)]
    elif first + 1 < epochs:
        parts.append((first + 1, epochs, spe, (first + 1) * spe, run.steps))
    history = None
    with warnings.catch_warnings():
        # A run of `steps` that is not a whole number of epochs ends inside its last epoch, by design.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        for initial, end, per_epoch, start, stop in parts:
            if start >= stop:
                break
            history = trainer.fit(
                _keras_batches(trainer, run, trainer.nested.compute_dtype_name, integer_inputs, off_plan, failures,
                               start, stop),
                epochs=end, initial_epoch=initial, steps_per_epoch=per_epoch,
                callbacks=[recorder, resumable, *callbacks], verbose=verbose, shuffle=False,
            )
            if recorder.bad is not None or off_plan or failures or trainer.stop_training:
                break
    if recorder.bad is not None:
        step, loss, grads_ok = recorder.bad
        if resumable.undo():  # rule T4: the update before the bad step is undone too
            run.undone()
        run.record(step, loss)  # raises NonFiniteLossError on a non-finite loss
        run.check_gradients(step, grads_ok)  # else the gradient was the problem: raises too
    if failures:
        raise failures[0]
    if off_plan:
        assert static is not None
        raise _off_plan(run, off_plan[0], static)
    return history
