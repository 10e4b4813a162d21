"""Loft layers: nn.Conv2d / nn.BatchNorm2d that can run on an active subset of filters.

A LoFT worker computes only the filters it owns (docs/algorithm.md): conv_a
produces the owned output channels, the norm normalises those, conv_b sums
over those input channels. `LoftConv2d` and `LoftBatchNorm2d` are drop-in
subclasses (same constructor, same state_dict) with an *active set*; with no
active set they are exactly their nn parents. With an active set the full-size
weights stay in place and gradients land in the full-size parameters, zero
outside the active rows/channels (the `lk.partial_conv2d` contract).

LoftOptimizer does not use active sets: it shrinks the partitioned tensors to
the worker's compact blocks for a round (`training.submodel`). `activate(model,
groups, assignment)` sets the active sets of a model from a worker's owned
filters per group; `dense(model)` evaluates the full model in either case.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks as C
from ..ops.partial_conv import _partial_conv2d
from .submodel import full_size, is_compact


def _refuse_if_compact(module: nn.Module) -> None:
    if is_compact(module):
        raise RuntimeError(f"{type(module).__name__}: this layer is training as part of a LoftOptimizer's compact "
                           f"sub-model this round; active sets apply to full-size layers only")


class LoftConv2d(nn.Conv2d):
    """nn.Conv2d with optional active output filters / input channels.

    `set_active(out_index, in_index)`: the forward then equals
    `F.conv2d(x, weight[out_index][:, in_index], bias[out_index], ...)` (x has
    len(in_index) channels), computed by `lk.partial_conv2d`.
    """

    # Class-level defaults keep nn.Conv2d's __init__ (and state_dict) untouched, and let
    # `convert` turn an existing nn.Conv2d into a LoftConv2d by swapping its class.
    _active_out: Optional[Tensor] = None
    _active_in: Optional[Tensor] = None

    @property
    def active_out(self) -> Optional[Tensor]:
        return self._active_out

    @property
    def active_in(self) -> Optional[Tensor]:
        return self._active_in

    def set_active(self, out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None) -> None:
        """Restrict to output filters `out_index` and input channels `in_index` (None = all)."""
        if self.groups != 1 and (out_index is not None or in_index is not None):
            raise ValueError(f"out_index/in_index need a conv with groups=1, this one has groups={self.groups}")
        if out_index is not None or in_index is not None:
            _refuse_if_compact(self)
        dev = self.weight.device
        # Validated copies: a caller editing its tensor afterwards cannot slip unchecked indices in.
        self._active_out = None if out_index is None else \
            C.index(out_index, "out_index", self.out_channels, dev).clone()
        self._active_in = None if in_index is None else C.index(in_index, "in_index", self.in_channels, dev).clone()

    def forward(self, input: Tensor) -> Tensor:
        if self._active_out is None and self._active_in is None:
            return super().forward(input)
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward does
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        # indices were validated by set_active
        return _partial_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                               self._active_out, self._active_in, check_index_values=False)


class LoftBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with an optional active channel subset.

    With `set_active(index)` the input has len(index) channels; they are
    normalised with the matching affine parameters and running statistics, and
    in training the running statistics of exactly those channels are updated in
    place in the full buffers (same momentum / cumulative-average rules).
    """

    _active: Optional[Tensor] = None

    @property
    def active(self) -> Optional[Tensor]:
        return self._active

    def set_active(self, index: Optional[Tensor] = None) -> None:
        """Restrict to channels `index` (None = all)."""
        if index is None:
            self._active = None
            return
        _refuse_if_compact(self)
        # With neither affine parameters nor running stats there is nothing to index: any device will do.
        held = [t for t in (self.weight, self.running_mean) if t is not None]
        dev = held[0].device if held else getattr(index, "device", None)
        self._active = C.index(index, "index", self.num_features, dev).clone()  # a copy the caller cannot edit

    def forward(self, input: Tensor) -> Tensor:
        idx = self._active
        if idx is None:
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] != idx.numel():
            raise ValueError(f"input must have {idx.numel()} channels (the active subset), got shape "
                             f"{tuple(input.shape)}")
        # The same factor/flag logic as nn.BatchNorm2d.forward, on the selected channels.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_stats = (not self.training or self.track_running_stats) and self.running_mean is not None
        mean = self.running_mean.index_select(0, idx) if use_stats else None
        var = self.running_var.index_select(0, idx) if use_stats else None
        weight = None if self.weight is None else self.weight.index_select(0, idx)
        bias = None if self.bias is None else self.bias.index_select(0, idx)
        out = F.batch_norm(input, mean, var, weight, bias, bn_training, factor, self.eps)
        if use_stats and bn_training:  # F.batch_norm updated the selected copies: write them back
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, mean)
                self.running_var.index_copy_(0, idx, var)
        return out


