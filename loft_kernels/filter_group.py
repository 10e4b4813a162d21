"""The filter group record: what a LoFT partition unit is made of, checked against a model in one place.

A group is a producer layer (nn.Conv2d with groups=1, or nn.Linear) whose n
output channels flow only through per-channel operations into one consumer
layer (nn.Conv2d with groups=1, or nn.Linear). Filter j of the group is

- row j of the producer's weight and bias (dim 0),
- channel j of every per-channel *member* on the way, cut along dim 0:
  a BatchNorm2d (weight, bias, running_mean, running_var) or a depthwise
  nn.Conv2d (groups == in_channels == out_channels == n; weight and bias),
- for a squeeze-and-excitation gate on the way (pool -> reduce -> act ->
  expand -> sigmoid, multiplying the channels): input column j of the reduce
  layer's weight (an "se_reduce" member, dim 1) and output row j and bias j
  of the expand layer (an "se_expand" member, dim 0),
- input column j of the consumer's weight (dim 1; the consumer's bias is not
  per filter).

Producer and consumer may be grouped convs (ResNeXt, RegNet): then the group's
`conv_groups` G > 1 says its n channels form G equal blocks, a grouped consumer's
weight holds only a block's n/G input columns (cut by in-block position), and
the partition deals the same in-block positions of every block to a worker.

This module imports nothing of the training or tickets packages: the record,
its validation against a model (`resolve_groups`) and the list of tensors it
owns (`FilterGroup.filter_keys` / `filter_tensors`) live here once, and
discovery, Loft layers, partition, sync, pruning and the tracker all use them.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn

BATCHNORM = "batchnorm"
DEPTHWISE = "depthwise"
SE_REDUCE = "se_reduce"
SE_EXPAND = "se_expand"
MEMBER_KINDS = (BATCHNORM, DEPTHWISE, SE_REDUCE, SE_EXPAND)
# (tensor, dim it is cut along) of each member kind. An SE reduce layer reads the group's channels (its input
# columns, like a consumer); every other kind carries them on its output side.
_MEMBER_TENSORS = {BATCHNORM: (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)),
                   DEPTHWISE: (("weight", 0), ("bias", 0)), SE_REDUCE: (("weight", 1),),
                   SE_EXPAND: (("weight", 0), ("bias", 0))}
_INPUT_SIDE = (SE_REDUCE,)


def derived_weight_reason(m: nn.Module) -> Optional[str]:
    """Why `m`'s weight cannot be cut (it is not a parameter of its own, e.g. old hook-style weight_norm)."""
    if "weight" in m._parameters:
        return None
    hooked = [k for k in m._parameters if k.startswith("weight_")]
    how = f" from {hooked} (torch.nn.utils.weight_norm or a similar hook)" if hooked else ""
    return f"its weight is computed{how} in the forward, not a parameter of its own: it cannot be cut by filter"


@dataclass(frozen=True)
class Member:
    """A per-channel layer between producer and consumer: module name, kind and the dim its tensors are cut along."""
    name: str
    kind: str = BATCHNORM
    dim: Optional[int] = None  # the dim of its weight that holds the group's channels; follows from the kind

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Member name must be a non-empty str, got {self.name!r}")
        if self.kind not in MEMBER_KINDS:
            raise ValueError(f"Member kind must be one of {MEMBER_KINDS}, got {self.kind!r}")
        dim = _MEMBER_TENSORS[self.kind][0][1]
        if self.dim is not None and self.dim != dim:
            raise ValueError(f"Member dim of kind {self.kind!r} is {dim}, got {self.dim!r}")
        object.__setattr__(self, "dim", dim)

    @property
    def input_side(self) -> bool:
        """Whether the member reads the group's channels as inputs (an SE reduce layer) rather than carrying them."""
        return self.kind in _INPUT_SIDE


def _member(value, where: str) -> Member:
    if isinstance(value, Member):
        return value
    if isinstance(value, str):  # a bare name is a BatchNorm, as groups were written before depthwise members
        return Member(value, BATCHNORM)
    raise TypeError(f"{where} must be a module name or a Member, got {value!r}")


