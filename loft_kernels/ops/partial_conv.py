"""Partial convolution over a subset of filters, single and grouped.

`partial_conv2d(x, w, b, ..., out_index=o, in_index=i)` equals
`F.conv2d(x, w[o][:, i], b[o], ...)`; its backward returns the gradient of the
*full-size* weight and bias, zero outside the selected rows/columns.
`grouped_partial_conv2d` runs G such convolutions (own input batch, own index
sets, one shared weight) as one op: S simulated LoFT workers per layer.

The public functions validate and normalise arguments; the custom ops below
are what autograd, fake tensors and torch.compile see; the arithmetic is in the
backend chosen by loft_kernels.backends.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks as C
from ..backends import autograd_node, dispatch, reference


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


def _op_indices(weight, bias, out_index, in_index, ndim: int):
    """What the kernels may assume, checked inside the custom ops (a compiled graph or a direct torch.ops call
    skips the public functions' checks): a bias of one entry per filter, int64 contiguous indices in range."""
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have {weight.shape[0]} entries (weight.shape[0]), got shape {tuple(bias.shape)}")
    return (C.index_in_op(out_index, "out_index", weight.shape[0], ndim=ndim),
            C.index_in_op(in_index, "in_index", weight.shape[1], ndim=ndim))


# ---------------------------------------------------------------- single ----
# The custom ops return contiguous tensors, whatever the layout of x and the weight (a channels-last x gives a
# channels-last convolution): their fake kernels say so, and a compiled graph (Inductor plans the strides of an
# op's result from the fake kernel) must get exactly the strides it planned for.
@torch.library.custom_op("loft_kernels::partial_conv2d", mutates_args=())
def _partial_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_index: Optional[Tensor],
                       in_index: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                       groups: int) -> Tensor:
    out_index, in_index = _op_indices(weight, bias, out_index, in_index, 1)
    y = dispatch("partial_conv2d", x, x, weight, bias, out_index, in_index,
                 tuple(stride), tuple(padding), tuple(dilation), groups)
    return y.contiguous()


@_partial_conv2d_op.register_fake
def _(x, weight, bias, out_index, in_index, stride, padding, dilation, groups):
    c_out = weight.shape[0] if out_index is None else out_index.shape[0]
    h = _out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], c_out, h, w))


@torch.library.custom_op("loft_kernels::partial_conv2d_backward", mutates_args=())
def _partial_conv2d_backward_op(grad: Tensor, x: Tensor, weight: Tensor, out_index: Optional[Tensor],
                                in_index: Optional[Tensor], has_bias: bool, stride: list[int], padding: list[int],
                                dilation: list[int], groups: int, need_input: bool,
                                need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    out_index, in_index = _op_indices(weight, None, out_index, in_index, 1)
    gx, gw, gb = dispatch("partial_conv2d_backward", x, grad, x, weight, out_index, in_index, has_bias,
                          tuple(stride), tuple(padding), tuple(dilation), groups, need_input, need_weight)
    return _backward_result(x, gx, gw, gb, need_input, need_weight, has_bias)


def _backward_result(x, gx, gw, gb, need_input, need_weight, has_bias):
    return (gx.contiguous() if need_input else _empty(x), gw.contiguous() if need_weight else _empty(x),
            gb if has_bias else _empty(x))


def _backward_fake(x, weight, need_input, need_weight, has_bias):
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_input else _empty(x),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else _empty(x),
            weight.new_empty(weight.shape[0]) if has_bias else _empty(x))


@_partial_conv2d_backward_op.register_fake
def _(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation, groups, need_input, need_weight):
    return _backward_fake(x, weight, need_input, need_weight, has_bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, out_index, in_index, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, out_index, in_index)
    ctx.has_bias = bias is not None
    ctx.conf = (stride, padding, dilation, groups)


def _backward(ctx, grad):
    x, weight, out_index, in_index = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    has_bias = ctx.has_bias and ctx.needs_input_grad[2]
    gx, gw, gb = _partial_conv2d_backward_op(grad.contiguous(), x, weight, out_index, in_index, has_bias,
                                             stride, padding, dilation, groups, need_x, need_w)
    return (gx if need_x else None, gw if need_w else None, gb if has_bias else None,
            None, None, None, None, None, None)


