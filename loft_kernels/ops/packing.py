"""Gather selected rows of many tensors into one flat buffer and scatter them back.

The LoFT sync moves each worker's owned filters with these: one buffer, one
collective, instead of one collective per tensor.
"""
from __future__ import annotations

import bisect
from typing import Optional

import torch
from torch import Tensor

from .. import _checks as C
from ..backends import dispatch


def _packed_numel(tensors, indices, dims) -> int:
    total = 0
    for t, i, d in zip(tensors, indices, dims):
        total += t.numel() // t.shape[d] * i.shape[0]
    return total


@torch.library.custom_op("loft_kernels::pack_rows", mutates_args=())
def _pack_op(tensors: list[Tensor], indices: list[Tensor], dims: list[int]) -> Tensor:
    indices = _check_values(tensors, indices, dims)
    if not C.arguments_checked():  # a direct torch.ops call, or a compiled graph
        for i, t in enumerate(tensors[1:], 1):
            C.same_device_dtype(tensors[0], "tensors[0]", t, f"tensors[{i}]")
    return dispatch("pack_rows", tensors[0], tensors, indices, dims)


def _check_values(tensors, indices, dims) -> list:
    return [C.index_in_op(i, f"indices[{k}]", t.shape[d]) for k, (t, i, d) in enumerate(zip(tensors, indices, dims))]


@_pack_op.register_fake
def _(tensors, indices, dims):
    return tensors[0].new_empty(_packed_numel(tensors, indices, dims))


@torch.library.custom_op("loft_kernels::unpack_rows", mutates_args=("tensors",))
def _unpack_op(flat: Tensor, tensors: list[Tensor], indices: list[Tensor], dims: list[int]) -> None:
    indices = _check_values(tensors, indices, dims)
    if not C.arguments_checked():  # a direct torch.ops call, or a compiled graph
        for i, t in enumerate(tensors):
            C.same_device_dtype(flat, "flat", t, f"tensors[{i}]")
        want = _packed_numel(tensors, indices, dims)
        if flat.dim() != 1 or flat.numel() != want:
            raise ValueError(f"flat must be 1-D with {want} elements (the packed size of the selected rows), got "
                             f"shape {tuple(flat.shape)}")
    dispatch("unpack_rows", tensors[0], flat, tensors, indices, dims)


@_unpack_op.register_fake
def _(flat, tensors, indices, dims):
    return None


def _check(tensors, indices, dims):
    tensors = C.tensor_list(tensors, "tensors", min_ndim=1)
    for i, t in enumerate(tensors[1:], 1):
        C.same_device_dtype(tensors[0], "tensors[0]", t, f"tensors[{i}]")
    if isinstance(indices, torch.Tensor) or not isinstance(indices, (list, tuple)):
        raise TypeError(f"indices must be a list of 1-D index tensors, got {type(indices).__name__}")
    if len(indices) != len(tensors):
        raise ValueError(f"indices must have one entry per tensor ({len(tensors)}), got {len(indices)}")
    if dims is None:
        dims = [0] * len(tensors)
    elif isinstance(dims, (list, tuple)):
        if len(dims) != len(tensors):
            raise ValueError(f"dims must have one entry per tensor ({len(tensors)}), got {len(dims)}")
    else:
        raise TypeError(f"dims must be None or a list of ints, got {type(dims).__name__}")
    norm_dims, norm_indices = [], []
    for k, (t, d) in enumerate(zip(tensors, dims)):
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"dims[{k}] must be an int, got {type(d).__name__}")
        if not -t.dim() <= d < t.dim():
            raise ValueError(f"dims[{k}] = {d} is out of range for tensors[{k}] with {t.dim()} dimension(s)")
        d %= t.dim()
        norm_dims.append(d)
        norm_indices.append(C.index(indices[k], f"indices[{k}]", t.shape[d], t.device))
    return tensors, norm_indices, norm_dims


def pack_rows(tensors: list[Tensor], indices: list[Tensor], dims: Optional[list[int]] = None) -> Tensor:
    """Concatenate `t_i.index_select(d_i, r_i).flatten()` over all i into one contiguous buffer."""
    tensors, indices, dims = _check(tensors, indices, dims)
    with C.checked_arguments():
        return _pack_op([t.detach() for t in tensors], indices, dims)


