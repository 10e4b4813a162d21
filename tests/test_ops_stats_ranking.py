"""filter_norms, filter_stats, footrule_matrix, mask_distance_matrix on every backend."""
import math

import naive
import pytest
import torch
from conftest import backend_accepts

import loft_kernels as lk

SHAPES = [(13, 7, 3, 3), (1, 1, 1, 1), (64, 3, 5, 5), (17,), (5, 11), (3, 2, 1, 4), (0, 4), (2, 0)]


def _tensors(device, dtype, g):
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype) for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_filter_norms(backend, device, dtype):
    if not backend_accepts("filter_norms", backend, dtype):
        pytest.skip(f"{backend} does not run {dtype}")
    g = torch.Generator().manual_seed(3)
    ts = _tensors(device, dtype, g)
    out = lk.filter_norms(ts)
    assert len(out) == len(ts)
    for t, n in zip(ts, out):
        assert n.dtype == torch.float32 and n.shape == (t.shape[0],) and n.device == t.device
        want = naive.filter_stats([t], [t])[0][:, 0].sqrt()
        torch.testing.assert_close(n.cpu().double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_filter_stats(backend, device, dtype):
    if not backend_accepts("filter_stats", backend, dtype):
        pytest.skip(f"{backend} does not run {dtype}")
    g = torch.Generator().manual_seed(4)
    a = _tensors(device, dtype, g)
    b = [t + 0.1 * torch.randn(t.shape, generator=g).to(device, dtype) for t in a]
    out = lk.filter_stats(a, b)
    for got, want in zip(out, naive.filter_stats(a, b)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


def test_filter_stats_large_rows(backend, device):
    """Rows longer than one block and a distance computed directly, not by cancellation."""
    a = [torch.randn(3, 5000, device=device) + 100.0]
    b = [a[0] + 1e-3]
    got = lk.filter_stats(a, b)[0]
    torch.testing.assert_close(got[:, 3].cpu().double(), torch.full((3,), 5000 * 1e-6, dtype=torch.float64),
                               rtol=2e-2, atol=0)


def test_footrule_by_hand(backend, device):
    same = torch.tensor([[3.0, 2.0, 1.0], [30.0, 20.0, 10.0]], device=device)
    assert lk.footrule_matrix([same]).abs().max().item() == 0.0
    swapped = torch.tensor([[2.0, 1.0], [1.0, 2.0]], device=device)
    m = lk.footrule_matrix([swapped])
    # ranks 1<->2 swapped: 1/1*|ln1-ln2| + 1/2*|ln2-ln1| = 1.5 ln 2
    assert m[0, 0, 1].item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert m[0, 1, 0].item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert m[0, 0, 0].item() == 0.0 and m[0, 1, 1].item() == 0.0


def test_footrule_asymmetric(backend, device):
    # a: ranking 0,1,2 ; b: ranking 2,0,1 -> F(a,b) != F(b,a)
    s = torch.tensor([[3.0, 2.0, 1.0], [2.0, 1.0, 3.0]], device=device)
    m = lk.footrule_matrix([s])[0].cpu()
    fab = 1 * abs(math.log(1) - math.log(2)) + 0.5 * abs(math.log(2) - math.log(3)) + abs(math.log(3)) / 3
    fba = 1 * abs(math.log(1) - math.log(3)) + 0.5 * abs(math.log(2) - math.log(1)) + abs(math.log(3) - math.log(2)) / 3
    assert m[0, 1].item() == pytest.approx(fab, rel=1e-6)
    assert m[1, 0].item() == pytest.approx(fba, rel=1e-6)
    assert fab != pytest.approx(fba)


def test_footrule_ties_go_to_lower_index(backend, device):
    # all-equal scores rank filters 0,1,2,...; identical to strictly decreasing scores
    ties = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]], device=device)
    m = lk.footrule_matrix([ties])[0].cpu()
    assert m[0, 1].item() == 0.0 and m[1, 0].item() == 0.0
    assert m[0, 2].item() > 0


@pytest.mark.parametrize("T,sizes", [(1, [5]), (4, [1, 7, 13]), (9, [64, 3]), (40, [17])])
def test_footrule_matrix_random(backend, device, T, sizes):
    if backend == "triton" and T * max(sizes) > 700:
        pytest.skip("Triton interpreter: small shapes only")
    g = torch.Generator().manual_seed(T)
    # coarse integer scores create many ties
    scores = [torch.randint(0, 5, (T, n), generator=g).float().to(device) for n in sizes]
    got = lk.footrule_matrix(scores)
    assert got.shape == (len(sizes), T, T) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), naive.footrule_matrix([s.cpu() for s in scores]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.8, 0.99])
def test_mask_distance_matrix(backend, device, ratio):
    g = torch.Generator().manual_seed(int(ratio * 100))
    scores = [torch.randn(6, n, generator=g).to(device) for n in (1, 10, 13)]
    scores[1][2] = scores[1][3]  # a repeated snapshot: distance 0
    got = lk.mask_distance_matrix(scores, ratio)
    want = naive.mask_distance_matrix([s.cpu() for s in scores], ratio)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-6, atol=1e-6)
    assert got[1, 2, 3].item() == 0.0


def test_mask_distance_uses_pruned_count():
    # 0.29 * 100 is 28.999... in binary; the library must still prune 29 filters
    assert lk.pruned_count(100, 0.29) == 29
    assert lk.pruned_count(10, 0.5) == 5 and lk.pruned_count(7, 0.0) == 0 and lk.pruned_count(3, 0.99) == 2
    s = torch.stack([torch.arange(100.0), torch.arange(100.0).flip(0)])
    # reversed rankings keeping 71 of 100: the kept sets differ on 2 * 29 filters
    assert lk.mask_distance_matrix([s], 0.29)[0, 0, 1].item() == pytest.approx(0.58)


def test_scores_mixed_snapshot_counts_rejected():
    with pytest.raises(ValueError, match=r"scores\[1\].*snapshots|same number of snapshots"):
        lk.footrule_matrix([torch.rand(3, 4), torch.rand(2, 4)])
