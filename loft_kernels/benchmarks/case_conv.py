"""P1, P2: the partial convolutions against their floors: the same convolutions on physically sliced weights.

Shapes: one stride-1 3x3 block conv of each PreActResNet-18 stage (64@32x32,
128@16x16, 256@8x8, 512@4x4), batch 32; every timed call runs forward and
backward (input and weight gradients). P1 times each shape on its own and
reports the worst; P2 runs all four in one call. The floor ("sliced")
convolves a weight that already holds only the selected filters and writes
its gradient into a full-size tensor, as the ops' contract demands; nothing
can do the op's job with less work. The earlier yardsticks (the dense conv's
FLOP share, the `weight * mask` simulation, the dense conv of equal FLOPs)
are kept as extra ratios in each row's note.
"""
from __future__ import annotations

import torch

from ..backends import select
from . import workloads as W
from .result import Config, Result, Spec, timed
from .shapes import block_convs
from .timing import interleaved

P1 = (
    Spec("P1a", "partial_conv2d fwd+bwd, 1/4 of the filters", "conv on the sliced weight, grad into full size",
         1.10, "worst shape's ratio <= 1.10"),
    Spec("P1b", "partial_conv2d fwd+bwd, 1/4 of the filters", "F.conv2d(x, w.index_select(0, rows)) fwd+bwd",
         1.0, "worst shape's ratio <= 1.0"),
)
P2 = (
    Spec("P2a", "grouped_partial_conv2d fwd+bwd, 4 groups of 1/4", "4 convs on sliced weights, grads into full size",
         1.10, "ratio <= 1.10"),
    Spec("P2b", "grouped_partial_conv2d fwd+bwd, 4 groups of 1/4", "loop of 4 partial_conv2d fwd+bwd",
         1.0, "ratio <= 1.0 (GPU: <= 0.8)"),
)
GPU_P2B_LIMIT = 0.8  # on a GPU the one grouped launch must clearly beat four


def _ratios(t, cand: str, **bases) -> str:
    return "; ".join(f"{text}: {t.ratio(cand, key, scale):.3f}x" for text, (key, scale) in bases.items())


def p1(cfg: Config) -> list[Result]:
    # Each shape timed on its own (its own interleaved repetitions), so a row is the worst shape's ratio: the op
    # must hold on every shape, and one summed time would let the 64@32 shape (half the work) hide the others.
    dev = cfg.device
    reps = cfg.reps(full=20, quick=4)
    per_shape = []
    for s in block_convs():
        one = [s]
        per_shape.append((s, interleaved({"partial": W.partial_setup(one, dev), "sliced": W.sliced_setup(one, dev),
                                          "obvious": W.obvious_setup(one, dev), "dense": W.dense_setup(one, dev),
                                          "masked": W.masked_setup(one, dev)}, reps, warmup=cfg.warmup, device=dev)))
    backend = select("partial_conv2d", dev, torch.float32)[0]
    rows = []
    for spec, base in ((P1[0], "sliced"), (P1[1], "obvious")):
        shape, t = max(per_shape, key=lambda st: st[1].ratio("partial", base))
        each = ", ".join(f"{s.c_in}@{s.size}: {t_s.ratio('partial', base):.3f}" for s, t_s in per_shape)
        note = (f"worst of the shapes ({each}); other yardsticks at {shape.c_in}@{shape.size}: "
                + _ratios(t, "partial", **{"dense conv x 1/4 (FLOP share)": ("dense", 1 / W.WORKERS),
                                          "weight * mask conv": ("masked", 1.0)}))
        rows.append(timed(spec, t, "partial", base, backend=backend, repeats=reps, note=note,
                          per_shape={f"{s.c_in}@{s.size}": t_s.ratio("partial", base) for s, t_s in per_shape}))
    return rows


def p2(cfg: Config) -> list[Result]:
    # 4 groups of 32 samples x 1/4 of the filters = the FLOPs of one dense conv on 32 samples
    dev, shapes = cfg.device, block_convs()
    reps = cfg.reps(full=12, quick=2)
    t = interleaved({"grouped": W.grouped_setup(shapes, dev), "sliced": W.sliced_setup(shapes, dev, W.WORKERS),
                     "loop": W.grouped_setup(shapes, dev, loop=True), "dense": W.dense_setup(shapes, dev)},
                    reps, warmup=cfg.warmup, device=dev)
    backend = select("grouped_partial_conv2d", dev, torch.float32)[0]
    note = "other yardsticks: " + _ratios(t, "grouped", **{"dense conv of equal FLOPs": ("dense", 1.0)})
    loop_spec = P2[1]
    if dev.type == "cuda":
        loop_spec = Spec(loop_spec.id, loop_spec.name, loop_spec.baseline, GPU_P2B_LIMIT, "ratio <= 0.8 (GPU)")
    return [timed(P2[0], t, "grouped", "sliced", backend=backend, repeats=reps, note=note),
            timed(loop_spec, t, "grouped", "loop", backend=backend, repeats=reps, note=note)]


CASES = {"P1": (P1, p1), "P2": (P2, p2)}
