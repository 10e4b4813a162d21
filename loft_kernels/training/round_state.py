"""What a LoFT rank carries from round to round besides its model: optimizer state and the sync's buffers.

`RoundState` owns the optimizer-state bookkeeping of LoftOptimizer between two
dispatches (which block of each tensor this rank holds is the WorkerModel's;
this module asks it):
- the compact shape of every partitioned parameter's block this round;
- state="keep": the full-size *shadow* of each partitioned parameter's
  optimizer state, from which the next owner's compact state is cut. Between
  syncs only chain convs (a conv that is the consumer of one group and the producer of
  another) keep a shadow: their elements outside every worker's block were
  trained by nobody this round and keep their previous state;
- packing this rank's sync buffers (shared tensors and their state for the
  mean, integer buffers for the max, owned blocks and their state for the
  all_gather) and writing the exchanged result back.

Scalar state (Adam's step count) is not sent: every worker steps every
parameter once per iteration, so it is equal on all workers, unless a
`GradScaler` skipped a step on some workers only (an inf in their own
gradients, which no per-step all-reduce spreads to the others). Such a
worker's count then stays behind by the skipped steps, as the rank's
count does in any distributed run whose ranks skip independently; under
state="keep" a block handed to it is bias-corrected with its own count.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .sync import (
    PackEntry,
    Payload,
    SyncPlan,
    flatten,
    owned_numel,
    pack_owned,
    unflatten_,
    unpack_owned,
)
from .worker_model import gather


def split_state(state: dict, shape: torch.Size) -> tuple[dict, dict]:
    """(parameter-shaped floating tensors, everything else) of one parameter's optimizer state."""
    shaped, rest = {}, {}
    for k, v in state.items():
        if isinstance(v, Tensor) and v.is_floating_point() and v.shape == shape:
            shaped[k] = v
        else:
            rest[k] = v
    return shaped, rest


class _Block:
    """A partitioned trainable parameter and the shape of this rank's block of it (rows/cols: the WorkerModel)."""
    __slots__ = ("slot", "param", "shape")

    def __init__(self, slot, param: nn.Parameter):
        self.slot, self.param = slot, param
        self.shape = param.shape


