"""Implicit-GEMM partial convolution (single, grouped, conv groups): forward and backward.

Every launch sees a 5-D problem [G, N, C, H, W] with one grid axis over G:
- `partial_conv2d` with groups=1 is G = 1;
- `grouped_partial_conv2d` is G simulated workers, each with its own input
  batch and index rows over one shared weight;
- `partial_conv2d` with groups > 1 (no indices) is G = groups, each conv
  group a strided view of x/y and a block of `row_step` weight rows.
The out_index/in_index gather happens inside the kernels (the weight slice is
never materialised); output row j of group g is weight row
`g * row_step + (out_index[g, j] if out_index else j)`.

Backward: the input gradient is a second implicit GEMM (grad x gathered,
transposed weight; for stride > 1 the taps that do not land on an output are
masked). The weight gradient is accumulated in fp32 (fp64 for fp64) into a
zero-initialised full-size buffer, scattered through the indices: plain stores
when each entry has one writer, atomic adds when groups may overlap or the
reduction over N*H'*W' is split across programs (results then vary in the last
bits from run to run on a GPU). The bias gradient is a separate reduction with
atomic adds.
"""
from __future__ import annotations

import torch
import triton

from ._common import INTERPRET, acc_dtype, acc_torch_dtype, launch_opts, pow2_clamp
from .partial_conv_kernels import _bias_grad_kernel, _conv_bwd_input_kernel, _conv_bwd_weight_kernel, _conv_fwd_kernel


