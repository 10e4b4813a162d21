"""The LoFT sync: which tensors are shared or partitioned, how they are bucketed and exchanged.

`SyncPlan` sorts a model's state once:
- shared: trainable parameters outside every filter group, and floating buffers
  outside them (e.g. block-input BatchNorm statistics) -> mean over workers
  (one all_reduce per dtype);
- counters: integer buffers (`num_batches_tracked`) -> max (one all_reduce);
- slots: tensors holding filters (producer rows and bias, the members' channels
  and running statistics, consumer input columns) -> each worker contributes the
  rows it owns (one all_gather per dtype of `lk.pack_rows` buffers, padded to
  the largest rank's size, written back with `lk.unpack_rows`).
A conv that is the consumer of one group and the producer of the next (a VGG chain) is
one slot with both a row group and a column group: a worker trains only the
block (its rows) x (its columns), so only that block is sent.

Frozen parameters (requires_grad=False) never change and are not sent.
The same plan sizes the buffers that the optimizer sends and the bytes that
`loft_sync_bytes` reports, so the accounting and the traffic agree.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import pack_rows, unpack_rows
from .groups import FilterGroup
from .partition import owned_count

KINDS = ("all_reduce", "all_gather")


@dataclass(frozen=True)
class Slot:
    """A parameter or buffer holding filters: rows of `row_group` (dim 0) and/or columns of `col_group` (dim 1)."""
    name: str
    is_param: bool
    row_group: Optional[str]
    col_group: Optional[str]

    def index(self, owned: dict) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(rows, cols) of this slot for a worker owning `owned` (group name -> index tensor)."""
        return (None if self.row_group is None else owned[self.row_group],
                None if self.col_group is None else owned[self.col_group])


def owned_numel(shape: Sequence[int], slot: Slot, sizes: dict, workers: int, rank: int) -> int:
    """Number of elements of a slot-shaped tensor that `rank` owns (its block)."""
    numel = 1
    for d, s in enumerate(shape):
        group = slot.row_group if d == 0 else slot.col_group if d == 1 else None
        numel *= s if group is None else owned_count(sizes[group], workers, rank)
    return numel


class SyncPlan:
    """The classification of one model's tensors for the sync (see module docstring); names only."""

    def __init__(self, model: nn.Module, groups: Sequence[FilterGroup], workers: int):
        self.workers = workers
        self.sizes = {g.name: g.n for g in groups}
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        rows: dict[str, str] = {}
        cols: dict[str, str] = {}
        for g in groups:
            for name, _, dim in g.filter_tensors(model):
                target = rows if dim == 0 else cols
                if name in target:
                    raise ValueError(f"groups: {name!r} belongs to groups {target[name]!r} and {g.name!r} along the "
                                     f"same dimension; filter groups must be disjoint")
                target[name] = g.name
        slots = []
        for name, t in list(params.items()) + list(buffers.items()):
            if name not in rows and name not in cols:
                continue
            is_param = name in params
            if is_param and not t.requires_grad:
                continue
            slots.append(Slot(name, is_param, rows.get(name), cols.get(name)))
        self.slots: list[Slot] = slots
        partitioned = set(rows) | set(cols)
        self.shared_params = [n for n, p in params.items() if p.requires_grad and n not in partitioned]
        self.shared_buffers = [n for n, b in buffers.items() if b.is_floating_point() and n not in partitioned]
        self.counters = [n for n, b in buffers.items()
                         if not b.is_floating_point() and not b.is_complex() and b.dtype != torch.bool]
        self.slot_params = [s for s in slots if s.is_param]
        self.trainable = self.shared_params + [s.name for s in self.slot_params]

    def tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """Name -> current parameter/buffer tensor of `model` (a model of the same architecture)."""
        out = dict(model.named_parameters())
        out.update(model.named_buffers())
        return out

    def bucket_numels(self, model: nn.Module, state_keys: dict) -> dict[tuple[str, torch.dtype], int]:
        """Elements per (bucket, dtype) for one sync: 'mean' and 'max' all_reduce, 'gather' per-rank padded size.

        state_keys: parameter name -> list of (key, dtype) of the parameter-shaped optimizer
        state tensors sent with it (state="keep"; empty for "reset").
        """
        t = self.tensors(model)
        out: dict[tuple[str, torch.dtype], int] = OrderedDict()

        def add(key, n):
            out[key] = out.get(key, 0) + n
        for n in self.shared_params:
            add(("mean", t[n].dtype), t[n].numel())
            for _, dt in state_keys.get(n, ()):
                add(("mean", dt), t[n].numel())
        for n in self.shared_buffers:
            add(("mean", t[n].dtype), t[n].numel())
        for n in self.counters:
            add(("max", t[n].dtype), t[n].numel())
        per_rank: dict[torch.dtype, list[int]] = OrderedDict()
        for s in self.slots:
            entries = [t[s.name].dtype] + [dt for _, dt in state_keys.get(s.name, ())]
            for dt in entries:
                sizes = per_rank.setdefault(dt, [0] * self.workers)
                for r in range(self.workers):
                    sizes[r] += owned_numel(t[s.name].shape, s, self.sizes, self.workers, r)
        for dt, sizes in per_rank.items():
            out[("gather", dt)] = max(sizes)
        return out


