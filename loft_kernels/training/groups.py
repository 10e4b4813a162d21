"""Filter groups: the partition unit of LoFT, found by tracing the model with torch.fx.

A group is a conv `conv_a` whose output flows only through per-channel ops
(BatchNorm2d, elementwise activations, dropout, pooling) into one conv `conv_b`
and nowhere else (DESIGN.md section 1). Filter j of the group is row j of
conv_a.weight (and conv_a.bias[j]), channel j of every norm in between and
input channel j of conv_b.weight.

Why torch.fx and not the autograd graph: fx gives the exact module names and
the functional call targets (F.relu vs a residual add) without running a
backward, and a model it cannot trace gets a clear error instead of a silently
wrong grouping. The example input is run once (eval mode, no grad, so no
running statistic moves) to check that every op on the path keeps the n
channels.
"""
from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .layers import LoftBatchNorm2d, LoftConv2d, dense


@dataclass(frozen=True)
class FilterGroup:
    """One partitionable group; all fields but `n` are module names (`model.get_submodule`)."""
    name: str
    conv_a: str
    norms: tuple
    conv_b: str
    n: int

    def __post_init__(self):
        for field in ("name", "conv_a", "conv_b"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"{field} must be a str, got {type(getattr(self, field)).__name__}")
        if isinstance(self.norms, str) or not isinstance(self.norms, (list, tuple)) or \
                not all(isinstance(nm, str) for nm in self.norms):
            raise TypeError(f"norms must be a list or tuple of module names, got {self.norms!r}")
        object.__setattr__(self, "norms", tuple(self.norms))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")

    @property
    def modules(self) -> tuple:
        """All module names of the group: conv_a, the norms, conv_b."""
        return (self.conv_a, *self.norms, self.conv_b)

    def filter_tensors(self, model: nn.Module) -> list[tuple[str, Tensor, int]]:
        """(qualified name, tensor, filter dim) of every parameter and buffer that holds this group's filters.

        conv_a.weight/bias along dim 0, each norm's weight/bias/running_mean/running_var
        along dim 0, conv_b.weight along dim 1 (conv_b's bias is not per filter).
        """
        out = []
        conv_a = model.get_submodule(self.conv_a)
        for attr in ("weight", "bias"):
            if getattr(conv_a, attr) is not None:
                out.append((f"{self.conv_a}.{attr}", getattr(conv_a, attr), 0))
        for nm in self.norms:
            norm = model.get_submodule(nm)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(norm, attr) is not None:
                    out.append((f"{nm}.{attr}", getattr(norm, attr), 0))
        out.append((f"{self.conv_b}.weight", model.get_submodule(self.conv_b).weight, 1))
        return out


_CONVS = (nn.Conv2d, LoftConv2d)
_NORMS = (nn.BatchNorm2d, LoftBatchNorm2d)
# Modules and functions that act on each channel separately and keep the channel count.
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid,
                        nn.Hardtanh, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Dropout2d, nn.Identity,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PER_CHANNEL_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.leaky_relu,
                          F.leaky_relu_, F.elu, F.elu_, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish,
                          torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout2d, F.max_pool2d,
                          F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


class _Tracer(fx.Tracer):
    # Every Conv2d/BatchNorm2d (Loft layers included) is one opaque call; subclasses other than
    # the Loft ones stay opaque too, so they can never be mistaken for a partitionable layer.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _example_args(example_input) -> tuple:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and \
            all(isinstance(t, Tensor) for t in example_input):
        return tuple(example_input)
    raise TypeError(f"example_input must be a torch.Tensor or a tuple of tensors (the forward's positional "
                    f"arguments), got {type(example_input).__name__}")


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph and records each tensor-valued node's shape."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # the model's own error message is the useful one
        self.shapes: dict[fx.Node, tuple] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = tuple(result.shape)
        return result


def _trace(model: nn.Module, args: tuple) -> tuple[fx.GraphModule, dict]:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError on proxy iteration, ...)
        raise ValueError(f"model could not be traced with torch.fx ({type(e).__name__}: {e}); filter groups are "
                         f"found on the fx graph, so the forward must be free of data-dependent Python control "
                         f"flow") from e
    gm = fx.GraphModule(model, graph)
    recorder = _ShapeRecorder(gm)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # no running-statistic update, no dropout
    try:
        with torch.no_grad(), dense(model):
            recorder.run(*args)
    except Exception as e:
        raise ValueError(f"example_input: the model failed to run on it ({type(e).__name__}: {e})") from e
    finally:
        for m, mode in modes:
            m.training = mode
    return gm, recorder.shapes


def _channels(node: fx.Node, shapes: dict) -> Optional[int]:
    shape = shapes.get(node)
    return shape[1] if shape is not None and len(shape) == 4 else None


def _is_per_channel(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PER_CHANNEL_MODULES)
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FUNCTIONS and not node.kwargs.get("return_indices", False)
    if node.op == "call_method":
        return node.target in _PER_CHANNEL_METHODS
    return False


def _follow(conv_a: fx.Node, n: int, modules: dict, shapes: dict) -> Optional[tuple[tuple, str]]:
    """Walk conv_a's output forward; (norm names, conv_b name) if it is a group, else None."""
    norms, node = [], conv_a
    while True:
        if _channels(node, shapes) != n or len(node.users) != 1:
            return None  # channel count changed, or a second consumer (add, cat, size(), ...)
        user = next(iter(node.users))
        if user.all_input_nodes != [node]:
            return None  # combined with another tensor
        mod = modules.get(user.target) if user.op == "call_module" else None
        if type(mod) in _CONVS:
            return (tuple(norms), user.target) if mod.groups == 1 and mod.in_channels == n else None
        if type(mod) in _NORMS:
            if mod.num_features != n:
                return None
            norms.append(user.target)
        elif not _is_per_channel(user, modules):
            return None
        node = user