# ------------------------------------------------------------------ host side ----
def _precision(dtype: torch.dtype) -> str:
    # fp32 is exact ("ieee") unless the user opted into TF32 matmuls in torch.
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _blocks(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Tile sizes (BLOCK_M, BLOCK_N, BLOCK_K); tl.dot needs each >= 16."""
    if INTERPRET:  # few, large tiles: the interpreter's cost is per tl operation, not per element
        return pow2_clamp(m, 16, 64), pow2_clamp(n, 16, 64), pow2_clamp(k, 16, 128)
    big = 32 if dtype == torch.float64 else 64
    return pow2_clamp(m, 16, big), pow2_clamp(n, 16, big), pow2_clamp(k, 16, 32)


def _launch_opts(dtype: torch.dtype) -> dict:
    return launch_opts(num_warps=4, num_stages=2 if dtype == torch.float64 else 3)


def _wgrad_split(reduction: int, programs: int, device: torch.device, block: int) -> int:
    """How many chunks to split the weight-gradient reduction into, to fill the GPU."""
    if INTERPRET or device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    most = max(1, reduction // (16 * block))  # keep at least 16 tiles of work per chunk
    return max(1, min(target // max(programs, 1), most))


def _index_args(index):
    """(tensor or None, per-group stride) for an optional [G, k] index; entries read with stride 1."""
    if index is None:
        return None, 0
    index = index.contiguous()  # callers may skip validation, so indices may arrive strided
    return index, index.stride(0)


def _out_hw(H, W, KH, KW, stride, padding, dilation):
    return ((H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1,
            (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1)


class _Problem:
    """One launch's geometry: 5-D views of x and the output-shaped tensor, indices, conv params."""

    def __init__(self, x5, weight, out_index, in_index, row_step, k_out, stride, padding, dilation):
        self.x5, self.weight, self.row_step, self.k_out = x5, weight, row_step, k_out
        self.G, self.N, self.C, self.H, self.W = x5.shape
        self.KH, self.KW = weight.shape[2], weight.shape[3]
        self.OH, self.OW = _out_hw(self.H, self.W, self.KH, self.KW, stride, padding, dilation)
        self.conv = (*stride, *padding, *dilation)
        self.oi, self.soi = _index_args(out_index)
        self.ii, self.sii = _index_args(in_index)
        self.dtype = x5.dtype

    def flags(self):
        return dict(KH=self.KH, KW=self.KW, HAS_OI=self.oi is not None, HAS_II=self.ii is not None,
                    ACC=acc_dtype(self.dtype), PRECISION=_precision(self.dtype))


def _forward(p: _Problem, bias, y5):
    M = p.N * p.OH * p.OW
    if y5.numel() == 0:
        return
    bm, bn, bk = _blocks(M, p.k_out, p.C * p.KH * p.KW, p.dtype)
    grid = (triton.cdiv(M, bm), triton.cdiv(p.k_out, bn), p.G)
    w = p.weight
    _conv_fwd_kernel[grid](
        p.x5, w, bias, p.oi, p.ii, y5,
        p.N, p.C, p.H, p.W, p.k_out, p.OH, p.OW,
        *p.x5.stride(), *w.stride(), p.soi, p.sii, p.row_step, *y5.stride(), *p.conv,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **p.flags(), **_launch_opts(p.dtype))


def _input_grad(p: _Problem, g5, gx5):
    M = p.N * p.H * p.W
    if gx5.numel() == 0:
        return
    if g5.numel() == 0:  # no output positions: nothing flows back
        gx5.zero_()
        return
    bm, bn, bk = _blocks(M, p.C, p.k_out * p.KH * p.KW, p.dtype)
    grid = (triton.cdiv(M, bm), triton.cdiv(p.C, bn), p.G)
    w = p.weight
    _conv_bwd_input_kernel[grid](
        g5, w, p.oi, p.ii, gx5,
        p.N, p.C, p.H, p.W, p.k_out, p.OH, p.OW,
        *g5.stride(), *w.stride(), p.soi, p.sii, p.row_step, *gx5.stride(), *p.conv,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **p.flags(), **_launch_opts(p.dtype))


def _weight_grad(p: _Problem, g5, gw, overlapping: bool):
    """Accumulate into gw (zero-initialised, full size, fp32/fp64)."""
    P = p.N * p.OH * p.OW
    if P == 0 or p.k_out == 0 or p.C == 0:
        return
    Q = p.C * p.KH * p.KW
    bm, bn, bk = _blocks(p.k_out, Q, P, p.dtype)
    programs = triton.cdiv(p.k_out, bm) * triton.cdiv(Q, bn) * p.G
    split = _wgrad_split(P, programs, gw.device, bk)
    per_split = triton.cdiv(triton.cdiv(P, split), bk) * bk
    split = triton.cdiv(P, per_split)
    grid = (triton.cdiv(p.k_out, bm), triton.cdiv(Q, bn), p.G * split)
    _conv_bwd_weight_kernel[grid](
        g5, p.x5, p.oi, p.ii, gw,
        p.N, p.C, p.H, p.W, p.k_out, p.OH, p.OW,
        *g5.stride(), *p.x5.stride(), *gw.stride(), p.soi, p.sii, p.row_step, *p.conv, per_split, split,
        ATOMIC=overlapping or split > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **p.flags(),
        **_launch_opts(p.dtype))


def _bias_grad(p: _Problem, g5, gb):
    """Accumulate into gb (zero-initialised, fp32/fp64) with atomic adds; g5 contiguous over (OH, OW)."""
    P = p.N * p.OH * p.OW
    if P == 0 or p.k_out == 0:
        return
    bj, bp = pow2_clamp(p.k_out, 16, 32), pow2_clamp(P, 16, 128)
    split = _wgrad_split(P, triton.cdiv(p.k_out, bj) * p.G, gb.device, bp)
    per_split = triton.cdiv(triton.cdiv(P, split), bp) * bp
    split = triton.cdiv(P, per_split)
    grid = (triton.cdiv(p.k_out, bj), p.G * split)
    _bias_grad_kernel[grid](g5, p.oi, gb, p.N, p.k_out, p.OH * p.OW, g5.stride(0), g5.stride(1), g5.stride(2),
                            p.soi, p.row_step, per_split, split, HAS_OI=p.oi is not None,
                            ACC=acc_dtype(p.dtype), BLOCK_J=bj, BLOCK_P=bp)


def _backward(p: _Problem, g5, gx5, has_bias, need_weight, overlapping):
    """Shared by both ops: fills gx5 when given; returns (grad_weight, grad_bias) or None for each."""
    if gx5 is not None:
        _input_grad(p, g5, gx5)
    acc = acc_torch_dtype(p.dtype)
    gw = gb = None
    if need_weight:
        gw = torch.zeros(p.weight.shape, dtype=acc, device=p.weight.device)
        _weight_grad(p, g5, gw, overlapping)
        gw = gw.to(p.weight.dtype)
    if has_bias:
        gb = torch.zeros(p.weight.shape[0], dtype=acc, device=p.weight.device)
        _bias_grad(p, g5, gb)
        gb = gb.to(p.weight.dtype)
    return gw, gb


def _by_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, groups * c, H, W] -> strided view [groups, N, c, H, W] (no copy)."""
    return t.unflatten(1, (groups, t.shape[1] // groups)).transpose(0, 1)


def _single(x, weight, out_index, in_index, groups, stride, padding, dilation):
    """_Problem for partial_conv2d and the function mapping [N, C, ...] tensors to 5-D views."""
    if groups == 1:
        k_out = weight.shape[0] if out_index is None else out_index.numel()
        oi = None if out_index is None else out_index.unsqueeze(0)
        ii = None if in_index is None else in_index.unsqueeze(0)
        view = lambda t: t.unsqueeze(0)  # noqa: E731
        return _Problem(view(x), weight, oi, ii, 0, k_out, stride, padding, dilation), view
    # conv groups (never with indices: the public op refuses that): group g is
    # x channels [g*c, (g+1)*c) and weight rows [g*k, (g+1)*k).
    view = lambda t: _by_groups(t, groups)  # noqa: E731
    k = weight.shape[0] // groups
    return _Problem(view(x), weight, None, None, k, k, stride, padding, dilation), view


def partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation, groups):
    p, view = _single(x, weight, out_index, in_index, groups, stride, padding, dilation)
    y = x.new_empty((x.shape[0], p.k_out * groups, p.OH, p.OW))
    _forward(p, bias, view(y))
    return y


def partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation, groups,
                            need_input, need_weight):
    p, view = _single(x, weight, out_index, in_index, groups, stride, padding, dilation)
    grad = grad.contiguous()
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_input else None
    gw, gb = _backward(p, view(grad), None if gx is None else view(gx), has_bias, need_weight, overlapping=False)
    return gx, gw, gb


def grouped_partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation):
    k_out = weight.shape[0] if out_index is None else out_index.shape[1]
    p = _Problem(x, weight, out_index, in_index, 0, k_out, stride, padding, dilation)
    y = x.new_empty((p.G, p.N, k_out, p.OH, p.OW))
    _forward(p, bias, y)
    return y


def grouped_partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation,
                                    need_input, need_weight):
    k_out = weight.shape[0] if out_index is None else out_index.shape[1]
    p = _Problem(x, weight, out_index, in_index, 0, k_out, stride, padding, dilation)
    grad = grad.contiguous()
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_input else None
    # Groups share the weight: their gradients add up, possibly in the same entries.
    gw, gb = _backward(p, grad, gx, has_bias, need_weight, overlapping=p.G > 1)
    return gx, gw, gb
