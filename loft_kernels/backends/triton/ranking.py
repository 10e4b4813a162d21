"""Footrule and mask-distance matrices for all (layer, a, b) snapshot pairs in one launch.

Ranks come from one torch sort over every layer at once (layers padded to the
widest with -inf scores, which rank after every real, finite score and so leave
the real ranks unchanged); the kernel then reads rank rows only. Program
(l, a, b-block) sums over the filters of layer l; fp32 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import ranks
from ._common import pow2_clamp


@triton.jit
def _rank_pair_kernel(r_ptr, n_ptr, keep_ptr, out_ptr, T, NMAX,
                      MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr):
    l = tl.program_id(0)
    a = tl.program_id(1)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < T
    n = tl.load(n_ptr + l)
    base = r_ptr + l.to(tl.int64) * T * NMAX
    acc = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
    if MASK:
        keep = tl.load(keep_ptr + l)
    for f0 in range(0, n, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        f_mask = f < n
        both = b_mask[:, None] & f_mask[None, :]
        ra = tl.load(base + a * NMAX + f, mask=f_mask, other=1)
        rb = tl.load(base + offs_b[:, None] * NMAX + f[None, :], mask=both, other=1)
        if MASK:
            # Early-Bird: filter kept at a snapshot iff its rank <= keep
            term = ((ra <= keep)[None, :] != (rb <= keep)).to(tl.float32)
        else:
            # the filter at rank i = ra in a contributes (1/i) |ln i - ln sigma(i)|, sigma(i) = rb
            ra_f = ra.to(tl.float32)
            term = tl.abs(tl.log(ra_f)[None, :] - tl.log(rb.to(tl.float32))) / ra_f[None, :]
        acc += tl.where(both, term, 0.0)
    res = tl.sum(acc, axis=1)
    if MASK:
        res = res / n.to(tl.float32)
    tl.store(out_ptr + l.to(tl.int64) * T * T + a * T + offs_b, res, mask=b_mask)


def _padded_ranks(scores):
    """[L, T, n_max] int64 ranks of every layer (entries past n_l are padding)."""
    widths = [s.shape[1] for s in scores]
    if len(set(widths)) == 1:
        padded = torch.stack(scores)
    else:
        padded = scores[0].new_full((len(scores), scores[0].shape[0], max(widths)), float("-inf"))
        for l, s in enumerate(scores):
            padded[l, :, :s.shape[1]] = s
    L, T, n_max = padded.shape
    return ranks(padded.view(L * T, n_max)).view(L, T, n_max).contiguous()


def _pair_matrix(scores, keep):
    r = _padded_ranks(scores)
    L, T, n_max = r.shape
    device = r.device
    n = torch.tensor([s.shape[1] for s in scores], dtype=torch.int64).to(device)
    keep_t = None if keep is None else torch.tensor(list(keep), dtype=torch.int64).to(device)
    out = torch.empty((L, T, T), dtype=torch.float32, device=device)
    block_b = pow2_clamp(T, 2, 16)
    block_f = pow2_clamp(n_max, 16, max(16, 4096 // block_b))
    _rank_pair_kernel[(L, T, triton.cdiv(T, block_b))](r, n, keep_t, out, T, n_max, MASK=keep is not None,
                                                       BLOCK_B=block_b, BLOCK_F=block_f)
    return out


def footrule_matrix(scores):
    return _pair_matrix(scores, None)


def mask_distance_matrix(scores, keep):
    return _pair_matrix(scores, keep)
