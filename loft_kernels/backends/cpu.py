"""The `cpu` backend: the C++/OpenMP kernels of csrc/cpu, compiled on first use (loft_kernels._ext).

Every op of the table is the extension function of the same name, with the
signature of its counterpart in `reference.py`; the grouped convolution adds
the choice between its two formulations (below). The convolutions gather the
weight slice and scatter its gradient in C++ and leave the arithmetic to ATen
(oneDNN); the statistics, distance and packing ops are OpenMP kernels over the
whole list of tensors at once.
"""
from __future__ import annotations

import torch

from .. import _ext

STACKED, LOOP = 0, 1  # the grouped convolution as one grouped conv over stacked channels / a loop of G convs


def unavailable_reason() -> str | None:
    return _ext.unavailable_reason()


def grouping(x: torch.Tensor) -> int:
    """Which grouped formulation is faster for x [G, N, C, H, W] on the CPU (measured, docs/kernels.md).

    Measured single-threaded (other jobs' load on a shared machine distorts
    multi-threaded timings far more than the difference), 4 groups of 1/4 of the
    filters, PreActResNet-18 block shapes: float32 on every shape and both index
    sides, the loop (stacked 1.04-1.42x its time); bfloat16 the loop (stacked
    1.13-2.04x); float64 the stacked grouped convolution on 32x32 maps (0.84x),
    a tie on 8x8 (1.00x); float16 the loop (1.03-1.10x).
    """
    if x.dtype == torch.float64 and x.shape[3] * x.shape[4] >= 1024:
        return STACKED
    return LOOP


def _grouped_partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation):
    return _ext.load().grouped_partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation,
                                              grouping(x))


def _grouped_partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation,
                                     need_input, need_weight):
    return _ext.load().grouped_partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride,
                                                       padding, dilation, need_input, need_weight, grouping(x))


def _grouped_partial_conv2d_node(x, weight, bias, out_index, in_index, stride, padding, dilation):
    return _ext.load().grouped_partial_conv2d_node(x, weight, bias, out_index, in_index, stride, padding, dilation,
                                                   grouping(x))


def _partial_conv2d_node(x, weight, bias, out_index, in_index, stride, padding, dilation, groups):
    return _ext.load().partial_conv2d_node(x, weight, bias, out_index, in_index, stride, padding, dilation, groups)


_NODES = {"partial_conv2d": _partial_conv2d_node, "grouped_partial_conv2d": _grouped_partial_conv2d_node}


def autograd_node(name: str):
    """Op `name` (a forward op) with its autograd node in C++, or None: the eager path for plain CPU tensors.

    Takes the forward op's arguments and returns its differentiable result; the
    backward runs this backend's backward kernel (csrc/cpu/partial_conv_node.cpp).
    """
    return _NODES.get(name)


_ADAPTED = {"grouped_partial_conv2d": _grouped_partial_conv2d,
            "grouped_partial_conv2d_backward": _grouped_partial_conv2d_backward}


def implementation(name: str):
    """The implementation of op `name`: the extension's function, resolved (and built) on first call."""
    if name in _ADAPTED:
        return _ADAPTED[name]

    def call(*args):
        return getattr(_ext.load(), name)(*args)
    call.__name__ = call.__qualname__ = name
    return call