def unpack_rows(flat: Tensor, tensors: list[Tensor], indices: list[Tensor], dims: Optional[list[int]] = None) -> None:
    """Write a `pack_rows` buffer back into the tensors in place (outside autograd).

    `flat` and the indices must not share memory with the tensors written (the
    kernels would read what they have already overwritten); the tensors may
    share memory with one another (they are then written one after another).
    """
    _refuse_reads_of_written_memory(flat, tensors, indices)
    tensors, indices, dims = _check(tensors, indices, dims)
    for i, t in enumerate(tensors):
        C.writable(t, f"tensors[{i}]")
    C.tensor(flat, "flat", ndim=1)
    C.same_device_dtype(tensors[0], "tensors[0]", flat, "flat")
    want = _packed_numel(tensors, indices, dims)
    if flat.numel() != want:
        raise ValueError(f"flat must have {want} elements (the packed size of the selected rows), got {flat.numel()}")
    # Detached rather than under no_grad: a compiled graph that raises inside a no_grad block (an index the op
    # refuses) would leave grad mode off.
    flat = flat.detach().contiguous()
    if not _share_memory(tensors):
        with C.checked_arguments():
            _unpack_op(flat, [t.detach() for t in tensors], indices, dims)
        return
    # Tensors listed twice (or views of one another): one entry after another, so each write lands as in
    # a loop over the entries; one pass may write a layout it cannot stride through via a copy, whose
    # write-back would undo another entry's writes to the same memory.
    start = 0
    for t, i, d in zip(tensors, indices, dims):
        n = t.numel() // t.shape[d] * i.shape[0]
        with C.checked_arguments():
            _unpack_op(flat[start:start + n], [t.detach()], [i], [d])
        start += n


def _extent(t: Tensor) -> Optional[tuple[int, int]]:
    """The [start, end) byte range a tensor's elements lie in (None if it has none, or no memory: fake, meta)."""
    if not isinstance(t, Tensor) or t.numel() == 0 or t.device.type == "meta" or \
            (type(t) not in (Tensor, torch.nn.Parameter) and C._is_fake(t)):
        return None
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (span + 1) * t.element_size()


def _first_overlap(sources: list, written: list) -> Optional[tuple]:
    """(source label, written label) of a source range that meets a written one, else None; O((n + m) log m).

    Ranges are compared, not elements: views that interleave without sharing an element count as overlapping."""
    written = sorted((e[0], e[1], k) for k, e in written if e is not None)
    starts = [w[0] for w in written]
    reach, furthest = [], None  # reach[i]: the written range reaching furthest among the first i + 1
    for w in written:
        furthest = w if furthest is None or w[1] > furthest[1] else furthest
        reach.append(furthest)
    for label, e in sources:
        if e is None:
            continue
        i = bisect.bisect_left(starts, e[1]) - 1  # the written ranges that start before this one ends
        if i >= 0 and reach[i][1] > e[0]:
            return label, reach[i][2]
    return None


def _refuse_reads_of_written_memory(flat, tensors, indices) -> None:
    if torch.compiler.is_compiling() or not isinstance(tensors, (list, tuple)) or \
            not isinstance(indices, (list, tuple)):  # no memory to compare while tracing; bad lists: _check says
        return
    written = [(k, _extent(t)) for k, t in enumerate(tensors)]
    sources = [("flat", _extent(flat))] + [(f"indices[{k}]", _extent(i)) for k, i in enumerate(indices)]
    hit = _first_overlap(sources, written)
    if hit is not None:
        raise ValueError(f"{hit[0]} shares memory with tensors[{hit[1]}], which unpack_rows writes: pass a copy "
                         f"({hit[0]}.clone())")


def _share_memory(tensors) -> bool:
    """Whether any two tensors' memory ranges overlap (views of one storage, or of one numpy array)."""
    if torch.compiler.is_compiling():  # no memory to compare while tracing
        return False
    furthest = None  # the end of the ranges seen so far, in order of their starts
    for start, end in sorted(e for e in map(_extent, tensors) if e is not None):
        if furthest is not None and start < furthest:
            return True
        furthest = end if furthest is None else max(furthest, end)
    return False
