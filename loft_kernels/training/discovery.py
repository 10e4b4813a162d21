"""Filter-group discovery: follow each conv/linear's output channels through the model's data flow.

A group (see loft_kernels.filter_group) is a producer (nn.Conv2d or nn.Linear)
whose output channels flow only through per-channel operations into exactly
one consumer (nn.Conv2d or nn.Linear). Per-channel here means output channel j
depends on input channel j alone and the op runs the same on a subset of
channels and keeps a removed (zero) channel zero: elementwise activations with
f(0) = 0 (in place or not), multiplication by a scalar, dropout, spatial pooling,
BatchNorm2d and depthwise convs (channel multiplier 1; they become members cut
with the group), a squeeze-and-excitation gate and the multiplication by it
(its reduce and expand layers become members), layout permutes/transposes (the
walk tracks which dim holds the channels, so a channels-last Linear after a
conv is found), and means over non-channel dims that keep the rank. A grouped
conv may be the producer or the consumer: the group then records its conv
groups, and the partition keeps every worker's share aligned in each of them.
What stops a walk is reported as the reason: a residual add, a concat, a
reshape, a channel shuffle, a split, a multiplication by anything but an SE
gate, a sigmoid or an added constant (they turn a removed channel's zero into
something else), LayerNorm/GroupNorm/softmax over channels, a depthwise conv with a
channel multiplier, a layer called twice or with tied weights, a weight that is
not a parameter of its own layer (hook-style weight_norm).

The model is traced with torch.fx, and with the autograd graph of one forward
when fx cannot trace it (see loft_kernels.training.trace). The example input is
run once in eval mode (no running statistic moves, no dropout).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..filter_group import DEPTHWISE, SE_EXPAND, SE_REDUCE, FilterGroup, Member, derived_weight_reason
from ..nn import LoftBatchNorm2d, LoftConv2d, LoftLinear, full_view
from ..nn.views import training_mode
from . import trace
from .group_report import GroupReport, parameter_share

CONVS = (nn.Conv2d, LoftConv2d)
LINEARS = (nn.Linear, LoftLinear)
NORMS = (nn.BatchNorm2d, LoftBatchNorm2d)
_ELEMENTWISE = {"relu", "relu6", "hardtanh", "gelu", "silu", "leaky_relu", "elu", "hardswish", "hardsigmoid",
                "mish", "sigmoid", "tanh", "dropout", "identity"}
# Elementwise ops allowed inside an SE gate but not on a group's own path, where a removed filter must stay zero.
_NOT_ZERO_PRESERVING = {"sigmoid": "0.5", "hardsigmoid": "0.5"}
_SHIFTS = {"add", "sub"}
_SPATIAL = {"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout2d"}
_ARITHMETIC = {"add", "sub", "mul", "div"}
_COMBINE_REASONS = {"add": "residual add (summed with another tensor)", "sub": "combined with another tensor (sub)",
                    "mul": "multiplied by another tensor (a channel-attention/SE scale or a gate)",
                    "div": "divided by another tensor", "cat": "concat with other tensors"}
_OP_REASONS = {"reshape": "reshape (view/flatten: channel j no longer maps to one channel, e.g. a head or a "
                          "channel shuffle)",
               "split": "split/chunk of the channels", "softmax": "softmax (mixes channels)",
               "layer_norm": "layer_norm (normalises over channels: mixes them)"}


def _example_args(example_input) -> tuple:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and \
            all(isinstance(t, Tensor) for t in example_input):
        return tuple(example_input)
    raise TypeError(f"example_input must be a torch.Tensor or a tuple of tensors (the forward's positional "
                    f"arguments), got {type(example_input).__name__}")


class ExampleInputError(ValueError):
    """The model failed to run on the example input: no tracer can help, so it is reported as it is."""


def _safe_runner(model: nn.Module):
    """run(fn, grad=False): fn() in eval mode, dense, model flags restored; a failure names example_input."""
    def run(fn, grad: bool = False):
        try:
            with training_mode(model, False), torch.set_grad_enabled(grad), full_view(model):
                fn()
        except Exception as e:
            raise ExampleInputError(f"example_input: the model failed to run on it ({type(e).__name__}: {e})") from e
    return run


TRACERS = ("auto", "fx", "autograd")


def _trace(model: nn.Module, args: tuple, tracer: str) -> trace.FlowGraph:
    run = _safe_runner(model)
    if tracer == "autograd":
        return trace.autograd_graph(model, args, run)
    try:
        return trace.fx_graph(model, args, run)
    except ExampleInputError:
        raise
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on proxy iteration, ...)
        if tracer == "fx":
            raise ValueError(f"model could not be traced with torch.fx ({type(e).__name__}: {e})") from e
        fx_error = e
    try:
        return trace.autograd_graph(model, args, run)
    except ExampleInputError:
        raise
    except ValueError as e:
        raise ValueError(f"model could not be traced: torch.fx failed ({type(fx_error).__name__}: {fx_error}) and "
                         f"so did the autograd graph of one forward ({e})") from e


def _breaks_zero(node: trace.FlowNode) -> Optional[str]:
    """Why a one-input op turns a removed (zero) channel into something else, or None if it keeps it zero."""
    op = node.target
    if op in _NOT_ZERO_PRESERVING:
        return f"{op} maps 0 to {_NOT_ZERO_PRESERVING[op]}: a removed filter's zero output would still reach the " \
            "consumer, so the smaller network would compute something else"
    if node.info.get("keeps_zero") is False:  # hardtanh with a range without 0, a scalar divided by x
        return f"{op} does not map 0 to 0 here: a removed filter's zero output would reach the consumer as " \
            "something else"
    if op in _SHIFTS:  # no other tensor operand: a scalar (or, seen by autograd, a tensor without grad)
        return f"{op} of a constant: a removed filter's zero output would become that constant in the consumer"
    return None


def _one_pixel(shape) -> bool:
    """Whether a known [N, C, ...] shape has a single spatial position (a pooled map), so that a reshape
    between it and [N, C] keeps channel j as feature j."""
    return shape is not None and len(shape) >= 2 and math.prod(shape[2:]) == 1


def _norm_dims(dims, ndim: int) -> tuple:
    return tuple(d % ndim for d in dims)


class _Walk:
    """Follows a producer's output channels through the graph, tracking the dim that holds them."""

    def __init__(self, modules: dict, exclusive):
        self.modules, self.exclusive = modules, exclusive

    def run(self, start: trace.FlowNode, n: int, cdim: int, ndim: int):
        """(members, consumer name, consumer's conv groups) if the n channels (in dim cdim of ndim) reach one
        consumer, else the reason."""
        node, members, path = start, [], [start.target]
        while True:
            if not node.users:
                return f"{' -> '.join(path)}: feeds nothing but the model output (the head)"
            if len(node.users) > 1:
                gate = self._se_gate(node, n, cdim, ndim)
                if isinstance(gate, tuple):
                    members += gate[0]
                    node = gate[1]
                    path.append(f"SE gate ({gate[0][0].name} -> {gate[0][1].name}) -> mul")
                    continue
                return f"{' -> '.join(path)}: output used by {len(node.users)} ops ({self._names(node.users)})" + \
                    self._branch_hint(node.users) + gate
            user = node.users[0]
            where = f"{' -> '.join(path)} -> {user.target}"
            if user.kind == "output":
                return f"{' -> '.join(path)}: feeds the model output (the head)"
            others = [i for i in user.inputs if i is not node]
            if others and all(i.kind == "param" for i in others):
                return f"{where}: {user.target} with parameter {others[0].target} (a per-channel scale or " \
                    "shift outside any layer, e.g. a layer scale)"
            if others:
                return f"{where}: {_COMBINE_REASONS.get(user.target, f'combined with another tensor by {user.target}')}"
            if user.kind == "module":
                step = self._module(user, n, cdim, ndim, members)
                if isinstance(step, str):
                    return f"{where}: {step}"
                if step is not None:
                    return members, step[1], step[2]
            else:
                step = self._op(user, cdim, ndim)
                if isinstance(step, str):
                    return f"{where}: {step}"
                cdim, ndim = step
            node = user
            path.append(user.target)

    def _se_gate(self, node: trace.FlowNode, n: int, cdim: int, ndim: int):
        """([se_reduce, se_expand] members, the mul node) if `node` feeds exactly a squeeze-and-excitation gate
        and the multiplication by it; else a reason suffix ("" when the branch is not shaped like a gate).

        The gate: per-channel ops (pooling) -> reduce layer reading the n channels -> elementwise ops -> expand
        layer producing n channels -> elementwise ops (and a reshape back to the channels' layout) -> mul with
        `node`. Channel j of the group is then column j of reduce and row j of expand; a worker's sub-model
        squeezes only its own channels, so its reduce layer sums over those (the LoFT partial sum)."""
        muls = [u for u in node.users if u.target == "mul" and len(u.inputs) == 2]
        if len(node.users) != 2 or len(muls) != 1:
            return ""
        mul = muls[0]
        gate_end = next((i for i in mul.inputs if i is not node), None)
        branch = next(u for u in node.users if u is not mul)
        if gate_end is None:
            return ""
        layers, cur, c, nd = [], branch, cdim, ndim
        while True:
            if cur.kind == "module":
                m = self.modules[cur.target]
                if len(layers) == 2 or type(m) not in CONVS + LINEARS or getattr(m, "groups", 1) != 1:
                    return ""
                size_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                size_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                want_cdim = 1 if isinstance(m, nn.Conv2d) else nd - 1
                if (size_in if not layers else size_out) != n or c != want_cdim or \
                        (isinstance(m, nn.Conv2d) and nd != 4):
                    return ""
                if not self.exclusive(cur.target):
                    return f" - its SE gate layer {cur.target!r} is called more than once or shares its parameters"
                if derived_weight_reason(m):
                    return f" - its SE gate layer {cur.target!r}: {derived_weight_reason(m)}"
                layers.append(cur.target)
            elif cur.kind != "op":
                return ""
            elif cur.target == "reshape" and len(layers) == 2 and c == 1 and nd == 2 and cur.ndim == 4 and \
                    _one_pixel(cur.shape):
                nd = 4  # [N, C] -> [N, C, 1, 1] to scale the feature map (a Linear gate)
            elif not layers and _breaks_zero(cur) is not None:
                return ""  # before the reduce layer a removed channel must still be zero
            elif cur.target in _ELEMENTWISE or (cur.target in _ARITHMETIC and len(cur.inputs) == 1):
                pass
            elif not layers and cur.target == "mean" and c == 1 and nd == 4 and \
                    sorted(_norm_dims(cur.info.get("dims") or (1,), nd)) == [2, 3] and not cur.info.get("keepdim"):
                nd = 2  # a squeeze to [N, C] for a Linear gate
            elif not layers and cur.target == "reshape" and c == 1 and nd == 4 and cur.ndim == 2 and \
                    len(cur.inputs) == 1 and _one_pixel(cur.inputs[0].shape):
                nd = 2  # a flatten of the pooled [N, C, 1, 1] (the Linear checks it holds n features)
            elif not layers:
                step = self._op(cur, c, nd)  # pooling before the reduce layer: per channel
                if isinstance(step, str):
                    return ""
                c, nd = step
            else:
                return ""
            if cur is gate_end:
                break
            if len(cur.users) != 1 or len(cur.inputs) != 1:
                return ""
            cur = cur.users[0]
        if len(layers) != 2:
            return ""
        return [Member(layers[0], SE_REDUCE), Member(layers[1], SE_EXPAND)], mul

    @staticmethod
    def _names(users) -> str:
        return ", ".join(u.target for u in users)

    @staticmethod
    def _branch_hint(users) -> str:
        ops = {u.target for u in users}
        if "add" in ops:
            return " - a residual add"
        if "mul" in ops:
            return " - a channel-attention (SE) scale computed from all channels multiplies it, through a branch " \
                "that is not a gate discovery can cut (pool -> reduce layer -> elementwise -> expand layer -> " \
                "elementwise -> mul)"
        return ""

    def _module(self, user: trace.FlowNode, n: int, cdim: int, ndim: int, members: list):
        """None to go on (member added), ("consumer", name) to stop, or a reason string."""
        name, m = user.target, self.modules[user.target]
        if not self.exclusive(name):
            return f"{type(m).__name__} {name!r} is called more than once or shares its parameters"
        reason = derived_weight_reason(m) if isinstance(m, (nn.Conv2d, nn.Linear)) else None
        if reason is not None and type(m) in CONVS + LINEARS:
            return f"{name!r}: {reason}"
        if type(m) in CONVS:
            if cdim != 1 or ndim != 4:
                return f"conv over a layout whose channels are in dim {cdim}"
            if m.in_channels == m.out_channels == m.groups and m.groups > 1:
                members.append(Member(name, DEPTHWISE))
                return None
            if m.groups == m.in_channels and m.groups > 1:
                return f"depthwise conv with channel multiplier {m.out_channels // m.in_channels} (not 1)"
            # A grouped conv consumes the channels block by block: a worker's share must be aligned in every block.
            return ("consumer", name, m.groups) if m.in_channels == n else \
                f"conv expects {m.in_channels} channels, got {n}"
        if type(m) in LINEARS:
            if cdim != ndim - 1:
                return f"Linear acts on the last dim but the channels are in dim {cdim} of {ndim}"
            return ("consumer", name, 1) if m.in_features == n else \
                f"Linear expects {m.in_features} features, got {n}"
        if type(m) in NORMS:
            if cdim != 1 or ndim != 4:
                return f"BatchNorm2d over a layout whose channels are in dim {cdim}"
            members.append(Member(name))
            return None
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            return f"{type(m).__name__} is a user subclass of an nn layer; its forward may differ"
        if isinstance(m, nn.LayerNorm):
            return "LayerNorm normalises over the channels (mixes them)"
        if isinstance(m, nn.GroupNorm):
            return "GroupNorm normalises over groups of channels (mixes them)"
        return f"{type(m).__name__} is not a known per-channel layer"

    @staticmethod
    def _op(user: trace.FlowNode, cdim: int, ndim: int):
        """The new (channel dim, rank) after a per-channel op, or a reason string."""
        op = user.target
        broken = _breaks_zero(user)
        if broken is not None:
            return broken
        if op in _ELEMENTWISE or op in _ARITHMETIC:  # mul/div by a scalar keep zero
            return cdim, ndim
        if op in _SPATIAL:
            return (cdim, ndim) if cdim == 1 and ndim == 4 else f"{op} over a layout whose channels are in dim {cdim}"
        if op in ("permute", "transpose"):
            dims = _norm_dims(user.info["dims"], ndim)
            if op == "transpose":
                return (dims[1] if cdim == dims[0] else dims[0] if cdim == dims[1] else cdim), ndim
            return dims.index(cdim), ndim
        if op == "mean":
            dims = user.info.get("dims")
            if dims is None:
                return "mean over every dim"
            dims = _norm_dims(dims, ndim)
            if cdim in dims:
                return "mean over the channel dim (mixes channels)"
            if user.info.get("keepdim"):
                return cdim, ndim
            # Like a flatten after global pooling: what follows is a head, which stays shared.
            return "mean that drops the pooled dims (global pooling into a head)"
        return _OP_REASONS.get(op, f"{op} is not known to act per channel")


