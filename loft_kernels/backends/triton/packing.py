"""Gather selected rows of many tensors into one flat buffer, and scatter them back, in one launch.

Tensor i is seen as [outer, size_i, inner] around its packing dim d_i; its
packed segment is [outer, k_i, inner] at offset off_i of the buffer. The kernel
gets address/shape tables over the tensors and one program per BLOCK elements
of any segment. Copies are dtype-blind: every tensor is reinterpreted as
integers of its element width (no conversion), so any 1/2/4/8-byte dtype works,
under the interpreter too.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._checks import writable
from ._common import block_programs, check_table_device, int_table

_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool,
               torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_BLOCK = 1024


@triton.jit
def _rows_copy_kernel(flat_ptr, t_tbl, i_tbl, size_tbl, inner_tbl, k_tbl, off_tbl, prog_seg, prog_start, numel_tbl,
                      UNPACK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(prog_seg + pid)
    t = tl.load(t_tbl + seg).to(tl.pointer_type(flat_ptr.dtype.element_ty))
    idx = tl.load(i_tbl + seg).to(tl.pointer_type(tl.int64))
    size = tl.load(size_tbl + seg)
    inner = tl.load(inner_tbl + seg)
    k = tl.load(k_tbl + seg)
    e = tl.load(prog_start + pid) + tl.arange(0, BLOCK)  # int64 element numbers within the segment
    mask = e < tl.load(numel_tbl + seg)
    o = e // (k * inner)
    j = (e // inner) % k
    q = e % inner
    src = (o * size + tl.load(idx + j, mask=mask, other=0)) * inner + q
    dst = flat_ptr + tl.load(off_tbl + seg) + e
    if UNPACK:
        tl.store(t + src, tl.load(dst, mask=mask), mask=mask)
    else:
        tl.store(dst, tl.load(t + src, mask=mask), mask=mask)


def _words(t: torch.Tensor) -> torch.Tensor:
    return t.view(_WORDS[t.element_size()])


def _copy_rows(flat, tensors, indices, dims, unpack: bool):
    """flat and tensors contiguous; flat already sized to the packed total."""
    check_table_device(flat.device, "unpack_rows" if unpack else "pack_rows")
    sizes, inners, ks, offs, numels = [], [], [], [], []
    offset = 0
    for t, i, d in zip(tensors, indices, dims):
        inner = math.prod(t.shape[d + 1:])
        numel = math.prod(t.shape[:d]) * i.numel() * inner
        sizes.append(t.shape[d])
        inners.append(inner)
        ks.append(i.numel())
        offs.append(offset)
        numels.append(numel)
        offset += numel
    seg, start = block_programs(numels, _BLOCK)
    if not seg:
        return
    tables = int_table([[t.data_ptr() for t in tensors], [i.data_ptr() for i in indices], sizes, inners, ks, offs,
                        seg, start, numels], flat.device)
    _rows_copy_kernel[(len(seg),)](_words(flat), *tables, UNPACK=unpack, BLOCK=_BLOCK)


def pack_rows(tensors, indices, dims):
    tensors = [t.contiguous() for t in tensors]  # kept alive until the copy is enqueued
    total = sum(t.numel() // t.shape[d] * i.numel() for t, i, d in zip(tensors, indices, dims))
    flat = tensors[0].new_empty(total)
    _copy_rows(flat, tensors, [i.long().contiguous() for i in indices], dims, unpack=False)
    return flat


def unpack_rows(flat, tensors, indices, dims):
    for i, t in enumerate(tensors):
        writable(t, f"tensors[{i}]")
    # The kernel writes contiguous memory; a non-contiguous target gets a contiguous
    # stand-in that is copied back afterwards.
    targets = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    _copy_rows(flat.contiguous(), targets, [i.long().contiguous() for i in indices], dims, unpack=True)
    for t, tgt in zip(tensors, targets):
        if tgt is not t:
            t.copy_(tgt)
