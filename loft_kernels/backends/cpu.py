"""The `cpu` backend: C++/OpenMP kernels from csrc/cpu, compiled on first use (loft_kernels._ext).

Each function has the signature of its counterpart in `reference.py`. The
convolutions gather the weight slice and scatter its gradient in C++ and leave
the arithmetic to ATen (oneDNN); the statistics, distance and packing ops are
OpenMP kernels over the whole list of tensors at once.
"""
from __future__ import annotations

from .. import _ext
from . import register


def unavailable_reason() -> str | None:
    return _ext.unavailable_reason()


@register("partial_conv2d", "cpu")
def partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation, groups):
    return _ext.load().partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation, groups)


@register("partial_conv2d_backward", "cpu")
def partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation, groups,
                            need_input, need_weight):
    return _ext.load().partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding,
                                               dilation, groups, need_input, need_weight)


@register("grouped_partial_conv2d", "cpu")
def grouped_partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation):
    return _ext.load().grouped_partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation)


@register("grouped_partial_conv2d_backward", "cpu")
def grouped_partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation,
                                    need_input, need_weight):
    return _ext.load().grouped_partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride,
                                                       padding, dilation, need_input, need_weight)


@register("filter_norms", "cpu")
def filter_norms(tensors):
    return _ext.load().filter_norms(tensors)


@register("filter_stats", "cpu")
def filter_stats(a, b):
    return _ext.load().filter_stats(a, b)


@register("footrule_matrix", "cpu")
def footrule_matrix(scores):
    return _ext.load().footrule_matrix(scores)


@register("mask_distance_matrix", "cpu")
def mask_distance_matrix(scores, keep):
    return _ext.load().mask_distance_matrix(scores, keep)


# Packing copies elements as opaque words, so every dtype works.
@register("pack_rows", "cpu", dtypes=None)
def pack_rows(tensors, indices, dims):
    return _ext.load().pack_rows(tensors, indices, dims)


@register("unpack_rows", "cpu", dtypes=None)
def unpack_rows(flat, tensors, indices, dims):
    _ext.load().unpack_rows(flat, tensors, indices, dims)
