"""`full_view(model)`: the full model, whatever state its layers are in.

A layer can hold less than its full weight in two ways: a Loft layer with an
active set computes a subset of its filters on full-size tensors, and a layer
of a LoFT worker mid-round holds only the worker's block of its tensors (its
owner, a `training.WorkerModel`, is recorded in the module under `OWNER`).
Inside `full_view(model)` both show the full layer: active sets are cleared
and every owner shows its full-size values (the owned blocks as trained so
far, the rest as at the last sync); both are restored on exit. Every reader of
the full model in the package (evaluation, the communication model, discovery,
pruning, the filter tracker) goes through it.
"""
from __future__ import annotations

import contextlib

from torch import nn

OWNER = "_loft_owner"  # module attribute: the WorkerModel that holds this layer's tensors
_ACTIVE = ("_active_out", "_active_in", "_active")  # the Loft layers' active sets


def owners(model: nn.Module) -> list:
    """The distinct WorkerModels holding layers of `model`, in module order."""
    out: dict = {}
    for m in model.modules():
        owner = m.__dict__.get(OWNER)
        if owner is not None:
            out.setdefault(id(owner), owner)
    return list(out.values())


def is_compact(module: nn.Module) -> bool:
    """Whether `module` holds a LoFT worker's block (not its full tensors) now."""
    owner = module.__dict__.get(OWNER)
    return owner is not None and owner.holds_block(module)


def refuse_active_sets(module: nn.Module) -> None:
    """Active sets (the full-size path of the Loft layers) cannot apply to a layer that holds a block now."""
    if is_compact(module):
        raise RuntimeError(f"{type(module).__name__}: this layer is training as part of a LoftOptimizer's compact "
                           f"sub-model this round; active sets apply to full-size layers only")


@contextlib.contextmanager
def full_view(model: nn.Module):
    """Context manager: `model` computes and shows all filters, as the full model (see the module docstring).

    Changes made inside to the owned blocks (e.g. BatchNorm statistics in train
    mode, `load_state_dict`) are kept; active sets are restored as they were.
    `lk.dense` is the same context.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    saved = [(m, {a: m.__dict__[a] for a in _ACTIVE if a in m.__dict__}) for m in model.modules()
             if any(a in m.__dict__ for a in _ACTIVE)]
    for m, _ in saved:
        for a in _ACTIVE:
            m.__dict__.pop(a, None)  # the class default: no active set
    try:
        with contextlib.ExitStack() as stack:
            for owner in owners(model):
                stack.enter_context(owner.full_view())
            yield model
    finally:
        for m, state in saved:  # already validated when set: restore as they were
            m.__dict__.update(state)


dense = full_view

__all__ = ["full_view", "dense", "is_compact", "owners", "refuse_active_sets", "OWNER"]


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool):
    """`model.train(training)` for the block; every module's own flag restored after (a BatchNorm the user
    froze with `.eval()` inside a training model stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def refuse_scripting(module: nn.Module):
    """`__prepare_scriptable__` of the Loft layers: torch.jit.script cannot compile their forward (it calls the
    package's Python ops), so say so instead of failing on an internal attribute."""
    raise RuntimeError(f"{type(module).__name__} cannot be compiled by torch.jit.script; use torch.compile or "
                       f"torch.export, or lk.prune / plain nn layers for a TorchScript model")
