"""A ratio benchmark's configuration and result rows (the runner's JSON schema)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .timing import Timings


@dataclass(frozen=True)
class Config:
    device: torch.device
    quick: bool = False
    repeats: Optional[int] = None  # overrides every case's repeat count (tests, smoke runs)
    warmup: int = 1  # untimed repetitions before the timed ones

    def reps(self, full: int, quick: int) -> int:
        """Timed repetitions for a case: the override, else its quick or full count."""
        if self.repeats is not None:
            return self.repeats
        return quick if self.quick else full


@dataclass
class Result:
    """One comparison: ratio = candidate / baseline (median over repetitions), goal: ratio <= limit.

    For P7 (a model against a published ratio) the goal is abs(ratio - 1) <= limit
    (`within=True`). Rows that compare computed values rather than times (P6m,
    P7, P8r, P8m) leave the *_ms fields None: the compared quantities are
    `candidate_value` / `baseline_value`, in `unit`.
    """
    id: str
    name: str
    baseline: str
    candidate_ms: Optional[float]
    baseline_ms: Optional[float]
    ratio: Optional[float]
    limit: float
    goal: str
    met: bool
    within: bool = False
    backend: Optional[str] = None
    candidate_value: Optional[float] = None
    baseline_value: Optional[float] = None
    unit: str = "ms"  # of the compared values: "ms" (the *_ms fields), "bytes" or "" (plain numbers, e.g. ratios)
    note: str = ""
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        d = asdict(self)
        for k in ("candidate_ms", "baseline_ms", "ratio", "candidate_value", "baseline_value"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 6)
        return d


@dataclass(frozen=True)
class Spec:
    """What a result row compares: declared up front so a case that fails still reports every row."""
    id: str
    name: str
    baseline: str
    limit: float
    goal: str
    within: bool = False


def judge(ratio: Optional[float], limit: float, within: bool = False) -> bool:
    if ratio is None or not math.isfinite(ratio):
        return False
    eps = 1e-12  # a ratio exactly on the limit meets it despite float rounding
    return abs(ratio - 1.0) <= limit + eps if within else ratio <= limit + eps


def timed(spec: Spec, t: Timings, cand: str, base: str, *, scale: float = 1.0, backend: str | None = None,
          note: str = "", **extra) -> Result:
    """A Result from interleaved timings; the baseline time is scaled by `scale` (a FLOP-limit fraction)."""
    ratio = t.ratio(cand, base, scale)
    return Result(id=spec.id, name=spec.name, baseline=spec.baseline, candidate_ms=t.median(cand),
                  baseline_ms=t.median(base) * scale, ratio=ratio, limit=spec.limit, goal=spec.goal,
                  met=judge(ratio, spec.limit), backend=backend, note=note, extra=dict(extra))


def valued(spec: Spec, candidate: float, baseline: float, *, unit: str, note: str = "", **extra) -> Result:
    """A Result comparing two computed values (not times), in `unit` ("bytes" or "" for plain numbers)."""
    ratio = candidate / baseline
    return Result(id=spec.id, name=spec.name, baseline=spec.baseline, candidate_ms=None, baseline_ms=None,
                  ratio=ratio, limit=spec.limit, goal=spec.goal, met=judge(ratio, spec.limit, spec.within),
                  within=spec.within, candidate_value=candidate, baseline_value=baseline, unit=unit, note=note,
                  extra=dict(extra))


def failed(spec: Spec, error: str) -> Result:
    """A row that could not be measured: recorded with its error, never as met."""
    return Result(id=spec.id, name=spec.name, baseline=spec.baseline, candidate_ms=None, baseline_ms=None,
                  ratio=None, limit=spec.limit, goal=spec.goal, met=False, within=spec.within, error=error)
