"""Per-filter statistics for a whole list of tensors in one op.

Dim 0 of every tensor indexes filters; a filter's entries are all the others.
Results are float32; half inputs are accumulated in float32 (float64 in float64).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks as C
from ..backends import dispatch


@torch.library.custom_op("loft_kernels::filter_norms", mutates_args=())
def _filter_norms_op(tensors: list[Tensor]) -> list[Tensor]:
    if not C.arguments_checked():  # a direct torch.ops call skips the public function's checks
        tensors = _uniform_list(tensors, "tensors")
    return dispatch("filter_norms", tensors[0], tensors)


@_filter_norms_op.register_fake
def _(tensors):
    return [t.new_empty(t.shape[0], dtype=torch.float32) for t in tensors]


@torch.library.custom_op("loft_kernels::filter_stats", mutates_args=())
def _filter_stats_op(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    if not C.arguments_checked():  # a direct torch.ops call skips the public function's checks
        a, b = _pairs(a, b)
    return dispatch("filter_stats", a[0], a, b)


@_filter_stats_op.register_fake
def _(a, b):
    return [t.new_empty((t.shape[0], 4), dtype=torch.float32) for t in a]


def _uniform_list(tensors, name):
    tensors = C.tensor_list(tensors, name, floating=True, min_ndim=1)
    for i, t in enumerate(tensors[1:], 1):
        C.same_device_dtype(tensors[0], f"{name}[0]", t, f"{name}[{i}]")
    return [t.detach().contiguous() for t in tensors]


def filter_norms(tensors: list[Tensor]) -> list[Tensor]:
    """For each tensor, the L2 norm of each row (dim 0) over all other dims, as float32.

    All tensors must share one device and dtype (one launch on kernel backends).
    """
    tensors = _uniform_list(tensors, "tensors")
    with C.checked_arguments():
        return _filter_norms_op(tensors)


def _pairs(a, b):
    a, b = _uniform_list(a, "a"), _uniform_list(b, "b")
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    C.same_device_dtype(a[0], "a[0]", b[0], "b[0]")
    for i, (ta, tb) in enumerate(zip(a, b)):
        if ta.shape != tb.shape:
            raise ValueError(f"a[{i}] and b[{i}] must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    return a, b


def filter_stats(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """Per tensor pair an [n, 4] float32 of ||a_j||^2, ||b_j||^2, <a_j, b_j>, ||a_j - b_j||^2."""
    a, b = _pairs(a, b)
    with C.checked_arguments():
        return _filter_stats_op(a, b)
