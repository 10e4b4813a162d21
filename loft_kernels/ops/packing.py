"""Gather selected rows of many tensors into one flat buffer and scatter them back.

The LoFT sync moves each worker's owned filters with these: one buffer, one
collective, instead of one collective per tensor.
"""
from __future__ import annotations

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
    for i, t in enumerate(tensors[1:], 1):  # again: a direct torch.ops call skips the public function
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
    for i, t in enumerate(tensors):  # again: a direct torch.ops call skips the public function
        C.same_device_dtype(flat, "flat", t, f"tensors[{i}]")
    if flat.dim() != 1 or flat.numel() != _packed_numel(tensors, indices, dims):
        raise ValueError(f"flat must be 1-D with {_packed_numel(tensors, indices, dims)} elements (the packed size "
                         f"of the selected rows), got shape {tuple(flat.shape)}")
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
        _unpack_op(flat, [t.detach() for t in tensors], indices, dims)
        return
    # Tensors listed twice (or views of one another): one entry after another, so each write lands as in
    # a loop over the entries; one pass may write a layout it cannot stride through via a copy, whose
    # write-back would undo another entry's writes to the same memory.
    start = 0
    for t, i, d in zip(tensors, indices, dims):
        n = t.numel() // t.shape[d] * i.shape[0]
        _unpack_op(flat[start:start + n], [t.detach()], [i], [d])
        start += n


def _extent(t: Tensor) -> Optional[tuple[int, int]]:
    """The [start, end) byte range a tensor's elements lie in (None if it has none)."""
    if not isinstance(t, Tensor) or t.numel() == 0 or t.device.type == "meta":
        return None
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (span + 1) * t.element_size()


def _overlap(a, b) -> bool:
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def _refuse_reads_of_written_memory(flat, tensors, indices) -> None:
    if torch.compiler.is_compiling() or not isinstance(tensors, (list, tuple)) or \
            not isinstance(indices, (list, tuple)):  # no memory to compare while tracing; bad lists: _check says
        return
    written = [(k, _extent(t)) for k, t in enumerate(tensors)]
    for what, source in [("flat", _extent(flat))] + [(f"indices[{k}]", _extent(i)) for k, i in enumerate(indices)]:
        hit = next((k for k, e in written if _overlap(source, e)), None)
        if hit is not None:
            raise ValueError(f"{what} shares memory with tensors[{hit}], which unpack_rows writes: pass a copy "
                             f"({what}.clone())")


def _share_memory(tensors) -> bool:
    """Whether any two tensors' memory ranges overlap (views of one storage, or of one numpy array)."""
    if torch.compiler.is_compiling():  # no memory to compare while tracing
        return False
    extents = [e for e in map(_extent, tensors) if e is not None]
    return any(_overlap(a, b) for k, a in enumerate(extents) for b in extents[k + 1:])