@dataclass(frozen=True)
class FilterGroup:
    """One partition unit; `producer`, `consumer` and each member's name are `model.get_submodule` names.

    Constructed as FilterGroup(name, producer, members, consumer, n); members may
    be bare names (BatchNorm2d) or `Member(name, kind)`. `conv_a`, `conv_b` and
    `norms` are aliases of producer, consumer and the BatchNorm members' names.
    `conv_groups` (G, default 1): the n channels are G equal blocks because the
    producer or the consumer is a grouped conv; workers then own the same
    in-block positions of every block (see `loft_kernels.training.partition`).
    """
    name: str
    producer: str
    members: tuple
    consumer: str
    n: int
    conv_groups: int = 1

    def __post_init__(self):
        for field in ("name", "producer", "consumer"):
            if not isinstance(getattr(self, field), str):
                alias = {"producer": " (conv_a)", "consumer": " (conv_b)"}.get(field, "")
                raise TypeError(f"{field}{alias} must be a str, got {type(getattr(self, field)).__name__}")
        if isinstance(self.members, (str, Member)) or not isinstance(self.members, (list, tuple)):
            raise TypeError(f"members (norms) must be a list or tuple of module names or Members, "
                            f"got {self.members!r}")
        members = tuple(_member(m, f"members[{i}]") for i, m in enumerate(self.members))
        object.__setattr__(self, "members", members)
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        object.__setattr__(self, "n", int(self.n))
        g = self.conv_groups
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1 or self.n % g:
            raise ValueError(f"conv_groups must be a positive int dividing n={self.n}, got {g!r}")
        object.__setattr__(self, "conv_groups", int(g))
        names = self.modules
        if len(set(names)) != len(names):
            raise ValueError(f"group {self.name!r} names a module twice: {names}")

    # Aliases kept for the conv-only vocabulary.
    @property
    def conv_a(self) -> str:
        return self.producer

    @property
    def conv_b(self) -> str:
        return self.consumer

    @property
    def norms(self) -> tuple:
        return tuple(m.name for m in self.members if m.kind == BATCHNORM)

    @property
    def depthwise(self) -> tuple:
        return tuple(m.name for m in self.members if m.kind == DEPTHWISE)

    @property
    def block_size(self) -> int:
        """Channels per conv group (n // conv_groups): what a worker's share is dealt within."""
        return self.n // self.conv_groups

    @property
    def modules(self) -> tuple:
        """All module names of the group: producer, members in flow order, consumer."""
        return (self.producer, *(m.name for m in self.members), self.consumer)

    def filter_keys(self) -> list[tuple[str, int]]:
        """(state_dict key, filter dim) of every tensor that may hold this group's filters (biases may be absent)."""
        keys = [(f"{self.producer}.weight", 0), (f"{self.producer}.bias", 0)]
        keys += [(f"{m.name}.{attr}", dim) for m in self.members for attr, dim in _MEMBER_TENSORS[m.kind]]
        return keys + [(f"{self.consumer}.weight", 1)]

    def filter_tensors(self, model: nn.Module) -> list[tuple[str, Tensor, int]]:
        """(qualified name, tensor, filter dim) of every parameter and buffer of `model` holding this group's filters.

        Producer weight/bias along dim 0; each member's tensors along dim 0
        (BatchNorm weight, bias, running_mean, running_var; depthwise and SE
        expand weight, bias) or dim 1 (SE reduce weight); the consumer's weight
        along dim 1 (a grouped consumer: by in-block position). Absent
        biases/buffers are skipped.
        """
        out = []
        for key, dim in self.filter_keys():
            owner, _, attr = key.rpartition(".")
            tensor = getattr(model.get_submodule(owner), attr, None)
            if isinstance(tensor, Tensor):
                out.append((key, tensor, dim))
        return out

    def to_dict(self) -> dict:
        """Plain data (str/int/list) for checkpoints and JSON; `FilterGroup.from_dict` reads it back."""
        out = {"name": self.name, "producer": self.producer, "consumer": self.consumer, "n": self.n,
               "members": [[m.name, m.kind] for m in self.members]}
        if self.conv_groups != 1:
            out["conv_groups"] = self.conv_groups
        return out

    @classmethod
    def from_dict(cls, data) -> "FilterGroup":
        """Inverse of `to_dict`; also reads the older {name, conv_a, norms, conv_b, n} form."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict from FilterGroup.to_dict(), got {type(data).__name__}")
        try:
            if "producer" in data:
                members = [Member(name, kind) for name, kind in data["members"]]
                return cls(data["name"], data["producer"], tuple(members), data["consumer"], data["n"],
                           data.get("conv_groups", 1))
            return cls(data["name"], data["conv_a"], tuple(data["norms"]), data["conv_b"], data["n"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"data is not a FilterGroup dict ({type(e).__name__}: {e}): {data!r}") from None


# ----------------------------------------------------------- validation ----
@dataclass(frozen=True)
class ResolvedGroup:
    """A group checked against a model, with its modules looked up."""
    group: FilterGroup
    producer: nn.Module
    members: tuple  # modules, in the order of group.members
    consumer: nn.Module


def check_group_list(groups, workers: Optional[int] = None, name: str = "groups") -> list[FilterGroup]:
    """`groups` is a non-empty list of FilterGroup with unique names, each module's channels in one group per side.

    With `workers`, every group also needs n >= workers (else some worker would own none of its filters).
    """
    if isinstance(groups, FilterGroup) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"{name} must be a list of FilterGroup, got {type(groups).__name__}")
    if not groups:
        raise ValueError(f"{name} must not be empty: LoFT needs at least one filter group (see lk.convert)")
    owner: dict[tuple[str, str], str] = {}
    seen = set()
    for i, g in enumerate(groups):
        if not isinstance(g, FilterGroup):
            raise TypeError(f"{name}[{i}] must be a FilterGroup, got {type(g).__name__}")
        if g.name in seen:
            raise ValueError(f"{name} has duplicate group name {g.name!r}; group names must be unique")
        seen.add(g.name)
        # A module's output channels (producer, members) and input channels (consumer) belong to one group each.
        outputs = (g.producer, *(m.name for m in g.members if not m.input_side))
        inputs = (*(m.name for m in g.members if m.input_side), g.consumer)
        for side, names in (("output", outputs), ("input", inputs)):
            for module_name in names:
                if (side, module_name) in owner:
                    raise ValueError(f"{name}: module {module_name!r} has its {side} channels in both group "
                                     f"{owner[side, module_name]!r} and group {g.name!r}")
                owner[side, module_name] = g.name
    if workers is not None:
        small = [f"{g.name!r} (n={g.n})" for g in groups if g.n < workers]
        small += [f"{g.name!r} (n={g.n} in {g.conv_groups} conv groups of {g.block_size})" for g in groups
                  if g.n >= workers and g.block_size < workers]
        if small:
            raise ValueError(f"{name}: {', '.join(small)} have fewer filters than workers={workers}; every worker "
                             f"must own at least one filter of every group (of every conv group of a grouped conv; "
                             f"exclude those groups or use fewer workers)")
    return list(groups)


def _lookup(model: nn.Module, module_name: str, role: str, group: str) -> nn.Module:
    try:
        return model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"groups: group {group!r} names {role} {module_name!r}, which the model does not "
                         f"have; were the groups found on another model?") from None


def _size_error(group: FilterGroup, role: str, module_name: str, what: str, size: int) -> ValueError:
    return ValueError(f"groups: group {group.name!r} has n={group.n} filters but its {role} {module_name!r} has "
                      f"{size} {what}; were the groups found on another model?")


def _check_weight(group: FilterGroup, m: nn.Module, role: str, module_name: str) -> None:
    reason = derived_weight_reason(m) if isinstance(m, (nn.Conv2d, nn.Linear)) else None
    if reason is not None:
        raise ValueError(f"groups: group {group.name!r}: {role} {module_name!r}: {reason}")


def _check_layer(group: FilterGroup, m: nn.Module, role: str, module_name: str) -> None:
    """A producer or consumer (also an SE member: role 'se_expand' is cut like a producer, 'se_reduce' like a
    consumer): a Conv2d or a Linear of size n on its side; a grouped conv only where the group's conv groups
    refine the conv's own (its blocks stay aligned)."""
    out = role in ("producer", SE_EXPAND)
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            if role not in ("producer", "consumer") or m.in_channels == m.groups or group.conv_groups % m.groups:
                raise ValueError(f"groups: group {group.name!r}: {role} {module_name!r} is a grouped conv "
                                 f"(groups={m.groups}); only groups=1 convs can be cut by filter here, or a "
                                 f"producer/consumer whose conv groups divide the group's conv_groups "
                                 f"({group.conv_groups})")
        size, what = (m.out_channels, "output channels") if out else (m.in_channels, "input channels")
    elif isinstance(m, nn.Linear):
        size, what = (m.out_features, "output features") if out else (m.in_features, "input features")
    else:
        raise TypeError(f"groups: group {group.name!r}: {role} {module_name!r} is {type(m).__name__}; expected an "
                        f"nn.Conv2d or nn.Linear")
    if size != group.n:
        raise _size_error(group, role, module_name, what, size)
    _check_weight(group, m, role, module_name)


