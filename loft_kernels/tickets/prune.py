"""Physical filter pruning: draw the ticket and cut the removed filters out of the model."""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn

from .. import _checks as C
from ..ops import filter_norms, pruned_count
from . import _groups


def group_scores(model: nn.Module, groups) -> dict[str, Tensor]:
    """Group name -> [n] float32 L2 norms of the producer rows (conv or linear; one `lk.filter_norms` call)."""
    with _groups.full_view(model):
        resolved = _groups.resolve(model, groups)
        norms = filter_norms([r.producer.weight for r in resolved])
    return {r.group.name: s.detach().to("cpu", torch.float32) for r, s in zip(resolved, norms)}


def select_filters(scores, groups, ratio: float) -> dict[str, Tensor]:
    """Group name -> sorted int64 indices of the top `n - lk.pruned_count(n, ratio)` filters by score.

    `scores`: group name -> [n] importance (higher = keep), e.g. from
    `group_scores` or `FilterTracker.scores(tag)`. Ties go to the lower index.
    """
    groups = _groups.records(groups)
    ratio = C.ratio(ratio)
    if not isinstance(scores, dict):
        raise TypeError(f"scores must be a dict mapping group name to a 1-D tensor, got {type(scores).__name__}")
    kept = {}
    for g in groups:
        if g.name not in scores:
            raise ValueError(f"scores has no entry for group {g.name!r}")
        s = C.tensor(scores[g.name], f"scores[{g.name!r}]", ndim=1, floating=True)
        if s.shape[0] != g.n:
            raise ValueError(f"scores[{g.name!r}] has {s.shape[0]} entries, group has n={g.n}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{g.name!r}] contains NaN or infinite values")
        # A group crossing a grouped conv keeps the same count in every conv group (they stay equal in size).
        block = g.block_size
        keep = block - pruned_count(block, ratio)
        if keep < 1:
            raise ValueError(f"ratio {ratio} would remove all {g.n} filters of group {g.name!r}" +
                             (f" (all {block} of each of its {g.conv_groups} conv groups)" if g.conv_groups > 1 else ""))
        order = torch.sort(s.detach().cpu().view(g.conv_groups, block), dim=1, descending=True, stable=True).indices
        kept[g.name] = (order[:, :keep] + torch.arange(0, g.n, block)[:, None]).reshape(-1).sort().values.long()
    return kept


def _check_kept(kept, groups) -> dict[str, Tensor]:
    if not isinstance(kept, dict):
        raise TypeError(f"kept must be a dict mapping group name to kept indices, got {type(kept).__name__}")
    extra = set(kept) - {g.name for g in groups}
    if extra:
        raise ValueError(f"kept has entries for unknown group(s) {sorted(extra)}")
    out = {}
    for g in groups:
        if g.name not in kept:
            raise ValueError(f"kept has no entry for group {g.name!r}")
        idx = kept[g.name]
        device = idx.device if isinstance(idx, Tensor) else torch.device("cpu")
        out[g.name] = C.index(idx, f"kept[{g.name!r}]", g.n, device).cpu().sort().values
        counts = torch.bincount(out[g.name] // g.block_size, minlength=g.conv_groups)
        if g.conv_groups > 1 and not bool((counts == counts[0]).all()):
            raise ValueError(f"kept[{g.name!r}] keeps {counts.tolist()} filters of the group's {g.conv_groups} conv "
                             f"groups; a grouped conv needs the same count in each")
    return out


def slice_state_dict(state_dict, groups, kept) -> dict[str, Tensor]:
    """A full-size state dict (keys as in the model `groups` describe) cut down to the `kept` filters.

    Every tensor a group lists in `FilterGroup.filter_keys` is cut along its
    filter dim: producer rows and bias, each member's channels (BatchNorm
    weight/bias/running stats, depthwise weight/bias), consumer input columns;
    every other entry is passed through. This is the one place that maps
    full-size tensors to the pruned structure: `prune` and `rewind` both use it.
    """
    return _slice(state_dict, groups, kept, "state_dict")


def _slice(state_dict, groups, kept, what: str) -> dict[str, Tensor]:
    if not isinstance(state_dict, dict):
        raise TypeError(f"{what} must be a dict of tensors, got {type(state_dict).__name__}")
    groups = _groups.records(groups)
    kept = _check_kept(kept, groups)
    plan: dict[str, list[tuple[int, Tensor, str, int]]] = {}  # key -> [(dim, kept, group, n)]
    for g in groups:
        for key, dim in g.filter_keys():
            plan.setdefault(key, []).append((dim, kept[g.name], g.name, g.n))
    required = {f"{g.producer}.weight" for g in groups} | {f"{g.consumer}.weight" for g in groups}
    missing = sorted(required - state_dict.keys())
    if missing:
        raise ValueError(f"{what} lacks {missing}; it must come from the model the groups describe")
    out = OrderedDict()
    out._metadata = getattr(state_dict, "_metadata", None)  # module versions: their load hooks may need them
    if out._metadata is None:
        del out._metadata
    for key, value in state_dict.items():
        for dim, idx, group, n in plan.get(key, ()):
            blocks = _in_block(value, dim, n)
            if not isinstance(value, Tensor) or value.dim() <= dim or (value.shape[dim] != n and not blocks):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{what}[{key!r}] has shape {shape}; group {group!r} expects size "
                                 f"{n} along dim {dim}")
            value = _cut_blocks(value, idx, blocks) if blocks else value.index_select(dim, idx.to(value.device))
        out[key] = value
    return out


