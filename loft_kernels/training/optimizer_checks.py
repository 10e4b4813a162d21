"""The boundary checks of LoFT training: the base optimizer, and the group list against the model, once.

`check_training_groups` is the one validation of the groups a LoftOptimizer
or LoftSimulator trains: the list itself (unique names, disjoint roles,
n >= workers), every module against the model (`resolve_groups`), and what
training additionally needs of the tensors a group cuts: trainable (a frozen
tensor would stay full-size and the sub-model would not fit together) and not
tied to a tensor outside the group (the other user would silently run on one
worker's block). It returns a `TrainingGroups`, which everything behind the
boundary (the sync plan, the partition of every round) takes as checked.
Any model whose groups pass trains: plain nn layers and Loft layers alike.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..filter_group import FilterGroup, resolve_groups

# Optimizers whose update of one element reads only that element's gradient and state, so stepping a
# worker's compact block equals stepping the full tensor and keeping the other elements.
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.Rprop,
               torch.optim.ASGD)


class TrainingGroups(tuple):
    """Groups that passed `check_training_groups` for `workers` workers (a tuple of FilterGroup)."""
    workers: int

    def __new__(cls, groups: Sequence[FilterGroup], workers: int):
        out = super().__new__(cls, groups)
        out.workers = workers
        return out

    def __reduce__(self):
        return TrainingGroups, (tuple(self), self.workers)


def check_training_groups(model: nn.Module, groups, workers: int) -> TrainingGroups:
    """Validate `groups` against `model` for `workers` workers, once (see the module docstring)."""
    if isinstance(groups, TrainingGroups) and groups.workers == workers:
        return groups
    resolved = resolve_groups(model, groups, workers)
    names: dict[int, list[str]] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    for r in resolved:
        g = r.group
        for name, t, _ in g.filter_tensors(model):
            role = _role(g, name)
            if isinstance(t, nn.Parameter) and not t.requires_grad:
                raise ValueError(f"groups: group {g.name!r}: {role} tensor {name!r} is frozen (requires_grad=False); "
                                 f"every tensor of a group is cut into the workers' blocks and trained, so unfreeze "
                                 f"it or leave this group out")
            others = [n for n in names.get(id(t), []) if n != name]
            if others:
                raise ValueError(f"groups: group {g.name!r}: {role} tensor {name!r} is tied to {others} (the same "
                                 f"tensor); a worker would cut it to its block under both names, so tied or shared "
                                 f"weights cannot be in a group: untie them or leave this group out")
    return TrainingGroups([r.group for r in resolved], workers)


def _role(group: FilterGroup, tensor_name: str) -> str:
    module = tensor_name.rpartition(".")[0]
    return "producer" if module == group.producer else "consumer" if module == group.consumer else "member"


def check_params(model: nn.Module, base: torch.optim.Optimizer) -> None:
    """The base optimizer holds only model parameters (the sync carries nothing else)."""
    known = {id(p) for p in model.parameters()}
    for group in base.param_groups:
        for p in group["params"]:
            if id(p) not in known:
                raise ValueError("base_optimizer holds parameters that are not model's; LoFT syncs the model's "
                                 "parameters only")