def _check_member(group: FilterGroup, member: Member, m: nn.Module) -> None:
    if member.kind in (SE_REDUCE, SE_EXPAND):
        _check_layer(group, m, member.kind, member.name)
        return
    if member.kind == BATCHNORM:
        if not isinstance(m, nn.BatchNorm2d):
            raise TypeError(f"groups: group {group.name!r}: member {member.name!r} is {type(m).__name__}; "
                            f"kind {BATCHNORM!r} needs an nn.BatchNorm2d")
        if m.num_features != group.n:
            raise _size_error(group, "member", member.name, "channels", m.num_features)
        return
    if not isinstance(m, nn.Conv2d):
        raise TypeError(f"groups: group {group.name!r}: member {member.name!r} is {type(m).__name__}; "
                        f"kind {DEPTHWISE!r} needs a depthwise nn.Conv2d")
    if not m.in_channels == m.out_channels == m.groups:
        raise ValueError(f"groups: group {group.name!r}: member {member.name!r} is not depthwise with channel "
                         f"multiplier 1 (in_channels={m.in_channels}, out_channels={m.out_channels}, "
                         f"groups={m.groups})")
    if m.out_channels != group.n:
        raise _size_error(group, "member", member.name, "channels", m.out_channels)
    _check_weight(group, m, "member", member.name)


def resolve_groups(model: nn.Module, groups: Sequence[FilterGroup],
                   workers: Optional[int] = None) -> list[ResolvedGroup]:
    """Check `groups` against `model` and look up their modules (the one validation of groups).

    Checks the list (see `check_group_list`), that every named module exists and
    has the kind its role needs (producer/consumer: nn.Conv2d or nn.Linear, a
    grouped conv only with matching conv_groups; members: nn.BatchNorm2d,
    depthwise nn.Conv2d, or the SE gate's nn.Conv2d/nn.Linear layers) and n
    channels there, and that every weight is a parameter of its own layer. Loft layers are subclasses of these, so converted and plain models
    both pass. With `workers`, every group also needs n >= workers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups = check_group_list(groups, workers)
    out = []
    for g in groups:
        producer = _lookup(model, g.producer, "producer", g.name)
        _check_layer(g, producer, "producer", g.producer)
        members = []
        for member in g.members:
            m = _lookup(model, member.name, "member", g.name)
            _check_member(g, member, m)
            members.append(m)
        consumer = _lookup(model, g.consumer, "consumer", g.name)
        _check_layer(g, consumer, "consumer", g.consumer)
        out.append(ResolvedGroup(g, producer, tuple(members), consumer))
    return out
