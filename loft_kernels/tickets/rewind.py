"""Rewinding: the pruned structure with weights from another checkpoint of the same run.

LoFT's ticket is fine-tuned from the pruned pretrained weights (what `prune`
returns). The rewinding variants re-train the same pruned structure from the
initial weights or from those of an early snapshot e: the full-size weights
of that checkpoint, cut by the same kept indices.
"""
from __future__ import annotations

import copy

from torch import Tensor, nn

from . import _groups
from .prune import _slice


def rewind(pruned_model: nn.Module, kept: dict[str, Tensor], groups, source) -> nn.Module:
    """A deep copy of `pruned_model` whose every parameter and buffer comes from `source`.

    groups: the groups of the full-size model `source` belongs to (the ones
    `prune` was given); kept: the `kept` that `prune` returned. source: that
    full-size model's state dict (e.g. saved before training, or at epoch e)
    or the model itself. Entries outside the groups (stem, head, shortcuts)
    are taken from `source` unchanged; `pruned_model` is left untouched.
    """
    _groups.check_model(pruned_model)
    if isinstance(source, nn.Module):
        source = source.state_dict()
    elif not isinstance(source, dict):
        raise TypeError(f"source must be a state dict or an nn.Module, got {type(source).__name__}")
    sliced = _slice(source, groups, kept, "source")
    target = pruned_model.state_dict()
    if set(target) != set(sliced):
        missing, extra = sorted(set(target) - set(sliced)), sorted(set(sliced) - set(target))
        raise ValueError(f"source does not match pruned_model's structure: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for key, value in target.items():
        if isinstance(value, Tensor) and tuple(sliced[key].shape) != tuple(value.shape):
            raise ValueError(f"source[{key!r}] cut by kept has shape {tuple(sliced[key].shape)} but pruned_model "
                             f"has {tuple(value.shape)}; kept and groups must be the ones prune used")
    new = copy.deepcopy(pruned_model)
    new.load_state_dict(sliced)
    return new
