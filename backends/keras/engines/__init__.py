"""One module per Keras engine: what cannot be written once over ``keras.ops``.

:func:`matta.backends.keras.engine.current` imports the module of the engine Keras
runs on (``KERAS_BACKEND``); each imports its framework at the top, so no other
engine's framework is imported. Every module has the same members:

* ``value_and_grad(variables, fn)``: ``fn() -> (scalar, aux)``, evaluated with its
  gradient for ``variables`` (zeros where unused): the engine's one gradient path,
  used by its ``train_step`` and by ``KerasBackend.loss_and_gradients``;
* ``grads_finite(grads)``: rule T4's gradient check;
* ``apply_if_finite(...)``: rule T4's conditional update;
* ``train_step(trainer, ...)``: Keras' custom train step of
  :class:`matta.backends.keras.training.Trainer`, with the engine's compiled groups
  for varying plans;
* ``prepare_fit()``: what the engine needs once before ``fit`` runs.

plus the engine's own helpers (torch: ``prefix_reads``; JAX: ``reuse_step_memory``).
"""