def _loft_layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, (LoftConv2d, LoftBatchNorm2d)))


def _clear(module: nn.Module) -> None:
    if isinstance(module, LoftConv2d):
        module.set_active(None, None)
    else:
        module.set_active(None)


def _module(model: nn.Module, name: str, kind: type, group: str) -> nn.Module:
    try:
        m = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"groups: group {group!r} names module {name!r}, which the model does not have") from e
    if not isinstance(m, kind):
        raise TypeError(f"groups: group {group!r}: module {name!r} is {type(m).__name__}, not {kind.__name__}; "
                        f"call lk.convert(model, ...) first")
    return m


def activate(model: nn.Module, groups, assignment: Optional[Mapping[str, Tensor]]) -> None:
    """Make `model` compute only the filters in `assignment` (group name -> 1-D index tensor).

    For each group: conv_a.set_active(out_index=idx), every norm .set_active(idx),
    conv_b.set_active(in_index=idx); a conv that is conv_b of one group and conv_a
    of another gets both. Loft layers outside the groups are cleared.
    `assignment=None` clears every Loft layer of the model (dense).
    """
    from .groups import FilterGroup  # groups imports this module

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(groups, FilterGroup) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups must be a list of FilterGroup, got {type(groups).__name__}")
    for i, g in enumerate(groups):
        if not isinstance(g, FilterGroup):
            raise TypeError(f"groups[{i}] must be a FilterGroup, got {type(g).__name__}")
    if assignment is None:
        for m in _loft_layers(model):
            _clear(m)
        return
    if not isinstance(assignment, Mapping):
        raise TypeError(f"assignment must be a dict of group name -> index tensor or None, "
                        f"got {type(assignment).__name__}")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError("groups has duplicate group names")
    unknown = sorted(set(assignment) - set(names), key=str)
    missing = [n for n in names if n not in assignment]
    if unknown:
        raise ValueError(f"assignment has keys that are not group names: {unknown}")
    if missing:
        raise ValueError(f"assignment has no entry for groups {missing}")
    # Validate everything before touching the model, so a bad entry leaves it unchanged.
    outs: dict[str, Tensor] = {}
    ins: dict[str, Tensor] = {}
    norms: dict[str, Tensor] = {}
    for g in groups:
        conv_a = _module(model, g.conv_a, LoftConv2d, g.name)
        sizes = {g.conv_a: conv_a.out_channels, g.conv_b: _module(model, g.conv_b, LoftConv2d, g.name).in_channels}
        sizes.update({nm: _module(model, nm, LoftBatchNorm2d, g.name).num_features for nm in g.norms})
        for nm, size in sizes.items():
            if size != g.n:
                raise ValueError(f"groups: group {g.name!r} has n={g.n} filters but module {nm!r} has {size} "
                                 f"channels there; were the groups found on another model?")
        idx = C.index(assignment[g.name], f"assignment[{g.name!r}]", g.n, conv_a.weight.device)
        outs[g.conv_a] = idx
        ins[g.conv_b] = idx
        for nm in g.norms:
            norms[nm] = idx
    for m in _loft_layers(model):
        _clear(m)
    for name in {**outs, **ins}:
        model.get_submodule(name).set_active(out_index=outs.get(name), in_index=ins.get(name))
    for name, idx in norms.items():
        model.get_submodule(name).set_active(idx)


@contextlib.contextmanager
def dense(model: nn.Module):
    """Context manager: `model` computes all filters, as the full model.

    Active sets are cleared and compact sub-model tensors (a LoftOptimizer
    mid-round) show their full-size values: the owned blocks as trained so far,
    the rest as at the last sync. Both are restored on exit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    attrs = ("_active_out", "_active_in", "_active")
    saved = [(m, {a: m.__dict__[a] for a in attrs if a in m.__dict__}) for m in _loft_layers(model)]
    for m, _ in saved:
        _clear(m)
    try:
        with full_size(model):
            yield model
    finally:
        for m, state in saved:  # already validated when set: restore as they were
            for a in attrs:
                m.__dict__.pop(a, None)
            m.__dict__.update(state)
