"""Model files and specs: rebuild a zoo model, its filter groups and, for tickets, the pruned structure.

A model file (`save_model`) carries a `spec` (zoo name and constructor
arguments, group policy, input shape), the groups, the state_dict and extras
(a ticket's kept indices and ratio), so the CLI can rebuild the architecture.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..data import Dataset
from ..io import CheckpointError, atomic_save, load_checkpoint
from ..models import get_model
from ..tickets import prune
from ..training import FilterGroup, convert


def build_model(spec: dict) -> tuple[nn.Module, list[FilterGroup]]:
    """The zoo model `spec` describes, converted (Loft layers in its filter groups), and the groups.

    spec: {"model": zoo name, "kwargs": constructor arguments, "input_shape": [C, H, W],
    "policy": "all" | "paper", "include": patterns or None, "exclude": patterns or None}.
    Initial weights come from torch's global RNG: seed it first for a reproducible model.
    """
    if not isinstance(spec, dict) or not {"model", "kwargs", "input_shape", "policy"} <= set(spec):
        raise ValueError("spec must be a dict with model, kwargs, input_shape, policy (see build_model)")
    model = get_model(spec["model"], **spec["kwargs"])
    example = torch.zeros(2, *spec["input_shape"])
    return convert(model, example, spec["policy"], spec.get("include"), spec.get("exclude"))


def model_spec(name: str, dataset: Dataset, *, width: float = 1.0, policy: str = "all",
               include=None, exclude=None) -> dict:
    return {"model": name, "kwargs": {"num_classes": dataset.num_classes, "in_channels": dataset.in_channels,
                                      "width": float(width)},
            "input_shape": [dataset.in_channels, *dataset.image_size], "policy": policy,
            "include": list(include) if include else None, "exclude": list(exclude) if exclude else None}


def groups_to_list(groups) -> list[dict]:
    return [g.to_dict() for g in groups]


def groups_from_list(items) -> list[FilterGroup]:
    """Groups saved by `groups_to_list` (also the older conv_a/norms/conv_b form)."""
    return [FilterGroup.from_dict(d) for d in items]


def save_model(path, model: nn.Module, spec: dict, groups, **extra) -> None:
    """A model file: spec, groups, state_dict and `extra` (e.g. kept indices of a ticket), written atomically."""
    atomic_save({"spec": spec, "groups": groups_to_list(groups),
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}, path)


def load_model_file(path, what: str = "model file") -> dict:
    """The dict of a model file; FileNotFoundError or CheckpointError (naming `what` and the file) otherwise."""
    try:
        obj = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {str(path)!r} is not a loft_kernels model file ({exc})") from None
    if not isinstance(obj, dict) or not {"spec", "groups", "state_dict"} <= set(obj):
        raise CheckpointError(f"{what} {str(path)!r} is not a loft_kernels model file (needs spec, groups, state_dict); "
                         f"use a model.pt written by `loft pretrain` or a ticket.pt written by `loft prune`")
    return obj


def full_model(obj: dict, what: str = "model file") -> tuple[nn.Module, list[FilterGroup]]:
    """The full-size model of a model file, weights loaded; CheckpointError (naming `what`) for a ticket's file or
    contents that do not fit together."""
    if "kept" in obj:
        raise CheckpointError(f"{what} is a ticket (a pruned model), not a full-size model: give a model.pt, "
                              f"init.pt or epoch_<eee>.pt written by `loft pretrain`")
    with _contents(what):
        model, groups = build_model(obj["spec"])
        model.load_state_dict(obj["state_dict"])
        return model, groups_from_list(obj["groups"])


def ticket_model(obj: dict, what: str = "model file") -> nn.Module:
    """The pruned model of a ticket file (`save_model(..., kept=..., ratio=...)`), weights loaded."""
    if "kept" not in obj or "ratio" not in obj:
        raise CheckpointError(f"{what} is not a ticket (no kept filters): use the ticket.pt written by `loft prune`")
    with _contents(what):
        pruned = pruned_skeleton(obj["spec"], groups_from_list(obj["groups"]), obj["kept"], float(obj["ratio"]))
        pruned.load_state_dict(obj["state_dict"])
        return pruned


@contextlib.contextmanager
def _contents(what: str):
    # A file with the right keys whose spec, groups, kept filters and weights do not fit together (edited,
    # or written by another version): the user's file is at fault, not the program.
    try:
        yield
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{what}: its spec, filter groups and weights do not fit together "
                              f"({type(exc).__name__}: {exc})") from None


def pruned_skeleton(spec: dict, groups, kept: dict, ratio: float) -> nn.Module:
    """The architecture of a ticket drawn at `ratio` keeping `kept` (load the ticket's state_dict into it)."""
    model, _ = build_model(spec)
    # Scores that rank exactly the kept filters first make `prune` rebuild that structure.
    scores = {}
    for g in groups:
        s = torch.zeros(g.n)
        s[kept[g.name].long()] = 1.0
        scores[g.name] = s
    pruned, got = prune(model, groups, ratio, criterion=scores)
    for g in groups:
        if not torch.equal(got[g.name], kept[g.name].long().sort().values):
            raise ValueError(f"kept: group {g.name!r} keeps {len(kept[g.name])} of {g.n} filters, "
                             f"not what ratio {ratio} keeps")
    return pruned