def _in_block(value, dim: int, n: int) -> int:
    """A grouped consumer's weight holds one of G blocks of the n channels along dim 1: G, else 0."""
    if dim != 1 or not isinstance(value, Tensor) or value.dim() < 2 or value.shape[1] in (0, n) or n % value.shape[1]:
        return 0
    return n // value.shape[1]


def _cut_blocks(weight: Tensor, kept: Tensor, blocks: int) -> Tensor:
    """weight[r][:, kept in-block positions of r's conv group]: each conv group keeps its own input channels."""
    size = weight.shape[1]
    local = (kept.to(weight.device) % size).view(blocks, -1)  # kept is sorted, the same count per block
    w = weight.view(blocks, weight.shape[0] // blocks, size, *weight.shape[2:])
    cut = torch.stack([w[b].index_select(1, local[b]) for b in range(blocks)])
    return cut.reshape(weight.shape[0], local.shape[1], *weight.shape[2:])


_PLAIN = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def _plain(m: nn.Module, out_size: int | None, in_size: int | None, depthwise: bool = False) -> nn.Module:
    """A plain nn.Conv2d / nn.Linear / nn.BatchNorm2d with m's configuration and the given channel counts.

    depthwise: m is a depthwise member; it becomes depthwise over out_size channels.
    """
    if isinstance(m, nn.Conv2d):
        cin, cout, groups = in_size or m.in_channels, out_size or m.out_channels, m.groups
        if depthwise:
            cin = groups = cout
        new = nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups, m.bias is not None,
                        m.padding_mode, device=m.weight.device, dtype=m.weight.dtype)
    elif isinstance(m, nn.Linear):
        new = nn.Linear(in_size or m.in_features, out_size or m.out_features, m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
    else:
        ref = next((t for t in (m.weight, m.running_mean) if t is not None), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = nn.BatchNorm2d(out_size or m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                             **factory)
    for name, p in new.named_parameters(recurse=False):
        p.requires_grad_(getattr(m, name).requires_grad)
    return new.train(m.training)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _build_pruned(model: nn.Module, groups, kept) -> nn.Module:
    """Deep copy of `model` with the pruned (or plain) modules swapped in and `kept` weights loaded.

    Loft layers anywhere in the model become their plain nn equivalents. Sizes come from the
    group records and values from `model.state_dict()`, both full-size also for a LoFT worker
    mid-round (whose partitioned tensors are compact blocks until the sync).
    """
    resolved = [r.group for r in _groups.resolve(model, groups)]
    kept = _check_kept(kept, resolved)
    out_size, in_size, depthwise = {}, {}, set()
    for g in resolved:
        for name in (g.producer, *(m.name for m in g.members if not m.input_side)):
            out_size[name] = len(kept[g.name])
        for name in (*(m.name for m in g.members if m.input_side), g.consumer):
            in_size[name] = len(kept[g.name])
        depthwise.update(g.depthwise)
    new = _plain_copy(model)
    for name, m in model.named_modules():
        loft = _groups.is_loft_layer(m)
        if not (name in out_size or name in in_size or loft):
            continue
        if type(m) not in _PLAIN and not loft:
            raise TypeError(f"module {name!r} is a {type(m).__name__}; pruning rebuilds only nn.Conv2d, nn.Linear, "
                            "nn.BatchNorm2d and loft_kernels' Loft layers, so its behaviour would be lost")
        rebuilt = _plain(m, out_size.get(name), in_size.get(name), name in depthwise)
        _set_module(new, name, _carry_attributes(new.get_submodule(name), rebuilt))
    new.load_state_dict(slice_state_dict(model.state_dict(), resolved, kept))
    return new


_HOOK_DICTS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _is_attached(v) -> bool:
    inner = getattr(v, "hook", None)  # torch wraps some hooks (the wrapper keeps the hook as `.hook`)
    return getattr(v, "_loft_attached", False) or getattr(inner, "_loft_attached", False)


def _attached(m: nn.Module) -> list[tuple[str | None, object]]:
    """What a LoFT run attached to module `m`, as (hook dict name or None for the module's own attributes,
    key): its owner marker, its conversion hook (an instance `_apply` that converts a simulator's workers, or
    a worker's blocks, with the module) and its state-dict hooks."""
    found = [(None, k) for k, v in m.__dict__.items() if k.startswith("_loft") or _is_attached(v)]
    for name in _HOOK_DICTS:
        found += [(name, k) for k, h in (m.__dict__.get(name) or {}).items() if _is_attached(h)]
    return found


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without what a LoFT run attached to it (see `_attached`): copying those would
    copy the whole simulator or worker state into the ticket and tie its `.to()` and state dict to them."""
    def holder(m: nn.Module, where: str | None) -> dict:
        return m.__dict__ if where is None else m.__dict__[where]
    attached = {name: _attached(m) for name, m in model.named_modules()}
    memo = {id(holder(model.get_submodule(name), where)[k]): None
            for name, items in attached.items() for where, k in items}
    new = copy.deepcopy(model, memo)
    for name, items in attached.items():
        for where, k in items:
            holder(new.get_submodule(name), where).pop(k, None)
    return new


def _carry_attributes(old: nn.Module, new: nn.Module) -> nn.Module:
    """The rebuilt layer takes over every plain attribute its (deep-copied) predecessor had beyond the layer's
    configuration (a version tag, a flag the model's forward reads) and its forward hooks; sizes and tensors are
    the new ones."""
    for key, value in old.__dict__.items():
        if key not in new.__dict__ and not key.startswith("_loft") and not isinstance(value, (Tensor, nn.Module)):
            new.__dict__[key] = value
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(old, hooks):
            getattr(new, hooks).update(getattr(old, hooks))
    return new


def _check_finite(model: nn.Module) -> None:
    """A ticket cut from a diverged model would compute garbage: refuse it, naming the tensor."""
    with _groups.full_view(model):
        for name, t in model.state_dict().items():
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"model: {name!r} holds NaN or infinite values (did the training diverge?); "
                                 f"a ticket cut from it would not compute finite outputs")


def prune(model: nn.Module, groups, ratio: float, criterion="l2") -> tuple[nn.Module, dict[str, Tensor]]:
    """Draw the ticket: keep the top `n - lk.pruned_count(n, ratio)` filters of each group, cut out the rest.

    criterion "l2" ranks filters by the L2 norm of their producer row (the
    LoFT paper); a dict group name -> [n] scores (e.g. `tracker.scores(tag)`)
    ranks by those instead. Ties keep the lower index. Note: the official LoFT
    prune script keeps the *smallest*-norm filters, an apparent slip; we keep
    the largest, as the paper describes.

    Returns (pruned, kept): `pruned` is a deep copy with the removed filters
    physically cut out of every tensor of their group (producer rows and bias,
    BatchNorm channels, depthwise kernels, consumer input columns), made of plain
    nn.Conv2d/nn.Linear/nn.BatchNorm2d (Loft layers replaced); `model` is left
    untouched; a model whose state holds NaN/inf (diverged training) is refused.
    `kept` maps group name -> sorted int64 kept indices. With
    zero-preserving per-channel ops in between (BN, ReLU, GELU, depthwise conv),
    `pruned` computes exactly what `model` does with the removed filters'
    producer rows, bias, BN affine parameters and depthwise bias zeroed.
    """
    groups = [r.group for r in _groups.resolve(model, groups)]
    ratio = C.ratio(ratio)
    _check_finite(model)
    if isinstance(criterion, str):
        if criterion != "l2":
            raise ValueError(f"criterion must be 'l2' or a dict of per-group scores, got {criterion!r}")
        scores = group_scores(model, groups)
    elif isinstance(criterion, dict):
        scores = criterion
    else:
        raise TypeError(f"criterion must be 'l2' or a dict of per-group scores, got {type(criterion).__name__}")
    kept = select_filters(scores, groups, ratio)
    return _build_pruned(model, groups, kept), kept
