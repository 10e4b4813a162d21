"""The LoFT partition: which worker owns which filters of each group in a round.

Every rank (and every simulated worker) computes the same partition from
(seed, round) alone, so agreeing on it, the first step of every LoFT round,
costs no communication. For each group a random permutation of its n filters
is dealt round-robin: worker s gets perm[s::S], i.e. n//S or n//S + 1 filters
(workers s < n % S get the extra one), returned sorted ascending.

The permutation of a group is seeded by (seed, round, group name) through a
stable hash, so it does not depend on the order of the groups list nor on
Python's per-process hash salt.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

from .. import _checks as C
from ..filter_group import FilterGroup, check_group_list


def _group_seed(seed: int, round: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{round}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_groups(groups, workers: int) -> list[FilterGroup]:
    """Validate a list of FilterGroup for S workers: unique names, disjoint roles, n >= S (else some worker owns
    nothing). No model is needed; `loft_kernels.filter_group.resolve_groups` also checks them against one."""
    return check_group_list(groups, workers)


def owned_count(n: int, workers: int, rank: int) -> int:
    """How many of a group's n filters worker `rank` owns: len(range(rank, n, workers))."""
    return (n - rank + workers - 1) // workers


def partition(groups: Sequence[FilterGroup], workers: int, seed: int, round: int) -> dict[str, list[Tensor]]:
    """Group name -> list of `workers` sorted int64 index tensors (CPU), disjoint and covering range(n)."""
    workers = C.positive_int(workers, "workers")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    round = C.non_negative_int(round, "round")
    return deal(check_groups(groups, workers), workers, seed, round)


def deal(groups: Sequence[FilterGroup], workers: int, seed: int, round: int) -> dict[str, list[Tensor]]:
    """`partition` of groups already checked (behind the training boundary: no validation per round)."""
    out = {}
    for g in groups:
        gen = torch.Generator().manual_seed(_group_seed(seed, round, g.name))
        perm = torch.randperm(g.n, generator=gen)
        out[g.name] = [perm[s::workers].sort().values for s in range(workers)]
    return out
