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


def resolve(model: nn.Module, groups) -> list[Resolved]:
    """Check `groups` against `model` (modules exist, have the right kind and sizes); return plain records."""
    check_model(model)
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups must be a list of FilterGroup, got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups must not be empty")
    out, seen = [], set()
    as_a, as_b = {}, {}
    for i, g in enumerate(groups):
        where = f"groups[{i}]"
        missing = [f for f in _FIELDS if not hasattr(g, f)]
        if missing:
            raise TypeError(f"{where} must be a FilterGroup (fields {', '.join(_FIELDS)}); "
                            f"{type(g).__name__} lacks {', '.join(missing)}")
        if not isinstance(g.name, str):
            raise TypeError(f"{where}.name must be a str, got {type(g.name).__name__}")
        if g.name in seen:
            raise ValueError(f"{where}.name {g.name!r} is used by two groups; group names must be unique")
        seen.add(g.name)
        if isinstance(g.n, bool) or not isinstance(g.n, numbers.Integral) or g.n < 1:
            raise ValueError(f"{where}.n must be a positive int, got {g.n!r}")
        n = int(g.n)
        a_name = _names(g.conv_a, f"{where}.conv_a")
        if len(a_name) != 1:
            raise ValueError(f"{where}.conv_a must name exactly one module, got {g.conv_a!r}")
        conv_a = module(model, a_name[0], f"{where}.conv_a", nn.Conv2d)
        if conv_a.groups != 1:
            raise ValueError(f"{where}.conv_a ({a_name[0]!r}) is a grouped conv (groups={conv_a.groups}); "
                             "only groups=1 convs can be sliced by filter")
        if conv_a.out_channels != n:
            raise ValueError(f"{where}.n is {n} but conv_a ({a_name[0]!r}) has {conv_a.out_channels} output channels")
        norms = _names(g.norms, f"{where}.norms")
        for name in norms:
            bn = module(model, name, f"{where}.norms", nn.BatchNorm2d)
            if bn.num_features != n:
                raise ValueError(f"{where}.norms module {name!r} has {bn.num_features} channels, expected n={n}")
        conv_b = _names(g.conv_b, f"{where}.conv_b")
        if not conv_b:
            raise ValueError(f"{where}.conv_b must name at least one module")
        for name in conv_b:
            cb = module(model, name, f"{where}.conv_b", nn.Conv2d)
            if cb.groups != 1:
                raise ValueError(f"{where}.conv_b module {name!r} is a grouped conv (groups={cb.groups}); "
                                 "only groups=1 convs can be sliced by input channel")
            if cb.in_channels != n:
                raise ValueError(f"{where}.conv_b module {name!r} has {cb.in_channels} input channels, expected n={n}")
        # A module's output (input) channels can belong to one group only.
        for table, names, role in ((as_a, a_name, "conv_a"), (as_b, conv_b, "conv_b")):
            for name in names:
                if name in table:
                    raise ValueError(f"module {name!r} is {role} of both {table[name]!r} and {g.name!r}")
                table[name] = g.name
        for name in norms:
            if name in as_a:  # norms and conv_a share the output-channel namespace key
                raise ValueError(f"module {name!r} appears twice among the groups' conv_a/norms")
            as_a[name] = g.name
        out.append(Resolved(g.name, n, a_name[0], norms, conv_b))
    return out
