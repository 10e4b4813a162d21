"""Filter groups: discovery (re-exported from .discovery), selection policies and `convert`.

The group record itself lives in loft_kernels.filter_group; discovery of the
groups of a model in loft_kernels.training.discovery. This module chooses which
groups to train with LoFT (and, when asked, turns their layers into Loft layers).
"""
from __future__ import annotations

import fnmatch
import re
import sys
from typing import Optional, Sequence

from torch import nn

from ..filter_group import FilterGroup, Member, check_group_list, resolve_groups
from ..nn import LoftConv2d, LoftLinear, to_loft_layers
from .discovery import explain_groups, find_filter_groups
from .group_report import GroupReport, ParameterShare, parameter_share

__all__ = ["FilterGroup", "Member", "GroupReport", "ParameterShare", "parameter_share", "find_filter_groups",
           "explain_groups", "select_groups",
           "convert", "POLICIES", "check_group_list", "resolve_groups"]

_PAPER_BLOCK = re.compile(r"^(layer[234]\.(\d+))\.")
POLICIES = ("all", "paper", "declared")


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
                  exclude=None, *, model: Optional[nn.Module] = None) -> list[FilterGroup]:
    """The groups chosen by `policy`, narrowed to those matching `include` and not matching `exclude`.

    policy "all": every group. policy "paper": the official LoFT rule for ResNets,
    groups inside blocks with index >= 1 of layer2..layer4 (stage 1, the first
    block of each stage, the stem and the head stay shared); a model without
    such blocks is a ValueError. policy "declared" (needs `model`): the groups
    whose producer the model definition declares partitionable by being a
    LoftConv2d or LoftLinear. include/exclude: fnmatch patterns (or lists)
    matched against the group name and each of its module names. Every include
    pattern must match some group (a typo would otherwise silently drop groups).
    """
    if isinstance(groups, FilterGroup) or not isinstance(groups, (list, tuple)) or \
            not all(isinstance(g, FilterGroup) for g in groups):
        raise TypeError("groups must be a list of FilterGroup")
    include, exclude = _check_selection(policy, include, exclude)
    if not groups:
        raise ValueError("the model has no partitionable filter group (a conv or linear whose output flows only "
                         "through per-channel ops into exactly one other conv or linear); lk.explain_groups(model, "
                         "example_input) says why each layer is not one")
    chosen = list(groups)
    if policy == "declared":
        if not isinstance(model, nn.Module):
            raise TypeError("policy='declared' needs model= (the groups' model, whose Loft layers declare them)")
        chosen = [g for g in chosen if isinstance(model.get_submodule(g.producer), (LoftConv2d, LoftLinear))]
        if not chosen:
            raise ValueError("policy='declared' found no group whose producer is a LoftConv2d or LoftLinear in the "
                             "model definition; declare one or use policy='all'")
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


def convert(model: nn.Module, example_input, policy: str = "all", include=None, exclude=None, *,
            explain=False, loft_layers: bool = False) -> tuple[nn.Module, list[FilterGroup]]:
    """Find the groups of `model` and select them (see `select_groups`); returns (model, selected groups).

    Training needs nothing more: a LoFT worker trains a compact sub-model of any
    model. loft_layers=True also makes the selected groups' layers Loft layers
    in place (`lk.nn.to_loft_layers`: producers and consumers LoftConv2d /
    LoftLinear, BatchNorm members LoftBatchNorm2d, each keeping its identity,
    parameters and buffers), which active sets (`lk.activate`) need.
    policy="declared" selects the groups whose producer the model definition
    declares as a Loft layer (a LoftConv2d or LoftLinear).
    explain=True prints the report of `explain_groups` (what each group is made
    of, why every other conv/linear is not a group) and the selection to stdout;
    a writable file object prints it there instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(explain, bool) or callable(getattr(explain, "write", None))):
        raise TypeError(f"explain must be a bool or a writable file object, got {type(explain).__name__}")
    if not isinstance(loft_layers, bool):
        raise TypeError(f"loft_layers must be a bool, got {type(loft_layers).__name__}")
    _check_selection(policy, include, exclude)  # fail fast, before tracing
    report = explain_groups(model, example_input)
    if explain is not False:
        out = sys.stdout if explain is True else explain
        print(report, file=out)
    groups = select_groups(report.groups, policy, include, exclude, model=model)
    if explain is not False:
        print(f"selected {len(groups)} of {len(report.groups)} group(s) with policy={policy!r}, include={include!r}, "
              f"exclude={exclude!r}: {[g.name for g in groups]}", file=out)
    if loft_layers:
        to_loft_layers(model, groups)
    return model, groups
