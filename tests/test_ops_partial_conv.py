"""partial_conv2d and grouped_partial_conv2d on every backend against F.conv2d on the sliced weight."""
import random
import zlib

import naive
import pytest
import torch
from conftest import backend_accepts

import loft_kernels as lk

# Odd and prime shapes, every stride/padding/dilation/kernel/bias/subset variant;
# a seeded sample of the full product keeps the run short while covering each value.
CHANNELS = (1, 3, 7, 13)
SIZES = (1, 5, 9, 17)
KERNELS = (1, 3, 5)
STRIDES = (1, 2)
PADDINGS = (0, 1, "same")
DILATIONS = (1, 2)
SUBSETS = ("one", "all", "random", "none")


def _valid(c_in, c_out, h, k, s, p, d):
    if p == "same":
        return s == 1
    return h + 2 * p >= d * (k - 1) + 1


def _cases(n, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        c = (rng.choice(CHANNELS), rng.choice(CHANNELS), rng.choice(SIZES), rng.choice(KERNELS), rng.choice(STRIDES),
             rng.choice(PADDINGS), rng.choice(DILATIONS), rng.random() < 0.5, rng.choice(SUBSETS),
             rng.choice(SUBSETS))
        if _valid(*c[:7]):
            out.append(c)
    return out


CASES = _cases(36, 0)
SMALL_CASES = [c for c in CASES if c[2] <= 9][:12]  # for the (slow) Triton interpreter


def _subset(kind, n, g):
    if kind == "none":
        return None
    if kind == "all":
        return torch.randperm(n, generator=g)  # all, in a shuffled order
    if kind == "one":
        return torch.randint(n, (1,), generator=g)
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    return torch.randperm(n, generator=g)[:k]


def _check_case(case, device, dtype=torch.float32, batch=2):
    c_in, c_out, h, k, s, p, d, has_bias, out_kind, in_kind = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    out_index = _subset(out_kind, c_out, g)
    in_index = _subset(in_kind, c_in, g)
    k_in = c_in if in_index is None else len(in_index)
    w = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    b = torch.randn(c_out, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() if has_bias else None
    x = torch.randn(batch, k_in, h, h + 1, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    oi = None if out_index is None else out_index.to(device)
    ii = None if in_index is None else in_index.to(device)
    y = lk.partial_conv2d(x, w, b, s, p, d, out_index=oi, in_index=ii)
    grad = torch.randn_like(y)
    gx, gw, *gb = torch.autograd.grad(y, [x, w] + ([b] if has_bias else []), grad)
    # reference in float64 from the definition
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if has_bias else None
    y64 = naive.partial_conv2d(x64, w64, b64, s, p, d, 1, oi, ii)
    rx, rw, *rb = torch.autograd.grad(y64, [x64, w64] + ([b64] if has_bias else []), grad.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.double(), y64, **tol)
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)
    if has_bias:
        torch.testing.assert_close(gb[0].double(), rb[0], **tol)
    # the full-size weight gradient is exactly zero outside the selected rows/columns
    mask = torch.zeros(c_out, c_in, dtype=torch.bool, device=device)
    mask[(oi if oi is not None else slice(None))] = True
    if ii is not None:
        col = torch.zeros(c_in, dtype=torch.bool, device=device)
        col[ii] = True
        mask &= col[None, :]
    assert bool((gw[~mask] == 0).all())
    if has_bias and oi is not None:
        row = torch.ones(c_out, dtype=torch.bool, device=device)
        row[oi] = False
        assert bool((gb[0][row] == 0).all())


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_partial_conv2d_matches_reference(backend, device, case):
    if backend == "triton" and case not in SMALL_CASES:
        pytest.skip("Triton interpreter: covered by the small-shape subset")
    _check_case(case, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_partial_conv2d_half_precision_within_torch_error(backend, device, dtype):
    """Our error against float64 is at most 2x PyTorch's own error in that dtype."""
    if not backend_accepts("partial_conv2d", backend, dtype):
        pytest.skip(f"{backend} does not run partial_conv2d in {dtype}")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 13, 17, 17, generator=g, dtype=torch.float64)
    w = torch.randn(23, 16, 3, 3, generator=g, dtype=torch.float64) * 0.2
    b = torch.randn(23, generator=g, dtype=torch.float64)
    oi, ii = torch.randperm(23, generator=g)[:11], torch.randperm(16, generator=g)[:13]
    ref = naive.partial_conv2d(x, w, b, 1, 1, 1, 1, oi, ii)
    torch_out = naive.partial_conv2d(x.to(dtype), w.to(dtype), b.to(dtype), 1, 1, 1, 1, oi, ii)
    to = lambda t: t.to(device, dtype)  # noqa: E731
    ours = lk.partial_conv2d(to(x), to(w), to(b), 1, 1, out_index=oi.to(device), in_index=ii.to(device))
    torch_err = (torch_out.double() - ref).abs().max().item()
    our_err = (ours.cpu().double() - ref).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


def test_partial_conv2d_gradcheck(backend, device):
    if not backend_accepts("partial_conv2d", backend, torch.float64):
        pytest.skip(f"{backend} does not run float64")
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, w, b = torch.randn(2, 3, 6, 5, **opts), torch.randn(5, 4, 3, 3, **opts), torch.randn(5, **opts)
    oi, ii = torch.tensor([4, 0, 2], device=device), torch.tensor([3, 1, 2], device=device)
    fast = backend == "triton"  # hundreds of launches in full mode are minutes in the interpreter
    assert torch.autograd.gradcheck(
        lambda x, w, b: lk.partial_conv2d(x, w, b, 2, 1, 1, out_index=oi, in_index=ii), (x, w, b), fast_mode=fast)
    w2 = torch.randn(5, 4, 2, 2, **opts)  # even kernel: asymmetric 'same' padding
    assert torch.autograd.gradcheck(
        lambda x, w: lk.partial_conv2d(x, w, None, padding="same", dilation=2, in_index=ii), (x, w2),
        fast_mode=fast)


def test_partial_conv2d_groups_without_index(backend, device):
    x = torch.randn(2, 6, 7, 7, device=device)
    w = torch.randn(9, 2, 3, 3, device=device)
    torch.testing.assert_close(lk.partial_conv2d(x, w, None, 1, 1, 1, 3),
                               torch.nn.functional.conv2d(x, w, None, 1, 1, 1, 3))


def test_partial_conv2d_unbatched_input(backend, device):
    x, w = torch.randn(3, 5, 5, device=device), torch.randn(4, 3, 3, 3, device=device)
    oi = torch.tensor([2, 0], device=device)
    torch.testing.assert_close(lk.partial_conv2d(x, w, out_index=oi),
                               torch.nn.functional.conv2d(x, w[oi]))


# ------------------------------------------------------------------ grouped ----
def _grouped_reference(x, w, b, s, p, d, oi, ii):
    return torch.stack([naive.partial_conv2d(x[g], w, b, s, p, d, 1, None if oi is None else oi[g],
                                             None if ii is None else ii[g]) for g in range(x.shape[0])])


@pytest.mark.parametrize("G,N,c_in,c_out,h,k,s,p,d,bias,use_out,use_in", [
    (4, 2, 8, 12, 9, 3, 1, 1, 1, True, True, True),
    (3, 1, 7, 13, 5, 3, 2, 1, 1, False, True, False),
    (2, 3, 5, 6, 6, 2, 1, "same", 2, True, False, True),
    (1, 2, 3, 5, 5, 1, 1, 0, 1, True, True, True),
    (4, 1, 6, 4, 7, 5, 1, 2, 1, False, False, False),
])
def test_grouped_partial_conv2d_matches_loop(backend, device, G, N, c_in, c_out, h, k, s, p, d, bias,
                                            use_out, use_in):
    g = torch.Generator().manual_seed(G * 100 + c_in)
    # overlapping index rows across groups: weight gradients must add up
    oi = torch.stack([torch.randperm(c_out, generator=g)[: max(1, c_out // 2)] for _ in range(G)]) if use_out else None
    ii = torch.stack([torch.randperm(c_in, generator=g)[: max(1, c_in - 2)] for _ in range(G)]) if use_in else None
    k_in = c_in if ii is None else ii.shape[1]
    x = torch.randn(G, N, k_in, h, h, generator=g).to(device).requires_grad_()
    w = torch.randn(c_out, c_in, k, k, generator=g).to(device).requires_grad_()
    b = torch.randn(c_out, generator=g).to(device).requires_grad_() if bias else None
    oi = None if oi is None else oi.to(device)
    ii = None if ii is None else ii.to(device)
    y = lk.grouped_partial_conv2d(x, w, b, s, p, d, out_index=oi, in_index=ii)
    ref = _grouped_reference(x, w, b, s, p, d, oi, ii)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(y)
    params = [x, w] + ([b] if bias else [])
    for got, want in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_partial_conv2d_gradcheck(backend, device):
    if not backend_accepts("grouped_partial_conv2d", backend, torch.float64):
        pytest.skip(f"{backend} does not run float64")
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, w, b = torch.randn(3, 2, 2, 5, 5, **opts), torch.randn(4, 3, 3, 3, **opts), torch.randn(4, **opts)
    oi = torch.tensor([[0, 1], [1, 3], [2, 0]], device=device)
    ii = torch.tensor([[0, 2], [1, 2], [2, 1]], device=device)
    assert torch.autograd.gradcheck(
        lambda x, w, b: lk.grouped_partial_conv2d(x, w, b, 1, 1, out_index=oi, in_index=ii), (x, w, b),
        fast_mode=backend == "triton")


def _under_autocast(grouped: bool, dtype: torch.dtype):
    """(the op's result, F.conv2d's) under bf16 autocast for `dtype` inputs (float32 ones require grad), and x, w."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 6, 6, generator=g, dtype=dtype)[: 2 if grouped else 1]
    x = (x if grouped else x[0]).requires_grad_(dtype == torch.float32)
    w = torch.randn(8, 6, 3, 3, generator=g, dtype=dtype, requires_grad=dtype == torch.float32)
    rows = torch.tensor([[1, 5, 6], [0, 2, 7]]) if grouped else torch.tensor([1, 5, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = (lk.grouped_partial_conv2d if grouped else lk.partial_conv2d)(x, w, None, 1, 1, out_index=rows)
        want = torch.stack([torch.nn.functional.conv2d(x[k], w[rows[k]], None, 1, 1) for k in range(2)]) \
            if grouped else torch.nn.functional.conv2d(x, w[rows], None, 1, 1)
    return y, want, x, w


@pytest.mark.parametrize("grouped", [False, True])
def test_autocast_convolves_in_its_dtype_like_conv2d(grouped):
    """Under autocast the ops cast like F.conv2d: low-precision output, float32 gradients for float32 leaves."""
    y, want, x, w = _under_autocast(grouped, torch.float32)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    gx, gw = torch.autograd.grad(y.float().sum(), [x, w])
    rx, rw = torch.autograd.grad(want.float().sum(), [x, w])
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gx, rx, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("grouped", [False, True])
def test_autocast_leaves_float64_alone_like_conv2d(grouped):
    y, want, _, _ = _under_autocast(grouped, torch.float64)
    assert y.dtype == want.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grouped", [False, True])
def test_meta_and_fake_tensors_give_shapes_without_values(grouped):
    """Meta and fake tensors (shape propagation, torch.compile tracing) run the op's fake kernels, backward too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(device):
        x = torch.randn(3, 2, 6, 7, 7, device=device)[: 3 if grouped else 1]
        x = (x if grouped else x[0]).requires_grad_()
        w = torch.randn(8, 6, 3, 3, device=device, requires_grad=True)
        b = torch.randn(8, device=device, requires_grad=True)
        rows = torch.tensor([[1, 5, 6], [0, 2, 7], [3, 4, 6]], device=device)[: 3 if grouped else 1]
        op = lk.grouped_partial_conv2d if grouped else lk.partial_conv2d
        y = op(x, w, b, 2, 1, out_index=rows if grouped else rows[0])
        gx, gw, gb = torch.autograd.grad(y.sum(), [x, w, b])
        return y, gx, gw, gb

    real = run("cpu")
    for got in (run("meta"), None):
        if got is None:
            with FakeTensorMode():
                got = run("cpu")
        for r, g in zip(real, got):
            assert g.shape == r.shape and g.dtype == r.dtype


# The eager path's autograd node: the cpu extension's compiled one, else the Python one.
EAGER_NODES = {"cpu": "PartialConvNode", "torch": "_EagerPartialConvBackward"}


@pytest.mark.parametrize("backend_name", list(EAGER_NODES))
@pytest.mark.parametrize("grouped", [False, True])
def test_eager_path_equals_the_custom_op(grouped, backend_name):
    """Plain CPU tensors skip the custom-op machinery; the result and every gradient equal the custom op's."""
    reason = lk.backends.unavailable_reason(backend_name)
    if reason is not None:
        pytest.skip(f"backend {backend_name!r} unavailable here: {reason}")
    with lk.use_backend(backend_name):
        _check_eager_path(grouped, EAGER_NODES[backend_name])


def _check_eager_path(grouped, node):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, 6, 6, generator=g, dtype=torch.float64)
    x = (x[:2] if grouped else x[0]).requires_grad_()
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([[6, 1, 3], [0, 2, 5]])
    if grouped:
        eager = lk.grouped_partial_conv2d(x, w, b, 1, 1, out_index=rows)
        custom = torch.ops.loft_kernels.grouped_partial_conv2d(x, w, b, rows, None, [1, 1], [1, 1], [1, 1])
    else:
        eager = lk.partial_conv2d(x, w, b, 1, 1, out_index=rows[0])
        custom = torch.ops.loft_kernels.partial_conv2d(x, w, b, rows[0], None, [1, 1], [1, 1], [1, 1], 1)
    assert eager.grad_fn is not None and node in eager.grad_fn.name()
    assert "loft_kernels" in type(custom.grad_fn).__name__
    torch.testing.assert_close(eager, custom, rtol=0, atol=0)
    grad = torch.randn(eager.shape, generator=g, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad(eager, [x, w, b], grad), torch.autograd.grad(custom, [x, w, b], grad)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    # no double backward on either path: a clear error, not a silently wrong second derivative
    y = lk.partial_conv2d(x if not grouped else x[0], w, None, 1, 1, out_index=rows[0])
    (gw,) = torch.autograd.grad(y.square().sum(), [w], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gw.sum(), [w])
