"""Communication accounting for LoFT: the ring model and the bytes of one sync.

Ring model (per rank, S ranks):
- all_reduce of a B-byte buffer: reduce-scatter then all-gather, each rank
  sends and receives 2 (S - 1) / S * B bytes;
- all_gather producing T bytes in total (S pieces of T / S): each rank sends and
  receives (S - 1) / S * T bytes.
Byte counts are integers (floor of the ring formula per collective).

`loft_sync_bytes` gives the traffic of one LoFT sync from the model alone; the
optimizer's `comm_stats()` adds up the collectives it really runs, whose
buffers are sized by the same `SyncPlan`, and the communication model
(`lk.comm_cost`) uses `loft_sync_bytes`, so all three agree.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence

from torch import nn

from .. import _checks as C
from ..filter_group import resolve_groups
from ..nn.views import full_view
from .groups import FilterGroup
from .sync import KINDS, SyncPlan

STATES = ("reset", "keep")


def ring_all_reduce_bytes(nbytes: int, workers: int) -> int:
    """Bytes one rank sends (= receives) in a ring all_reduce of an `nbytes` buffer."""
    nbytes = C.non_negative_int(nbytes, "nbytes")
    workers = C.positive_int(workers, "workers")
    return 2 * (workers - 1) * nbytes // workers


def ring_all_gather_bytes(total_bytes: int, workers: int) -> int:
    """Bytes one rank sends (= receives) in a ring all_gather whose gathered result has `total_bytes`."""
    total_bytes = C.non_negative_int(total_bytes, "total_bytes")
    workers = C.positive_int(workers, "workers")
    return (workers - 1) * total_bytes // workers


def summarize(collectives: Iterable[tuple[str, int]], workers: int) -> dict:
    """Per-kind totals of (kind, buffer bytes) collectives for one rank (all_gather: bytes gathered in total)."""
    out = {k: {"collectives": 0, "buffer_bytes": 0, "bytes_sent": 0, "bytes_received": 0} for k in KINDS}
    for kind, nbytes in collectives:
        moved = ring_all_reduce_bytes(nbytes, workers) if kind == "all_reduce" else \
            ring_all_gather_bytes(nbytes, workers)
        entry = out[kind]
        entry["collectives"] += 1
        entry["buffer_bytes"] += nbytes
        entry["bytes_sent"] += moved
        entry["bytes_received"] += moved
    for key in ("collectives", "bytes_sent", "bytes_received"):
        out[key] = sum(out[k][key] for k in KINDS)
    return out


class CommStats:
    """Running totals of the collectives one rank ran, in the ring model (see `LoftOptimizer.comm_stats`)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.syncs = 0
        self.totals = summarize((), workers)

    def add_sync(self, collectives: Sequence[tuple[str, int]]) -> None:
        one = summarize(collectives, self.workers)
        self.syncs += 1
        for k in KINDS:
            for key, v in one[k].items():
                self.totals[k][key] += v
        for key in ("collectives", "bytes_sent", "bytes_received"):
            self.totals[key] += one[key]

    def as_dict(self) -> dict:
        out = {"workers": self.workers, "syncs": self.syncs}
        out.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in self.totals.items()})
        return out

    def state_dict(self) -> dict:
        return self.as_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.syncs = int(sd["syncs"])
        self.totals = {k: (dict(sd[k]) if k in KINDS else int(sd[k]))
                       for k in (*KINDS, "collectives", "bytes_sent", "bytes_received")}


def loft_sync_bytes(model: nn.Module, groups: Sequence[FilterGroup], workers: int, state: str = "reset", *,
                    state_per_param: int = 1) -> dict:
    """Traffic of one LoFT sync for one rank, per collective kind, in the ring model.

    Returns {"all_reduce": {...}, "all_gather": {...}, "collectives", "bytes_sent",
    "bytes_received"}, each kind with "collectives", "buffer_bytes" (all_gather:
    the gathered total), "bytes_sent", "bytes_received". A sync is one all_reduce
    (mean) of the shared trainable parameters and floating buffers, one
    all_reduce (max) of the integer buffers, and one all_gather of every rank's
    owned filter blocks padded to the largest rank's size (one collective per
    dtype of each). With state="keep" the optimizer state travels too:
    `state_per_param` parameter-shaped state tensors per trainable parameter
    (SGD with momentum: 1, the default and the paper's optimizer; Adam/AdamW: 2;
    plain SGD: 0), averaged for shared parameters and moved with the filters
    for partitioned ones. With workers=1 nothing is sent.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    workers = C.positive_int(workers, "workers")
    if not isinstance(state, str) or state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    if isinstance(state_per_param, bool) or not isinstance(state_per_param, numbers.Integral):
        raise TypeError(f"state_per_param must be an int, got {type(state_per_param).__name__}")
    if state_per_param < 0:
        raise ValueError(f"state_per_param must be >= 0, got {state_per_param}")
    with full_view(model):  # a worker's model mid-round: its groups' layers and tensors at full size
        groups = [r.group for r in resolve_groups(model, groups, workers)]
        plan = make_plan(model, groups, workers)
        if workers == 1:
            return summarize((), workers)
        state_keys = {}
        if state == "keep":
            t = plan.tensors(model)
            state_keys = {n: [(f"state{i}", t[n].dtype) for i in range(state_per_param)]
                          for n in plan.shared_params + [s.name for s in plan.slot_params]}
        numels = plan.bucket_numels(model, state_keys)
    collectives = []
    for (bucket, dtype), numel in numels.items():
        nbytes = numel * dtype.itemsize
        collectives.append(("all_gather", workers * nbytes) if bucket == "gather" else ("all_reduce", nbytes))
    return summarize(collectives, workers)


def make_plan(model: nn.Module, groups: Sequence[FilterGroup], workers: int) -> SyncPlan:
    """SyncPlan with module lookups failing as a ValueError that names `groups`."""
    try:
        return SyncPlan(model, groups, workers)
    except AttributeError as exc:
        raise ValueError(f"groups names a module the model does not have ({exc}); were the groups found on "
                         f"this model?") from exc
