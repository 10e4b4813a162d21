"""Argument checks of LoftOptimizer: the base optimizer, the groups against the model, the process group."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .groups import FilterGroup
from .layers import LoftBatchNorm2d, LoftConv2d, _module
from .sync import LocalGroup

# Optimizers whose update of one element reads only that element's gradient and state, so stepping a
# worker's compact block equals stepping the full tensor and keeping the other elements.
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.Rprop,
               torch.optim.ASGD)


def check_loft_groups(model: nn.Module, groups: Sequence[FilterGroup]) -> None:
    """Every group names Loft layers of `model` whose sizes match its n (else TypeError/ValueError naming groups)."""
    for g in groups:
        conv_a, conv_b = _module(model, g.conv_a, LoftConv2d, g.name), _module(model, g.conv_b, LoftConv2d, g.name)
        if conv_a.out_channels != g.n or conv_b.in_channels != g.n or conv_b.groups != 1:
            raise ValueError(f"groups: group {g.name!r} has n={g.n} but {g.conv_a!r} has {conv_a.out_channels} "
                             f"output channels and {g.conv_b!r} {conv_b.in_channels} input channels "
                             f"(groups={conv_b.groups})")
        for nm in g.norms:
            norm = _module(model, nm, LoftBatchNorm2d, g.name)
            if norm.num_features != g.n:
                raise ValueError(f"groups: group {g.name!r} has n={g.n} but norm {nm!r} has "
                                 f"{norm.num_features} channels")


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
