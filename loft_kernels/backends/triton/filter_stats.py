"""Per-filter norms and two-snapshot statistics for a whole list of tensors in one launch.

The tensors stay where they are: the kernel gets a table of their addresses,
row counts and row lengths, and a program table (tensor id, first row) with
one program per block of BLOCK_R rows of any tensor. Sums are accumulated in
fp32 (fp64 for fp64 inputs); results are float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, block_programs, check_table_device, int_table, launch_opts, pow2_clamp


@triton.jit
def _filter_stats_kernel(a_tbl, b_tbl, out_tbl, rows_tbl, len_tbl, prog_seg, prog_row, ref_ptr,
                      STATS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(prog_seg + pid)
    n_rows = tl.load(rows_tbl + seg)
    D = tl.load(len_tbl + seg)
    rows = tl.load(prog_row + pid) + tl.arange(0, BLOCK_R)
    r_mask = rows < n_rows
    base = rows * D  # int64: the tables are int64
    a = tl.load(a_tbl + seg).to(tl.pointer_type(ref_ptr.dtype.element_ty))
    aa = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    if STATS:
        b = tl.load(b_tbl + seg).to(tl.pointer_type(ref_ptr.dtype.element_ty))
        bb = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
        ab = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
        dd = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = r_mask[:, None] & (cols < D)[None, :]
        offs = base[:, None] + cols[None, :]
        va = tl.load(a + offs, mask=mask, other=0.0).to(ACC)
        aa += va * va
        if STATS:
            vb = tl.load(b + offs, mask=mask, other=0.0).to(ACC)
            bb += vb * vb
            ab += va * vb
            diff = va - vb  # directly, not aa + bb - 2ab: no cancellation for close snapshots
            dd += diff * diff
    out = tl.load(out_tbl + seg).to(tl.pointer_type(tl.float32))
    if STATS:
        tl.store(out + rows * 4, tl.sum(aa, axis=1).to(tl.float32), mask=r_mask)
        tl.store(out + rows * 4 + 1, tl.sum(bb, axis=1).to(tl.float32), mask=r_mask)
        tl.store(out + rows * 4 + 2, tl.sum(ab, axis=1).to(tl.float32), mask=r_mask)
        tl.store(out + rows * 4 + 3, tl.sum(dd, axis=1).to(tl.float32), mask=r_mask)
    else:
        tl.store(out + rows, tl.sqrt(tl.sum(aa, axis=1)).to(tl.float32), mask=r_mask)


def _filter_stats(a, b, stats: bool):
    check_table_device(a[0].device, "filter_stats" if stats else "filter_norms")
    a = [t.contiguous() for t in a]
    b = None if b is None else [t.contiguous() for t in b]
    device = a[0].device
    outs = [torch.empty((t.shape[0], 4) if stats else (t.shape[0],), dtype=torch.float32, device=device) for t in a]
    n_rows = [t.shape[0] for t in a]
    lengths = [t.numel() // t.shape[0] if t.shape[0] else 0 for t in a]
    block_d = pow2_clamp(max(lengths), 16, 1024)
    block_r = max(4, min(64, 4096 // block_d))
    seg, first = block_programs(n_rows, block_r)
    if not seg:  # every tensor has zero rows
        return outs
    tables = int_table([[t.data_ptr() for t in a], [t.data_ptr() for t in (b or a)], [o.data_ptr() for o in outs],
                        n_rows, lengths, seg, first], device)
    # 8 warps: a 4096-element tile with up to four accumulators stays in registers
    _filter_stats_kernel[(len(seg),)](*tables, a[0], STATS=stats, ACC=acc_dtype(a[0].dtype),
                                   BLOCK_R=block_r, BLOCK_D=block_d, **launch_opts(num_warps=8))
    return outs


def filter_norms(tensors):
    return _filter_stats(tensors, None, stats=False)


def filter_stats(a, b):
    return _filter_stats(a, b, stats=True)
