"""Data-parallel and sharded training with ``torch.distributed`` (DDP, FSDP2).

A script that calls ``MatTA(...).fit(...)`` trains data-parallel when it runs
under ``torchrun`` (or in a process group the script initialised): :func:`setup`
finds the launcher's environment, initialises the process group if needed (gloo
on CPU, NCCL on CUDA) and returns a :class:`Group`. The global batch of every
step is the run's batch; each rank takes its contiguous share (``batch_size`` is
the global batch), its mean loss is weighted by its share, and the framework
averages the gradients, so N processes follow the optimisation of one.

* ``"ddp"``: ``DistributedDataParallel``, without ``find_unused_parameters``:
  every step plan holds the TA term, which reads every parameter.
* ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``): each Transformer
  block is its own unit and the rest of the model (embeddings, final norm,
  head; an MLP's layers) the root's, so parameters, gradients and optimizer
  state are sharded at rest and a block's parameters are gathered only while
  that block runs (the nested forward calls each block's module).

Rank 0 alone shows progress and keeps the history; every rank ends with the
same weights. The non-finite guard (rule T4) sees the all-reduced loss and an
all-reduced gradient flag, so all ranks stop together.
"""

from __future__ import annotations

import copy
import gc
import os
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from matta.errors import OptionError, choice
from matta.losses import Targets
from matta.nesting import Granularity
from matta.training import Batch, TrainingRun

__all__ = ["STRATEGIES", "Group", "check_strategy", "launched", "local_device", "setup"]

#: The values of the ``distributed`` fit option.
STRATEGIES = ("auto", "ddp", "fsdp", None)

_LAUNCHER = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_strategy(distributed: Any) -> Optional[str]:
    """The ``distributed`` option, checked before any framework call."""
    return choice("distributed", distributed, STRATEGIES)


def launched() -> bool:
    """Whether this process is one of several: an initialised group, or a launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return all(k in os.environ for k in _LAUNCHER) and int(os.environ["WORLD_SIZE"]) > 1


def local_device() -> Optional[str]:
    """``cuda:<LOCAL_RANK>`` when a launcher started this process on a CUDA machine, else ``None``."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return None


class _Terms(nn.Module):
    """The nested model as one ``forward(x) -> outputs`` call, so DDP's and FSDP's forward hooks run.

    The granularities are set before each call (not passed as arguments, so nothing
    tries to move them to a device).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.granularities: Sequence[Granularity] = ()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_many(x, list(self.granularities))


@dataclass
class Group:
    """The process group one ``fit`` trains over, and its strategy."""

    strategy: str
    rank: int
    world_size: int
    wrapped: Any = None
    _source: Optional[nn.Module] = None

    @property
    def primary(self) -> bool:
        """Rank 0: the one process that shows progress, keeps the history and writes files."""
        return self.rank == 0

    def check_batches(self, run: TrainingRun) -> None:
        """Every rank needs at least one example of every batch: ``batch_size`` divisible by the world size."""
        n, b, w = len(run.x), run.batch_size, self.world_size
        if b % w:
            raise OptionError(f"batch_size must be divisible by the number of processes {w}; got {b}")
        if 0 < n % b < w:
            raise OptionError(
                f"the last batch of each epoch has {n % b} example(s), fewer than the {w} processes; "
                f"choose batch_size so that len(x) % batch_size is 0 or >= {w} (len(x) = {n})"
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the step runs: DDP over ``model``, or an FSDP2-sharded copy of it."""
        terms = _Terms(model)
        if self.strategy == "ddp":
            self.wrapped = nn.parallel.DistributedDataParallel(terms)
        else:
            from torch.distributed.fsdp import fully_shard

            self._source = model
            sharded = copy.deepcopy(model)
            for block in getattr(sharded, "blocks", ()):  # a Transformer's blocks, one unit each
                fully_shard(block)
            self.wrapped = fully_shard(_Terms(sharded))
        return self.wrapped

    def outputs(self, x: torch.Tensor, granularities: Sequence[Granularity]) -> list[torch.Tensor]:
        """Every term's output on this rank's share of the batch."""
        inner = self.wrapped.module if self.strategy == "ddp" else self.wrapped
        inner.granularities = granularities
        return self.wrapped(x)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (the sharded ones under FSDP)."""
        return list(self.wrapped.parameters())

    def shard(self, batch: Batch) -> tuple[Batch, float]:
        """This rank's contiguous share of ``batch`` and its weight ``world_size * share / batch``.

        The weight makes the framework's gradient average the global batch's mean: it is
        exactly 1 for equal shares.
        """
        n = len(batch.x)
        bounds = np.linspace(0, n, self.world_size + 1).round().astype(int)
        part = slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))
        cut = lambda a: None if a is None else a[part]  # noqa: E731
        targets = Targets(hard=cut(batch.targets.hard), soft=cut(batch.targets.soft),
                          regression=cut(batch.targets.regression))
        share = part.stop - part.start
        return replace(batch, x=batch.x[part], targets=targets), self.world_size * share / n

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The average over ranks of ``values`` (each rank's weighted share: the global batch's value)."""
        out = values.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def all_finite(self, finite: bool, device: torch.device) -> bool:
        """True only if ``finite`` is true on every rank (one all-reduce, so no rank waits on another)."""
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def finish(self) -> None:
        """Copies the trained weights back into the plain model on every rank (FSDP gathers its shards), then lets go of the wrapper."""
        if self.strategy == "fsdp" and self._source is not None:
            full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                    for k, v in self.wrapped.model.state_dict().items()}
            with torch.no_grad():
                for k, v in self._source.state_dict().items():
                    v.copy_(full[k])
        self.wrapped = None
        self._source = None
        # A DDP backward leaves reference cycles that hold gloo's finished work objects. Left to the
        # interpreter's exit, freeing them aborts the process about one launch in three here
        # ("terminate called without an active exception"); collected now, the process exits cleanly.
        gc.collect()


def setup(distributed: Optional[str], device: torch.device) -> Optional[Group]:
    """The :class:`Group` a fit trains over, or ``None`` to train in this process alone.

    ``"auto"`` is DDP when launched as one of several processes, else ``None``;
    ``"ddp"`` and ``"fsdp"`` need such a launch (``torchrun --nproc_per_node=N``).
    """
    strategy = check_strategy(distributed)
    if strategy is None:
        return None
    if not launched():
        if strategy == "auto":
            return None
        raise OptionError(
            f"distributed={strategy!r} needs several processes: launch the script with "
            "`torchrun --nproc_per_node=N script.py` or initialise a torch.distributed process group"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Group("ddp" if strategy == "auto" else strategy, dist.get_rank(), dist.get_world_size())