def find_filter_groups(model: nn.Module, example_input) -> list[FilterGroup]:
    """The partitionable filter groups of `model`, in module order (see the module docstring).

    `example_input`: a tensor (or tuple of the forward's positional tensors) the
    model runs on; it is run once in eval mode without grad, leaving the model unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _example_args(example_input)
    gm, shapes = _trace(model, args)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    # A parameter tied between modules (or read directly via get_attr) cannot be partitioned per module.
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    read_directly = {node.target.rsplit(".", 1)[0] for node in gm.graph.nodes if node.op == "get_attr"}

    def exclusive(name: str) -> bool:
        m = modules[name]
        return calls.get(name) == 1 and name not in read_directly and \
            all(owners[id(p)] == 1 for p in m.parameters(recurse=False))

    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _CONVS:
            continue
        conv = modules[node.target]
        if conv.groups != 1:
            continue  # depthwise/grouped convs are not partitionable
        path = _follow(node, conv.out_channels, modules, shapes)
        if path is None:
            continue
        norms, conv_b = path
        group = FilterGroup(node.target, node.target, norms, conv_b, conv.out_channels)
        if all(exclusive(nm) for nm in group.modules):
            found[node.target] = group
    return [found[name] for name in modules if name in found]


# ------------------------------------------------------------- selection ----
_PAPER_BLOCK = re.compile(r"^(layer[234]\.(\d+))\.")
POLICIES = ("all", "paper")


def _patterns(value, name: str) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be None, a pattern string or a list of pattern strings, got {value!r}")
    if not value or any(not p for p in value):
        raise ValueError(f"{name} must hold at least one non-empty fnmatch pattern, got {value!r}")
    return tuple(value)


def _check_selection(policy, include, exclude) -> tuple:
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a str, one of {POLICIES}, got {type(policy).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return _patterns(include, "include"), _patterns(exclude, "exclude")


def _matches(group: FilterGroup, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(nm, p) for p in patterns for nm in (group.name, *group.modules))


def _paper(group: FilterGroup) -> bool:
    """The official ResNet rule: every module of the group in block k >= 1 of layer2..layer4 (one block)."""
    blocks = set()
    for nm in group.modules:
        m = _PAPER_BLOCK.match(nm)
        if m is None or int(m.group(2)) < 1:
            return False
        blocks.add(m.group(1))
    return len(blocks) == 1


def select_groups(groups: Sequence[FilterGroup], policy: str = "all", include=None,
                  exclude=None) -> list[FilterGroup]:
    """The groups chosen by `policy`, narrowed to those matching `include` and not matching `exclude`.

    policy "all": every group. policy "paper": the official LoFT rule for ResNets,
    groups inside blocks with index >= 1 of layer2..layer4 (stage 1, the first
    block of each stage, the stem and the head stay shared); a model without
    such blocks is a ValueError. include/exclude: fnmatch patterns (or lists)
    matched against the group name and each of its module names. Every include
    pattern must match some group (a typo would otherwise silently drop groups).
    """
    if isinstance(groups, FilterGroup) or not isinstance(groups, (list, tuple)) or \
            not all(isinstance(g, FilterGroup) for g in groups):
        raise TypeError("groups must be a list of FilterGroup")
    include, exclude = _check_selection(policy, include, exclude)
    if not groups:
        raise ValueError("the model has no partitionable filter group (a conv whose output flows only through "
                         "per-channel ops into exactly one other conv)")
    chosen = list(groups)
    if policy == "paper":
        chosen = [g for g in chosen if _paper(g)]
        if not chosen:
            raise ValueError("policy='paper' is the official ResNet rule (blocks with index >= 1 of layer2..layer4) "
                             "and found no such group in this model; use policy='all' or include=")
    if include is not None:
        for p in include:
            if not any(_matches(g, (p,)) for g in groups):
                raise ValueError(f"include pattern {p!r} matches no filter group; groups are "
                                 f"{[g.name for g in groups]}")
        chosen = [g for g in chosen if _matches(g, include)]
    if exclude is not None:
        chosen = [g for g in chosen if not _matches(g, exclude)]
    if not chosen:
        raise ValueError(f"policy={policy!r}, include={include!r}, exclude={exclude!r} selected none of the "
                         f"model's {len(groups)} filter groups")
    return chosen


def convert(model: nn.Module, example_input, policy: str = "all", include=None,
            exclude=None) -> tuple[nn.Module, list[FilterGroup]]:
    """Find the groups, select them (see `select_groups`) and make their layers Loft layers, in place.

    Each selected conv/norm module keeps its identity, parameters and buffers (its
    class is switched to LoftConv2d/LoftBatchNorm2d), so existing optimizers and
    hooks stay valid. Returns (model, selected groups).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_selection(policy, include, exclude)  # fail fast, before tracing
    groups = select_groups(find_filter_groups(model, example_input), policy, include, exclude)
    for g in groups:
        for name in (g.conv_a, g.conv_b):
            m = model.get_submodule(name)
            if type(m) is nn.Conv2d:
                m.__class__ = LoftConv2d
        for name in g.norms:
            m = model.get_submodule(name)
            if type(m) is nn.BatchNorm2d:
                m.__class__ = LoftBatchNorm2d
    return model, groups
