"""What filter-group discovery reports: the groups, why other layers are none, and the parameters they cover."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..filter_group import resolve_groups
from ..nn import full_view


@dataclass(frozen=True)
class ParameterShare:
    """How much of a model's parameters (elements) filter groups cover.

    touched: in modules that some group names (producer, members, consumer), whole modules counted;
    partitioned: in the tensors the groups cut (what LoFT splits across workers and pruning shrinks)."""
    total: int
    touched: int
    partitioned: int

    @property
    def touched_share(self) -> float:
        return self.touched / self.total if self.total else 0.0

    @property
    def partitioned_share(self) -> float:
        return self.partitioned / self.total if self.total else 0.0


def parameter_share(model: nn.Module, groups) -> ParameterShare:
    """The share of `model`'s parameters that `groups` touch and that they partition (see ParameterShare)."""
    with full_view(model):
        no_groups = isinstance(groups, (list, tuple)) and len(groups) == 0  # they touch nothing
        if not no_groups:
            groups = [r.group for r in resolve_groups(model, groups)]  # they belong to this model
        params = {id(p): p.numel() for p in model.parameters()}
        touched = {id(p) for g in groups for name in g.modules
                   for p in model.get_submodule(name).parameters(recurse=False)}
        cut = {id(t) for g in groups for _, t, _ in g.filter_tensors(model) if id(t) in params}
    return ParameterShare(sum(params.values()), sum(params[i] for i in touched), sum(params[i] for i in cut))


@dataclass
class GroupReport:
    """What discovery found: the groups, and for every other conv/linear why it is no group's producer.

    `share`: the parameters the groups touch and partition (a ParameterShare)."""
    groups: list
    reasons: dict = field(default_factory=dict)  # module name -> reason
    tracer: str = "torch.fx"
    share: Optional[ParameterShare] = None

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} filter group(s) (traced with {self.tracer}):"]
        for g in self.groups:
            members = "".join(f" -> {m.name} [{m.kind}]" for m in g.members)
            blocks = f", {g.conv_groups} conv groups" if g.conv_groups > 1 else ""
            lines.append(f"  {g.name}: {g.producer}{members} -> {g.consumer}  (n={g.n}{blocks})")
        if self.share is not None:
            lines.append(f"parameters: {self.share.partitioned_share:.1%} partitioned by the groups, "
                         f"{self.share.touched_share:.1%} in modules they touch ({self.share.total:,} in all)")
        if self.reasons:
            lines.append("not a group:")
            lines += [f"  {name}: {why}" for name, why in self.reasons.items()]
        return "\n".join(lines)
