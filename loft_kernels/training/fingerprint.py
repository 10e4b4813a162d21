"""One configuration across ranks: every LoFT rank must run the same workers, seed, schedule, model and groups.

Ranks that disagree would partition differently or exchange buffers of
different sizes, which diverges silently or aborts the backend. Each rank
hashes every field of its configuration; one small all_gather of the hashes
tells every rank which fields differ and which ranks hold which value, so all
of them raise the same clear error instead of hanging or crashing.
"""
from __future__ import annotations

import hashlib

import torch

from .collectives import all_gather, comm_device

# The fields a saved state must match. The fingerprint's "dtypes" is compared across ranks only: a checkpoint
# loads into another dtype (values are cast, as torch loads them), ranks of different dtypes would exchange
# buffers that do not fit.
FIELDS = ("workers", "seed", "sync_every", "state", "groups", "parameters", "buffers", "optimizer")


def fingerprint(tensors: dict, param_names, groups, workers: int, seed: int, sync_every: int, state: str,
                optimizer: torch.optim.Optimizer) -> dict:
    """The configuration fields compared across ranks (plain Python values).

    tensors: name -> full-size parameter or buffer of the model; param_names: which are parameters.
    """
    params = set(param_names)
    return {
        "workers": workers, "seed": seed, "sync_every": sync_every, "state": state,
        "groups": [(g.name, g.n) for g in groups],
        "parameters": [(n, tuple(t.shape)) for n, t in tensors.items() if n in params],
        "buffers": [(n, tuple(t.shape)) for n, t in tensors.items() if n not in params],
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        "dtypes": dtypes(tensors),
    }


def dtypes(tensors: dict) -> list:
    """The `dtypes` field: name -> dtype of every tensor (they change with `model.double()` and the like)."""
    return [(n, str(t.dtype)) for n, t in tensors.items()]


def _shapes(entries) -> list:
    # (name, shape) of each entry; fingerprints saved before dtypes had their own field carry a third item
    return [tuple(e[:2]) for e in entries] if isinstance(entries, list) else entries


def describe_difference(field: str, saved, mine) -> str:
    """What differs between a saved and this rank's list-valued field: its first differing entry."""
    saved, mine = _shapes(saved) or [], _shapes(mine) or []
    if field not in ("parameters", "buffers"):
        return f"{len(saved)} entries, this optimizer has {len(mine)}: {_describe(saved)}"
    saved, mine = dict(saved), dict(mine)
    for name in mine:
        if name not in saved:
            return f"{name!r} is not in the state_dict"
        if tuple(saved[name]) != tuple(mine[name]):
            return f"{name!r} has shape {tuple(saved[name])} in the state_dict, {tuple(mine[name])} here"
    extra = [n for n in saved if n not in mine]
    return f"the state_dict has {extra[0]!r}, which this model lacks" if extra else "another order"


def _digest(value) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little") & ((1 << 62) - 1)


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(mine: dict, other: dict) -> list[str]:
    """Fields (of FIELDS) whose values differ between two fingerprints (e.g. a saved one and this rank's)."""
    return [f for f in FIELDS if _digest(_comparable(f, mine.get(f))) != _digest(_comparable(f, other.get(f)))]


def _comparable(field: str, value):
    return _shapes(value) if field in ("parameters", "buffers") else value


def check_across_ranks(mine: dict, group, rank: int, size: int, *, what: str, local_error: str = "",
                       subject: str = "the LoFT configuration") -> None:
    """Compare `mine` with every rank's fingerprint in one all_gather; raise the same ValueError on every rank.

    `local_error`: a problem this rank found on its own (e.g. a checkpoint that does not
    fit); it is reported by every rank, so no rank waits on a peer that gave up.
    """
    fields = list(mine)
    codes = [_digest(mine[f]) for f in fields] + [1 if local_error else 0]
    device = comm_device(group)
    local = torch.tensor(codes, dtype=torch.int64, device=device)
    gathered = torch.empty(size * len(codes), dtype=torch.int64, device=device)
    try:
        all_gather(gathered, local, group)
    except RuntimeError as exc:
        raise RuntimeError(f"{what}: rank {rank} of {size} could not compare its configuration with its peers "
                           f"({exc})") from exc
    table = gathered.view(size, len(codes)).tolist()
    problems = []
    for i, field in enumerate(fields):
        holders: dict[int, list[int]] = {}
        for r in range(size):
            holders.setdefault(table[r][i], []).append(r)
        if len(holders) > 1:
            sets = "; ".join(f"ranks {rs}" for rs in holders.values())
            problems.append(f"{field} differs across ranks ({sets} agree among themselves; this rank {rank} has "
                            f"{field}={_describe(mine[field])})")
    failed = [r for r in range(size) if table[r][-1]]
    if failed:
        problems.append(f"ranks {failed} reported: {local_error}" if local_error else
                        f"ranks {failed} could not load their state (see their error)")
    if problems:
        raise ValueError(f"{what}: {subject} must be the same on every rank: " + "; ".join(problems))
