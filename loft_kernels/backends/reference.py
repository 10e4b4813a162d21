"""The `torch` backend: plain-PyTorch definitions of every op.

These are the semantics the other backends are tested against, written to be
obviously correct first and reasonably fast second. Arguments arrive already
validated and normalised by loft_kernels.ops (indices int64 and distinct,
stride/padding/dilation as pairs, mask-distance keep counts precomputed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def unavailable_reason() -> str | None:
    return None


def select_weight(weight, out_index, in_index):
    """weight[out_index][:, in_index] (None = all)."""
    if out_index is not None:
        weight = weight.index_select(0, out_index)
    if in_index is not None:
        weight = weight.index_select(1, in_index)
    return weight


def scatter_weight_grad(grad_sel, weight, out_index, in_index):
    """Full-size weight gradient: grad_sel in the selected rows/columns, zero elsewhere."""
    if out_index is None and in_index is None:
        return grad_sel
    full = torch.zeros_like(weight)
    rows = out_index if out_index is not None else torch.arange(weight.shape[0], device=weight.device)
    cols = in_index if in_index is not None else torch.arange(weight.shape[1], device=weight.device)
    full[rows[:, None], cols[None, :]] = grad_sel
    return full


def scatter_bias_grad(grad_sel, out_index, n_out):
    if out_index is None:
        return grad_sel
    return torch.zeros(n_out, dtype=grad_sel.dtype, device=grad_sel.device).index_copy_(0, out_index, grad_sel)


def partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation, groups):
    w = select_weight(weight, out_index, in_index)
    b = None if bias is None else (bias if out_index is None else bias.index_select(0, out_index))
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation, groups,
                            need_input, need_weight):
    w = select_weight(weight, out_index, in_index)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, w, [w.shape[0]] if has_bias else None, list(stride), list(padding), list(dilation),
        False, [0, 0], groups, [need_input, need_weight, has_bias])
    if need_weight:
        gw = scatter_weight_grad(gw, weight, out_index, in_index)
    if has_bias:
        gb = scatter_bias_grad(gb, out_index, weight.shape[0])
    return gx, gw, gb


def _row(index, g):
    return None if index is None else index[g]


def grouped_partial_conv2d(x, weight, bias, out_index, in_index, stride, padding, dilation):
    return torch.stack([partial_conv2d(x[g], weight, bias, _row(out_index, g), _row(in_index, g),
                                       stride, padding, dilation, 1) for g in range(x.shape[0])])


def grouped_partial_conv2d_backward(grad, x, weight, out_index, in_index, has_bias, stride, padding, dilation,
                                    need_input, need_weight):
    gxs, gw, gb = [], None, None
    for g in range(x.shape[0]):
        gx_g, gw_g, gb_g = partial_conv2d_backward(grad[g], x[g], weight, _row(out_index, g), _row(in_index, g),
                                                   has_bias, stride, padding, dilation, 1, need_input, need_weight)
        gxs.append(gx_g)
        if need_weight:
            gw = gw_g if gw is None else gw + gw_g
        if has_bias:
            gb = gb_g if gb is None else gb + gb_g
    return (torch.stack(gxs) if need_input else None), gw, gb


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(t):
    # explicit row length: reshape(0, -1) is ambiguous for a tensor with no rows
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).to(_acc_dtype(t))


def filter_norms(tensors):
    return [torch.linalg.vector_norm(_rows(t), dim=1).float() for t in tensors]


def filter_stats(a, b):
    out = []
    for ta, tb in zip(a, b):
        ra, rb = _rows(ta), _rows(tb)
        out.append(torch.stack([(ra * ra).sum(1), (rb * rb).sum(1), (ra * rb).sum(1),
                                ((ra - rb) ** 2).sum(1)], dim=1).float())
    return out


def ranks(scores):
    """[T, n] scores -> [T, n] 1-based rank of each filter (descending score; ties: lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def footrule_matrix(scores):
    out = []
    for s in scores:
        r = ranks(s).double()              # r[t, f]: rank of filter f at snapshot t
        log_r = r.log()
        # M[a, b] = sum_f (1 / r[a, f]) * |ln r[a, f] - ln r[b, f]|  (sum over i = r[a, f])
        diff = (log_r[:, None, :] - log_r[None, :, :]).abs()
        out.append((diff / r[:, None, :]).sum(-1))
    return torch.stack(out).float()


def mask_distance_matrix(scores, keep):
    out = []
    for s, k in zip(scores, keep):
        kept = ranks(s) <= k                 # [T, n] keep bits
        out.append((kept[:, None, :] != kept[None, :, :]).double().mean(-1))
    return torch.stack(out).float()


def pack_rows(tensors, indices, dims):
    return torch.cat([t.index_select(d, i).reshape(-1) for t, i, d in zip(tensors, indices, dims)])


def unpack_rows(flat, tensors, indices, dims):
    offset = 0
    for t, i, d in zip(tensors, indices, dims):
        shape = list(t.shape)
        shape[d] = i.numel()
        n = 1
        for s in shape:
            n *= s
        t.index_copy_(d, i, flat[offset:offset + n].view(shape))
        offset += n
