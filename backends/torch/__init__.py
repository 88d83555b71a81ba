"""The PyTorch backend of matta (``backend="torch"``).

Implements :class:`matta.backend.Backend` with the modules of
:mod:`matta.backends.torch.modules`. Weights cross into the core as numpy in
rule P2 layout; PyTorch's ``(out, in)`` kernels are transposed on the way.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matta.backend import FRAMEWORK_PACKAGES, Backend
from matta.errors import BackendError, NonFiniteLossError, OptionError, choice
from matta.losses import LossOptions, StepPlan, Targets, composite_loss
from matta.nesting import Granularity
from matta.specs import MLP, Spec
from matta.training import TrainingRun
from matta.backends.torch.distributed import local_device
from matta.backends.torch.distributed import setup as distributed_setup
from matta.backends.torch.modules import NestedTransformer, nested_module, plain_module, torch_name

__all__ = ["TorchBackend", "TorchOps", "backend"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchOps:
    """:class:`matta.losses.Ops` in PyTorch."""

    def log_softmax(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(x, dim=-1)

    def stop_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean()

    def sum_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=-1)

    def take_last(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, -1, ids.unsqueeze(-1)).squeeze(-1)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)

    def square(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(x)


OPS = TorchOps()


def _device(device: Optional[str]) -> torch.device:
    if device is None:
        # Under a launcher each process takes its own GPU.
        return torch.device(local_device() or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise OptionError(f"device must be a torch device string such as 'cpu' or 'cuda:0'; got {device!r}") from exc


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class TorchBackend(Backend):
    """matta's PyTorch backend (see :class:`matta.backend.Backend` for the contract)."""

    name = "torch"

    # -------------------------------------------------------------- weights
    def _load(self, module: nn.Module, spec: Spec, weights: Mapping[str, np.ndarray], device: torch.device) -> nn.Module:
        dtype = _DTYPES[next(iter(weights.values())).dtype.name]
        module = module.to_empty(device=device).to(dtype)
        self.set_weights(module, weights)
        module.eval()  # no dropout or batch statistics anywhere: train/eval modes compute the same
        return module

    def get_weights(self, model: nn.Module) -> dict[str, np.ndarray]:
        state = model.state_dict()
        out = {}
        for name in model.spec_parameters():  # type: ignore[operator]
            key, transposed = torch_name(name)
            t = state[key].detach()
            out[name] = (t.T if transposed else t).cpu().numpy().copy()
        return out

    def set_weights(self, model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
        state = model.state_dict()
        with torch.no_grad():
            for name, value in weights.items():
                key, transposed = torch_name(name)
                t = torch.from_numpy(np.ascontiguousarray(value))
                state[key].copy_(t.T if transposed else t)

    # -------------------------------------------------------------- nested model
    def build(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> nn.Module:
        module = nested_module(spec)
        _attach_spec(module, spec)
        return self._load(module, spec, weights, _device(device))

    def _input(self, model: nn.Module, x: np.ndarray) -> torch.Tensor:
        device = _model_device(model)
        if np.issubdtype(x.dtype, np.integer):
            return torch.as_tensor(x, dtype=torch.long, device=device)
        return torch.as_tensor(x, device=device).to(_model_dtype(model))

    def forward(self, model: nn.Module, x: np.ndarray, granularity: Granularity) -> np.ndarray:
        with torch.no_grad():
            return model(self._input(model, x), granularity).cpu().numpy()

    def forward_many(self, model: nn.Module, x: np.ndarray, granularities: Sequence[Granularity]) -> list[np.ndarray]:
        """One ``forward_many`` call: the nested MLP computes its first layer once for every granularity."""
        with torch.no_grad():
            return [out.cpu().numpy() for out in model.forward_many(self._input(model, x), list(granularities))]

    def _targets(self, model: nn.Module, targets: Targets[np.ndarray]) -> Targets[torch.Tensor]:
        device, dtype = _model_device(model), _model_dtype(model)
        convert = lambda a, dt: None if a is None else torch.as_tensor(a, device=device).to(dt)  # noqa: E731
        return Targets(
            hard=convert(targets.hard, torch.long),
            soft=convert(targets.soft, dtype),
            regression=convert(targets.regression, dtype),
        )

    def _loss(self, model: nn.Module, x: torch.Tensor, targets: Targets[torch.Tensor], plan: StepPlan,
              options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # One call for every term: the nested MLP shares its first layer across them (same math).
        outputs = dict(zip((t.name for t in plan.terms), model.forward_many(x, [t.granularity for t in plan.terms])))
        return composite_loss(OPS, outputs, targets, plan, options)

    def loss_and_gradients(self, model: nn.Module, x: np.ndarray, targets: Targets[np.ndarray], plan: StepPlan,
                           options: LossOptions) -> tuple[float, dict[str, np.ndarray]]:
        model.zero_grad(set_to_none=True)
        loss, _ = self._loss(model, self._input(model, x), self._targets(model, targets), plan, options)
        loss.backward()
        params = dict(model.named_parameters())
        grads = {}
        for name in model.spec_parameters():  # type: ignore[operator]
            key, transposed = torch_name(name)
            g = params[key].grad
            g = torch.zeros_like(params[key]) if g is None else g
            grads[name] = (g.T if transposed else g).detach().cpu().numpy().copy()
        model.zero_grad(set_to_none=True)
        return float(loss.item()), grads

    def _optimizer(self, model: nn.Module, optimizer: Any, learning_rate: float, weight_decay: float):
        cached = getattr(model, "_matta_optimizer", None)
        if cached is not None and cached[0] is optimizer:
            return cached[1]
        params = list(model.parameters())
        if optimizer is None:
            opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        elif isinstance(optimizer, torch.optim.Optimizer):
            owned = {id(p) for p in params}
            if not all(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
                raise OptionError("optimizer was built over other parameters; pass an optimizer class or a callable(params)")
            opt = optimizer
        elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            kwargs = {"lr": learning_rate}
            if weight_decay:
                kwargs["weight_decay"] = weight_decay
            opt = optimizer(params, **kwargs)
        elif callable(optimizer):
            opt = optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise OptionError(f"optimizer(params) must return a torch.optim.Optimizer; got {type(opt).__name__}")
        else:
            raise OptionError(
                "optimizer must be None (AdamW), a torch.optim.Optimizer class, an optimizer over this model's "
                f"parameters, or a callable(params) -> optimizer; got {optimizer!r}"
            )
        model._matta_optimizer = (optimizer, opt)  # keeps optimizer state across fit() calls
        return opt

    def backward(self, model: nn.Module, x: torch.Tensor, targets: Targets[torch.Tensor], plan: StepPlan,
                 options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's loss and its gradients in ``.grad``, one term's graph alive at a time.

        With stop-gradient on (rule L3), a term's loss reaches the parameters only through
        its own output: the parents enter as constants. So each term runs forward and
        backward on its own (largest first, rule T1, so every parent's output is ready) and
        its activations are freed before the next term's forward. The gradients are the sum
        of the terms', the one-backward step's up to float rounding. With stop-gradient off a
        parent's graph is needed by its children, and the step is one backward.

        Returns:
            ``(loss, parts)``, detached.
        """
        if not options.stop_gradient:
            loss, parts = self._loss(model, x, targets, plan, options)
            loss.backward()
            return loss.detach(), {k: v.detach() for k, v in parts.items()}
        parents = {t.parent for t in plan.terms if t.parent is not None}
        constants: dict[str, torch.Tensor] = {}
        total, parts = None, {}
        for term in plan.terms:
            z = model(x, term.granularity)
            outputs = {term.name: z}
            if term.parent is not None:
                outputs[term.parent] = constants[term.parent]
            value, _ = composite_loss(OPS, outputs, targets, StepPlan(plan.step, (term,), plan.distill), options)
            value.backward()
            if term.name in parents:
                constants[term.name] = z.detach()
            parts[term.name] = value.detach()
            total = parts[term.name] if total is None else total + parts[term.name]
        return total, parts

    def fit(self, model: nn.Module, run: TrainingRun, *, optimizer: Any = None, learning_rate: float = 1e-3,
            weight_decay: float = 0.0, distributed: Optional[str] = "auto", recompute_blocks: bool = False,
            **kwargs: Any) -> None:
        """Trains ``model`` on ``run``; ``distributed`` is ``"auto"``, ``"ddp"``, ``"fsdp"`` or ``None``.

        See :mod:`matta.backends.torch.distributed` for what training over several processes does.
        ``recompute_blocks=True`` (a Transformer) keeps only each block's input for the backward
        pass and recomputes the block there: less memory for long sequences, one more forward.
        """
        if kwargs:
            raise OptionError(f"unknown fit option(s) for the torch backend: {sorted(kwargs)}")
        choice("recompute_blocks", recompute_blocks, (True, False), OptionError)
        if recompute_blocks and not isinstance(model, NestedTransformer):
            raise OptionError("recompute_blocks=True recomputes a Transformer's residual blocks; an MLP has none "
                              "(allowed for an MLP: False)")
        if isinstance(model, NestedTransformer):
            model.recompute_blocks = recompute_blocks  # for this fit (and the copy FSDP shards)
        group = distributed_setup(distributed, _model_device(model))
        if group is not None:
            group.check_batches(run)
            run.progress = run.progress and group.primary
            group.wrap(model)
        opt = self._optimizer(model if group is None or group.strategy == "ddp" else group.wrapped, optimizer,
                              learning_rate, weight_decay)
        if run.optimizer_state is not None:
            self.set_optimizer_state(model, run.optimizer_state)
        # Rule T6 scales every parameter group's own rate; the rates are put back after the run.
        base_rates = [param_group["lr"] for param_group in opt.param_groups]
        params = list(model.parameters()) if group is None else group.parameters()
        undo = _Undo(model, opt)
        model.train()
        try:
            for batch in run.batches():
                if run.schedules_learning_rate:
                    scale = run.learning_rate_scale(batch.step)
                    for param_group, rate in zip(opt.param_groups, base_rates):
                        param_group["lr"] = rate * scale
                opt.zero_grad(set_to_none=True)
                if group is None:
                    x, targets = self._input(model, batch.x), self._targets(model, batch.targets)
                    loss, parts = self.backward(model, x, targets, batch.plan, run.options)
                else:
                    loss, parts = self._distributed_step(model, group, batch, run.options)
                # Rule T4: check before the update, so a NaN leaves the last good weights.
                run.record(batch.step, loss.item(), {k: v.item() for k, v in parts.items()}, batch.plan.distill)
                grads = [p.grad for p in params if p.grad is not None]
                # One fused (foreach) norm and one host sync per step: cheap next to the backward pass.
                finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
                if group is not None:
                    finite = group.all_finite(finite, _model_device(model))
                run.check_gradients(batch.step, finite)
                undo.before_update()
                opt.step()
                undo.after_update()
                run.applied(batch.step)
        except BaseException as exc:
            undo.on_error(run, exc)
            raise
        finally:
            for param_group, rate in zip(opt.param_groups, base_rates):
                param_group["lr"] = rate
            if group is not None:
                group.finish()
                if not group.primary:
                    run.history.clear()
                    run.epoch_logs.clear()
            if isinstance(model, NestedTransformer):
                model.recompute_blocks = False
            model.eval()

    # -------------------------------------------------------------- optimizer state (rule T7)
    def get_optimizer_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        """``state/<parameter index>/<key>`` for each tensor of ``optimizer.state_dict()``, ``number/…`` for each number."""
        cached = getattr(model, "_matta_optimizer", None)
        if cached is None:
            return {}
        out = {}
        for index, entries in cached[1].state_dict()["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    out[f"state/{index}/{key}"] = value.detach().cpu().numpy().copy()
                else:
                    out[f"number/{index}/{key}"] = np.asarray(value)
        return out

    def set_optimizer_state(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        """Loads :meth:`get_optimizer_state`'s tensors into the optimizer ``fit`` made; the parameter groups stay its own."""
        cached = getattr(model, "_matta_optimizer", None)
        if cached is None:
            raise BackendError("the torch model has no optimizer yet: set_optimizer_state runs inside fit()")
        opt = cached[1]
        entries: dict[int, dict[str, Any]] = {}
        for name, value in state.items():
            kind, index, key = (name.split("/", 2) + ["", ""])[:3]
            if kind not in ("state", "number") or not index.isdigit() or not key:
                raise BackendError(f"optimizer state names must be state/<index>/<key> or number/<index>/<key>; got {name!r}")
            entries.setdefault(int(index), {})[key] = torch.from_numpy(np.array(value)) if kind == "state" else value.item()
        current = opt.state_dict()
        try:
            opt.load_state_dict({"state": entries, "param_groups": current["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise BackendError(f"the optimizer state does not fit this optimizer: {exc}") from exc

    def _distributed_step(self, model: nn.Module, group: Any, batch: Any,
                          options: LossOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's share of one step, one backward (the framework averages the gradients).

        Returns the global batch's loss and parts (all-reduced), so every rank's guard sees the same value.
        """
        batch, weight = group.shard(batch)
        targets = self._targets(model, batch.targets)
        terms = batch.plan.terms
        outputs = dict(zip((t.name for t in terms), group.outputs(self._input(model, batch.x),
                                                                  [t.granularity for t in terms])))
        loss, parts = composite_loss(OPS, outputs, targets, batch.plan, options)
        (loss * weight if weight != 1 else loss).backward()
        names = list(parts)
        reduced = group.mean(torch.stack([loss.detach(), *(parts[k].detach() for k in names)]) * weight)
        return reduced[0], dict(zip(names, reduced[1:]))

    # -------------------------------------------------------------- plain models
    def build_plain(self, spec: Spec, weights: Mapping[str, np.ndarray], *, device: Optional[str] = None) -> nn.Module:
        module = plain_module(spec)
        _attach_spec(module, spec)
        return self._load(module, spec, weights, _device(device))

    def plain_forward(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(self._input(model, x)).cpu().numpy()

    def serving(self, model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        """The plain module itself under ``torch.inference_mode``: the same kernels as :meth:`plain_forward`.

        The ``torch.export`` program of :meth:`export` computes the same bits but runs about twice as
        slow on small models (docs/benchmarks.md), so serving stays on the module.
        """
        def serve(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(self._input(model, x)).cpu().numpy()

        return serve

    def export(self, model: nn.Module, spec: Spec, directory: str) -> list[str]:
        """Writes ``model.pt2``: a ``torch.export`` program that loads with ``torch.export.load`` alone."""
        device = _model_device(model)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        if isinstance(spec, MLP):
            example = (torch.zeros(2, spec.d_in, dtype=_model_dtype(model), device=device),)
            dynamic = ({0: batch},)
        else:
            t = min(spec.max_len, 4)
            example = (torch.zeros(2, t, dtype=torch.long, device=device),)
            dynamic = ({0: batch, 1: torch.export.Dim("time", min=1, max=spec.max_len)},)
        program = torch.export.export(model, example, dynamic_shapes=dynamic)
        torch.export.save(program, os.path.join(directory, "model.pt2"))
        return ["model.pt2"]

    def export_loader(self, directory: str) -> str:
        """Loads ``model.pt2`` with ``torch.export.load`` alone."""
        return (
            "import numpy as np, torch\n"
            f"_program = torch.export.load({os.path.join(directory, 'model.pt2')!r}).module()\n"
            "def predict(x):\n"
            "    with torch.no_grad():\n"
            "        return _program(torch.as_tensor(x)).numpy()\n"
        )

    def model_packages(self) -> tuple[str, ...]:
        return FRAMEWORK_PACKAGES["torch"]


class _Undo:
    """Rule T4: a copy of the weights and optimizer state from before the last update, put back when a step fails.

    Costs one copy of the parameters and of the optimizer state on the model's device.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.params = list(model.parameters())
        self.opt = opt
        self.saved: Optional[tuple[list[torch.Tensor], dict]] = None
        self.pending = False  # inside an update: an error there leaves the step before it

    def before_update(self) -> None:
        with torch.no_grad():
            state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.opt.state[p].items()}
                     for p in self.params if p in self.opt.state}
            self.saved = ([p.detach().clone() for p in self.params], state)
        self.pending = True

    def after_update(self) -> None:
        self.pending = False

    def on_error(self, run: TrainingRun, exc: BaseException) -> None:
        """Puts back the copy after a failed update, or (non-finite step) undoes the last update."""
        if self.saved is None or not (self.pending or isinstance(exc, NonFiniteLossError)):
            return
        weights, state = self.saved
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w)
        self.opt.state.clear()
        self.opt.state.update(state)
        if not self.pending:
            run.undone()
        self.saved, self.pending = None, False


def _attach_spec(module: nn.Module, spec: Spec) -> None:
    names = tuple(spec.parameters())
    # A plain function attribute, not a method: keeps the module picklable-free and export-clean.
    object.__setattr__(module, "spec_parameters", lambda: names)


def set_num_threads(n: int) -> None:
    """Caps torch's intra-op (and, when still allowed, inter-op) thread pools at ``n``."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; the intra-op cap is what matters
        pass


backend = TorchBackend()