def _exclusive_test(model: nn.Module, graph: trace.FlowGraph):
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    modules = dict(model.named_modules())

    def exclusive(name: str) -> bool:
        return graph.calls.get(name) == 1 and name not in graph.read_directly and \
            all(owners[id(p)] == 1 for p in modules[name].parameters(recurse=False))
    return exclusive


def _producer_reason(m: nn.Module) -> Optional[str]:
    """Why this conv/linear cannot start a group at all, before following its output."""
    if type(m) not in CONVS + LINEARS:
        return f"{type(m).__name__} is a subclass of {'nn.Conv2d' if isinstance(m, nn.Conv2d) else 'nn.Linear'}; " \
               "its forward may differ, so it is never partitioned"
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        if m.in_channels == m.out_channels == m.groups:
            return "depthwise conv: it can only be a per-channel member inside another layer's group, never a producer"
        if m.groups == m.in_channels:
            return f"depthwise conv with channel multiplier {m.out_channels // m.in_channels}: not partitionable"
    return derived_weight_reason(m)


def explain_groups(model: nn.Module, example_input, tracer: str = "auto") -> GroupReport:
    """The filter groups of `model` and, for every other conv/linear, the reason it is no group's producer.

    `example_input`: a tensor (or tuple of the forward's positional tensors) the
    model runs on; it is run once in eval mode, leaving the model unchanged.
    tracer: "auto" (torch.fx, the autograd graph if fx fails), "fx" or "autograd".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _example_args(example_input)
    if not isinstance(tracer, str) or tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    graph = _trace(model, args, tracer)
    modules = dict(model.named_modules())
    exclusive = _exclusive_test(model, graph)
    walk = _Walk(modules, exclusive)
    found, reasons = {}, {}
    starts = {node.target: node for node in graph.nodes if node.kind == "module"}
    for name, m in modules.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        reason = _producer_reason(m)
        if reason is None and name not in starts:
            reason = "not called in the forward"
        if reason is None:
            start = starts[name]
            cdim = 1 if isinstance(m, nn.Conv2d) else start.ndim - 1
            n = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            result = walk.run(start, n, cdim, start.ndim)
            if isinstance(result, str):
                reason = result
            else:
                members, consumer, consumer_groups = result
                conv_groups = math.lcm(getattr(m, "groups", 1), consumer_groups)
                group = FilterGroup(name, name, tuple(members), consumer, n, conv_groups)
                bad = [nm for nm in group.modules if not exclusive(nm)]
                if bad:
                    reason = f"{bad[0]!r} is called more than once or shares its parameters"
                else:
                    found[name] = group
        if reason is not None:
            reasons[name] = reason
    groups = [found[name] for name in modules if name in found]
    for g in groups:  # an SE gate's expand layer is no producer, but its rows travel with a group
        for member in g.members:
            if member.kind == SE_EXPAND and member.name in reasons:
                reasons[member.name] = f"SE gate expand layer: its rows are a member of group {g.name!r}"
    return GroupReport(groups, reasons, graph.tracer, parameter_share(model, groups))


def find_filter_groups(model: nn.Module, example_input, tracer: str = "auto") -> list[FilterGroup]:
    """The partitionable filter groups of `model`, in module order (see the module docstring).

    `example_input`: a tensor (or tuple of the forward's positional tensors) the
    model runs on; it is run once in eval mode without grad, leaving the model
    unchanged. `explain_groups` also says why each other conv/linear is not a group.
    """
    return explain_groups(model, example_input, tracer).groups
