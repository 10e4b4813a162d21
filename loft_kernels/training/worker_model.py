"""WorkerModel: the one owner of a LoFT worker's model and of the block of each filter it holds this round.

During a round a worker trains an ordinary, physically smaller network: every
parameter or buffer that holds filters of a group (a *slot* of the sync plan)
keeps its identity (the same `nn.Parameter`, so optimizers, hooks and
`model.parameters()` stay valid) but its `.data` is swapped for the worker's
block `full[rows][:, cols]`. Forward, backward, gradients and optimizer state
then exist only at that size. The full-size tensors (the *masters*) are kept
aside and written back at the sync.

A `WorkerModel` has an explicit state, "full" or "compact", and holds the
round's block once: `owned`, the worker's filter indices per group; every
slot's rows/columns are derived from it. Its operations:

- `shrink(owned)`: full -> compact (cut every slot's block from its master);
- `expand(write_back)`: compact -> full (write the blocks back, or drop them);
- `full_view()`: a context in which the model shows its full-size values;
- the module hooks that keep `state_dict()` / `load_state_dict()` full-size,
  refuse `load_state_dict(assign=True)` mid-round (it would replace the
  parameters the optimizer holds), make `.to()`, `.double()`, `.half()`,
  `.cuda()` (every `nn.Module._apply`) move the masters along, and make the
  `repr` of a compact layer say it is a block.

The masters are either the tensors' own former storage (a distributed rank)
or tensors shared with other workers (`shared=True`: the simulator's full
model), which are written only by `expand` at the sync: every view of them
(`state_dict`, `full_view`) works on a merged copy instead.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..nn.views import OWNER, owners
from .sync import SyncPlan

FULL, COMPACT = "full", "compact"


def channels_last(t: Tensor) -> bool:
    """True for a 4-D tensor laid out channels-last (and not also plain contiguous, as a 1-channel one is)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def gather(t: Tensor, rows: Optional[Tensor], cols: Optional[Tensor]) -> Tensor:
    """t[rows][:, cols] (None = all) as a new tensor in t's memory format (a channels-last master keeps
    channels-last blocks, so a worker's convolutions run in the layout the model was put in)."""
    out = t
    if rows is not None:
        out = out.index_select(0, rows)
    if cols is not None:
        out = out.index_select(1, cols)
    if out is t:
        return t.clone()
    if channels_last(t):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def scatter_(t: Tensor, rows: Optional[Tensor], cols: Optional[Tensor], value: Tensor) -> None:
    """t[rows][:, cols] = value in place (the inverse of `gather`)."""
    with torch.no_grad():
        if rows is None and cols is None:
            t.copy_(value)
        elif cols is None:
            t.index_copy_(0, rows, value)
        elif rows is None:
            t.index_copy_(1, cols, value)
        else:
            t.index_put_((rows[:, None], cols[None, :]), value)


class _Entry:
    """One slot of the plan as this model holds it: its module, attribute and (while compact) master."""
    __slots__ = ("slot", "module", "attr", "master", "groups")

    def __init__(self, slot, module: nn.Module, attr: str):
        self.slot, self.module, self.attr = slot, module, attr
        self.master: Optional[Tensor] = None
        self.groups: Optional[int] = None  # a depthwise conv's `groups` while it is shrunk

    def tensor(self) -> Tensor:
        t = self.module._parameters.get(self.attr)
        return self.module._buffers.get(self.attr) if t is None else t