class RoundState:
    def __init__(self, base: torch.optim.Optimizer, plan: SyncPlan, workers: int, mode: str, params: dict):
        """params: the model's named parameters (full-size, before the first dispatch)."""
        self.base, self.plan, self.workers, self.mode = base, plan, workers, mode
        self.blocks = [_Block(s, params[s.name]) for s in plan.slot_params]
        self._named_params = params
        self._slot_names = {b.slot.name for b in self.blocks}
        self.shadow: dict[str, dict[str, Tensor]] = {}
        self._pending = None

    # ------------------------------------------------------- dispatch ----
    def adopt_prior_state(self) -> dict:
        """State the base optimizer held before wrapping: shaped parts to the shadow; returns the rest."""
        prior = {}
        for b in self.blocks:
            shaped, rest = split_state(self.base.state.pop(b.param, {}), b.param.shape)
            if shaped:
                self.shadow[b.slot.name] = shaped
            prior[b.slot.name] = rest
        return prior

    def dispatch(self, worker, prior: dict) -> None:
        """`worker` (the WorkerModel) is compact now: give each block its optimizer state for the round."""
        chain = set()
        for b in self.blocks:
            rows, cols = worker.index(b.slot)
            if rows is not None and cols is not None:
                chain.add(b.slot.name)
            b.shape = b.param.shape
            new_state = dict(prior.get(b.slot.name, {}))
            for k, full in self.shadow.get(b.slot.name, {}).items():
                new_state[k] = gather(full, rows, cols)
            if new_state:
                self.base.state[b.param] = new_state
        # Only a chain conv's shadow holds state that no owner brings back at the next sync.
        self.shadow = {n: d for n, d in self.shadow.items() if n in chain}

    def shadow_state(self) -> dict:
        return {n: {k: v.clone() for k, v in d.items()} for n, d in self.shadow.items()}

    def load_shadow_state(self, saved: dict) -> None:
        params = {b.slot.name: b.param for b in self.blocks}
        self.shadow = {n: {k: v.to(params[n].device) for k, v in d.items()} for n, d in saved.items()}

    # ----------------------------------------------------------- sync ----
    def remember_compact_state(self) -> None:
        """Call while the parameters are still compact: which state tensors travel (state="keep")."""
        self._keys = self._state_keys()

    def _state_keys(self) -> dict[str, list[tuple[str, torch.dtype]]]:
        """state="keep": parameter name -> sorted (key, dtype) of the parameter-shaped state it sends."""
        if self.mode != "keep":
            return {}
        names = {id(p): n for n, p in self._named_params.items()}
        keys, out = {}, {}
        for group in self.base.param_groups:
            ref = None
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                shaped, _ = split_state(self.base.state.get(p, {}), p.shape)
                keys[id(p)] = sorted((k, v.dtype) for k, v in shaped.items())
                if p.dim() == 0:  # a scalar parameter's scalar counters (Adam's step) look parameter-shaped too
                    continue
                got = [k for k, _ in keys[id(p)]]
                if ref is None:
                    ref = got
                elif got != ref:
                    raise RuntimeError(f"state='keep': parameters of one param group hold different optimizer "
                                       f"state ({ref} and {got}); every parameter the optimizer holds must "
                                       f"receive a gradient before the first sync (freeze one the loss does "
                                       f"not use, or leave it out of the optimizer)")
        for pid, k in keys.items():
            if pid in names:
                out[names[pid]] = k
        return {n: k for n, k in out.items() if n in self.plan.shared_params or n in self._slot_names}

    def pack(self, model: nn.Module, owned: dict, rank: int) -> Payload:
        """This rank's buffers (full-size tensors, compact state), kept for `unpack`."""
        t = self.plan.tensors(model)
        keys = self._keys
        mean: dict = OrderedDict()
        for n in self.plan.shared_params:
            mean.setdefault(t[n].dtype, []).append(t[n])
            for k, dt in keys.get(n, ()):
                mean.setdefault(dt, []).append(self.base.state[t[n]][k])
        for n in self.plan.shared_buffers:
            mean.setdefault(t[n].dtype, []).append(t[n])
        counters: dict = OrderedDict()
        for n in self.plan.counters:
            counters.setdefault(t[n].dtype, []).append(t[n])
        # gather bucket per dtype: model tensors, then the compact state (keep) with its full-size shadow
        entries: dict = OrderedDict()
        compact_state: dict = OrderedDict()
        shadow_entries: dict = OrderedDict()
        for s in self.plan.slots:
            entries.setdefault(t[s.name].dtype, []).append(PackEntry(t[s.name], s))
        for b in self.blocks:
            for k, dt in keys.get(b.slot.name, ()):
                v = self.base.state[b.param][k]
                shadow = self.shadow.setdefault(b.slot.name, {}).setdefault(
                    k, torch.zeros(t[b.slot.name].shape, dtype=v.dtype, device=v.device))
                compact_state.setdefault(dt, []).append(v)
                shadow_entries.setdefault(dt, []).append(PackEntry(shadow, b.slot))
        payload = Payload()
        payload.mean = OrderedDict((dt, flatten(ts)) for dt, ts in mean.items())
        payload.max = OrderedDict((dt, flatten(ts)) for dt, ts in counters.items())
        sizes = {}
        for dt in list(entries) + [d for d in shadow_entries if d not in entries]:
            # per rank: (elements of the model tensors, elements in all) of its block in the buffer
            sizes[dt] = [(sum(owned_numel(e.tensor.shape, e.slot, self.plan.sizes, self.workers, r)
                              for e in entries.get(dt, [])),
                          sum(owned_numel(e.tensor.shape, e.slot, self.plan.sizes, self.workers, r)
                              for e in entries.get(dt, []) + shadow_entries.get(dt, [])))
                          for r in range(self.workers)]
            flat = pack_owned(entries.get(dt, []), owned, compact_state.get(dt, []))
            if flat.numel() != sizes[dt][rank][1]:
                raise RuntimeError(f"internal: packed {flat.numel()} elements, the plan says {sizes[dt][rank][1]}")
            pad = max(total for _, total in sizes[dt]) - flat.numel()
            payload.gather[dt] = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
        self._pending = (mean, counters, entries, shadow_entries, sizes)
        return payload

    def unpack(self, result: Payload, parts: list[dict], rank: int, *, model_rows: bool = True) -> None:
        """Write the exchanged buffers back. model_rows=False: the model's partitioned tensors are masters
        shared with every (simulated) worker and already hold all blocks, so only the state is unpacked."""
        mean, counters, entries, shadow_entries, sizes = self._pending
        self._pending = None
        for dt, ts in mean.items():
            unflatten_(result.mean[dt], ts)
        for dt, ts in counters.items():
            unflatten_(result.max[dt], ts)
        for dt, gathered in result.gather.items():
            model_part, shadows = entries.get(dt, []), shadow_entries.get(dt, [])
            for r in range(self.workers):
                n_model, n_all = sizes[dt][r]
                if r != rank and model_rows:
                    unpack_owned(gathered[r, :n_all], model_part + shadows, parts[r])
                elif shadows:  # the model rows are already in place: only the state goes to the shadow
                    unpack_owned(gathered[r, n_model:n_all], shadows, parts[r])

    def next_round_prior(self) -> dict:
        """Drop the compact state of the finished round; returns the scalar state to carry ("keep")."""
        prior = {}
        for b in self.blocks:
            old = self.base.state.pop(b.param, {})
            prior[b.slot.name] = split_state(old, b.shape)[1] if self.mode == "keep" else {}
        if self.mode == "reset":
            self.base.state.clear()
            self.shadow = {}
        return prior
