"""Kernel-specific tests of the Triton backend (loft_kernels/backends/triton/).

Without a GPU the kernels run on CPU tensors in Triton's numpy interpreter, so
the interpreter is switched on before anything asks whether triton is usable.
Shapes are small (the interpreter is slow) but chosen to cross the kernels'
block boundaries: several programs per tensor/segment, reduction loops with
more than one trip, split weight-gradient reductions, overlapping groups.
Every result is compared with a plain float64 computation written here.
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

import loft_kernels as lk  # noqa: E402
from loft_kernels.backends import unavailable_reason  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")

pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None,
                                reason=f"triton backend unavailable: {unavailable_reason('triton')}")


@pytest.fixture(autouse=True)
def _on_triton():
    torch.manual_seed(0)
    with lk.use_backend("triton"):
        yield


def _conv_module():
    from loft_kernels.backends.triton import partial_conv as conv
    return conv


# ----------------------------------------------------------------- helpers ----
def _rand(*shape, dtype=torch.float32, grad=True):
    t = torch.randn(*shape, dtype=torch.float64).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def _ref_partial(x, w, b, stride, padding, dilation, groups, oi, ii):
    """F.conv2d in float64 on the explicitly sliced weight (autograd gives the full-size grads)."""
    ws = w if oi is None else w[oi]
    ws = ws if ii is None else ws[:, ii]
    bs = None if b is None else (b if oi is None else b[oi])
    return F.conv2d(x, ws, bs, stride, padding, dilation, groups)


def _grads(y, inputs, grad):
    return torch.autograd.grad(y, [t for t in inputs if t is not None], grad)


def _as64(ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _assert_close(got, want, dtype=torch.float32):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.double(), want, **tol)


# ---------------------------------------------------------- availability ----
def test_backend_is_available_with_interpreter_dtypes():
    assert unavailable_reason("triton") is None
    assert "triton" in lk.available_backends()
    if INTERPRET:
        # the interpreter's bf16 arithmetic is wrong: the conv kernels refuse it rather than mis-compute
        x, w = _rand(1, 2, 5, 5, dtype=torch.bfloat16), _rand(3, 2, 3, 3, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match="triton"):
            lk.partial_conv2d(x, w)


# ------------------------------------------------------- partial_conv2d ----
# (N, C_in, C_out, H, W, k, stride, padding, dilation, bias, out_index, in_index)
CASES = [
    (2, 5, 7, 9, 8, 3, 1, 1, 1, True, [4, 0, 2], [3, 1]),
    (1, 3, 4, 7, 7, 3, 2, 0, 1, False, None, None),
    (3, 4, 6, 11, 10, 3, 2, 2, 2, True, [5], None),
    (2, 7, 5, 9, 9, 5, 1, "same", 1, True, None, [6, 0, 3, 2, 5, 1, 4]),  # in_index: all, shuffled
    (2, 13, 3, 5, 6, 1, 1, 0, 1, True, [2, 0, 1], list(range(12, -1, -2))),
    (1, 2, 3, 1, 1, 1, 1, 0, 1, True, [1], [1]),                          # 1x1 image, 1x1 kernel
    (2, 3, 17, 6, 5, 3, 1, "same", 2, False, list(range(16, -1, -1)), None),  # > one column block
    (1, 36, 2, 5, 4, 3, 1, 1, 1, True, None, None),                       # reduction > one k block
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_partial_conv2d_matches_float64_reference(case):
    n, c_in, c_out, h, w_, k, s, p, d, has_bias, oi, ii = case
    oi = None if oi is None else torch.tensor(oi, device=DEVICE)
    ii = None if ii is None else torch.tensor(ii, device=DEVICE)
    x = _rand(n, c_in if ii is None else len(ii), h, w_)
    w = _rand(c_out, c_in, k, k)
    b = _rand(c_out) if has_bias else None
    y = lk.partial_conv2d(x, w, b, s, p, d, out_index=oi, in_index=ii)
    grad = torch.randn_like(y)
    got = _grads(y, [x, w, b], grad)
    x64, w64, b64 = _as64([x, w, b])
    y64 = _ref_partial(x64, w64, b64, s, p, d, 1, oi, ii)
    want = _grads(y64, [x64, w64, b64], grad.double())
    _assert_close(y, y64)
    for g, r in zip(got, want):
        _assert_close(g, r)
    # the weight/bias gradients are exactly zero outside the selected rows and columns
    keep = torch.zeros(c_out, c_in, dtype=torch.bool, device=DEVICE)
    rows = torch.arange(c_out, device=DEVICE) if oi is None else oi
    cols = torch.arange(c_in, device=DEVICE) if ii is None else ii
    keep[rows[:, None], cols[None, :]] = True
    assert torch.all(got[1][~keep] == 0)
    if has_bias and oi is not None:
        outside = torch.ones(c_out, dtype=torch.bool, device=DEVICE)
        outside[oi] = False
        assert torch.all(got[2][outside] == 0)


def test_partial_conv2d_float64_is_exact_to_rounding():
    oi, ii = torch.tensor([3, 0], device=DEVICE), torch.tensor([2, 0], device=DEVICE)
    x, w, b = _rand(2, 2, 7, 6, dtype=torch.float64), _rand(4, 3, 3, 3, dtype=torch.float64), \
        _rand(4, dtype=torch.float64)
    y = lk.partial_conv2d(x, w, b, 2, 1, 1, out_index=oi, in_index=ii)
    grad = torch.randn_like(y)
    got = _grads(y, [x, w, b], grad)
    x64, w64, b64 = _as64([x, w, b])
    y64 = _ref_partial(x64, w64, b64, 2, 1, 1, 1, oi, ii)
    _assert_close(y, y64, torch.float64)
    for g, r in zip(got, _grads(y64, [x64, w64, b64], grad)):
        _assert_close(g, r, torch.float64)


def test_partial_conv2d_gradcheck_float64():
    oi, ii = torch.tensor([3, 0], device=DEVICE), torch.tensor([2, 0], device=DEVICE)
    x, w, b = _rand(1, 2, 5, 4, dtype=torch.float64), _rand(4, 3, 3, 3, dtype=torch.float64), \
        _rand(4, dtype=torch.float64)
    # fast_mode: the interpreter makes the full Jacobian (hundreds of launches) too slow for CI
    assert torch.autograd.gradcheck(
        lambda x, w, b: lk.partial_conv2d(x, w, b, (2, 1), 1, (1, 2), out_index=oi, in_index=ii),
        (x, w, b), fast_mode=True)


@pytest.mark.parametrize("groups,c_in,c_out", [(3, 6, 9), (4, 4, 4)], ids=["groups3", "depthwise"])
def test_conv_groups_without_indices(groups, c_in, c_out):
    x, w, b = _rand(2, c_in, 7, 6), _rand(c_out, c_in // groups, 3, 3), _rand(c_out)
    y = lk.partial_conv2d(x, w, b, 1, 1, 1, groups)
    grad = torch.randn_like(y)
    got = _grads(y, [x, w, b], grad)
    x64, w64, b64 = _as64([x, w, b])
    y64 = F.conv2d(x64, w64, b64, 1, 1, 1, groups)
    _assert_close(y, y64)
    for g, r in zip(got, _grads(y64, [x64, w64, b64], grad.double())):
        _assert_close(g, r)


def test_strided_inputs_are_read_through_their_strides():
    # channels_last x, a column-sliced x and a transposed (non-contiguous) weight
    oi = torch.tensor([1, 4, 2], device=DEVICE)
    w_t = _rand(3, 5, 3, 3, grad=False).transpose(0, 1).requires_grad_()  # [5, 3, 3, 3], not contiguous
    for x in (_rand(2, 3, 6, 7, grad=False).contiguous(memory_format=torch.channels_last).requires_grad_(),
              _rand(2, 3, 6, 14, grad=False)[..., ::2].requires_grad_()):
        assert not x.is_contiguous() and not w_t.is_contiguous()
        y = lk.partial_conv2d(x, w_t, None, 1, 1, out_index=oi)
        grad = torch.randn_like(y)
        got = _grads(y, [x, w_t], grad)
        x64, w64 = _as64([x, w_t])
        y64 = _ref_partial(x64, w64, None, 1, 1, 1, 1, oi, None)
        _assert_close(y, y64)
        for g, r in zip(got, _grads(y64, [x64, w64], grad.double())):
            _assert_close(g, r)


def test_only_some_gradients_requested():
    oi = torch.tensor([2, 0], device=DEVICE)
    x, w, b = _rand(2, 3, 6, 6, grad=False), _rand(4, 3, 3, 3, grad=False), _rand(4)
    y = lk.partial_conv2d(x, w, b, 1, 1, out_index=oi)
    (gb,) = torch.autograd.grad(y, [b], torch.ones_like(y))
    want = torch.zeros(4, dtype=torch.float64)
    want[oi] = 36 * 2  # each output channel has N * H' * W' = 2 * 6 * 6 ones
    _assert_close(gb.cpu(), want)
    w.requires_grad_()
    y = lk.partial_conv2d(x, w, None, 1, 1, out_index=oi)
    (gw,) = torch.autograd.grad(y, [w], torch.ones_like(y))
    x64, w64 = _as64([x, w])
    _assert_close(gw, torch.autograd.grad(_ref_partial(x64, w64, None, 1, 1, 1, 1, oi, None), [w64],
                                          torch.ones_like(y).double())[0])


def test_empty_batch():
    x, w, b = _rand(0, 3, 5, 5), _rand(4, 3, 3, 3), _rand(4)
    y = lk.partial_conv2d(x, w, b, 1, 1, out_index=torch.tensor([1, 3], device=DEVICE))
    assert y.shape == (0, 2, 5, 5)
    gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b])
    assert gx.shape == x.shape and torch.all(gw == 0) and torch.all(gb == 0)


def test_split_weight_gradient_reduction(monkeypatch):
    """The GPU path splits the N*H'*W' reduction over programs (atomic adds); force it here."""
    conv = _conv_module()
    calls = []

    def split(*args):
        calls.append(args)
        return 3
    monkeypatch.setattr(conv, "_wgrad_split", split)
    oi, ii = torch.tensor([3, 1, 4], device=DEVICE), torch.tensor([0, 2], device=DEVICE)
    x, w, b = _rand(2, 2, 17, 17), _rand(5, 3, 3, 3), _rand(5)
    y = lk.partial_conv2d(x, w, b, 1, 1, out_index=oi, in_index=ii)
    grad = torch.randn_like(y)
    got = _grads(y, [x, w, b], grad)
    assert calls, "the split heuristic was not consulted"
    x64, w64, b64 = _as64([x, w, b])
    want = _grads(_ref_partial(x64, w64, b64, 1, 1, 1, 1, oi, ii), [x64, w64, b64], grad.double())
    for g, r in zip(got, want):
        _assert_close(g, r)


# ----------------------------------------------- grouped_partial_conv2d ----
def _grouped_reference(x, w, b, stride, padding, dilation, oi, ii):
    return torch.stack([_ref_partial(x[g], w, b, stride, padding, dilation, 1,
                                     None if oi is None else oi[g], None if ii is None else ii[g])
                        for g in range(x.shape[0])])


@pytest.mark.parametrize("kind", ["overlapping", "disjoint_in_only", "no_index"])
def test_grouped_partial_conv2d(kind):
    G, n, c_in, c_out = 3, 2, 6, 9
    if kind == "overlapping":  # group 0 and 2 share rows 4 and 7: their weight gradients add up
        oi = torch.tensor([[4, 7, 0], [1, 2, 3], [7, 4, 8]], device=DEVICE)
        ii = torch.tensor([[5, 0, 2, 1], [0, 1, 2, 3], [2, 3, 4, 5]], device=DEVICE)
    elif kind == "disjoint_in_only":
        oi, ii = None, torch.tensor([[0, 3], [1, 4], [5, 2]], device=DEVICE)
    else:
        oi = ii = None
    x = _rand(G, n, c_in if ii is None else ii.shape[1], 7, 6)
    w, b = _rand(c_out, c_in, 3, 3), _rand(c_out)
    y = lk.grouped_partial_conv2d(x, w, b, 2, 1, 1, out_index=oi, in_index=ii)
    grad = torch.randn_like(y)
    got = _grads(y, [x, w, b], grad)
    x64, w64, b64 = _as64([x, w, b])
    y64 = _grouped_reference(x64, w64, b64, 2, 1, 1, oi, ii)
    _assert_close(y, y64)
    for g, r in zip(got, _grads(y64, [x64, w64, b64], grad.double())):
        _assert_close(g, r)
    if oi is not None:
        unused = torch.ones(c_out, dtype=torch.bool, device=DEVICE)
        unused[oi.flatten()] = False
        assert torch.all(got[1][unused] == 0) and torch.all(got[2][unused] == 0)


def test_grouped_gradcheck_float64():
    oi = torch.tensor([[3, 0], [0, 1]], device=DEVICE)
    ii = torch.tensor([[2, 0], [1, 2]], device=DEVICE)
    x, w, b = _rand(2, 1, 2, 4, 4, dtype=torch.float64), _rand(4, 3, 3, 3, dtype=torch.float64), \
        _rand(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: lk.grouped_partial_conv2d(x, w, b, 1, 1, 1, out_index=oi, in_index=ii),
        (x, w, b), fast_mode=True)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="half precision needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_torch_error(dtype):
    oi, ii = torch.arange(0, 48, 2, device=DEVICE), torch.arange(31, -1, -1, device=DEVICE)
    x64, w64 = torch.randn(4, 32, 17, 17, dtype=torch.float64, device=DEVICE), \
        torch.randn(48, 32, 3, 3, dtype=torch.float64, device=DEVICE) * 0.2
    want = _ref_partial(x64, w64, None, 1, 1, 1, 1, oi, ii)
    x, w = x64.to(dtype), w64.to(dtype)
    ours = (lk.partial_conv2d(x, w, None, 1, 1, out_index=oi, in_index=ii).double() - want).abs().max()
    with lk.use_backend("torch"):
        theirs = (lk.partial_conv2d(x, w, None, 1, 1, out_index=oi, in_index=ii).double() - want).abs().max()
    assert ours <= 2 * theirs + 1e-6


# ------------------------------------------------ filter norms and stats ----
def _stat_tensors(dtype=torch.float32):
    shapes = [(70, 3, 3, 3), (13,), (5, 1500), (9, 2, 1, 1), (1, 1), (3, 0), (33, 40)]
    return [torch.randn(*s, dtype=torch.float64).to(DEVICE, dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filter_norms_segmented(dtype):
    ts = _stat_tensors(dtype)
    got = lk.filter_norms(ts)
    for g, t in zip(got, ts):
        assert g.dtype == torch.float32 and g.shape == (t.shape[0],)
        rows = t.double().reshape(t.shape[0], -1) if t.numel() else torch.zeros(t.shape[0], 0, dtype=torch.float64)
        want = torch.tensor([math.sqrt(sum(v * v for v in r.tolist())) for r in rows], dtype=torch.float64)
        torch.testing.assert_close(g.double().cpu(), want, rtol=2e-6, atol=1e-6)


def test_filter_stats_segmented():
    a = _stat_tensors()
    b = [t + 0.05 * torch.randn_like(t) for t in a]
    got = lk.filter_stats(a, b)
    for g, ta, tb in zip(got, a, b):
        assert g.dtype == torch.float32 and g.shape == (ta.shape[0], 4)
        ra = ta.double().reshape(ta.shape[0], -1) if ta.numel() else torch.zeros(ta.shape[0], 0).double()
        rb = tb.double().reshape(tb.shape[0], -1) if tb.numel() else torch.zeros(tb.shape[0], 0).double()
        want = torch.stack([(ra * ra).sum(1), (rb * rb).sum(1), (ra * rb).sum(1), ((ra - rb) ** 2).sum(1)], 1)
        torch.testing.assert_close(g.double().cpu(), want.cpu(), rtol=2e-6, atol=1e-5)


# -------------------------------------------------- footrule, mask distance ----
def _ranks(row):
    order = sorted(range(len(row)), key=lambda f: (-row[f], f))
    r = [0] * len(row)
    for pos, f in enumerate(order, 1):
        r[f] = pos
    return r


def _footrule(sa, sb):
    ra, rb = _ranks(sa), _ranks(sb)
    return sum(abs(math.log(ra[f]) - math.log(rb[f])) / ra[f] for f in range(len(ra)))


def _mask_distance(sa, sb, ratio):
    n = len(sa)
    keep = n - lk.pruned_count(n, ratio)
    ka, kb = [r <= keep for r in _ranks(sa)], [r <= keep for r in _ranks(sb)]
    return sum(x != y for x, y in zip(ka, kb)) / n


def _score_layers(T, widths):
    layers = [torch.randn(T, n, dtype=torch.float64) for n in widths]
    layers.append(torch.randint(0, 3, (T, 21)).double())  # many ties
    return layers


@pytest.mark.parametrize("T,widths", [(19, [7, 300, 1]), (4, [16, 16])], ids=["ragged", "equal"])
def test_footrule_and_mask_distance_matrices(T, widths):
    layers = _score_layers(T, widths)
    scores = [s.to(DEVICE, torch.float32) for s in layers]
    fr = lk.footrule_matrix(scores).cpu()
    md = lk.mask_distance_matrix(scores, 0.3).cpu()
    assert fr.shape == md.shape == (len(layers), T, T)
    rows = [[s[t].float().tolist() for t in range(T)] for s in layers]  # what the kernels saw
    for l, r in enumerate(rows):
        for a in range(T):
            for b in range(T):
                assert fr[l, a, b].item() == pytest.approx(_footrule(r[a], r[b]), rel=1e-5, abs=1e-5)
                assert md[l, a, b].item() == pytest.approx(_mask_distance(r[a], r[b], 0.3), abs=1e-6)


def test_footrule_by_hand():
    s = torch.tensor([[2.0, 1.0], [1.0, 2.0], [2.0, 1.0]], device=DEVICE)
    m = lk.footrule_matrix([s]).cpu()
    assert m[0, 0, 2].item() == 0.0 and m[0, 1, 1].item() == 0.0
    assert m[0, 0, 1].item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


# ----------------------------------------------------------- pack / unpack ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                                   torch.bool])
def test_pack_unpack_round_trip(dtype):
    def make(*shape):
        return torch.randn(*shape).mul(5).to(DEVICE).to(dtype)
    # segments longer than one 1024-element block, dims 0/1/last, and one segment
    # ending mid-block next to the following one
    tensors = [make(40, 3, 3, 3), make(6, 50, 7), make(9), make(5, 4, 11)]
    indices = [torch.tensor(i, device=DEVICE) for i in
               ([39, 0, 17, 5, 22, 31, 8, 1, 2, 3, 4], list(range(49, 0, -3)), [8, 3], [10, 0, 5])]
    dims = [0, 1, 0, -1]
    flat = lk.pack_rows(tensors, indices, dims)
    want = torch.cat([t.index_select(d, i).reshape(-1) for t, i, d in zip(tensors, indices, dims)])
    assert flat.dtype == dtype and torch.equal(flat, want)
    new = make(flat.numel())
    targets = [t.clone() for t in tensors]
    lk.unpack_rows(new, targets, indices, dims)
    offset = 0
    for t, tgt, i, d in zip(tensors, targets, indices, dims):
        expect = t.clone()
        n = t.numel() // t.shape[d] * i.numel()
        shape = list(t.shape)
        shape[d % t.dim()] = i.numel()
        expect.index_copy_(d, i, new[offset:offset + n].view(shape))
        offset += n
        assert torch.equal(tgt, expect)


def test_unpack_into_non_contiguous_tensor():
    base = torch.randn(7, 5, device=DEVICE)
    target = base.t()  # [5, 7] view, not contiguous; writes must land in `base`
    idx = torch.tensor([4, 1], device=DEVICE)
    flat = torch.arange(14.0, device=DEVICE)
    expect = target.clone().index_copy_(0, idx, flat.view(2, 7))
    lk.unpack_rows(flat, [target], [idx])
    assert torch.equal(target, expect) and torch.equal(base.t(), expect)


# ------------------------------------------- GPU lowering without a GPU ----
def _aot_compile(kernel, types, constexprs, arch):
    """Compile a kernel ahead of time for an NVIDIA arch: proves it lowers to a cubin, runs nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types(n) for n in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, num_stages=3))