class WorkerModel:
    """Owner of `model` for one LoFT worker: see the module docstring.

    Args:
        model: the worker's model (full-size now).
        plan: the sync plan of `model` (which tensors hold filters of which group).
        masters: None (the model's own tensors become the masters at `shrink`) or
            slot name -> full-size tensor shared with other workers.
    """

    def __init__(self, model: nn.Module, plan: SyncPlan, masters: Optional[dict] = None):
        for previous in owners(model):
            if previous.state == COMPACT:
                raise RuntimeError(
                    "model is already compact: another LoftOptimizer trains it as a worker's sub-model this round, "
                    "and a model has one LoFT owner. Build the new optimizer on a full-size model, e.g. a fresh "
                    "one loaded with model.state_dict() (full-size at any time)")
            previous.release()  # full-size: the old owner holds nothing; the new one takes over
        self.model, self.plan = model, plan
        self.shared = bool(masters)
        self._given = dict(masters or {})
        self.owned: Optional[dict[str, Tensor]] = None  # the round's block: group -> sorted filter indices (CPU)
        self._on: dict = {}  # (group, device) -> `owned[group]` on that device
        self._viewing = 0
        self._applying = False
        self.entries: list[_Entry] = []
        for s in plan.slots:
            owner, _, attr = s.name.rpartition(".")
            self.entries.append(_Entry(s, model.get_submodule(owner) if owner else model, attr))
        self._by_name = {e.slot.name: e for e in self.entries}
        hooked = {}
        for e in self.entries:
            hooked.setdefault(id(e.module), e.module)
        self._modules = list(hooked.values())
        self._handles = [model.register_load_state_dict_pre_hook(_Hook(self, "_refuse_assign"))]
        for m in self._modules:
            m.__dict__[OWNER] = self
            self._handles += [m.register_state_dict_post_hook(_Hook(self, "_state_dict_hook")),
                              m.register_load_state_dict_pre_hook(_Hook(self, "_load_pre_hook")),
                              m.register_load_state_dict_post_hook(_Hook(self, "_load_post_hook"))]
        # `_apply` (to/double/half/cuda/...) on any module above or at a slot moves the masters along.
        names = {n for n, m in model.named_modules() if id(m) in hooked}
        above = {n.rpartition(".")[0] if "." in n else "" for n in names}
        while above - names:
            names |= above
            above = {n.rpartition(".")[0] if "." in n else "" for n in names}
        self._appliers = [m for n, m in model.named_modules() if n in names]
        for m in self._appliers:
            m.__dict__["_apply"] = _Apply(self, m)

    def release(self) -> None:
        """Let go of a full-size model: remove the hooks and marks (a new owner takes over)."""
        if self.owned is not None:
            raise RuntimeError("internal: release() of a compact worker model")
        for h in self._handles:
            h.remove()
        for m in self._modules:
            if m.__dict__.get(OWNER) is self:
                del m.__dict__[OWNER]
        for m in self._appliers:
            if getattr(m.__dict__.get("_apply"), "owner", None) is self:
                del m.__dict__["_apply"]
        self._handles, self._modules, self._appliers = [], [], []

    # ------------------------------------------------------------ state ----
    @property
    def state(self) -> str:
        """"full" (every tensor full-size) or "compact" (the slots hold this worker's blocks)."""
        return FULL if self.owned is None else COMPACT

    def holds_block(self, module: nn.Module) -> bool:
        """Whether `module` holds a block (not its full tensors) now."""
        return bool(self._compact_here(module))

    def on_devices(self, owned: dict[str, Tensor]) -> dict[str, Tensor]:
        """`owned` (group -> indices) with each group's indices on the device of that group's tensors."""
        out = {}
        for e in self.entries:
            for group in (e.slot.row_group, e.slot.col_group):
                if group is not None and group not in out:
                    device = (e.master if e.master is not None else e.tensor()).device
                    out[group] = self._to(group, owned[group], device) if owned is self.owned else \
                        owned[group].to(device)
        return out

    def index(self, slot) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(rows, cols) of `slot` this round, on the device of its tensor (None = all along that dim)."""
        if self.owned is None:
            raise RuntimeError("internal: the worker model is full-size; it holds no block")
        device = self._device(slot.name)
        # the groups' indices move to the device once (cached); the slot derives its rows/columns from them
        owned = {g: self._to(g, self.owned[g], device) for g in (slot.row_group, slot.col_group) if g is not None}
        return slot.index(owned)

    def _device(self, name: str) -> torch.device:
        e = self._by_name[name]
        return (e.master if e.master is not None else e.tensor()).device

    def _to(self, group, idx, device):
        if idx is None:
            return None
        key = (group, device)
        if key not in self._on:
            self._on[key] = idx.to(device)
        return self._on[key]

    # ------------------------------------------------------- operations ----
    def shrink(self, owned: dict[str, Tensor]) -> None:
        """full -> compact: every slot's data becomes this worker's block of its master."""
        if self.owned is not None:
            raise RuntimeError("internal: the worker model is compact already; expand() it first")
        self.owned = {k: v.cpu() for k, v in owned.items()}
        self._on = {}
        for e in self.entries:
            t = e.tensor()
            e.master = self._given[e.slot.name] if self.shared else t.data
            rows, cols = self.index(e.slot)
            m = e.module
            if (isinstance(m, nn.Conv2d) and e.attr == "weight" and rows is not None
                    and m.groups > 1 and m.groups == e.master.shape[0] and e.master.shape[1] == 1):
                e.groups, m.groups = m.groups, len(rows)  # a depthwise member keeps one input channel per filter
            # a grouped conv keeps its number of conv groups, each with fewer channels (aligned partition)
            if t.grad is not None:
                t.grad = None  # a gradient of the old shape cannot accumulate into the new one
            t.data = gather(e.master, rows, cols)
        for m in self._modules:
            m.__dict__["extra_repr"] = _BlockRepr(self, m)

    def expand(self, write_back: bool = True) -> None:
        """compact -> full: write every block into its master (unless `write_back=False`) and hold the master."""
        if self.owned is None:
            return
        for e in self.entries:
            t = e.tensor()
            if write_back:
                rows, cols = self.index(e.slot)
                scatter_(e.master, rows, cols, t.data)
            if t.grad is not None:
                t.grad = None
            t.data = e.master
            e.master = None
            if e.groups is not None:
                e.module.groups, e.groups = e.groups, None
        for m in self._modules:
            m.__dict__.pop("extra_repr", None)
        self.owned = None

    def merged(self, e: _Entry) -> Tensor:
        """The full-size value of a slot: its master with this worker's block written in (a copy if shared)."""
        full = e.master.clone() if self.shared else e.master
        rows, cols = self.index(e.slot)
        scatter_(full, rows, cols, e.tensor().data)
        return full

    @contextlib.contextmanager
    def full_view(self):
        """Every slot shows its full-size value inside the block; compact again after.

        Changes made inside (e.g. BatchNorm statistics in train mode) to the owned
        block are kept; a shared master is not written. Nested views share the outer one.
        """
        if self.owned is None or self._viewing:
            self._viewing += 1
            try:
                yield self.model
            finally:
                self._viewing -= 1
            return
        saved = []
        for e in self.entries:
            t = e.tensor()
            saved.append((e, t, t.data))
            t.data = self.merged(e)
            if e.groups is not None:
                e.module.groups = e.groups
        self._viewing += 1
        try:
            yield self.model
        finally:
            self._viewing -= 1
            for e, t, compact in saved:
                rows, cols = self.index(e.slot)
                compact.copy_(gather(t.data, rows, cols))
                t.data = compact
                if e.groups is not None:
                    e.module.groups = len(rows)

    def _compact_here(self, module: nn.Module) -> list[_Entry]:
        if self.owned is None or self._viewing:
            return []
        return [e for e in self.entries if e.module is module]

    # ------------------------------------------------------------ hooks ----
    def _state_dict_hook(self, module, state_dict, prefix, local_metadata):
        for e in self._compact_here(module):
            if prefix + e.attr in state_dict:
                state_dict[prefix + e.attr] = self.merged(e).detach()

    def _refuse_assign(self, module, state_dict, prefix, local_metadata, *args):
        # Registered on the root too, whose hook runs before any module is loaded: nothing is replaced.
        if self.owned is not None and not self._viewing and local_metadata.get("assign_to_params_buffers"):
            raise RuntimeError("load_state_dict(assign=True) would replace the parameters a LoftOptimizer trains "
                               "mid-round; load without assign (the values are copied into the worker's block)")

    def _load_pre_hook(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
        # Load full-size values into the master (a scratch copy of a shared one); the post hook cuts the blocks.
        self._refuse_assign(module, state_dict, prefix, local_metadata)
        entries = self._compact_here(module)
        for e in entries:
            t = e.tensor()
            module.__dict__.setdefault("_loft_loading", []).append((e, t.data))
            t.data = self.merged(e)

    def _load_post_hook(self, module, incompatible_keys):
        for e, compact in module.__dict__.pop("_loft_loading", []):
            rows, cols = self.index(e.slot)
            t = e.tensor()
            compact.copy_(gather(t.data, rows, cols))
            t.data = compact

    def apply(self, module: nn.Module, fn: Callable) -> nn.Module:
        """`module._apply(fn)` with the masters following: expand, convert the full model, shrink again.

        A worker whose masters are shared (the simulator's) is converted through
        the simulator's model, which converts its masters and every worker.
        """
        if self._applying or self.owned is None:
            return nn.Module._apply(module, fn)
        if self.shared:
            raise RuntimeError("this worker's blocks are cut from LoftSimulator.model; convert that model "
                               "(e.g. sim.model.double()), which converts every worker with it")
        owned = self.owned
        self._applying = True
        try:
            self.expand(write_back=True)
            nn.Module._apply(module, fn)
        finally:
            self._applying = False
            self.shrink(owned)
        return module

    def apply_shared(self, fn: Callable, masters: dict) -> None:
        """The simulator converted the shared masters with `fn` (`masters`: the converted ones; a converted
        buffer is a new tensor): convert this worker's own tensors too."""
        self._given = dict(masters)
        for e in self.entries:
            if e.master is not None:
                e.master = self._given[e.slot.name]
        self._applying = True
        try:
            nn.Module._apply(self.model, fn)
        finally:
            self._applying = False
        self._on = {}


class _Hook:
    """A module hook calling one method of its WorkerModel (an object: torch marks hooks with attributes)."""

    _loft_attached = True  # what a LoFT run attaches to a model; a ticket cut from it leaves these behind

    def __init__(self, owner: WorkerModel, method: str):
        self.owner, self.method = owner, method

    def __call__(self, *args):
        return getattr(self.owner, self.method)(*args)


class _Apply:
    """`module._apply` replacement installed by a WorkerModel (picklable, copied with the model)."""

    _loft_attached = True

    def __init__(self, owner: WorkerModel, module: nn.Module):
        self.owner, self.module = owner, module

    def __call__(self, fn, recurse: bool = True):
        if not recurse:
            return nn.Module._apply(self.module, fn, recurse=False)
        return self.owner.apply(self.module, fn)


class _BlockRepr:
    """`extra_repr` of a layer while it holds a worker's block: the layer's own text plus what the block is."""

    def __init__(self, owner: WorkerModel, module: nn.Module):
        self.owner, self.module = owner, module

    def __call__(self) -> str:
        own = type(self.module).extra_repr(self.module)
        if self.owner.owned is None or self.owner._viewing:
            return own
        parts = []
        for e in self.owner.entries:
            if e.module is self.module:
                full = tuple(e.master.shape)
                parts.append(f"{e.attr} {tuple(e.tensor().shape)} of {full}")
        return f"{own}, LoFT worker's block of the full layer: {', '.join(parts)}"


__all__ = ["WorkerModel", "gather", "scatter_", "FULL", "COMPACT"]
