"""The timed workloads, written once for bench/ and the ratio runner: candidates and baselines.

Each `*_setup(...)` returns a setup callable in the convention of timing.py:
calling it makes fresh random inputs (untimed) and returns the zero-argument
function to time. Baselines are plain PyTorch (or plain Python where a case
says "naive"): the dense convolution, the `weight * mask` convolution that
simulates a filter subset by zeroing, a loop of single ops, one read of the
data, loops over layers or pairs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import reference
from ..ops import (
    filter_norms,
    filter_stats,
    footrule_matrix,
    grouped_partial_conv2d,
    mask_distance_matrix,
    pack_rows,
    partial_conv2d,
    pruned_count,
    unpack_rows,
)
from .shapes import BATCH, ConvShape, conv_snapshot, group_sizes

WORKERS = 4  # a subset is 1/4 of the filters: one LoFT-4 worker's share
SNAPSHOTS = 40


# ------------------------------------------------------------ inputs ----
def leaf(*shape, device, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def conv_weight(s: ConvShape, device) -> Tensor:
    return leaf(s.c_out, s.c_in, s.kernel, s.kernel, device=device, scale=(s.c_in * s.kernel ** 2) ** -0.5)


def disjoint_subsets(n: int, parts: int, device="cpu") -> Tensor:
    """[parts, n // parts] random disjoint sorted index sets over n (inputs shaped like a LoFT partition)."""
    perm = torch.randperm(n, device=device)[: n - n % parts]
    return torch.stack([perm[g::parts].sort().values for g in range(parts)])


def _grad(y: Tensor, inputs: Sequence[Tensor], grad_out: Tensor):
    return torch.autograd.grad(y, inputs, grad_out)


# ---------------------------------------------------- convolutions (P1, P2) ----
def dense_setup(shapes: Sequence[ConvShape], device):
    """Dense conv forward + backward (input and weight gradients), batch 32, over every shape."""
    def setup():
        args = [(leaf(BATCH, s.c_in, s.size, s.size, device=device), conv_weight(s, device),
                 torch.randn(BATCH, s.c_out, s.size, s.size, device=device), s) for s in shapes]
        return lambda: [_grad(F.conv2d(x, w, None, s.stride, s.padding), (x, w), g) for x, w, g, s in args]
    return setup


def masked_setup(shapes: Sequence[ConvShape], device):
    """The 1/4 filter subset simulated by zeroing rows of the weight: dense compute (a mask-based LoFT)."""
    def setup():
        args = []
        for s in shapes:
            mask = torch.zeros(s.c_out, device=device)
            mask[disjoint_subsets(s.c_out, WORKERS, device)[0]] = 1.0
            args.append((leaf(BATCH, s.c_in, s.size, s.size, device=device), conv_weight(s, device), mask,
                         torch.randn(BATCH, s.c_out, s.size, s.size, device=device), s))
        return lambda: [_grad(F.conv2d(x, w * m[:, None, None, None], None, s.stride, s.padding), (x, w), g)
                        for x, w, m, g, s in args]
    return setup


def sliced_setup(shapes: Sequence[ConvShape], device, groups: int = 1, side: str = "out"):
    """The floor of the partial convs: `groups` convs (each its own batch) on physically sliced weights (1/4 of
    the filters each, or with side="in" 1/4 of the input channels, own leaves), forward + backward, the weight
    gradients then written into one full-size tensor (the partial ops' contract: a full-size gradient, zero
    outside the selected rows or columns)."""
    dim = 0 if side == "out" else 1

    def setup():
        args = []
        for s in shapes:
            idx = disjoint_subsets(s.c_out if side == "out" else s.c_in, WORKERS, device)[:groups]
            c_in, c_out = (s.c_in, idx.shape[1]) if side == "out" else (idx.shape[1], s.c_out)
            out = (s.size + 2 * s.padding - s.kernel) // s.stride + 1
            xs = [leaf(BATCH, c_in, s.size, s.size, device=device) for _ in range(groups)]
            ws = [leaf(c_out, c_in, s.kernel, s.kernel, device=device) for _ in range(groups)]
            gs = [torch.randn(BATCH, c_out, out, out, device=device) for _ in range(groups)]
            args.append((xs, ws, gs, idx, s))

        def run():
            for xs, ws, gs, idx, s in args:
                full = torch.zeros(s.c_out, s.c_in, s.kernel, s.kernel, device=device)
                for x, w, g, chosen in zip(xs, ws, gs, idx):
                    _, gw = _grad(F.conv2d(x, w, None, s.stride, s.padding), (x, w), g)
                    full.index_add_(dim, chosen, gw)
        return run
    return setup


def obvious_setup(shapes: Sequence[ConvShape], device):
    """The obvious PyTorch code for 1/4 of the filters: `F.conv2d(x, w.index_select(0, rows))`, fwd + bwd."""
    def setup():
        args = []
        for s in shapes:
            rows = disjoint_subsets(s.c_out, WORKERS, device)[0]
            args.append((leaf(BATCH, s.c_in, s.size, s.size, device=device), conv_weight(s, device), rows,
                         torch.randn(BATCH, rows.numel(), s.size, s.size, device=device), s))
        return lambda: [_grad(F.conv2d(x, w.index_select(0, rows), None, s.stride, s.padding), (x, w), g)
                        for x, w, rows, g, s in args]
    return setup


def partial_setup(shapes: Sequence[ConvShape], device, side: str = "out"):
    """lk.partial_conv2d forward + backward on 1/4 of the output filters (side="out", a conv_a)
    or of the input channels (side="in", a conv_b)."""
    def setup():
        args = []
        for s in shapes:
            n = s.c_out if side == "out" else s.c_in
            idx = disjoint_subsets(n, WORKERS, device)[0]
            c_in = s.c_in if side == "out" else idx.numel()
            c_out = idx.numel() if side == "out" else s.c_out
            out = (s.size + 2 * s.padding - s.kernel) // s.stride + 1
            kw = {"out_index": idx} if side == "out" else {"in_index": idx}
            args.append((leaf(BATCH, c_in, s.size, s.size, device=device), conv_weight(s, device),
                         torch.randn(BATCH, c_out, out, out, device=device), s, kw))
        return lambda: [_grad(partial_conv2d(x, w, None, s.stride, s.padding, **kw), (x, w), g)
                        for x, w, g, s, kw in args]
    return setup


def grouped_setup(shapes: Sequence[ConvShape], device, loop: bool = False):
    """4 groups, each its own batch of 32 and its own 1/4 of the filters (disjoint), forward + backward:
    one `grouped_partial_conv2d` (loop=False) or a Python loop of `partial_conv2d` (loop=True)."""
    def setup():
        args = []
        for s in shapes:
            idx = disjoint_subsets(s.c_out, WORKERS, device)
            args.append((leaf(WORKERS, BATCH, s.c_in, s.size, s.size, device=device), conv_weight(s, device),
                         torch.randn(WORKERS, BATCH, idx.shape[1], s.size, s.size, device=device), s, idx))

        def run():
            for x, w, g, s, idx in args:
                if loop:
                    y = torch.stack([partial_conv2d(x[k], w, None, s.stride, s.padding, out_index=idx[k])
                                     for k in range(WORKERS)])
                else:
                    y = grouped_partial_conv2d(x, w, None, s.stride, s.padding, out_index=idx)
                _grad(y, (x, w), g)
        return run
    return setup


# ----------------------------------------------- filter statistics (P3) ----
def filter_stats_setup(device, how: str = "op"):
    """Two PreActResNet-18 conv snapshots: how = "op" (lk.filter_stats), "loop" (the per-layer torch
    reference) or "read" (the memory-bound floor: one pass over both flat buffers, a BLAS dot product,
    which measured faster here than a sum or max reduction)."""
    def setup():
        (fa, a), (fb, b) = conv_snapshot(device), conv_snapshot(device)
        if how == "op":
            return lambda: filter_stats(a, b)
        if how == "loop":
            return lambda: reference.filter_stats(a, b)
        return lambda: float(torch.dot(fa, fb))
    return setup


def filter_norms_setup(device, how: str = "op"):
    """One snapshot: how = "op" (lk.filter_norms), "loop" (the reference) or "read" (one pass: a dot product)."""
    def setup():
        flat, a = conv_snapshot(device)
        if how == "op":
            return lambda: filter_norms(a)
        if how == "loop":
            return lambda: reference.filter_norms(a)
        return lambda: float(torch.dot(flat, flat))
    return setup


# ---------------------------------------------------------- rankings (P4) ----
def footrule_naive(scores: list[Tensor]) -> list[list[list[float]]]:
    """The footrule matrix with Python loops: rank each snapshot, then sum over i for every pair."""
    out = []
    for s in scores:
        ranks = []
        for row in s.tolist():
            order = sorted(range(len(row)), key=lambda f: (-row[f], f))
            r = [0] * len(row)
            for pos, f in enumerate(order, 1):
                r[f] = pos
            ranks.append((order, r))
        layer = []
        for order_a, _ in ranks:
            line = []
            for _, r_b in ranks:
                total = 0.0
                for i, f in enumerate(order_a, 1):
                    total += abs(math.log(i) - math.log(r_b[f])) / i
                line.append(total)
            layer.append(line)
        out.append(layer)
    return out


def scores(device) -> list[Tensor]:
    """Importance scores of every PreActResNet-18 filter group at T = 40 snapshots."""
    return [torch.randn(SNAPSHOTS, n, device=device) for n in group_sizes()]


def footrule_setup(device, how: str = "op"):
    """how = "op" (lk.footrule_matrix), "vectorised" (the torch reference) or "naive" (Python loops)."""
    def setup():
        s = scores(device)
        if how == "op":
            return lambda: footrule_matrix(s)
        if how == "vectorised":
            return lambda: reference.footrule_matrix(s)
        cpu = [t.cpu() for t in s]
        return lambda: footrule_naive(cpu)
    return setup


def mask_distance_setup(device, how: str = "op", ratio: float = 0.5):
    """how = "op" (lk.mask_distance_matrix) or "vectorised" (the torch reference)."""
    def setup():
        s = scores(device)
        if how == "op":
            return lambda: mask_distance_matrix(s, ratio)
        keep = [t.shape[1] - pruned_count(t.shape[1], ratio) for t in s]
        return lambda: reference.mask_distance_matrix(s, keep)
    return setup


# ----------------------------------------------------------- sync packing ----
def _owned_rows(device):
    """A LoFT-4 worker's slice of PreActResNet-18's groups: (tensors, indices, dims) for pack/unpack.

    Per group: conv_a weight rows (dim 0), 4 BatchNorm vectors (dim 0), conv_b weight columns (dim 1).
    """
    tensors, indices, dims = [], [], []
    for n in group_sizes():
        idx = disjoint_subsets(n, WORKERS, device)[0]
        for t, d in [(torch.randn(n, n, 3, 3, device=device), 0)] + \
                    [(torch.randn(n, device=device), 0) for _ in range(4)] + \
                    [(torch.randn(n, n, 3, 3, device=device), 1)]:
            tensors.append(t)
            indices.append(idx)
            dims.append(d)
    return tensors, indices, dims


def pack_setup(device, how: str = "op"):
    """Pack a worker's rows: how = "op" (lk.pack_rows), "loop" (index_select per tensor + cat, the
    reference) or "copy" (one contiguous copy of as many bytes: the floor)."""
    def setup():
        tensors, indices, dims = _owned_rows(device)
        if how == "op":
            return lambda: pack_rows(tensors, indices, dims)
        if how == "loop":
            return lambda: reference.pack_rows(tensors, indices, dims)
        numel = sum(t.numel() // t.shape[d] * i.numel() for t, i, d in zip(tensors, indices, dims))
        src = torch.randn(numel, device=device)
        return lambda: src.clone()
    return setup


def unpack_setup(device, how: str = "op"):
    """Scatter a packed buffer back: how = "op" (lk.unpack_rows), "loop" (index_copy_ per tensor) or
    "copy" (one contiguous copy of as many bytes)."""
    def setup():
        tensors, indices, dims = _owned_rows(device)
        numel = sum(t.numel() // t.shape[d] * i.numel() for t, i, d in zip(tensors, indices, dims))
        flat = torch.randn(numel, device=device)
        if how == "op":
            return lambda: unpack_rows(flat, tensors, indices, dims)
        if how == "loop":
            return lambda: reference.unpack_rows(flat, tensors, indices, dims)
        dst = torch.empty_like(flat)
        return lambda: dst.copy_(flat)
    return setup
