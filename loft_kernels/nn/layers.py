"""Loft layers: nn.Conv2d / nn.BatchNorm2d that can run on an active subset of filters.

A LoFT worker computes only the filters it owns (docs/algorithm.md): the
producer computes the owned output channels, the BatchNorm members normalise
those, the consumer sums over those input channels. `LoftConv2d` and `LoftBatchNorm2d` are drop-in
subclasses (same constructor, same state_dict) with an *active set*; with no
active set they are exactly their nn parents. With an active set the full-size
weights stay in place and gradients land in the full-size parameters, zero
outside the active rows/channels (the `lk.partial_conv2d` contract).

Training does not need these layers: a LoFT worker shrinks its partitioned
tensors to its compact block for a round (`training.worker_model`), whatever
the layer classes. `activate(model, groups, assignment)` sets the active sets
of a model from a worker's owned filters per group; `lk.full_view(model)`
evaluates the full model in either case.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks as C
from ..filter_group import BATCHNORM, check_group_list, resolve_groups
from ..ops.partial_conv import _partial_conv2d
from .active import ActiveInOut
from .linear import LoftLinear
from .views import refuse_active_sets, refuse_scripting


def _active_conv(x, weight, bias, stride, padding, dilation, groups, out_index, in_index):
    # The indices were validated by set_active. One call for torch.fx (wrapped below): symbolic tracing records
    # it with the active set as a constant, instead of tracing into the argument checks.
    return _partial_conv2d(x, weight, bias, stride, padding, dilation, groups, out_index, in_index,
                           check_index_values=False)


torch.fx.wrap("_active_conv")


class LoftConv2d(ActiveInOut, nn.Conv2d):
    """nn.Conv2d with optional active output filters / input channels.

    `set_active(out_index, in_index)`: the forward then equals
    `F.conv2d(x, weight[out_index][:, in_index], bias[out_index], ...)` (x has
    len(in_index) channels), computed by `lk.partial_conv2d`.
    """

    def set_active(self, out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None) -> None:
        """Restrict to output filters `out_index` and input channels `in_index` (None = all)."""
        if self.groups != 1 and (out_index is not None or in_index is not None):
            raise ValueError(f"out_index/in_index need a conv with groups=1, this one has groups={self.groups}")
        self._set_active(out_index, in_index, self.out_channels, self.in_channels)

    def forward(self, input: Tensor) -> Tensor:
        if self._active_out is None and self._active_in is None:
            return super().forward(input)
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward does
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _active_conv(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                            self._active_out, self._active_in)


class LoftBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with an optional active channel subset.

    With `set_active(index)` the input has len(index) channels; they are
    normalised with the matching affine parameters and running statistics, and
    in training the running statistics of exactly those channels are updated in
    place in the full buffers (same momentum / cumulative-average rules).
    """

    _active: Optional[Tensor] = None
    __prepare_scriptable__ = refuse_scripting

    @property
    def active(self) -> Optional[Tensor]:
        """A copy of the active channels (None = all): editing it does not change the layer."""
        return None if self._active is None else self._active.clone()

    def set_active(self, index: Optional[Tensor] = None) -> None:
        """Restrict to channels `index` (None = all)."""
        if index is None:
            self._active = None
            return
        refuse_active_sets(self)
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


_LOFT_LAYERS = (LoftConv2d, LoftBatchNorm2d, LoftLinear)


def _loft_layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, _LOFT_LAYERS))


_LOFT_CLASS = {nn.Conv2d: LoftConv2d, nn.Linear: LoftLinear, nn.BatchNorm2d: LoftBatchNorm2d}


def to_loft_layers(model: nn.Module, groups) -> nn.Module:
    """Make the producers, consumers and BatchNorm members of `groups` Loft layers, in place; returns `model`.

    Each module keeps its identity, parameters and buffers (only its class is
    switched, so existing optimizers and hooks stay valid). Depthwise members
    stay nn.Conv2d (active sets run groups=1 convs only). Training does not need
    this; active sets (`activate`) do.
    """
    for r in resolve_groups(model, groups):
        for m in (r.producer, r.consumer, *(m for k, m in zip(r.group.members, r.members) if k.kind == BATCHNORM)):
            if type(m) in _LOFT_CLASS:
                m.__class__ = _LOFT_CLASS[type(m)]
    return model


def clear_active_sets(model: nn.Module) -> None:
    """Clear the active set of every Loft layer of `model` (no groups needed: they all compute everything)."""
    for m in _loft_layers(model):
        _clear(m)


def _clear(module: nn.Module) -> None:
    if isinstance(module, LoftBatchNorm2d):
        module.set_active(None)
    else:
        module.set_active(None, None)


def _require_loft(group: str, role: str, name: str, m: nn.Module, kinds: tuple) -> None:
    if not isinstance(m, kinds):
        raise TypeError(f"groups: group {group!r}: {role} {name!r} is {type(m).__name__}, not a Loft layer "
                        f"({' or '.join(k.__name__ for k in kinds)}); active sets need Loft layers: call "
                        f"lk.nn.to_loft_layers(model, groups) or lk.convert(model, ..., loft_layers=True) first")


def activate(model: nn.Module, groups, assignment: Optional[Mapping[str, Tensor]]) -> None:
    """Make `model` compute only the filters in `assignment` (group name -> 1-D index tensor).

    For each group: producer.set_active(out_index=idx), every norm .set_active(idx),
    consumer.set_active(in_index=idx); a layer that is the consumer of one group and
    the producer of another gets both. Loft layers outside the groups are cleared.
    `assignment=None` clears every Loft layer of the model (dense). Groups with a
    depthwise member cannot use active sets (LoftOptimizer trains them as compact
    sub-models instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if assignment is None:
        check_group_list(groups)
        clear_active_sets(model)
        return
    resolved = resolve_groups(model, groups)
    if not isinstance(assignment, Mapping):
        raise TypeError(f"assignment must be a dict of group name -> index tensor or None, "
                        f"got {type(assignment).__name__}")
    names = [r.group.name for r in resolved]
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
    for r in resolved:
        g = r.group
        if g.depthwise or g.conv_groups > 1 or len(g.norms) != len(g.members):
            raise ValueError(f"groups: group {g.name!r} has depthwise or SE gate members or crosses a grouped conv; "
                             f"active sets run on groups=1 layers and BatchNorm members only (LoftOptimizer trains "
                             f"such groups as compact sub-models)")
        _require_loft(g.name, "producer", g.producer, r.producer, (LoftConv2d, LoftLinear))
        _require_loft(g.name, "consumer", g.consumer, r.consumer, (LoftConv2d, LoftLinear))
        for member, m in zip(g.members, r.members):
            _require_loft(g.name, "member", member.name, m, (LoftBatchNorm2d,))
        idx = C.index(assignment[g.name], f"assignment[{g.name!r}]", g.n, r.producer.weight.device)
        outs[g.producer] = idx
        ins[g.consumer] = idx
        for member in g.members:
            norms[member.name] = idx
    for m in _loft_layers(model):
        _clear(m)
    for name in {**outs, **ins}:
        model.get_submodule(name).set_active(out_index=outs.get(name), in_index=ins.get(name))
    for name, idx in norms.items():
        model.get_submodule(name).set_active(idx)
