"""Training checkpoints (rule T7): what a checkpoint holds, writing one, choosing the newest valid one, pruning.

A checkpoint is one save folder ``DIR/step-000000120/`` of kind ``matta.checkpoint/1``
(:mod:`matta.saving`'s atomic mechanism: a folder appears whole or not at all,
every file checked against ``manifest.json``), holding:

* ``weights.safetensors``: the TA's weights (rule P2 layout);
* ``optimizer.safetensors``: the optimizer's floating-point state tensors, by the
  backend's names (:meth:`matta.backend.Backend.get_optimizer_state`);
* ``state.json``: the step, the run's configuration (what a resumed run must
  match), the history so far, and the optimizer's integer state as JSON numbers.

Nothing else is needed to resume exactly: the batch order of a fit is a function
of its seed and the step (:func:`matta.training.batch_indices`), the step plan of
the schedule's seed and the step (rule T1), and the learning rate of the step
(rule T6). Nothing is pickled.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from matta import saving
from matta.errors import FormatError, OptionError

__all__ = ["Checkpoint", "CheckpointWarning", "folder_name", "write", "read", "newest", "prune", "check_match"]

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "matta.checkpoint-state/1"
_NAME = re.compile(r"^step-(\d{9})$")
_FLOATS = ("float32", "float64")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is damaged (the previous one is used)."""


@dataclass
class Checkpoint:
    """One checkpoint read back.

    Attributes:
        path: its folder.
        step: steps of the fit done when it was written.
        state: ``state.json`` (``config``, ``history``, ``epoch_logs``, ``fits``, …).
        weights: the TA's weights.
        optimizer: the optimizer's state tensors, by the backend's names.
    """

    path: str
    step: int
    state: dict[str, Any]
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]


def folder_name(step: int) -> str:
    """``step-000000120``: names sort in step order."""
    return f"step-{int(step):09d}"


def write(directory: str, step: int, state: Mapping[str, Any], weights: Mapping[str, np.ndarray],
          optimizer: Mapping[str, np.ndarray], keep: int) -> str:
    """Writes checkpoint ``step`` into ``directory`` atomically, then keeps only the ``keep`` newest.

    Floating-point optimizer tensors go to ``optimizer.safetensors``, the others
    (step counters) to ``state.json`` as JSON numbers.

    Returns:
        The checkpoint's folder.

    Raises:
        SaveError: writing failed (e.g. a full disk); the earlier checkpoints are unchanged.
    """
    tensors = {k: v for k, v in optimizer.items() if np.asarray(v).dtype.name in _FLOATS}
    scalars = {k: {"dtype": np.asarray(v).dtype.name, "shape": list(np.shape(v)), "values": np.asarray(v).ravel().tolist()}
               for k, v in optimizer.items() if k not in tensors}
    target = os.path.join(directory, folder_name(step))
    # The folder of a step is the run's own: a damaged one of an earlier try is replaced.
    with saving.atomic_save(target, kind=saving.CHECKPOINT_FORMAT, overwrite=True) as folder:
        folder.write_json(STATE_FILE, {**state, "format": STATE_FORMAT, "step": int(step), "optimizer_scalars": scalars})
        folder.write_weights(saving.WEIGHTS_FILE, weights)
        folder.write_weights(OPTIMIZER_FILE, tensors)
    prune(directory, keep, step)
    return target


def read(path: str, spec_dict: Mapping[str, Any]) -> Checkpoint:
    """Reads and verifies one checkpoint folder.

    Raises:
        FormatError: a missing, truncated or damaged file (size or SHA-256 mismatch).
    """
    folder = saving.open_save(path)
    folder.expect(saving.CHECKPOINT_FORMAT)
    state = folder.read_json(STATE_FILE)
    if state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise FormatError(f"{path}: {STATE_FILE} has format {state.get('format')!r}; this matta reads {STATE_FORMAT!r}")
    _, weights = folder.read_weights(saving.WEIGHTS_FILE, dict(spec_dict))
    optimizer = folder.read_tensors(OPTIMIZER_FILE)
    scalars = state.get("optimizer_scalars")
    if not isinstance(scalars, dict):
        raise FormatError(f"{path}: {STATE_FILE} optimizer_scalars must be an object")
    for key, entry in scalars.items():
        try:
            optimizer[key] = np.asarray(entry["values"], dtype=entry["dtype"]).reshape(entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: {STATE_FILE} optimizer_scalars[{key!r}] is invalid: {exc}") from None
    folder.verify_rest()
    return Checkpoint(path, state["step"], state, weights, optimizer)


def _steps(directory: str) -> list[tuple[int, str]]:
    """``(step, folder)`` of every checkpoint-named folder in ``directory``, newest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name)) for name in os.listdir(directory)
             if (m := _NAME.match(name))]
    return sorted(found, reverse=True)


def newest(directory: str, spec_dict: Mapping[str, Any]) -> Optional[Checkpoint]:
    """The newest checkpoint in ``directory`` that reads back whole, or ``None`` if there is none.

    A damaged newer checkpoint (truncated, checksum mismatch) is skipped with a
    :class:`CheckpointWarning` naming it and the reason.
    """
    for _, path in _steps(directory):
        try:
            return read(path, spec_dict)
        except FormatError as exc:
            warnings.warn(f"skipping the damaged checkpoint {path}: {exc}", CheckpointWarning, stacklevel=3)
    return None


def prune(directory: str, keep: int, newest_step: int) -> None:
    """Keeps the ``keep`` newest checkpoints of ``directory`` up to ``newest_step``; removes the others.

    Checkpoints past ``newest_step`` are of a run that went on from an older point since
    (a resume past a damaged checkpoint, or the undo of rule T4): they are removed too.
    """
    found = _steps(directory)
    later = [path for step, path in found if step > newest_step]
    for path in later + [path for step, path in found if step <= newest_step][keep:]:
        shutil.rmtree(path, ignore_errors=True)


def check_match(checkpoint: Checkpoint, config: Mapping[str, Any]) -> None:
    """Raises :class:`OptionError` unless the run being resumed is configured as the checkpoint's.

    Args:
        config: the resuming run's configuration, as :meth:`matta.MatTA.fit` records it.
    """
    saved = checkpoint.state.get("config")
    if not isinstance(saved, dict):
        raise FormatError(f"{checkpoint.path}: {STATE_FILE} has no config object")
    differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {config.get(k)!r}" for k in differ[:4])
        raise OptionError(
            f"resume=True: the checkpoint {checkpoint.path} was written by a run configured differently "
            f"({', '.join(differ)} differ: {detail}); build the MatTA and call fit() as that run did, or use another checkpoint_dir"
        )
