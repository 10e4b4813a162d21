"""P3, P4: filter statistics and footrule distances over PreActResNet-18-shaped data.

P3: `filter_stats` over two snapshots of all PreActResNet-18 conv weights
(11.2 M floats each, each snapshot one flat buffer) against one read of both
snapshots (the memory-bound floor) and the per-layer torch loop (the reference).
P4: `footrule_matrix` over T = 40 snapshots of every filter group (the eight
block conv1 -> conv2 groups, 1920 filters) against the vectorised torch
reference and a plain Python loop.
"""
from __future__ import annotations

import torch

from ..backends import select
from . import workloads as W
from .result import Config, Result, Spec, timed
from .timing import interleaved

P3 = (
    Spec("P3a", "filter_stats, two PreActResNet-18 conv snapshots", "one read of both snapshots (dot product)",
         1.3, "ratio <= 1.3"),
    Spec("P3b", "filter_stats, two PreActResNet-18 conv snapshots", "per-layer torch loop (reference)",
         0.25, "ratio <= 0.25 (>= 4x faster than the loop)"),
)
P4 = (
    Spec("P4a", "footrule_matrix, T = 40, all 8 groups", "vectorised torch (reference)",
         0.2, "ratio <= 0.2 (>= 5x faster)"),
    Spec("P4b", "footrule_matrix, T = 40, all 8 groups", "naive Python loops",
         0.01, "ratio <= 0.01 (>= 100x faster)"),
)


def p3(cfg: Config) -> list[Result]:
    dev = cfg.device
    reps = cfg.reps(full=30, quick=8)
    t = interleaved({h: W.filter_stats_setup(dev, h) for h in ("op", "read", "loop")}, reps,
                    warmup=cfg.warmup, device=dev)
    backend = select("filter_stats", dev, torch.float32)[0]
    return [timed(P3[0], t, "op", "read", backend=backend, repeats=reps),
            timed(P3[1], t, "op", "loop", backend=backend, repeats=reps)]


def p4(cfg: Config) -> list[Result]:
    dev = cfg.device
    reps = cfg.reps(full=30, quick=8)
    vec = interleaved({h: W.footrule_setup(dev, h) for h in ("op", "vectorised")}, reps,
                      warmup=cfg.warmup, device=dev)
    naive_reps = cfg.reps(full=5, quick=2)  # a naive call takes about a second
    naive = interleaved({h: W.footrule_setup(dev, h) for h in ("op", "naive")}, naive_reps,
                        warmup=cfg.warmup, device=dev)
    backend = select("footrule_matrix", dev, torch.float32)[0]
    return [timed(P4[0], vec, "op", "vectorised", backend=backend, repeats=reps),
            timed(P4[1], naive, "op", "naive", backend=backend, repeats=naive_reps)]


CASES = {"P3": (P3, p3), "P4": (P4, p4)}
