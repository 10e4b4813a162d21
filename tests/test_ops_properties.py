"""Property-based tests (hypothesis) for partial_conv2d and footrule_matrix."""
import naive
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loft_kernels as lk

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def conv_problems(draw):
    c_in, c_out = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    k = draw(st.integers(1, 4))
    d = draw(st.integers(1, 2))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, 2))
    h = draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 11))
    w_ = draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), 11))
    out_index = draw(st.none() | st.lists(st.integers(0, c_out - 1), min_size=1, max_size=c_out, unique=True))
    in_index = draw(st.none() | st.lists(st.integers(0, c_in - 1), min_size=1, max_size=c_in, unique=True))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return c_in, c_out, k, d, s, p, h, w_, out_index, in_index, bias, seed


@SETTINGS
@given(conv_problems())
def test_partial_conv2d_equals_sliced_conv(problem):
    c_in, c_out, k, d, s, p, h, w_, out_index, in_index, bias, seed = problem
    g = torch.Generator().manual_seed(seed)
    oi = None if out_index is None else torch.tensor(out_index)
    ii = None if in_index is None else torch.tensor(in_index)
    k_in = c_in if ii is None else len(ii)
    x = torch.randn(2, k_in, h, w_, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = lk.partial_conv2d(x, wt, b, s, p, d, out_index=oi, in_index=ii)
    ref = naive.partial_conv2d(x, wt, b, s, p, d, 1, oi, ii)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    params = [x, wt] + ([b] if bias else [])
    for got, want in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(got, want)


score_matrices = st.integers(1, 5).flatmap(lambda T: st.integers(1, 9).flatmap(lambda n: st.lists(
    st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=T, max_size=T)))


@SETTINGS
@given(score_matrices)
def test_footrule_matches_naive_and_is_a_premetric(rows):
    s = torch.tensor(rows, dtype=torch.float32)
    m = lk.footrule_matrix([s])[0]
    torch.testing.assert_close(m.double(), naive.footrule_matrix([s])[0], rtol=1e-5, atol=1e-6)
    assert bool((m >= 0).all())
    assert bool((m.diagonal() == 0).all())


@SETTINGS
@given(score_matrices, st.floats(0.1, 10.0), st.floats(-5.0, 5.0))
def test_footrule_invariant_under_increasing_maps(rows, scale, shift):
    """Only the rankings matter: a strictly increasing map of all scores changes nothing."""
    s = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(lk.footrule_matrix([s]), lk.footrule_matrix([s * scale + shift]))


@SETTINGS
@given(st.integers(2, 6), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_footrule_invariant_under_relabelling_filters(T, n, seed):
    """Renaming filters consistently across snapshots (distinct scores) leaves F unchanged."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(T, n, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    torch.testing.assert_close(lk.footrule_matrix([s]), lk.footrule_matrix([s[:, perm]]))
