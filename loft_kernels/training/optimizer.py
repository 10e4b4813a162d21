"""LoftOptimizer: LoFT training (DESIGN.md section 1) around any elementwise torch optimizer.

Each of S workers (torch.distributed ranks, or workers simulated by
`LoftSimulator`) trains in round t only the filters it owns in
`partition(groups, S, seed, t)` plus its own copy of the shared parameters; every
`sync_every` steps (and on `finalize()`) the workers sync, then repartition.

How the base optimizer touches only owned filters: for the round, each
partitioned parameter is replaced, in the base optimizer's `param_groups`, by a
*compact* parameter holding just this rank's block (`w[rows][:, cols]`). A step
gathers the owned block of the full-size gradient into it, steps the base
optimizer, and scatters the block back into the model's parameter. The base
optimizer never sees the other rows, so those rows and their optimizer state
stay bit-identical through the round, and its work (and state memory) for
partitioned tensors is 1/S of dense. (Measured against the alternative, a full
step followed by restoring the non-owned rows and momentum: 1.9-2.7x faster for
a LoFT-4 worker of PreActResNet-18 on the 2-core CPU, bench/measure_training.py.)
This needs an elementwise optimizer (SGD, Adam, AdamW, RMSprop, Adagrad,
Adamax, NAdam, RAdam, Adadelta, Rprop, ASGD): exact for those; others (LBFGS, SparseAdam, Adafactor, Muon, unknown
classes) are refused. Consequences of the swap: clip gradients on
`model.parameters()` (the full-size gradients), not on the optimizer's
param_groups; `torch.amp.GradScaler` is not supported (it unscales the
param_groups' gradients); parameter groups must be set up before wrapping.

Optimizer state across rounds (`state`):
- "reset" (the official code): the base optimizer's state is cleared at every
  sync, so momentum restarts each round. Per sync and rank, in the ring model:
  all_reduce of the shared parameters and floating buffers (2 (S-1)/S of their
  bytes), all_reduce (max) of the integer buffers, all_gather of the owned
  filter blocks ((S-1) x the largest rank's block bytes).
- "keep": each filter's state moves with the filter to its next owner (it
  rides in the same all_gather) and the shared parameters' state is averaged
  (in the same all_reduce): with m parameter-shaped state tensors per parameter
  (SGD momentum: 1, Adam: 2) the parameter part of both buffers grows by a
  factor 1 + m; the number of collectives stays the same. Scalar state (Adam's step count) is not sent:
  every worker steps every parameter once per iteration, so it is equal on
  all workers. Elements of a VGG-chain conv that no worker trained in a round
  (row owned by one worker, column by another) keep their previous state;
  elements that never had state start at zero.

With one worker (no process group and torch.distributed not initialised) there
is nothing to partition or send: the wrapper is the base optimizer exactly
(no active filter sets, no state reset).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _checks as C
from .comm import STATES, CommStats, make_plan
from .groups import FilterGroup
from .layers import LoftBatchNorm2d, LoftConv2d, _module, activate
from .partition import check_groups, partition
from .sync import (LocalGroup, PackEntry, Payload, Slot, distributed_exchange, flatten, gather, owned_numel,
                   pack_owned, scatter_, unflatten_, unpack_owned)

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.Rprop,
               torch.optim.ASGD)


def _split_state(state: dict, shape: torch.Size) -> tuple[dict, dict]:
    """(parameter-shaped floating tensors, everything else) of one parameter's optimizer state."""
    shaped, rest = {}, {}
    for k, v in state.items():
        if isinstance(v, Tensor) and v.is_floating_point() and v.shape == shape:
            shaped[k] = v
        else:
            rest[k] = v
    return shaped, rest