_partial_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------- grouped ----
@torch.library.custom_op("loft_kernels::grouped_partial_conv2d", mutates_args=())
def _grouped_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_index: Optional[Tensor],
                in_index: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    out_index, in_index = _op_indices(weight, bias, out_index, in_index, 2)
    return dispatch("grouped_partial_conv2d", x, x, weight, bias, out_index, in_index,
                    tuple(stride), tuple(padding), tuple(dilation)).contiguous()


@_grouped_op.register_fake
def _(x, weight, bias, out_index, in_index, stride, padding, dilation):
    c_out = weight.shape[0] if out_index is None else out_index.shape[1]
    h = _out_size(x.shape[3], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _out_size(x.shape[4], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], x.shape[1], c_out, h, w))


@torch.library.custom_op("loft_kernels::grouped_partial_conv2d_backward", mutates_args=())
def _grouped_backward_op(grad: Tensor, x: Tensor, weight: Tensor, out_index: Optional[Tensor],
                         in_index: Optional[Tensor], has_bias: bool, stride: list[int], padding: list[int],
                         dilation: list[int], need_input: bool, need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    out_index, in_index = _op_indices(weight, None, out_index, in_index, 2)
    gx, gw, gb = dispatch("grouped_partial_conv2d_backward", x, grad, x, weight, out_index, in_index, has_bias,
                          tuple(stride), tuple(padding), tuple(dilation), need_input, need_weight)
    return _backward_result(x, gx, gw, gb, need_input, need_weight, has_bias)


@_grouped_backward_op.register_fake
def _(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation, need_input, need_weight):
    return _backward_fake(x, weight, need_input, need_weight, has_bias)


def _grouped_setup_context(ctx, inputs, output):
    x, weight, bias, out_index, in_index, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight, out_index, in_index)
    ctx.has_bias = bias is not None
    ctx.conf = (stride, padding, dilation)


def _grouped_backward(ctx, grad):
    x, weight, out_index, in_index = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    has_bias = ctx.has_bias and ctx.needs_input_grad[2]
    gx, gw, gb = _grouped_backward_op(grad.contiguous(), x, weight, out_index, in_index, has_bias, *ctx.conf,
                                      need_x, need_w)
    return (gx if need_x else None, gw if need_w else None, gb if has_bias else None, None, None, None, None, None)


_grouped_op.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)


# ------------------------------------------------------ eager fast path ----
class _EagerPartialConv(torch.autograd.Function):
    """The op without the custom-op machinery, for plain CPU tensors in eager mode.

    A custom op's Python dispatch round trip and generated autograd wrapper cost
    a few hundred microseconds per forward + backward, which dominates a small
    convolution. A backend with a compiled autograd node (the `cpu` extension)
    runs that instead; this Python node serves the others (the `torch`
    reference). Same backend selection and kernels as the custom op (`op` is
    its dispatch name, `conf` its trailing non-tensor arguments); compiled
    graphs, fake/meta tensors, subclasses and active modes take the custom op.
    """

    @staticmethod
    def forward(ctx, op: str, x, weight, bias, out_index, in_index, *conf):
        ctx.save_for_backward(x, weight, out_index, in_index)
        ctx.op, ctx.has_bias, ctx.conf = op, bias is not None, conf
        return dispatch(op, x, x, weight, bias, out_index, in_index, *conf)

    @staticmethod
    def backward(ctx, grad):
        x, weight, out_index, in_index = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        has_bias = ctx.has_bias and ctx.needs_input_grad[3]
        args = (grad.contiguous(), x, weight, out_index, in_index, has_bias, *ctx.conf, need_x, need_w)
        if torch.is_grad_enabled():  # create_graph: the custom backward op, whose double backward raises clearly
            gx, gw, gb = _BACKWARD_OPS[ctx.op](*(list(c) if isinstance(c, tuple) else c for c in args))
        else:
            gx, gw, gb = dispatch(ctx.op + "_backward", x, *args)
        return (None, gx if need_x else None, gw if need_w else None, gb if has_bias else None,
                None, None) + (None,) * len(ctx.conf)


_BACKWARD_OPS = {"partial_conv2d": _partial_conv2d_backward_op, "grouped_partial_conv2d": _grouped_backward_op}


def _plain_cpu(*tensors) -> bool:
    """True when the eager fast path may run: eager mode, no torch function/dispatch mode, and every
    tensor a plain (or Parameter) CPU tensor that no functorch transform wraps."""
    if torch.compiler.is_compiling() or torch._C._len_torch_function_stack() or \
            torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or t.device.type != "cpu" or _functorch_wrapped(t):
            return False
    return True


