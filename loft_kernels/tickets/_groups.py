"""The tickets code's view of filter groups: the one record and validation of loft_kernels.filter_group."""
from __future__ import annotations

import contextlib

from torch import nn

from ..filter_group import FilterGroup, ResolvedGroup, check_group_list, resolve_groups

_IN_FULL_VIEW = "_loft_tickets_full_view"
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

    Sizes are those of the full model, also for a LoFT worker mid-round (see `full_view`).
    """
    check_model(model)
    with full_view(model):
        return resolve_groups(model, groups)


def is_loft_layer(m: nn.Module) -> bool:
    """A Loft layer (recognised by type): pruning replaces it by its plain nn parent."""
    from ..training.layers import LoftBatchNorm2d, LoftConv2d  # the training package is not needed to import tickets
    from ..training.linear import LoftLinear
    return isinstance(m, (LoftConv2d, LoftBatchNorm2d, LoftLinear))


@contextlib.contextmanager
def full_view(model: nn.Module):
    """Context manager: a LoFT worker's model mid-round (compact sub-model tensors) shows its full-size values.

    Scores and pruning read every filter: the owned blocks as trained so far, the rest as at the last sync.
    A model that is not mid-round is left as it is. Nested uses share the outer view.
    """
    if model.__dict__.get(_IN_FULL_VIEW):
        yield model
        return
    from ..training.submodel import full_size
    model.__dict__[_IN_FULL_VIEW] = True
    try:
        with full_size(model):
            yield model
    finally:
        model.__dict__.pop(_IN_FULL_VIEW, None)
