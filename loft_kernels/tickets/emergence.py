"""When has the ticket emerged? Two criteria over a series of snapshots.

footrule (LoFT's metric): d_t = F(snapshot t, snapshot t-1), the weighted
footrule of the newest ranking against the previous one (model level: summed
over groups). The ticket has emerged at the first snapshot t where the last
`window` consecutive distances d_{t-window+1..t} are all <= the threshold.
By default the threshold is relative: `threshold * d_1`, a fraction of the
first consecutive distance. Footrule values grow with the number of groups
and filters, so an absolute threshold would not carry from one model to the
next; relative to d_1 it reads "the ranking now moves less than 10 % of what
it moved at the start", matching the poster's curves (30-60 falling to about
0). window=3 asks for the settling to last, not a single quiet epoch.
Pass relative=False for an absolute threshold.

mask (Early-Bird, You et al. 2020): at pruning `ratio`, the ticket has
emerged at the first snapshot t whose keep-mask is within `mask_threshold`
(<=, default 0.1, Early-Bird's value) of the masks of each of the previous
`lookback` (4) snapshots.

Both criteria only look at snapshots up to t, so calling them after every
new snapshot (to stop pretraining early) fires at the same snapshot as a call
on the finished run.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import _checks as C
from .tracker import FilterTracker

CRITERIA = ("footrule", "mask")


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _matrix(source, criterion: str, ratio) -> Tensor:
    if isinstance(source, FilterTracker):
        if criterion == "footrule":
            return source.footrule_matrix(reduce=True)
        if ratio is None:
            raise ValueError("ratio is required for criterion='mask' with a FilterTracker (the pruning ratio "
                             "whose keep-masks are compared)")
        return source.mask_distance_matrix(ratio, reduce=True)
    if ratio is not None:
        raise ValueError("ratio applies only when source is a FilterTracker; a precomputed mask-distance "
                         "matrix already has its ratio built in")
    m = C.tensor(source, "source", ndim=2, floating=True)
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"source must be a square [T, T] model-level distance matrix, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError("source contains NaN or infinite values")
    return m.detach().cpu()


def detect_emergence(source, criterion: str = "footrule", *, threshold: float = 0.1, window: int = 3,
                     relative: bool = True, ratio: float | None = None, mask_threshold: float = 0.1,
                     lookback: int = 4):
    """The snapshot at which the ticket emerged under `criterion`, or None if it has not.

    source: a FilterTracker (returns the snapshot's tag) or a precomputed
    model-level [T, T] distance matrix in snapshot order (returns the index),
    e.g. `tracker.footrule_matrix(reduce=True)` or
    `tracker.mask_distance_matrix(ratio, reduce=True)`.
    criterion "footrule": `threshold` (relative to the first consecutive
    distance unless relative=False) and `window` consecutive distances.
    criterion "mask": `ratio` (required with a tracker), `mask_threshold`,
    `lookback` previous masks. See the module docstring for the definitions.
    """
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be a bool, got {type(relative).__name__}")
    threshold = _number(threshold, "threshold")
    mask_threshold = _number(mask_threshold, "mask_threshold")
    window = C.positive_int(window, "window")
    lookback = C.positive_int(lookback, "lookback")
    m = _matrix(source, criterion, ratio)
    T = m.shape[0]

    def within(values, limit: float) -> bool:
        # Compare in the matrix's dtype: a float32 mask distance of exactly 1/10 must pass a 0.1 threshold.
        return bool((values <= torch.tensor(limit, dtype=m.dtype)).all())

    if criterion == "footrule":
        d = torch.diagonal(m, offset=-1)                  # d[t-1] = M[t, t-1] = F(snapshot t, snapshot t-1)
        limit = threshold * float(d[0]) if (relative and T > 1) else threshold
        fired = next((t for t in range(window, T) if within(d[t - window:t], limit)), None)
    else:
        back = torch.arange(1, lookback + 1)
        fired = next((t for t in range(lookback, T) if within(m[t, t - back], mask_threshold)), None)
    if fired is None or not isinstance(source, FilterTracker):
        return fired
    return source.tags[fired]