_PLAIN = (Tensor, torch.nn.Parameter)
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _composite(*tensors) -> bool:
    """True where the op runs as plain differentiable PyTorch (index_select + F.conv2d): under torch.jit.trace,
    which records aten ops and cannot see into a compiled kernel, and under functorch transforms (jvp, grad,
    jacrev, vmap), which need forward-mode and higher-order derivatives the custom op does not define."""
    if torch.compiler.is_compiling():  # the custom op: what the compiled graph's fake kernels describe
        return False
    return torch.jit.is_tracing() or any(t is not None and _functorch_wrapped(t) for t in tensors)


def _run(op: str, custom, x, weight, bias, out_index, in_index, *conf) -> Tensor:
    if _composite(x, weight, bias, out_index, in_index) or x.numel() == 0:
        return getattr(reference, op)(x, weight, bias, out_index, in_index, *conf)
    if _plain_cpu(x, weight, bias, out_index, in_index):
        node = autograd_node(op, x.device, x.dtype)
        if node is not None:  # the compiled backend's own node
            return node(x, weight, bias, out_index, in_index, *conf)
        conf = tuple(tuple(c) if isinstance(c, list) else c for c in conf)
        return _EagerPartialConv.apply(op, x, weight, bias, out_index, in_index, *conf)
    with C.checked_arguments():  # the public function checked the indices (or set_active did)
        return custom(x, weight, bias, out_index, in_index, *conf)


# ------------------------------------------------------- public functions ----
def _autocast(x, weight, bias):
    """Under autocast, convolve in autocast's dtype as F.conv2d does (gradients flow back through the cast).

    The custom ops have no autocast kernel of their own, so without this a layer
    after an autocast convolution would hand a low-precision x to a float32 weight.
    """
    if not isinstance(x, Tensor) or not torch.amp.is_autocast_available(x.device.type) \
            or not torch.is_autocast_enabled(x.device.type):  # meta/fake tensors: no autocast device
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    # what autocast casts for F.conv2d: floating tensors other than float64 (a float64 conv stays float64)
    cast = [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, weight, bias)]
    return tuple(cast)


def _conv_args(x, weight, bias, stride, padding, dilation, spatial):
    """Validate the conv arguments; returns (x, stride, padding, dilation) with padding resolved.

    An asymmetric 'same' padding (even effective kernel) is applied to x with F.pad,
    exactly as F.conv2d does it, so the kernels only ever see symmetric padding.
    """
    C.tensor(weight, "weight", ndim=4, floating=True)
    C.same_device_dtype(x, "x", weight, "weight")
    if bias is not None:
        C.tensor(bias, "bias", ndim=1, floating=True)
        C.same_device_dtype(x, "x", bias, "bias")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} entries (weight.shape[0]), got {bias.shape[0]}")
    stride = C.pair(stride, "stride", minimum=1)
    dilation = C.pair(dilation, "dilation", minimum=1)
    kernel = weight.shape[2:]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' requires stride 1 (as in F.conv2d), got stride={stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            before = [t // 2 for t in total]
            after = [t - b for t, b in zip(total, before)]
            if before != after:
                extra = [a - b for a, b in zip(after, before)]  # 0 or 1 more on the bottom/right
                x = F.pad(x, [0, extra[1], 0, extra[0]])
            padding = tuple(before)
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        padding = C.pair(padding, "padding", minimum=0)
    for axis in range(2):
        size = x.shape[spatial + axis] + 2 * padding[axis]
        if size < dilation[axis] * (kernel[axis] - 1) + 1:
            raise ValueError(f"x spatial size {tuple(x.shape[spatial:])} with padding {padding} is smaller than the "
                             f"dilated kernel {tuple(kernel)} (dilation {dilation})")
    return x, list(stride), list(padding), list(dilation)


def partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                   groups: int = 1, *, out_index: Optional[Tensor] = None,
                   in_index: Optional[Tensor] = None) -> Tensor:
    """`F.conv2d(x, weight[out_index][:, in_index], bias[out_index], stride, padding, dilation, groups)`.

    `out_index`/`in_index`: 1-D distinct integer indices on x's device (None = all).
    x has `len(in_index)` channels when `in_index` is given. The gradient of
    `weight` (and `bias`) is full-size and zero outside the selected entries.
    """
    return _partial_conv2d(x, weight, bias, stride, padding, dilation, groups, out_index, in_index,
                           check_index_values=True)


