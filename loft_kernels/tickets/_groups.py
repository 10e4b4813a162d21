"""Validate filter groups against a model and resolve their module names.

A group is any object with `name`, `conv_a`, `norms`, `conv_b` and `n`
(`loft_kernels.training.FilterGroup` is one); the tickets code reads nothing
else from it, so it does not import the training package.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from torch import nn

_FIELDS = ("name", "conv_a", "norms", "conv_b", "n")


@dataclass(frozen=True)
class Resolved:
    name: str
    n: int
    conv_a: str
    norms: tuple[str, ...]
    conv_b: tuple[str, ...]


def _names(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{what} must be a module name or a list of module names, got {value!r}")


def module(model: nn.Module, name: str, what: str, kind: type) -> nn.Module:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what} names module {name!r}, which the model does not have") from None
    if not isinstance(m, kind):
        raise TypeError(f"{what} names module {name!r} of type {type(m).__name__}; expected {kind.__name__}")
    return m


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def records(groups) -> list[Resolved]:
    """Check the groups' own fields (types, unique names, one module per channel role); no model needed."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups must be a list of FilterGroup, got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups must not be empty")
    out, seen, owner = [], set(), {}
    for i, g in enumerate(groups):
        where = f"groups[{i}]"
        if isinstance(g, Resolved):
            out.append(g)
            continue
        missing = [f for f in _FIELDS if not hasattr(g, f)]
        if missing:
            raise TypeError(f"{where} must be a FilterGroup (fields {', '.join(_FIELDS)}); "
                            f"{type(g).__name__} lacks {', '.join(missing)}")
        if not isinstance(g.name, str):
            raise TypeError(f"{where}.name must be a str, got {type(g.name).__name__}")
        if isinstance(g.n, bool) or not isinstance(g.n, numbers.Integral) or g.n < 1:
            raise ValueError(f"{where}.n must be a positive int, got {g.n!r}")
        conv_a = _names(g.conv_a, f"{where}.conv_a")
        if len(conv_a) != 1:
            raise ValueError(f"{where}.conv_a must name exactly one module, got {g.conv_a!r}")
        conv_b = _names(g.conv_b, f"{where}.conv_b")
        if not conv_b:
            raise ValueError(f"{where}.conv_b must name at least one module")
        out.append(Resolved(g.name, int(g.n), conv_a[0], _names(g.norms, f"{where}.norms"), conv_b))
    for i, g in enumerate(out):
        if g.name in seen:
            raise ValueError(f"groups[{i}].name {g.name!r} is used by two groups; group names must be unique")
        seen.add(g.name)
        # A module's output (or input) channels can belong to one group only.
        for role, names in (("output", (g.conv_a, *g.norms)), ("input", g.conv_b)):
            for name in names:
                if (role, name) in owner:
                    raise ValueError(f"module {name!r} has its {role} channels in both group "
                                     f"{owner[role, name]!r} and group {g.name!r}")
                owner[role, name] = g.name
    return out


def resolve(model: nn.Module, groups) -> list[Resolved]:
    """Check `groups` against `model` (modules exist, have the right kind and sizes); return plain records."""
    check_model(model)
    out = records(groups)
    for i, g in enumerate(out):
        where = f"groups[{i}]"
        conv_a = module(model, g.conv_a, f"{where}.conv_a", nn.Conv2d)
        if conv_a.groups != 1:
            raise ValueError(f"{where}.conv_a ({g.conv_a!r}) is a grouped conv (groups={conv_a.groups}); "
                             "only groups=1 convs can be sliced by filter")
        if conv_a.out_channels != g.n:
            raise ValueError(f"{where}.n is {g.n} but conv_a ({g.conv_a!r}) has {conv_a.out_channels} output "
                             "channels")
        for name in g.norms:
            bn = module(model, name, f"{where}.norms", nn.BatchNorm2d)
            if bn.num_features != g.n:
                raise ValueError(f"{where}.norms module {name!r} has {bn.num_features} channels, expected n={g.n}")
        for name in g.conv_b:
            cb = module(model, name, f"{where}.conv_b", nn.Conv2d)
            if cb.groups != 1:
                raise ValueError(f"{where}.conv_b module {name!r} is a grouped conv (groups={cb.groups}); "
                                 "only groups=1 convs can be sliced by input channel")
            if cb.in_channels != g.n:
                raise ValueError(f"{where}.conv_b module {name!r} has {cb.in_channels} input channels, "
                                 f"expected n={g.n}")
    return out