def _compile_jobs():
    import triton.language as tl

    import loft_kernels.backends.triton.filter_stats as stats
    from loft_kernels.backends.triton import packing, ranking
    from loft_kernels.backends.triton import partial_conv as conv
    conv_flags = dict(KH=3, KW=3, HAS_OI=True, HAS_II=True, PRECISION="ieee", BLOCK_K=32)

    def conv_types(data, acc_ptr="x"):  # *data for tensors, *acc for gradient buffers, i64 indices
        return lambda n: ("*i64" if n in ("oi_ptr", "ii_ptr") else f"*{acc_ptr}" if n in ("gw_ptr", "gb_ptr")
                          else f"*{data}" if n.endswith("_ptr") else "i32")
    jobs = []
    for data, acc, block in (("bf16", tl.float32, 64), ("fp64", tl.float64, 32)):
        tiles = dict(conv_flags, ACC=acc, BLOCK_M=block, BLOCK_N=block)
        acc_name = "fp64" if data == "fp64" else "fp32"
        jobs += [(f"{data}-fwd", conv._conv_fwd_kernel, conv_types(data), dict(tiles, HAS_BIAS=True)),
                 (f"{data}-bwd-input", conv._conv_bwd_input_kernel, conv_types(data), tiles),
                 (f"{data}-bwd-weight", conv._conv_bwd_weight_kernel, conv_types(data, acc_name),
                  dict(tiles, ATOMIC=True)),
                 (f"{data}-bias", conv._bias_grad_kernel, conv_types(data, acc_name),
                  dict(HAS_OI=True, ACC=acc, BLOCK_J=32, BLOCK_P=128)),
                 (f"{data}-stats", stats._filter_stats_kernel, lambda n, d=data: f"*{d}" if n == "ref_ptr" else "*i64",
                  dict(STATS=True, ACC=acc, BLOCK_R=8, BLOCK_D=512))]
    jobs += [("ranking", ranking._rank_pair_kernel,
              lambda n: {"out_ptr": "*fp32", "T": "i32", "NMAX": "i32"}.get(n, "*i64"),
              dict(MASK=False, BLOCK_B=16, BLOCK_F=256)),
             ("unpack", packing._rows_copy_kernel, lambda n: "*i16" if n == "flat_ptr" else "*i64",
              dict(UNPACK=True, BLOCK=1024))]
    return jobs


def _compile_all_for_hopper():
    for name, kernel, types, constexprs in _compile_jobs():
        compiled = _aot_compile(kernel, types, constexprs, 90)
        assert compiled.asm.get("cubin"), name
        print("compiled", name)


def test_kernels_compile_for_hopper(tmp_path):
    """Nothing can run on a GPU here, but every kernel family must lower to sm_90 code (bf16 and fp64).

    Runs in a child process with the interpreter off, since kernels defined under
    TRITON_INTERPRET=1 are interpreter objects that cannot be compiled.
    """
    import subprocess

    import triton.backends
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's package, not another installed copy
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, __file__, "--compile-for-hopper"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("compiled ") == len(_compile_jobs()), done.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--compile-for-hopper"]:
    _compile_all_for_hopper()
