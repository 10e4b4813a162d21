"""LoftOptimizer: LoFT training around any elementwise torch optimizer (see docs/algorithm.md).

Each of S workers (torch.distributed ranks, or workers simulated by
`LoftSimulator`) trains in round t only the filters it owns in
`partition(groups, S, seed, t)` plus its own copy of the shared parameters; every
`sync_every` steps (and on `finalize()`) the workers sync, then repartition.

The optimizer is the base optimizer, the worker's model owner (a
`WorkerModel`: which block of every filter this rank holds, the full-size
masters, the full/compact state), the optimizer-state bookkeeping across
rounds (`RoundState`) and an exchange (`exchange.Exchange`: a process group,
or the simulator's in-process meeting point). A worker trains a real sub-model. At the start of a round every
parameter and buffer holding filters is shrunk in place to the worker's block
(its producer rows, members' channels, consumer columns): the same Parameter
objects, now small, so the forward is the sliced network's forward, the
backward fills only compact gradients and the base optimizer keeps state only
for the compact tensors. The full-size values come back at the sync. Because
`param_groups` hold exactly the tensors whose `.grad` the backward fills,
`torch.amp.GradScaler`, `clip_grad_norm_` (over `param_groups` or
`model.parameters()`), the Optimizer hooks and LR schedulers behave as on the
base optimizer. This needs an elementwise optimizer (SGD, Adam, AdamW, RMSprop,
Adagrad, Adamax, NAdam, RAdam, Adadelta, Rprop, ASGD); others are refused.

GradScaler: the wrapper declares `_step_supports_amp_scaling`, so the scaler
always calls `step()`; a step whose gradients hold inf/NaN skips the base
optimizer's update but still counts towards the round, so every rank syncs on
schedule.

Optimizer state across rounds (`state`): "reset" clears it at every sync (the
official code); "keep" hands each filter's state to its next owner (it rides in
the sync's all_gather) and averages the shared parameters' state. Its layout is
fixed at the first sync, so under "keep" every parameter the optimizer holds
must have received a gradient by then (freeze one the loss never uses, or leave
it out of the optimizer); the sync refuses otherwise.

With one worker (no process group and torch.distributed not initialised) the
wrapper is the base optimizer exactly.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import _checks as C
from ..nn.layers import clear_active_sets
from . import fingerprint as fp
from .comm import STATES, CommStats, make_plan
from .exchange import Exchange, exchange_for
from .optimizer_checks import ELEMENTWISE, check_params, check_training_groups
from .partition import deal, partition
from .round_state import RoundState
from .worker_model import WorkerModel


class LoftOptimizer(torch.optim.Optimizer):
    """LoFT around `base_optimizer` (built on the parameters of `model`); see the module docstring.

    Args:
        base_optimizer: an elementwise torch.optim optimizer over parameters of `model`.
        model: the model (any nn.Module; plain nn layers need no conversion).
        groups: the filter groups to partition (from `lk.convert` or `lk.find_filter_groups`, or written by
            hand); each needs n >= workers. They are validated here, once.
        sync_every: K, local steps per round (the paper: 15).
        seed: the partition seed; every rank must use the same.
        state: "reset" or "keep" (optimizer state across rounds).
        process_group: None (the default group if torch.distributed is initialised,
            else one worker) or a torch.distributed ProcessGroup; one rank = one worker.
        exchange: instead of `process_group`, the `exchange.Exchange` this worker syncs through
            (`LoftSimulator` passes its in-process one).
        masters: with `exchange`, slot name -> full-size tensor shared by every worker, from which this
            worker's blocks are cut (`LoftSimulator` passes its model's); None: the model's own tensors.
        auto_sync: sync in `step()` after every `sync_every`-th step (True), or leave it to the caller's
            `sync()` (a simulator that steps its workers one after another).

    During a round the model's partitioned tensors are this rank's compact blocks;
    `model.state_dict()` is full-size at any time and `lk.full_view(model)` evaluates the
    full model. `model.to()`, `.double()`, `.half()`, `.cuda()` work mid-round (the masters
    follow; optimizer state already created keeps its dtype, as with any torch optimizer);
    `sum(p.numel() for p in model.parameters())` counts this worker's blocks mid-round;
    `copy.deepcopy`/pickling copy the optimizer with its model (not on a process group).
    Ranks compare their configuration at construction and on `load_state_dict` and all
    raise the same error if it differs. A rank whose peer
    dies gets a RuntimeError from `step()`/`finalize()` within the group's timeout.
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale/found_inf and always calls step()

    def __init__(self, base_optimizer, model, groups, sync_every: int = 15, seed: int = 0, state: str = "reset",
                 process_group=None, *, exchange: Optional[Exchange] = None, masters: Optional[dict] = None,
                 auto_sync: bool = True):
        self._ready = False
        if not isinstance(base_optimizer, torch.optim.Optimizer) or isinstance(base_optimizer, LoftOptimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer (not a LoftOptimizer), "
                            f"got {type(base_optimizer).__name__}")
        if not isinstance(base_optimizer, ELEMENTWISE):
            raise TypeError(f"base_optimizer: {type(base_optimizer).__name__} is not an elementwise optimizer; LoFT "
                            f"steps it on each worker's filter blocks only, which is exact for "
                            f"{', '.join(c.__name__ for c in ELEMENTWISE)}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.sync_every = C.positive_int(sync_every, "sync_every")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(state, str) or state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        if not isinstance(auto_sync, bool):
            raise TypeError(f"auto_sync must be a bool, got {type(auto_sync).__name__}")
        if exchange is None:
            if masters is not None:
                raise ValueError("masters is given with an exchange only (the simulator's shared full model)")
            exchange = exchange_for(process_group)
        elif process_group is not None:
            raise ValueError("give process_group or exchange, not both")
        elif not isinstance(exchange, Exchange):
            raise TypeError(f"exchange must be a loft_kernels.training.exchange.Exchange, got {type(exchange).__name__}")
        self._exchange, self._rank, self._workers = exchange, exchange.rank, exchange.workers
        self.groups = check_training_groups(model, groups, self._workers)
        self.base, self.model, self.seed, self.state_mode = base_optimizer, model, seed, state
        self.auto_sync = auto_sync
        # Optimizer.__init__ sets up the hook registries and patches step(); the groups stay the base's.
        torch.optim.Optimizer.__init__(self, base_optimizer.param_groups, base_optimizer.defaults)
        self._ready = True
        self._plan = make_plan(model, self.groups, self._workers)
        tensors = self._plan.tensors(model)
        tensors.update(masters or {})
        check_params(model, self.base)
        self._fingerprint = fp.fingerprint(tensors, dict(model.named_parameters()), self.groups, self._workers,
                                           seed, self.sync_every, state, base_optimizer)
        self._round = 0
        self._step_in_round = 0
        self._stats = CommStats(self._workers)
        self._rs = RoundState(self.base, self._plan, self._workers, state, dict(model.named_parameters()))
        clear_active_sets(model)
        self.worker: Optional[WorkerModel] = None  # the model's owner (None: one worker, the model stays full)
        if self._workers == 1:
            return
        self._exchange.check(self._fingerprint, "LoftOptimizer")
        self.worker = WorkerModel(model, self._plan, masters)
        self._dispatch(self._rs.adopt_prior_state())

    # ------------------------------------------- Optimizer attributes ----
    # The wrapper shares the base optimizer's param_groups, state and defaults (schedulers and
    # GradScaler work on either); Optimizer.__init__ assigns them once, before `_ready`.
    @property
    def param_groups(self):
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value):
        if self._ready:
            self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value):
        if self._ready:
            self.base.state = value

    @property
    def defaults(self):
        return self.base.defaults

    @defaults.setter
    def defaults(self, value):
        if self._ready:
            self.base.defaults = value

    # ------------------------------------------------------------ public ----
    @property
    def round(self) -> int:
        """The current round (number of syncs so far)."""
        return self._round

    @property
    def step_in_round(self) -> int:
        return self._step_in_round

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def workers(self) -> int:
        return self._workers

    def partition(self, round: int) -> dict[str, list[Tensor]]:
        """Group name -> list of `workers` sorted index tensors: who owns which filters in `round`."""
        return partition(self.groups, self._workers, self.seed, round)

    def owned(self) -> dict[str, Tensor]:
        """This rank's filters of each group in the current round (CPU index tensors)."""
        if self.worker is None or self.worker.owned is None:
            return {g.name: torch.arange(g.n) for g in self.groups}
        return dict(self.worker.owned)

    def add_param_group(self, param_group) -> None:
        if not self._ready:  # called by Optimizer.__init__ for the base's own groups
            return
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"param_group must be a dict with a 'params' entry, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        known = {id(p) for p in self.model.parameters()}
        trainable = {id(self.model.get_parameter(n)) for n in self._plan.trainable}
        for p in params:
            if id(p) not in known:
                raise ValueError("param_group: LoFT syncs the model's parameters only; this parameter is not one "
                                 "of model's")
            if id(p) not in trainable:
                raise ValueError("param_group: this parameter was frozen (requires_grad=False) when the "
                                 "LoftOptimizer was built, so no sync carries it; unfreeze it before wrapping")
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable] = None):
        """One local step of this worker; syncs after every `sync_every`-th step of a round.

        Under `GradScaler.step(opt)` a step with inf/NaN gradients skips the update but is counted.
        """
        loss = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None or not bool(found_inf):
            grad_scale = getattr(self, "grad_scale", None)
            if grad_scale is not None:
                self._unscale(grad_scale)
            self.base.step()
        self._step_in_round += 1
        if self.auto_sync and self._step_in_round >= self.sync_every:
            self.sync()
        return loss

    def finalize(self) -> None:
        """Sync now if the round has unsynced steps: the model is then the full LoFT model."""
        if self._step_in_round > 0:
            self.sync()

    def comm_stats(self) -> dict:
        """Bytes this rank sent/received so far per collective kind (ring model), collectives and syncs.

        {"workers", "syncs", "collectives", "bytes_sent", "bytes_received",
         "all_reduce": {"collectives", "buffer_bytes", "bytes_sent", "bytes_received"},
         "all_gather": {...}}; the per-sync amounts equal `lk.loft_sync_bytes`.
        """
        return self._stats.as_dict()

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus a "loft" entry (round, position, partition, comm, config).

        Mid-round the base state is that of the compact tensors; `load_state_dict`
        rebuilds the same sub-model first. Load the model's state_dict before this one.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.base.state_dict()
        sd["loft"] = {"round": self._round, "step_in_round": self._step_in_round, "workers": self._workers,
                      "rank": self._rank, "seed": self.seed, "sync_every": self.sync_every,
                      "state": self.state_mode, "owned": {k: v.cpu() for k, v in self.owned().items()},
                      "comm": self._stats.state_dict(), "fingerprint": self._fingerprint,
                      "shadow": self._rs.shadow_state()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or not {"state", "param_groups", "loft"} <= set(state_dict):
            raise ValueError("state_dict must be a dict from LoftOptimizer.state_dict() with keys "
                             "'state', 'param_groups', 'loft'")
        meta = state_dict["loft"]
        problem = self._compare(meta)
        # this rank's dtypes now (the model may have been converted since construction), compared across ranks
        mine = dict(self._fingerprint, dtypes=fp.dtypes(self._plan.tensors(self.model)))
        if isinstance(meta, dict):
            mine["position"] = (meta.get("round"), meta.get("step_in_round"))
        self._exchange.check(mine, "LoftOptimizer.load_state_dict", local_error=problem)
        if self._workers > 1:
            self.worker.expand(write_back=not self.worker.shared)
            self._round, self._step_in_round = int(meta["round"]), int(meta["step_in_round"])
            self.base.state.clear()
            self._rs.load_shadow_state(meta["shadow"])
            self._dispatch({})
            for name, idx in meta["owned"].items():
                if not torch.equal(idx.cpu(), self.owned()[name].cpu()):
                    raise ValueError(f"state_dict: the saved partition of group {name!r} differs from the one "
                                     f"recomputed from (seed, round); saved by another partition rule?")
        else:
            self._round, self._step_in_round = int(meta["round"]), int(meta["step_in_round"])
        self.base.load_state_dict({k: v for k, v in state_dict.items() if k != "loft"})
        self._stats.load_state_dict(meta["comm"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # --------------------------------------------------------- internals ----
    def _compare(self, meta) -> str:
        """'' if a saved "loft" entry fits this optimizer, else what differs."""
        if not isinstance(meta, dict) or not {"round", "step_in_round", "fingerprint", "rank"} <= set(meta):
            return "state_dict['loft'] is not a LoftOptimizer state (saved by another version?)"
        if meta["rank"] != self._rank:
            return f"state_dict was saved by rank {meta['rank']}, this is rank {self._rank}"
        fields = fp.differences(self._fingerprint, meta["fingerprint"])
        if not fields:
            return ""
        simple = [f for f in fields if f in ("workers", "seed", "sync_every", "state", "optimizer")]
        said = [f"{f}={meta['fingerprint'].get(f)!r}, this optimizer has {f}={self._fingerprint[f]!r}"
                for f in simple]
        said += [f"other {f} ({fp.describe_difference(f, meta['fingerprint'].get(f), self._fingerprint[f])})"
                 for f in fields if f not in simple]
        return "state_dict was saved with " + "; ".join(said)

    def _unscale(self, grad_scale: Tensor) -> None:
        # The same reciprocal and product as GradScaler.unscale_, so scaled and unscaled runs agree.
        inv = grad_scale.double().reciprocal().float()
        by_key: dict = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_key.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        with torch.no_grad():
            for (device, _), grads in by_key.items():
                torch._foreach_mul_(grads, inv.to(device))

    def _dispatch(self, prior: dict) -> None:
        """Partition for the current round and shrink the model to this rank's sub-model."""
        part = deal(self.groups, self._workers, self.seed, self._round)
        self.worker.shrink({name: idx[self._rank] for name, idx in part.items()})
        self._rs.dispatch(self.worker, prior)

    def sync(self) -> None:
        """End the round now: exchange with the other workers and start the next round.

        `step()` calls it after every `sync_every`-th step (unless built with
        auto_sync=False); `finalize()` calls it if the round has unsynced steps.
        """
        if self._workers == 1:
            self._round += 1
            self._step_in_round = 0
            return
        self._rs.remember_compact_state()
        owned = self.worker.owned
        self.worker.expand(write_back=True)
        payload = self._rs.pack(self.model, self.worker.on_devices(owned), self._rank)
        result = self._exchange(payload, f"the sync ending round {self._round}")
        part = deal(self.groups, self._workers, self.seed, self._round)  # every rank's block, for the gathered rows
        parts = [self.worker.on_devices({n: idx[r] for n, idx in part.items()}) for r in range(self._workers)]
        self._rs.unpack(result, parts, self._rank, model_rows=not self.worker.shared)
        self._stats.add_sync(payload.collectives(self._workers))
        prior = self._rs.next_round_prior()
        self._round += 1
        self._step_in_round = 0
        self._dispatch(prior)

    # ------------------------------------------------ copy and pickle ----
    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; this wrapper is its whole __dict__
        # (the exchange refuses where it cannot be copied: a process group, the simulator's meeting point).
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


__all__ = ["LoftOptimizer"]
