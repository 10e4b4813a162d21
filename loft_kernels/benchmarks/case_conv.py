"""P1, P2: the partial convolutions against the dense FLOP limit and the simulations they replace.

Shapes: one stride-1 3x3 block conv of each PreActResNet-18 stage (64@32x32,
128@16x16, 256@8x8, 512@4x4), batch 32; every timed call runs forward and
backward (input and weight gradients) through all four.
"""
from __future__ import annotations

import torch

from ..backends import select
from . import workloads as W
from .result import Config, Result, Spec, timed
from .shapes import block_convs
from .timing import interleaved

P1 = (
    Spec("P1a", "partial_conv2d fwd+bwd, 1/4 of the filters", "dense conv fwd+bwd x 1/4 (FLOP limit)",
         1.15, "ratio <= 1.15 (within 15 % of the FLOP limit)"),
    Spec("P1b", "partial_conv2d fwd+bwd, 1/4 of the filters", "conv with weight * mask fwd+bwd",
         1 / 3, "ratio <= 0.333 (>= 3x faster than the mask)"),
)
P2 = (
    Spec("P2a", "grouped_partial_conv2d fwd+bwd, 4 groups of 1/4", "dense conv fwd+bwd of equal FLOPs",
         1.15, "ratio <= 1.15"),
    Spec("P2b", "grouped_partial_conv2d fwd+bwd, 4 groups of 1/4", "loop of 4 partial_conv2d fwd+bwd",
         1.0, "ratio <= 1.0 (not slower than the loop)"),
)


def p1(cfg: Config) -> list[Result]:
    dev, shapes = cfg.device, block_convs()
    reps = cfg.reps(full=20, quick=4)
    t = interleaved({"partial": W.partial_setup(shapes, dev), "dense": W.dense_setup(shapes, dev),
                     "masked": W.masked_setup(shapes, dev)}, reps, warmup=cfg.warmup, device=dev)
    backend = select("partial_conv2d", dev, torch.float32)[0]
    return [timed(P1[0], t, "partial", "dense", scale=1 / W.WORKERS, backend=backend, repeats=reps),
            timed(P1[1], t, "partial", "masked", backend=backend, repeats=reps)]


def p2(cfg: Config) -> list[Result]:
    # 4 groups of 32 samples x 1/4 of the filters = the FLOPs of one dense conv on 32 samples
    dev, shapes = cfg.device, block_convs()
    reps = cfg.reps(full=12, quick=2)
    t = interleaved({"grouped": W.grouped_setup(shapes, dev), "loop": W.grouped_setup(shapes, dev, loop=True),
                     "dense": W.dense_setup(shapes, dev)}, reps, warmup=cfg.warmup, device=dev)
    backend = select("grouped_partial_conv2d", dev, torch.float32)[0]
    return [timed(P2[0], t, "grouped", "dense", backend=backend, repeats=reps),
            timed(P2[1], t, "grouped", "loop", backend=backend, repeats=reps)]


CASES = {"P1": (P1, p1), "P2": (P2, p2)}