def _partial_conv2d(x, weight, bias, stride, padding, dilation, groups, out_index, in_index, *,
                    check_index_values: bool) -> Tensor:
    """partial_conv2d; `check_index_values=False` skips the range/duplicate scan of the indices.

    Loft layers validate their index sets once in `set_active` and call this on every
    forward without the scan (on a GPU it would cost a host sync per layer per step).
    """
    x, weight, bias = _autocast(x, weight, bias)
    C.tensor(x, "x", ndim=(3, 4), floating=True)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    groups = C.positive_int(groups, "groups")
    x, stride, padding, dilation = _conv_args(x, weight, bias, stride, padding, dilation, spatial=2)
    if groups > 1 and (out_index is not None or in_index is not None):
        raise ValueError("groups > 1 together with out_index/in_index is not supported; use groups=1")
    if weight.shape[0] % groups:
        raise ValueError(f"weight.shape[0] ({weight.shape[0]}) must be divisible by groups ({groups})")
    for name, idx in (("out_index", out_index), ("in_index", in_index)):
        if isinstance(idx, Tensor) and idx.device != x.device:  # cheap, so checked on every path
            raise ValueError(f"{name} is on {idx.device} but must be on {x.device}, the device of x "
                             f"(after moving a model, call set_active/lk.activate again)")
    if out_index is not None and check_index_values:
        out_index = C.index(out_index, "out_index", weight.shape[0], x.device)
    if in_index is not None and check_index_values:
        in_index = C.index(in_index, "in_index", weight.shape[1], x.device)
    want = in_index.numel() if in_index is not None else weight.shape[1] * groups
    if x.shape[1] != want:
        what = "len(in_index)" if in_index is not None else "weight.shape[1] * groups"
        raise ValueError(f"x must have {want} channels ({what}), got {x.shape[1]} (x shape {tuple(x.shape)})")
    y = _run("partial_conv2d", _partial_conv2d_op, x, weight, bias, out_index, in_index, stride, padding,
             dilation, groups)
    return y.squeeze(0) if unbatched else y


def grouped_partial_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                           dilation=1, *, out_index: Optional[Tensor] = None,
                           in_index: Optional[Tensor] = None) -> Tensor:
    """G partial convolutions over one shared weight in one op.

    x: [G, N, C, H, W]; out_index [G, k_out] and/or in_index [G, k_in] (rows
    distinct; rows may overlap each other). Result [G, N, k_out or C_out, H', W'],
    group g equal to `partial_conv2d(x[g], weight, bias, ..., out_index=out_index[g],
    in_index=in_index[g])`. Weight gradients of overlapping rows add up.
    """
    x, weight, bias = _autocast(x, weight, bias)
    C.tensor(x, "x", ndim=5, floating=True)
    G, N = x.shape[:2]
    if G == 0:
        raise ValueError(f"x must hold at least one group, got shape {tuple(x.shape)}")
    # Validate (and apply an asymmetric 'same' padding) on the groups folded into the batch.
    folded, stride, padding, dilation = _conv_args(x.reshape(G * N, *x.shape[2:]), weight, bias,
                                                   stride, padding, dilation, spatial=2)
    x = folded.reshape(G, N, *folded.shape[1:])
    if out_index is not None:
        out_index = C.index(out_index, "out_index", weight.shape[0], x.device, ndim=2)
        if out_index.shape[0] != G:
            raise ValueError(f"out_index must have one row per group ({G}), got shape {tuple(out_index.shape)}")
    if in_index is not None:
        in_index = C.index(in_index, "in_index", weight.shape[1], x.device, ndim=2)
        if in_index.shape[0] != G:
            raise ValueError(f"in_index must have one row per group ({G}), got shape {tuple(in_index.shape)}")
    want = in_index.shape[1] if in_index is not None else weight.shape[1]
    if x.shape[2] != want:
        what = "in_index.shape[1]" if in_index is not None else "weight.shape[1]"
        raise ValueError(f"x must have {want} channels ({what}), got {x.shape[2]} (x shape {tuple(x.shape)})")
    return _run("grouped_partial_conv2d", _grouped_op, x, weight, bias, out_index, in_index, stride, padding,
                dilation)
