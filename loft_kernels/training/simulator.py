"""LoftSimulator: S LoFT workers in one process, for one device.

Each worker is a compact sub-model with its own `LoftOptimizer` (same
partition rule, same stepping as distributed rank r), so simulated worker r
owns exactly the filters of distributed rank r. The workers' partitioned
tensors are cut from one set of full-size masters, the simulator's `model`,
and written back into it at the sync; the shared layers are each worker's own
copy. Memory: the full model, S sub-models (each 1/S of the partitioned
tensors plus its copy of the shared ones) and, during a step, every worker's gradients.
With `execution="loop"` the workers' forwards and backwards run one after
another; with `execution="batched"` all of them run through one network on
stacked activations (`batched.py`), and the workers' optimizers then step as
in the loop.

Each worker's optimizer is given, explicitly, the simulator's in-process
exchange and the shared masters; a sync calls every worker's public
`LoftOptimizer.sync()` (each on its own thread, meeting in the exchange,
which combines the buffers in process: sum / S, max); `comm_stats()` reports
what one rank of the distributed run would have sent.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import _checks as C
from ..filter_group import FilterGroup
from ..nn.layers import clear_active_sets
from . import batched
from . import execution_choice as choice
from .comm import STATES, make_plan
from .exchange import InProcessExchange
from .optimizer import LoftOptimizer
from .optimizer_checks import check_training_groups
from .sim_model import ConvertWorkers, LoadIntoWorkers, plain_method

EXECUTIONS = ("loop", "batched", "auto")


class LoftSimulator:
    """S LoFT workers simulated in one process.

    Args:
        model: the model (any nn.Module); it becomes `sim.model`, the full model as of
            the last sync. `sim.model.double()`, `.to(...)` convert every worker with it;
            `sim.model.load_state_dict(sd)` restarts every worker's round from `sd` (their
            optimizer state is kept). Editing its tensors in place (`nn.init`, `p.data[...] = `)
            does not reach the workers: load a state dict instead. A copy or pickle of
            `sim.model` is a plain model, without the simulator.
        groups: the filter groups to partition; each needs n >= workers.
        optimizer_factory: called with a worker model's parameter list, returns an
            elementwise torch optimizer, e.g. `functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)`.
        workers, sync_every, seed, state: as for `LoftOptimizer`.
        execution: "loop" runs the workers' forwards and backwards one after another;
            "batched" runs all of them through one network on worker-major stacked
            activations (`training/batched.py`; VGG / ResNet / WideResNet without dropout,
            other models are refused). Both give the same workers' gradients and steps.
            "auto" (the default) runs the batched network with each convolution in the form
            measured faster for its shape (`training/execution_choice.py`), but only for a
            batch shape on which its gradients matched the loop's and its whole step measured
            faster; otherwise, and for a model the batched network cannot run, the loop
            (on a 2-core CPU: the loop, as measured).

    `step(batches, loss_fn)` runs one local step on every worker (worker s on
    batches[s]) and syncs after every `sync_every`-th step; the workers follow
    `model.training` (call `sim.model.train()` / `.eval()`).
    """

    def __init__(self, model: nn.Module, groups: Sequence[FilterGroup], optimizer_factory: Callable,
                 workers: int = 4, sync_every: int = 15, seed: int = 0, state: str = "reset",
                 execution: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(optimizer_factory):
            raise TypeError(f"optimizer_factory must be callable (params -> torch.optim.Optimizer), "
                            f"got {type(optimizer_factory).__name__}")
        workers = C.positive_int(workers, "workers")
        C.positive_int(sync_every, "sync_every")
        if not isinstance(state, str) or state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        if not isinstance(execution, str) or execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        unsupported = None if execution == "loop" else batched.unsupported(model)
        if execution == "batched" and unsupported is not None:
            raise ValueError(f"execution='batched' cannot run this model: {unsupported}; use execution='loop'")
        groups = check_training_groups(model, groups, workers)
        clear_active_sets(model)
        self.model = model
        self._plan = make_plan(model, groups, workers)
        tensors = self._plan.tensors(model)
        masters = {s.name: tensors[s.name] for s in self._plan.slots} if workers > 1 else {}
        self._checked: set = set()  # batch signatures that passed the dry run
        self.worker_models: list[nn.Module] = []
        self.optimizers: list[LoftOptimizer] = []
        self._exchange = InProcessExchange(workers)
        for s in range(workers):
            m = _copy_without(model, masters.values())
            base = optimizer_factory(list(m.parameters()))
            if not isinstance(base, torch.optim.Optimizer):
                raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(base).__name__}")
            opt = LoftOptimizer(base, m, groups, sync_every, seed, state, exchange=self._exchange.rank(s),
                                masters=masters or None, auto_sync=False)
            self.worker_models.append(m)
            self.optimizers.append(opt)
        self._attach()
        self.execution = execution
        self._batched = None
        if execution != "loop" and unsupported is None:
            self._batched = batched.BatchedWorkers(self.worker_models, auto=execution == "auto")
        self._loop_signatures: set = set()  # auto: batch signatures on which the loop measured faster
        self._decided: set = set()

    def _attach(self) -> None:
        # `sim.model.to(...)` / `.load_state_dict(...)` reach every worker. A copy or pickle of the model alone
        # drops these methods; a copy or pickle of the whole simulator attaches them again (`__setstate__`).
        for method in (ConvertWorkers, LoadIntoWorkers):
            self.model.__dict__[method.name] = method(self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

    @property
    def workers(self) -> int:
        return len(self.optimizers)

    @property
    def round(self) -> int:
        return self.optimizers[0].round

    @property
    def step_in_round(self) -> int:
        return self.optimizers[0].step_in_round

    def partition(self, round: int) -> dict[str, list[Tensor]]:
        """Who owns which filters in `round` (equal to every distributed rank's `LoftOptimizer.partition`)."""
        return self.optimizers[0].partition(round)

    def step(self, batches: Sequence, loss_fn: Callable, scalers: Optional[Sequence] = None) -> list[float]:
        """One step of every worker: worker s trains on batches[s] = (inputs, targets); returns the S losses.

        scalers: optional list of one `torch.amp.GradScaler` per worker (as each rank of a
        distributed run has its own): the loss is scaled, `scaler.step` and `scaler.update`
        run per worker. Call `step` inside `torch.autocast(...)` for mixed precision (one block
        around many steps is fine: the step drops autocast's cached casts of the weights it updates).
        All or nothing: the batches are checked (and, for a batch shape not seen
        before, run once through every worker's forward without grad), then every
        worker runs its forward, loss and backward, and only then do the workers
        step; a batch the model cannot take, or a `loss_fn` or backward that raises
        on any worker, leaves every worker unchanged (gradients dropped, BatchNorm
        statistics restored). Memory: every worker's gradients are alive until the
        step (together about one full model's plus S copies of the shared ones).
        """
        if isinstance(batches, (Tensor, str)) or not isinstance(batches, (list, tuple)):
            raise TypeError(f"batches must be a list of {self.workers} (inputs, targets) tuples, "
                            f"got {type(batches).__name__}")
        if len(batches) != self.workers:
            raise ValueError(f"batches must hold one (inputs, targets) per worker ({self.workers}), "
                             f"got {len(batches)}")
        for s, b in enumerate(batches):
            if not isinstance(b, (list, tuple)) or len(b) != 2:
                raise TypeError(f"batches[{s}] must be an (inputs, targets) tuple, got {type(b).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
        if scalers is not None:
            if not isinstance(scalers, (list, tuple)) or len(scalers) != self.workers or \
                    not all(isinstance(sc, torch.amp.GradScaler) for sc in scalers):
                raise TypeError(f"scalers must be None or a list of {self.workers} torch.amp.GradScaler (one per "
                                f"worker), got {scalers!r}")
        autocast = _autocast_state(batches[0][0])
        if autocast:  # autocast's cached low-precision weights are stale once anything stepped them in place
            torch.clear_autocast_cache()
        sig = self._dry_run(batches) + (autocast,)
        if self.execution == "auto" and self._batched is not None and sig not in self._decided:
            self._decide(sig, batches)
        engine = None if sig in self._loop_signatures else self._batched
        saved = self._snapshot()
        losses = []
        try:  # every worker's forward, loss and backward first: a failure on any of them steps none
            if engine is not None:
                for m, opt in zip(self.worker_models, self.optimizers):
                    m.train(self.model.training)
                    opt.zero_grad(set_to_none=True)
                engine.forward_backward(batches, loss_fn, scalers, self.model.training, losses)
            for s, (inputs, targets) in enumerate(batches if engine is None else ()):
                m, opt = self.worker_models[s], self.optimizers[s]
                m.train(self.model.training)
                opt.zero_grad(set_to_none=True)
                loss = _scalar(loss_fn(m(inputs), targets))
                (loss if scalers is None else scalers[s].scale(loss)).backward()
                losses.append(float(loss.detach()))
        except Exception as exc:
            self._undo(saved)
            exc.add_note(f"LoftSimulator.step failed on worker {len(losses)}; no worker has stepped")
            raise
        for s, opt in enumerate(self.optimizers):
            if scalers is None:
                opt.step()
            else:
                scalers[s].step(opt)
                scalers[s].update()
            opt.zero_grad(set_to_none=True)
        if self.step_in_round >= self.optimizers[0].sync_every:
            self._sync()
        if autocast:  # the workers stepped and the masters may have synced, in place: drop the stale casts
            torch.clear_autocast_cache()
        return losses

    def _dry_run(self, batches: Sequence) -> tuple:
        """Run each worker's forward once without grad (eval mode: no statistic moves) on a batch signature
        not seen yet. The loss function is not called: it may count or log (its own side effects)."""
        sig = tuple((type(x), getattr(x, "shape", None), getattr(x, "dtype", None), getattr(x, "device", None),
                     type(y), getattr(y, "shape", None), getattr(y, "dtype", None)) for x, y in batches)
        sig += (self.model.training,)
        if sig in self._checked:
            return sig
        for s, (inputs, targets) in enumerate(batches):
            m = self.worker_models[s]
            mode = m.training
            m.eval()
            try:
                with torch.no_grad():
                    m(inputs)
            except Exception as exc:
                kind = TypeError if isinstance(exc, TypeError) else ValueError
                raise kind(f"batches[{s}]: worker {s} cannot train on it ({exc}); no worker has stepped") from exc
            finally:
                m.train(mode)
        self._checked.add(sig)
        return sig

    def _snapshot(self) -> list[tuple[Tensor, Tensor]]:
        """(buffer, copy of its value) for every worker's buffers: what a forward in train mode moves."""
        return [(b, b.detach().clone()) for m in self.worker_models for b in m.buffers()]

    def _undo(self, saved: list[tuple[Tensor, Tensor]]) -> None:
        """Put the buffers back as `_snapshot` saw them and drop every worker's gradients."""
        with torch.no_grad():
            for b, value in saved:  # BatchNorm statistics moved by the forwards
                b.copy_(value)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _decide(self, sig: tuple, batches: Sequence) -> None:
        """auto: check the batched network against the loop, then time the two, on `batches` with a fixed random
        projection of the outputs as the loss (the user's loss_fn is not called), leaving no trace: gradients
        dropped, BatchNorm statistics restored. The batched network is used only if its gradients match the loop's on this
        batch shape (checked in every process, never cached) and its step measured faster (cached on disk
        with the per-conv choices)."""
        models = self.worker_models
        inputs = [x for x, _ in batches]
        saved = self._snapshot()

        def grads(into):
            if into is not None:
                into.extend(None if p.grad is None else p.grad.detach().clone() for m in models for p in m.parameters())

        # The loss of both runs: each worker's outputs against a fixed random tensor. (Not `out.sum()`: behind a
        # BatchNorm its gradients nearly cancel, leaving rounding noise that no tolerance can compare.)
        projections: dict[int, Tensor] = {}

        def loss(s: int, out: Tensor) -> Tensor:
            if s not in projections:
                gen = torch.Generator().manual_seed(s)
                projections[s] = torch.randn(out.shape, generator=gen).to(out.device)
            return (out.float() * projections[s]).sum()

        def run_batched(into=None):
            self._batched.forward_backward([(x, s) for s, x in enumerate(inputs)], lambda out, s: loss(s, out),
                                           None, self.model.training, [])
            grads(into)
            self._undo(saved)

        def run_loop(into=None):
            for s, (m, x) in enumerate(zip(models, inputs)):
                m.train(self.model.training)
                loss(s, m(x)).backward()
            grads(into)
            self._undo(saved)
        shapes = [list(getattr(x, "shape", ())) for x in inputs]
        params = [list(p.shape) for p in models[0].parameters()]
        k = choice.key(inputs[0], [], ("step", shapes, params, self.model.training), self.workers)
        # inputs that do not stack, or a shape measured before as the loop's: nothing to check or time
        how = choice.LOOP if not self._batched.accepts(inputs) else choice.cached(k)
        if how != choice.LOOP:
            try:
                # the per-conv choices are measured (or read) in this first pass, outside the timing
                batched_grads, loop_grads = [], []
                run_batched(batched_grads)
                run_loop(loop_grads)
                mismatch = choice.gradient_mismatch(batched_grads, loop_grads, _autocast_state(inputs[0]) != ())
                if mismatch is not None:
                    warnings.warn(f"LoftSimulator(execution='auto'): the batched network's gradients differ from "
                                  f"the loop's ({mismatch}); running the loop for this batch shape", RuntimeWarning,
                                  stacklevel=3)
                    how = choice.LOOP
                else:
                    how = choice.choose(k, lambda: choice.measure_steps(
                        {choice.STACKED: run_batched, choice.LOOP: run_loop}, inputs[0].device))
            finally:
                self._undo(saved)
        if how == choice.LOOP or self._batched.all_loop():
            self._loop_signatures.add(sig)
        self._decided.add(sig)

    def execution_choices(self) -> dict[str, dict[str, str]]:
        """execution="auto"/"batched": for every convolution, measurement key -> the form it runs in
        ("stacked" or "loop"; a convolution whose workers' blocks differ in size always loops). Empty for "loop"."""
        return {} if self._batched is None else self._batched.choices()

    def finalize(self) -> None:
        """Sync now if the round has unsynced steps; `model` is then the full LoFT model."""
        if self.step_in_round > 0:
            self._sync()

    def comm_stats(self) -> dict:
        """What one rank of the equivalent distributed run sends and receives (see LoftOptimizer.comm_stats)."""
        return self.optimizers[0].comm_stats()

    def state_dict(self) -> dict:
        """The synced model, every worker's model (full-size) and optimizer (mid-round they differ)."""
        return {"model": self.model.state_dict(),
                "worker_models": [m.state_dict() for m in self.worker_models],
                "optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or not {"model", "worker_models", "optimizers"} <= set(state_dict):
            raise ValueError("state_dict must be a dict from LoftSimulator.state_dict() with keys "
                             "'model', 'worker_models', 'optimizers'")
        if len(state_dict["optimizers"]) != self.workers or len(state_dict["worker_models"]) != self.workers:
            raise ValueError(f"state_dict holds {len(state_dict['optimizers'])} workers, this simulator has "
                             f"{self.workers}")
        # the masters, by the model's own method: the workers' saved values follow, no re-cut from the masters first
        plain_method(self.model, "load_state_dict")(state_dict["model"])
        for m, opt, msd, osd in zip(self.worker_models, self.optimizers, state_dict["worker_models"],
                                    state_dict["optimizers"]):
            # the optimizer first: it cuts the saved round's blocks from the masters, then the
            # worker's own (mid-round) values are loaded into those blocks
            opt.load_state_dict(osd)
            m.load_state_dict(msd)

    def _sync(self) -> None:
        if self.workers == 1:  # nothing to exchange: the one worker is the model
            self.optimizers[0].sync()
            plain_method(self.model, "load_state_dict")(self.worker_models[0].state_dict())
            return
        self._exchange.run([opt.sync for opt in self.optimizers])  # the blocks meet in the masters
        # the partitioned tensors are the masters already; the shared ones come from any worker
        mine, theirs = self._plan.tensors(self.model), self._plan.tensors(self.worker_models[0])
        with torch.no_grad():
            for n in self._plan.shared_params + self._plan.shared_buffers + self._plan.counters:
                mine[n].copy_(theirs[n])


def _autocast_state(x) -> tuple:
    kind = x.device.type if isinstance(x, Tensor) else "cpu"
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return ()
    return (kind, torch.get_autocast_dtype(kind))


def _scalar(loss) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got "
                         f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
    return loss


def _copy_without(model: nn.Module, skip) -> nn.Module:
    """A deep copy of `model` in which the tensors in `skip` (the masters) are not copied but aliased: the
    optimizer factory sees every parameter with its real shape (a rule such as "decay where p.ndim > 1", an
    optimizer that sizes its state in __init__), and the worker model then cuts its blocks from the masters
    without writing to them."""
    memo = {}
    for t in skip:
        alias = t.detach()
        memo[id(t)] = nn.Parameter(alias, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else alias
    return copy.deepcopy(model, memo)