# ------------------------------------------------------------ buffers ----
def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@dataclass
class PackEntry:
    """One tensor's owned block in a gather buffer: `tensor` (full size) with the slot's rows/cols."""
    tensor: Tensor
    slot: Slot


def _owned_layout(entries: Sequence[PackEntry], owned: dict):
    """Per entry: the tensor to pack/unpack, its indices and dim; for a block (rows and
    columns both owned) a column-gathered copy whose rows are packed, listed in `blocks`."""
    tensors, indices, dims, blocks = [], [], [], []
    for e in entries:
        rows, cols = e.slot.index(owned)
        if rows is not None and cols is not None:
            tmp = e.tensor.index_select(1, cols)
            blocks.append((e.tensor, cols, tmp))
            tensors.append(tmp)
            indices.append(rows)
            dims.append(0)
        else:
            tensors.append(e.tensor)
            indices.append(rows if rows is not None else cols)
            dims.append(0 if rows is not None else 1)
    return tensors, indices, dims, blocks


def pack_owned(entries: Sequence[PackEntry], owned: dict, compact: Sequence[Tensor] = ()) -> Tensor:
    """One flat buffer: each entry's block for `owned`, then the `compact` tensors (already in block layout)."""
    tensors, indices, dims, _ = _owned_layout(entries, owned)
    for c in compact:
        tensors.append(c)
        indices.append(torch.arange(c.shape[0], device=c.device))
        dims.append(0)
    return pack_rows(tensors, indices, dims)


def unpack_owned(flat: Tensor, entries: Sequence[PackEntry], owned: dict) -> None:
    """Write a `pack_owned` buffer (without compact tail: its entries are given full-size here) back."""
    tensors, indices, dims, blocks = _owned_layout(entries, owned)
    unpack_rows(flat, tensors, indices, dims)
    with torch.no_grad():
        for t, cols, tmp in blocks:
            t.index_copy_(1, cols, tmp)


@dataclass
class Payload:
    """What one rank contributes to a sync, one flat buffer per (bucket, dtype)."""
    mean: dict = field(default_factory=OrderedDict)    # dtype -> buffer, summed then divided by S
    max: dict = field(default_factory=OrderedDict)     # dtype -> buffer, elementwise max
    gather: dict = field(default_factory=OrderedDict)  # dtype -> padded buffer; result [S, P]

    def collectives(self, workers: int) -> list[tuple[str, int]]:
        """(kind, buffer bytes) of each collective this payload needs; all_gather bytes = the gathered total."""
        out = [("all_reduce", b.numel() * b.element_size()) for b in (*self.mean.values(), *self.max.values())]
        out += [("all_gather", workers * b.numel() * b.element_size()) for b in self.gather.values()]
        return out
