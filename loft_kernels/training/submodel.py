"""Compact sub-models: a LoFT worker's partitioned tensors replaced, for one round, by its own block.

During a round a worker trains an ordinary, physically smaller network: every
parameter or buffer that holds filters of a group keeps its identity (the same
`nn.Parameter`, so optimizers, hooks and `model.parameters()` stay valid) but
its `.data` is swapped for the worker's compact block `full[rows][:, cols]`.
Forward, backward, gradients and optimizer state then exist only at that size.
The full-size tensor (the *master*) is kept aside and written back at the sync.

The master is either the tensor's own former storage (a distributed rank) or a
tensor shared with other workers (the simulator's full model): a shared master
is never written outside the sync, so every view of it (`state_dict`, `dense`,
`load_state_dict`) works on a merged copy instead.

`model.state_dict()` is full-size at any time (owned block as trained so far,
the rest as at the last sync) and `load_state_dict` takes full-size tensors;
both go through module hooks registered here, which do nothing for a module
that holds no compact tensor.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

_RECORDS = "_loft_compact"      # module attribute: attr name -> _Compact
_HOOKED = "_loft_compact_hooks"  # module attribute: the hooks below are registered
_FULL_VIEW = "_loft_full_view"    # module attribute: inside `full_size`, the data is the full-size value


@dataclass
class _Compact:
    master: Tensor
    rows: Optional[Tensor]
    cols: Optional[Tensor]
    shared: bool
    groups: Optional[int] = None  # a depthwise conv's `groups` before it was shrunk


def gather(t: Tensor, rows: Optional[Tensor], cols: Optional[Tensor]) -> Tensor:
    """t[rows][:, cols] (None = all) as a new contiguous tensor."""
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None:
        t = t.index_select(1, cols)
    return t if rows is not None or cols is not None else t.clone()


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


def _records(module: nn.Module) -> dict:
    return module.__dict__.get(_RECORDS) or {}


def is_compact(module: nn.Module) -> bool:
    """Whether `module` holds compact (shrunk) tensors now."""
    return bool(_records(module))


def refuse_active_sets(module: nn.Module) -> None:
    """Active sets (the full-size path of the Loft layers) cannot apply to a layer that is compact now."""
    if is_compact(module):
        raise RuntimeError(f"{type(module).__name__}: this layer is training as part of a LoftOptimizer's compact "
                           f"sub-model this round; active sets apply to full-size layers only")


def compact_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if is_compact(m))


def _tensor(module: nn.Module, attr: str) -> Tensor:
    t = module._parameters.get(attr)
    if t is None:
        t = module._buffers.get(attr)
    if t is None:
        raise ValueError(f"module {type(module).__name__} has no parameter or buffer {attr!r}")
    return t


def _merged(module: nn.Module, attr: str, rec: _Compact) -> Tensor:
    """The full-size value: the master with this module's compact block written in (a copy if shared)."""
    full = rec.master.clone() if rec.shared else rec.master
    scatter_(full, rec.rows, rec.cols, _tensor(module, attr).data)
    return full


def shrink_(module: nn.Module, attr: str, rows: Optional[Tensor], cols: Optional[Tensor],
            master: Optional[Tensor] = None) -> None:
    """Swap `module.<attr>`'s data for its block rows x cols (None = all along that dim).

    `master`: the full-size tensor to gather from and write back to at `expand_`; a
    tensor shared with other workers (never written here outside `expand_`). By
    default the tensor's own current data becomes the master.
    """
    if attr in _records(module):
        raise RuntimeError(f"{type(module).__name__}.{attr} is already compact; expand it first")
    t = _tensor(module, attr)
    shared = master is not None
    if master is None:
        master = t.data
    elif master.shape != t.shape and t.numel() != 0:
        raise ValueError(f"master has shape {tuple(master.shape)}, {attr} has {tuple(t.shape)}")
    if not module.__dict__.get(_HOOKED):
        module.register_state_dict_post_hook(_state_dict_hook)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
        module.register_load_state_dict_post_hook(_load_post_hook)
        module.__dict__[_HOOKED] = True
    rec = _Compact(master, rows, cols, shared)
    if isinstance(module, nn.Conv2d) and attr == "weight" and module.groups > 1 and rows is not None:
        if module.groups == master.shape[0] and master.shape[1] == 1:  # depthwise: one conv group per channel
            rec.groups = module.groups
            module.groups = len(rows)
        elif len(rows) % module.groups:  # a grouped conv keeps its groups, each with fewer channels
            raise ValueError(f"a grouped convolution (groups={module.groups}) can only be shrunk to the same share "
                             f"of every conv group; got {len(rows)} filters")
    if t.grad is not None:
        t.grad = None  # a gradient of the old shape cannot accumulate into the new one
    t.data = gather(master, rows, cols)
    module.__dict__.setdefault(_RECORDS, {})[attr] = rec


def expand_(module: nn.Module, attr: str) -> None:
    """Write `module.<attr>`'s compact block into its master and make the master its data again."""
    rec = _records(module)[attr]
    scatter_(rec.master, rec.rows, rec.cols, _tensor(module, attr).data)
    release_(module, attr)


def release_(module: nn.Module, attr: str) -> None:
    """Make the master `module.<attr>`'s data again and drop the compact block unwritten."""
    rec = _records(module).pop(attr)
    t = _tensor(module, attr)
    if t.grad is not None:
        t.grad = None
    t.data = rec.master
    if rec.groups is not None:
        module.groups = rec.groups


@contextlib.contextmanager
def full_size(model: nn.Module):
    """Every compact tensor of `model` shows its full-size value inside the block; compact again after.

    Changes made inside (e.g. BatchNorm statistics in train mode) to the owned
    block are kept; a shared master is not written.
    """
    saved = []
    for m in [m for m in compact_modules(model) if not m.__dict__.get(_FULL_VIEW)]:  # nested: the outer one holds
        m.__dict__[_FULL_VIEW] = True
        for attr, rec in _records(m).items():
            t = _tensor(m, attr)
            saved.append((m, attr, rec, t, t.data))
            t.data = _merged(m, attr, rec)
            if rec.groups is not None:
                m.groups = rec.groups
    try:
        yield model
    finally:
        for m, attr, rec, t, compact in saved:
            compact.copy_(gather(t.data, rec.rows, rec.cols))
            t.data = compact
            if rec.groups is not None:
                m.groups = len(rec.rows)
            m.__dict__.pop(_FULL_VIEW, None)


# ------------------------------------------------------------- hooks ----
def _state_dict_hook(module, state_dict, prefix, local_metadata):
    if module.__dict__.get(_FULL_VIEW):
        return  # the data already is the full-size value
    for attr, rec in _records(module).items():
        if prefix + attr in state_dict:
            state_dict[prefix + attr] = _merged(module, attr, rec).detach()


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs):
    # Load full-size values into the master (a scratch copy of a shared one); the post hook gathers the blocks.
    if module.__dict__.get(_FULL_VIEW):
        return  # load into the full-size view; leaving `full_size` cuts the blocks from it
    pending = {}
    for attr, rec in _records(module).items():
        t = _tensor(module, attr)
        pending[attr] = t.data
        t.data = _merged(module, attr, rec)
    module.__dict__["_loft_loading"] = pending


def _load_post_hook(module, incompatible_keys):
    pending = module.__dict__.pop("_loft_loading", {})
    for attr, compact in pending.items():
        rec = _records(module)[attr]
        t = _tensor(module, attr)
        compact.copy_(gather(t.data, rec.rows, rec.cols))
        t.data = compact
