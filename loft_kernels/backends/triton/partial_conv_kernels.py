"""The Triton kernels of the partial convolutions (host side and layout notes: partial_conv.py)."""
import triton
import triton.language as tl


@triton.jit
def _gather(idx_ptr, row_stride, g, offs, mask, HAS_INDEX: tl.constexpr):
    """idx[g, offs] when an index is given (idx_ptr may be None otherwise), else offs itself."""
    if HAS_INDEX:
        return tl.load(idx_ptr + g * row_stride + offs, mask=mask, other=0)
    else:
        return offs


@triton.jit
def _pixel(offs, H, W):
    """Flat index over (n, h, w) of an H x W map -> its three parts."""
    hw = offs % (H * W)
    return offs // (H * W), hw // W, hw % W


@triton.jit
def _tap(offs, KH: tl.constexpr, KW: tl.constexpr):
    """Flat index over (channel, kh, kw) -> its three parts."""
    t = offs % (KH * KW)
    return offs // (KH * KW), t // KW, t % KW


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, oi_ptr, ii_ptr, y_ptr,
                     N, C, H, W, K_OUT, OH, OW,
                     sxg, sxn, sxc, sxh, sxw,
                     swo, swi, swh, sww,
                     soi, sii, row_step,
                     syg, syn, syc, syh, syw,
                     SH, SW, PH, PW, DH, DW,
                     KH: tl.constexpr, KW: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_OI: tl.constexpr, HAS_II: tl.constexpr,
                     ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GEMM: rows m = (n, oh, ow), columns j = selected filters, reduction k = (c, kh, kw).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * OH * OW
    n, oh, ow = _pixel(offs_m, OH, OW)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = offs_j < K_OUT
    rows = _gather(oi_ptr, soi, g, offs_j, j_mask, HAS_OI) + g * row_step
    x_base = x_ptr + g.to(tl.int64) * sxg + n.to(tl.int64) * sxn
    w_rows = w_ptr + rows.to(tl.int64) * swo
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, C * KH * KW, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < C * KH * KW
        c, kh, kw = _tap(offs_k, KH, KW)
        ih = ih0[:, None] + (kh * DH)[None, :]
        iw = iw0[:, None] + (kw * DW)[None, :]
        ok = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_base[:, None] + (c * sxc)[None, :] + ih * sxh + iw * sxw, mask=ok, other=0.0)
        wc = _gather(ii_ptr, sii, g, c, k_mask, HAS_II)
        b = tl.load(w_rows[None, :] + (wc * swi + kh * swh + kw * sww)[:, None],
                    mask=k_mask[:, None] & j_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=j_mask, other=0.0).to(ACC)[None, :]
    y_pos = y_ptr + g.to(tl.int64) * syg + n.to(tl.int64) * syn + oh * syh + ow * syw
    tl.store(y_pos[:, None] + offs_j[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & j_mask[None, :])


@triton.jit
def _conv_bwd_input_kernel(g_ptr, w_ptr, oi_ptr, ii_ptr, gx_ptr,
                           N, C, H, W, K_OUT, OH, OW,
                           sgg, sgn, sgc, sgh, sgw,
                           swo, swi, swh, sww,
                           soi, sii, row_step,
                           sxg, sxn, sxc, sxh, sxw,
                           SH, SW, PH, PW, DH, DW,
                           KH: tl.constexpr, KW: tl.constexpr,
                           HAS_OI: tl.constexpr, HAS_II: tl.constexpr,
                           ACC: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GEMM: rows m = (n, ih, iw), columns c = selected input channels, reduction k = (j, kh, kw).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * H * W
    n, ih, iw = _pixel(offs_m, H, W)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    wc = _gather(ii_ptr, sii, g, offs_c, c_mask, HAS_II)
    w_cols = w_ptr + wc.to(tl.int64) * swi
    g_base = g_ptr + g.to(tl.int64) * sgg + n.to(tl.int64) * sgn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K_OUT * KH * KW, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K_OUT * KH * KW
        j, kh, kw = _tap(offs_k, KH, KW)
        # input row ih receives output row oh when oh * SH - PH + kh * DH == ih
        th = ih[:, None] + PH - (kh * DH)[None, :]
        tw = iw[:, None] + PW - (kw * DW)[None, :]
        oh = th // SH
        ow = tw // SW
        ok = (m_mask[:, None] & k_mask[None, :] & (th >= 0) & (tw >= 0) & (oh * SH == th) & (ow * SW == tw)
              & (oh < OH) & (ow < OW))
        a = tl.load(g_base[:, None] + (j * sgc)[None, :] + oh * sgh + ow * sgw, mask=ok, other=0.0)
        rows = _gather(oi_ptr, soi, g, j, k_mask, HAS_OI) + g * row_step
        b = tl.load(w_cols[None, :] + (rows * swo + kh * swh + kw * sww)[:, None],
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    gx_pos = gx_ptr + g.to(tl.int64) * sxg + n.to(tl.int64) * sxn + ih * sxh + iw * sxw
    tl.store(gx_pos[:, None] + offs_c[None, :] * sxc, acc.to(gx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & c_mask[None, :])


@triton.jit
def _conv_bwd_weight_kernel(g_ptr, x_ptr, oi_ptr, ii_ptr, gw_ptr,
                            N, C, H, W, K_OUT, OH, OW,
                            sgg, sgn, sgc, sgh, sgw,
                            sxg, sxn, sxc, sxh, sxw,
                            swo, swi, swh, sww,
                            soi, sii, row_step,
                            SH, SW, PH, PW, DH, DW,
                            P_PER_SPLIT, SPLIT,
                            KH: tl.constexpr, KW: tl.constexpr,
                            HAS_OI: tl.constexpr, HAS_II: tl.constexpr, ATOMIC: tl.constexpr,
                            ACC: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GEMM: rows j = selected filters, columns q = (c, kh, kw) over the selected input
    # channels, reduction over p = (n, oh, ow), split into SPLIT chunks.
    pid_j = tl.program_id(0)
    pid_q = tl.program_id(1)
    g = tl.program_id(2) // SPLIT
    p_lo = (tl.program_id(2) % SPLIT) * P_PER_SPLIT
    p_hi = tl.minimum(p_lo + P_PER_SPLIT, N * OH * OW)
    offs_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    j_mask = offs_j < K_OUT
    offs_q = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    q_mask = offs_q < C * KH * KW
    c, kh, kw = _tap(offs_q, KH, KW)
    g_rows = g_ptr + g.to(tl.int64) * sgg + offs_j * sgc
    x_cols = x_ptr + g.to(tl.int64) * sxg + c * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for p0 in range(p_lo, p_hi, BLOCK_K):
        offs_p = p0 + tl.arange(0, BLOCK_K)
        p_mask = offs_p < p_hi
        n, oh, ow = _pixel(offs_p, OH, OW)
        n = n.to(tl.int64)
        a = tl.load(g_rows[:, None] + (n * sgn + oh * sgh + ow * sgw)[None, :],
                    mask=j_mask[:, None] & p_mask[None, :], other=0.0)
        ih = (oh * SH - PH)[:, None] + (kh * DH)[None, :]
        iw = (ow * SW - PW)[:, None] + (kw * DW)[None, :]
        ok = p_mask[:, None] & q_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load(x_cols[None, :] + (n * sxn)[:, None] + ih * sxh + iw * sxw, mask=ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    rows = _gather(oi_ptr, soi, g, offs_j, j_mask, HAS_OI) + g * row_step
    wc = _gather(ii_ptr, sii, g, c, q_mask, HAS_II)
    ptrs = gw_ptr + rows.to(tl.int64)[:, None] * swo + (wc * swi + kh * swh + kw * sww)[None, :]
    mask = j_mask[:, None] & q_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _bias_grad_kernel(g_ptr, oi_ptr, gb_ptr, N, K_OUT, OHW, sgg, sgn, sgc, soi, row_step, P_PER_SPLIT, SPLIT,
                      HAS_OI: tl.constexpr, ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    # grad is contiguous over (oh, ow); gb[row_j] += sum over (n, oh, ow) of grad[g, n, j].
    pid_j = tl.program_id(0)
    g = tl.program_id(1) // SPLIT
    p_lo = (tl.program_id(1) % SPLIT) * P_PER_SPLIT
    p_hi = tl.minimum(p_lo + P_PER_SPLIT, N * OHW)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = offs_j < K_OUT
    base = g_ptr + g.to(tl.int64) * sgg + offs_j[:, None] * sgc
    acc = tl.zeros((BLOCK_J, BLOCK_P), dtype=ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < p_hi
        off = (offs_p // OHW).to(tl.int64) * sgn + offs_p % OHW
        acc += tl.load(base + off[None, :], mask=j_mask[:, None] & p_mask[None, :], other=0.0).to(ACC)
    rows = _gather(oi_ptr, soi, g, offs_j, j_mask, HAS_OI) + g * row_step
    tl.atomic_add(gb_ptr + rows, tl.sum(acc, axis=1), mask=j_mask)
