"""Argument checks of LoftOptimizer: the base optimizer, the groups against the model, the process group."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..filter_group import FilterGroup, resolve_groups
from .sync import LocalGroup

# Optimizers whose update of one element reads only that element's gradient and state, so stepping a
# worker's compact block equals stepping the full tensor and keeping the other elements.
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.Rprop,
               torch.optim.ASGD)


def check_loft_groups(model: nn.Module, groups: Sequence[FilterGroup]) -> None:
    """The groups fit `model` (modules exist, have the kind their role needs and n channels there).

    Any such model trains: a worker's sub-model is cut from the tensors themselves, so
    plain nn layers work as well as converted Loft layers.
    """
    resolve_groups(model, groups)


def check_params(model: nn.Module, base: torch.optim.Optimizer) -> None:
    """The base optimizer holds only model parameters (the sync carries nothing else)."""
    known = {id(p) for p in model.parameters()}
    for group in base.param_groups:
        for p in group["params"]:
            if id(p) not in known:
                raise ValueError("base_optimizer holds parameters that are not model's; LoFT syncs the model's "
                                 "parameters only")


def resolve_group(process_group) -> tuple[object, int, int]:
    """(group, rank, workers) for `process_group` (see LoftOptimizer)."""
    if isinstance(process_group, LocalGroup):
        return process_group, process_group.rank, process_group.size
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialised:
            return None, 0, 1
        return dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if not initialised:
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None or a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__}")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("process_group does not contain this process")
    return process_group, rank, dist.get_world_size(process_group)
