"""The tickets code's view of filter groups: the one record and validation of loft_kernels.filter_group."""
from __future__ import annotations

from torch import nn

from ..filter_group import FilterGroup, ResolvedGroup, check_group_list, resolve_groups
from ..nn.views import full_view

__all__ = ["FilterGroup", "ResolvedGroup", "check_model", "records", "resolve", "is_loft_layer", "full_view"]


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def records(groups) -> list[FilterGroup]:
    """Check the groups' own fields (a non-empty list of FilterGroup, unique names, disjoint roles); no model needed."""
    return check_group_list(groups)


def resolve(model: nn.Module, groups) -> list[ResolvedGroup]:
    """Check `groups` against `model` (modules exist, have the right kind and sizes) and look up their modules.

    Sizes are those of the full model, also for a LoFT worker mid-round (see `lk.full_view`).
    """
    check_model(model)
    with full_view(model):
        return resolve_groups(model, groups)


def is_loft_layer(m: nn.Module) -> bool:
    """A Loft layer (recognised by type): pruning replaces it by its plain nn parent."""
    from ..nn import LoftBatchNorm2d, LoftConv2d, LoftLinear
    return isinstance(m, (LoftConv2d, LoftBatchNorm2d, LoftLinear))