def check_loft_groups(model: nn.Module, groups: Sequence[FilterGroup]) -> None:
    """Every group names Loft layers of `model` whose sizes match its n (else TypeError/ValueError naming groups)."""
    for g in groups:
        conv_a, conv_b = _module(model, g.conv_a, LoftConv2d, g.name), _module(model, g.conv_b, LoftConv2d, g.name)
        if conv_a.out_channels != g.n or conv_b.in_channels != g.n or conv_b.groups != 1:
            raise ValueError(f"groups: group {g.name!r} has n={g.n} but {g.conv_a!r} has {conv_a.out_channels} "
                             f"output channels and {g.conv_b!r} {conv_b.in_channels} input channels "
                             f"(groups={conv_b.groups})")
        for nm in g.norms:
            norm = _module(model, nm, LoftBatchNorm2d, g.name)
            if norm.num_features != g.n:
                raise ValueError(f"groups: group {g.name!r} has n={g.n} but norm {nm!r} has "
                                 f"{norm.num_features} channels")


def resolve_group(process_group) -> tuple[object, int, int]:
    """(group, rank, workers) for `process_group` (see LoftOptimizer)."""
    if isinstance(process_group, LocalGroup):
        return process_group, process_group.rank, process_group.size
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialised:
            return None, 0, 1
        return dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if not initialised:
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None or a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__}")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("process_group does not contain this process")
    return process_group, rank, dist.get_world_size(process_group)


class _SlotParam:
    """A partitioned trainable parameter and the compact parameter standing in for it this round."""
    __slots__ = ("slot", "param", "where", "compact", "rows", "cols")

    def __init__(self, slot: Slot, param: nn.Parameter, where: tuple[int, int]):
        self.slot, self.param, self.where = slot, param, where
        self.compact: Optional[nn.Parameter] = None
        self.rows = self.cols = None


