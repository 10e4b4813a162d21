"""FilterTracker: per-filter importance over training, and ranking distances between snapshots."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import _checks as C
from ..ops import filter_norms, footrule_matrix, mask_distance_matrix
from . import _groups


@dataclass(frozen=True)
class DistanceSeries:
    """Distance of every snapshot to one reference snapshot (in snapshot order)."""
    tags: list
    total: Tensor                # [T] float32, model level (sum over groups)
    per_group: dict[str, Tensor]  # group name -> [T] float32


class TrainingDiverged(ValueError):
    """A snapshot found NaN or infinite weights: the training it tracks has diverged."""


def _check_tag(tag, name: str = "tag"):
    # Plain ints/strs keep state_dict weights_only-loadable and tags printable.
    if isinstance(tag, bool) or not isinstance(tag, (numbers.Integral, str)):
        raise TypeError(f"{name} must be an int or a str, got {type(tag).__name__}")
    return int(tag) if isinstance(tag, numbers.Integral) else tag


class FilterTracker:
    """Records the importance of every filter of `groups` at named snapshots.

    Importance of filter j of a group = L2 norm of row j of its producer's weight
    (a conv's or a Linear's),
    computed for all groups in one `lk.filter_norms` call. Only these scores
    (CPU float32) are kept, never weight copies, so tracking every epoch costs
    sum(n) floats per snapshot.
    """

    def __init__(self, model: nn.Module, groups):
        self._groups = [r.group for r in _groups.resolve(model, groups)]
        self._model = model
        self._tags: list = []
        self._scores: list[list[Tensor]] = [[] for _ in self._groups]  # per group, per snapshot [n]

    # ---------------------------------------------------------------- record ----
    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self._groups]

    @property
    def tags(self) -> list:
        return list(self._tags)

    def __len__(self) -> int:
        return len(self._tags)

    def snapshot(self, tag) -> None:
        """Record the current producer row norms under `tag` (an int such as the epoch, or a str)."""
        tag = _check_tag(tag)
        if tag in self._tags:
            raise ValueError(f"tag {tag!r} was already recorded; snapshot tags must be unique")
        # Re-resolve by name: modules may have been swapped since (a user's own surgery), so held references
        # could go stale; resolving also checks every group still has n filters.
        with _groups.full_view(self._model):  # a LoFT worker mid-round holds compact blocks
            resolved = _groups.resolve(self._model, self._groups)
            norms = filter_norms([r.producer.weight for r in resolved])
        for g, s in zip(self._groups, norms):
            if not bool(torch.isfinite(s).all()):  # later ranking distances could not use the snapshot
                raise TrainingDiverged(f"snapshot {tag!r}: the weights of group {g.name!r} hold NaN or infinite "
                                       f"values (the training diverged; a lower learning rate may help)")
        for per_group, s in zip(self._scores, norms):
            per_group.append(s.detach().to("cpu", torch.float32))
        self._tags.append(tag)

    def _index(self, tag, name: str = "tag") -> int:
        tag = _check_tag(tag, name)
        try:
            return self._tags.index(tag)
        except ValueError:
            raise ValueError(f"{name} {tag!r} is not a recorded snapshot; recorded: {self._tags}") from None

    def scores(self, tag) -> dict[str, Tensor]:
        """Group name -> [n] float32 importance at snapshot `tag` (copies)."""
        t = self._index(tag)
        return {g.name: s[t].clone() for g, s in zip(self._groups, self._scores)}

    def score_history(self) -> list[Tensor]:
        """Per group (in group order) a [T, n] float32 tensor: the scores of every snapshot."""
        self._need(1)
        return [torch.stack(s) for s in self._scores]

    def _need(self, count: int) -> None:
        if len(self._tags) < count:
            raise ValueError(f"the tracker holds {len(self._tags)} snapshot(s); this needs at least {count}")

    # ------------------------------------------------------------- distances ----
    def footrule_to(self, tag) -> DistanceSeries:
        """F(snapshot t, `tag`) for every snapshot t: per group and summed over groups (the model distance).

        Computed in one `lk.footrule_matrix` call over the (t, reference) pairs, not the full T x T matrix.
        """
        ref = self._index(tag)
        T = len(self._tags)
        pairs = [torch.stack([s[t], s[ref]]) for s in self._scores for t in range(T)]
        d = footrule_matrix(pairs)[:, 0, 1].reshape(len(self._groups), T)
        return DistanceSeries(self.tags, d.sum(0), {g.name: d[i] for i, g in enumerate(self._groups)})

    def footrule_matrix(self, *, reduce: bool = False) -> Tensor:
        """[groups, T, T] float32 with M[g, a, b] = F(snapshot a, snapshot b) for group g.

        reduce=True: the model-level [T, T] matrix, the sum over groups.
        """
        m = footrule_matrix(self.score_history())
        return m.sum(0) if _bool(reduce, "reduce") else m

    def mask_distance_matrix(self, ratio: float, *, reduce: bool = False) -> Tensor:
        """[groups, T, T] float32 Early-Bird mask distances at pruning `ratio` (per-group keep masks, drawn per
        conv group where a group runs through grouped convs, as the ticket is).

        reduce=True: the model-level [T, T] matrix, the fraction of ALL tracked
        filters whose keep bit differs (the per-group distances averaged with
        weights n_g), which is Hamming distance between the concatenated masks.
        """
        ratio = C.ratio(ratio)
        # A group that runs through grouped convs keeps its top filters per conv group (as `select_filters` draws
        # the ticket): each conv group's mask is one of the op's. Distances are summed as counts of differing
        # filters, so that 2 of 20 is exactly float32(0.1), as the criterion's threshold test expects.
        blocks = [(i, h[:, b * g.block_size:(b + 1) * g.block_size].contiguous())
                  for i, (g, h) in enumerate(zip(self._groups, self.score_history())) for b in range(g.conv_groups)]
        per_block = mask_distance_matrix([h for _, h in blocks], ratio)
        sizes = torch.tensor([h.shape[1] for _, h in blocks], dtype=torch.float64)
        differing = (per_block.double() * sizes[:, None, None]).round()
        owner = torch.tensor([i for i, _ in blocks])
        if not _bool(reduce, "reduce"):
            return torch.stack([(differing[owner == i].sum(0) / g.n).float() for i, g in enumerate(self._groups)])
        return (differing.sum(0) / sizes.sum()).float()

    # ------------------------------------------------------------ checkpoint ----
    def state_dict(self) -> dict:
        """Plain lists and tensors only (loadable with torch.load(weights_only=True))."""
        return {"groups": self.group_names, "sizes": [g.n for g in self._groups], "tags": self.tags,
                "scores": [torch.stack(s) if s else torch.empty(0, g.n) for g, s in zip(self._groups, self._scores)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore snapshots saved by `state_dict`; the groups must be the same (names and sizes)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from FilterTracker.state_dict(), got {type(state).__name__}")
        missing = {"groups", "sizes", "tags", "scores"} - state.keys()
        if missing:
            raise ValueError(f"state is missing key(s) {sorted(missing)}; expected a FilterTracker.state_dict()")
        if list(state["groups"]) != self.group_names or list(state["sizes"]) != [g.n for g in self._groups]:
            raise ValueError(f"state was saved for groups {list(state['groups'])} with sizes {list(state['sizes'])}; "
                             f"this tracker has {self.group_names} with sizes {[g.n for g in self._groups]}")
        tags = [_check_tag(t, "state['tags'] entry") for t in state["tags"]]
        if len(set(tags)) != len(tags):
            raise ValueError("state['tags'] has duplicate tags")
        scores = list(state["scores"])
        if len(scores) != len(self._groups):
            raise ValueError(f"state['scores'] must have one tensor per group ({len(self._groups)}), got {len(scores)}")
        for g, s in zip(self._groups, scores):
            C.tensor(s, f"state['scores'] of group {g.name!r}", ndim=2)
            if tuple(s.shape) != (len(tags), g.n):
                raise ValueError(f"state['scores'] of group {g.name!r} has shape {tuple(s.shape)}, "
                                 f"expected {(len(tags), g.n)}")
        self._tags = tags
        self._scores = [list(s.to("cpu", torch.float32).clone().unbind(0)) for s in scores]


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