class LoftOptimizer(torch.optim.Optimizer):
    """LoFT around `base_optimizer` (built on `model.parameters()`); see the module docstring.

    Args:
        base_optimizer: an elementwise torch.optim optimizer over all trainable parameters of `model`.
        model: the model, converted with `lk.convert` (its groups are Loft layers).
        groups: the filter groups to partition (from `lk.convert`); each needs n >= workers.
        sync_every: K, local steps per round (the paper: 15).
        seed: the partition seed; every rank must use the same.
        state: "reset" or "keep" (optimizer state across rounds).
        process_group: None (the default group if torch.distributed is initialised,
            else one worker) or a torch.distributed ProcessGroup; one rank = one worker.

    The rank's filters are activated on `model` at construction and after each
    sync, so the model's forward computes only them; use `lk.dense(model)` to
    evaluate the full model. `param_groups` and `state` are the base optimizer's
    (learning-rate schedulers work on this wrapper). A rank whose peer dies gets
    a RuntimeError from `step()`/`finalize()` within the process group's timeout.
    """

    def __init__(self, base_optimizer, model, groups, sync_every: int = 15, seed: int = 0, state: str = "reset",
                 process_group=None):
        if not isinstance(base_optimizer, torch.optim.Optimizer) or isinstance(base_optimizer, LoftOptimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer (not a LoftOptimizer), "
                            f"got {type(base_optimizer).__name__}")
        if not isinstance(base_optimizer, ELEMENTWISE):
            raise TypeError(f"base_optimizer: {type(base_optimizer).__name__} is not an elementwise optimizer; LoFT "
                            f"steps it on each worker's filter rows only, which is exact for "
                            f"{', '.join(c.__name__ for c in ELEMENTWISE)}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.sync_every = C.positive_int(sync_every, "sync_every")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(state, str) or state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self._group, self._rank, self._workers = resolve_group(process_group)
        self.groups = check_groups(groups, self._workers)
        check_loft_groups(model, self.groups)
        self.base, self.model, self.seed, self.state_mode = base_optimizer, model, seed, state
        self._plan = make_plan(model, self.groups, self._workers)
        self._slot_params = self._locate_params()
        self._round = 0
        self._step_in_round = 0
        self._auto_sync = True  # LoftSimulator syncs its workers itself
        self._stats = CommStats(self._workers)
        self._shadow: dict[str, dict[str, Tensor]] = {}  # state="keep": full-size state of partitioned params
        self._part: dict[str, list[Tensor]] = {}
        self._pending = None
        self._gather_buffers: dict = {}  # all_gather outputs reused between syncs
        if self._workers == 1:
            activate(model, self.groups, None)
            return
        prior = {}
        for sp in self._slot_params:  # state the base optimizer already holds moves into the compact views
            shaped, rest = _split_state(self.base.state.pop(sp.param, {}), sp.param.shape)
            if shaped:
                self._shadow[sp.slot.name] = shaped
            prior[sp.slot.name] = rest
        self._dispatch(prior)

    # ------------------------------------------------------------ public ----
    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @property
    def defaults(self):
        return self.base.defaults

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
        """This rank's filters of each group in the current round."""
        return {g.name: self._part[g.name][self._rank] for g in self.groups} if self._part else \
            {g.name: torch.arange(g.n) for g in self.groups}

    def add_param_group(self, param_group) -> None:
        raise ValueError("param_group: add parameter groups to the base optimizer before wrapping it in "
                         "LoftOptimizer")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)
        for sp in self._slot_params:  # the model's full-size gradients (the base optimizer holds the compacts)
            if sp.param.grad is not None:
                if set_to_none:
                    sp.param.grad = None
                else:
                    sp.param.grad.detach_().zero_()

    def step(self, closure: Optional[Callable] = None):
        """One local step of this worker; syncs after every `sync_every`-th step of a round."""
        loss = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be callable, got {type(closure).__name__}")
            with torch.enable_grad():
                loss = closure()
        if self._workers == 1:
            self.base.step()
        else:
            for sp in self._slot_params:
                g = sp.param.grad
                sp.compact.grad = None if g is None else gather(g, sp.rows, sp.cols)
            self.base.step()
            for sp in self._slot_params:
                if sp.compact.grad is not None:
                    scatter_(sp.param, sp.rows, sp.cols, sp.compact.detach())
        self._step_in_round += 1
        if self._auto_sync and self._step_in_round >= self.sync_every:
            self._sync()
        return loss

    def finalize(self) -> None:
        """Sync now if the round has unsynced steps: the model is then the full LoFT model (see `lk.dense`)."""
        if self._step_in_round > 0:
            self._sync()

    def comm_stats(self) -> dict:
        """Bytes this rank sent/received so far per collective kind (ring model), collectives and syncs.

        {"workers", "syncs", "collectives", "bytes_sent", "bytes_received",
         "all_reduce": {"collectives", "buffer_bytes", "bytes_sent", "bytes_received"},
         "all_gather": {...}}; the per-sync amounts equal `lk.loft_sync_bytes`.
        """
        return self._stats.as_dict()

    def state_dict(self) -> dict:
        """Round, step within the round, this rank's partition, comm totals and the base optimizer's state.

        Mid-round the base state is that of the compact views; `load_state_dict`
        rebuilds the same views first. Load the model's state_dict before this one.
        """
        owned = {k: v.cpu() for k, v in self.owned().items()}
        return {"loft": {"round": self._round, "step_in_round": self._step_in_round, "workers": self._workers,
                         "rank": self._rank, "seed": self.seed, "sync_every": self.sync_every,
                         "state": self.state_mode, "owned": owned, "comm": self._stats.state_dict()},
                "shadow": {n: {k: v.clone() for k, v in d.items()} for n, d in self._shadow.items()},
                "base": self.base.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or not {"loft", "shadow", "base"} <= set(state_dict):
            raise ValueError("state_dict must be a dict from LoftOptimizer.state_dict() with keys "
                             "'loft', 'shadow', 'base'")
        meta = state_dict["loft"]
        mine = {"workers": self._workers, "rank": self._rank, "seed": self.seed, "sync_every": self.sync_every,
                "state": self.state_mode}
        for k, v in mine.items():
            if meta.get(k) != v:
                raise ValueError(f"state_dict was saved with {k}={meta.get(k)!r}, this optimizer has {k}={v!r}")
        self._round, self._step_in_round = int(meta["round"]), int(meta["step_in_round"])
        if self._workers > 1:
            params = {sp.slot.name: sp.param for sp in self._slot_params}
            self._shadow = {n: {k: v.to(params[n].device) for k, v in d.items()}
                            for n, d in state_dict["shadow"].items()}
            self.base.state.clear()
            self._dispatch({})
            for name, idx in meta["owned"].items():
                if not torch.equal(idx.cpu(), self.owned()[name].cpu()):
                    raise ValueError(f"state_dict: the saved partition of group {name!r} differs from the one "
                                     f"recomputed from (seed, round); saved by another partition rule?")
        self.base.load_state_dict(state_dict["base"])
        self._stats.load_state_dict(meta["comm"])

    # --------------------------------------------------------- internals ----
    def _locate_params(self) -> list[_SlotParam]:
        where = {}
        for gi, group in enumerate(self.base.param_groups):
            for pi, p in enumerate(group["params"]):
                where[id(p)] = (gi, pi)
        named = dict(self.model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and id(p) not in where]
        if missing:
            raise ValueError(f"base_optimizer does not optimise model parameter(s) {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}; build it on model.parameters()")
        ids = {id(p) for p in named.values()}
        if any(i not in ids for i in where):
            raise ValueError("base_optimizer holds parameters that are not model's; LoFT syncs the model's "
                             "parameters only")
        return [_SlotParam(s, named[s.name], where[id(named[s.name])]) for s in self._plan.slot_params]

    def _dispatch(self, prior: dict) -> None:
        """Partition for the current round, activate this rank's filters, swap in the compact views.

        prior: slot name -> non-parameter-shaped state (scalars) to give the new compact view.
        """
        part = partition(self.groups, self._workers, self.seed, self._round)
        devices = {g.name: self.model.get_submodule(g.conv_a).weight.device for g in self.groups}
        self._part = {n: [i.to(devices[n]) for i in idx] for n, idx in part.items()}
        owned = self.owned()
        activate(self.model, self.groups, owned)
        for sp in self._slot_params:
            sp.rows, sp.cols = sp.slot.index(owned)
            sp.compact = nn.Parameter(gather(sp.param.detach(), sp.rows, sp.cols))
            gi, pi = sp.where
            self.base.param_groups[gi]["params"][pi] = sp.compact
            new_state = dict(prior.get(sp.slot.name, {}))
            for k, full in self._shadow.get(sp.slot.name, {}).items():
                new_state[k] = gather(full, sp.rows, sp.cols)
            if new_state:
                self.base.state[sp.compact] = new_state
        # Rows outside a chain conv's blocks keep their state across rounds; other shadows are rebuilt
        # entirely from the owners at the next sync, so they need not be held meanwhile.
        self._shadow = {sp.slot.name: self._shadow[sp.slot.name] for sp in self._slot_params
                        if sp.slot.name in self._shadow and sp.rows is not None and sp.cols is not None}

    def _state_keys(self, tensors: dict) -> dict[str, list[tuple[str, torch.dtype]]]:
        """state="keep": parameter name -> sorted (key, dtype) of the parameter-shaped state it sends."""
        if self.state_mode != "keep":
            return {}
        compact = {sp.slot.name: sp.compact for sp in self._slot_params}
        keys = {}
        for group in self.base.param_groups:
            ref = None
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                shaped, _ = _split_state(self.base.state.get(p, {}), p.shape)
                keys[id(p)] = sorted((k, v.dtype) for k, v in shaped.items())
                names = [k for k, _ in keys[id(p)]]
                if ref is None:
                    ref = names
                elif names != ref:
                    raise RuntimeError(f"state='keep': parameters of one param group hold different optimizer "
                                       f"state ({ref} and {names}); every parameter must receive a gradient "
                                       f"before the first sync")
        out = {n: keys[id(tensors[n])] for n in self._plan.shared_params if id(tensors[n]) in keys}
        out.update({n: keys[id(c)] for n, c in compact.items()})
        return out

    def _pack(self) -> Payload:
        """Phase 1 of a sync: this rank's buffers (kept for `_finish_sync`)."""
        t = self._plan.tensors(self.model)
        keys = self._state_keys(t)
        mean: dict = OrderedDict()
        for n in self._plan.shared_params:
            mean.setdefault(t[n].dtype, []).append(t[n])
            for k, dt in keys.get(n, ()):
                mean.setdefault(dt, []).append(self.base.state[t[n]][k])
        for n in self._plan.shared_buffers:
            mean.setdefault(t[n].dtype, []).append(t[n])
        counters: dict = OrderedDict()
        for n in self._plan.counters:
            counters.setdefault(t[n].dtype, []).append(t[n])
        # gather bucket per dtype: model tensors, then the compact state (keep) with its full-size shadow
        entries: dict = OrderedDict()
        compact_state: dict = OrderedDict()
        shadow_entries: dict = OrderedDict()
        for s in self._plan.slots:
            entries.setdefault(t[s.name].dtype, []).append(PackEntry(t[s.name], s))
        for sp in self._slot_params:
            for k, dt in keys.get(sp.slot.name, ()):
                v = self.base.state[sp.compact][k]
                shadow = self._shadow.setdefault(sp.slot.name, {}).setdefault(
                    k, torch.zeros(sp.param.shape, dtype=v.dtype, device=v.device))
                compact_state.setdefault(dt, []).append(v)
                shadow_entries.setdefault(dt, []).append(PackEntry(shadow, sp.slot))
        payload = Payload()
        payload.mean = OrderedDict((dt, flatten(ts)) for dt, ts in mean.items())
        payload.max = OrderedDict((dt, flatten(ts)) for dt, ts in counters.items())
        owned, sizes = self.owned(), {}
        for dt in list(entries) + [d for d in shadow_entries if d not in entries]:
            # per rank: (elements of the model tensors, elements in all) of its block in the buffer
            sizes[dt] = [(sum(owned_numel(e.tensor.shape, e.slot, self._plan.sizes, self._workers, r)
                              for e in entries.get(dt, [])),
                          sum(owned_numel(e.tensor.shape, e.slot, self._plan.sizes, self._workers, r)
                              for e in entries.get(dt, []) + shadow_entries.get(dt, [])))
                          for r in range(self._workers)]
            flat = pack_owned(entries.get(dt, []), owned, compact_state.get(dt, []))
            if flat.numel() != sizes[dt][self._rank][1]:
                raise RuntimeError(f"internal: packed {flat.numel()} elements, the plan says "
                                   f"{sizes[dt][self._rank][1]}")
            pad = max(total for _, total in sizes[dt]) - flat.numel()
            payload.gather[dt] = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
        self._pending = (mean, counters, entries, shadow_entries, sizes)
        return payload

    def _finish_sync(self, payload: Payload, result: Payload) -> None:
        """Phase 2: write the exchanged buffers back, account the traffic, start the next round."""
        mean, counters, entries, shadow_entries, sizes = self._pending
        self._pending = None
        for dt, ts in mean.items():
            unflatten_(result.mean[dt], ts)
        for dt, ts in counters.items():
            unflatten_(result.max[dt], ts)
        for dt, gathered in result.gather.items():
            model_part, shadows = entries.get(dt, []), shadow_entries.get(dt, [])
            for r in range(self._workers):
                owned_r = {g.name: self._part[g.name][r] for g in self.groups}
                n_model, n_all = sizes[dt][r]
                if r != self._rank:
                    unpack_owned(gathered[r, :n_all], model_part + shadows, owned_r)
                elif shadows:  # this rank's own model rows are already in place: only its state goes to the shadow
                    unpack_owned(gathered[r, n_model:n_all], shadows, owned_r)
        self._stats.add_sync(payload.collectives(self._workers))
        prior = {}
        for sp in self._slot_params:
            old = self.base.state.pop(sp.compact, {})
            prior[sp.slot.name] = _split_state(old, sp.compact.shape)[1] if self.state_mode == "keep" else {}
        if self.state_mode == "reset":
            self.base.state.clear()
            self._shadow = {}
        self._round += 1
        self._step_in_round = 0
        self._dispatch(prior)

    def _sync(self) -> None:
        if self._workers == 1:
            self._round += 1
            self._step_in_round = 0
            return
        payload = self._pack()
        result = distributed_exchange(payload, self._group, self._rank, self._workers,
                                      f"the sync ending round {self._round}", self._gather_buffers)
        self._finish_sync(payload, result)
