"""pack_rows / unpack_rows on every backend against index_select + cat."""
import pytest
import torch

import loft_kernels as lk
from conftest import backend_accepts


def _case(device, dtype, g):
    shapes = [(13, 7, 3, 3), (13,), (5, 13, 2), (4, 3, 5, 1), (1, 1)]
    dims = [0, 0, 1, -2, 1]
    ts = [(torch.randn(*s, generator=g) * 10).to(dtype).to(device) for s in shapes]
    idx = []
    for t, d in zip(ts, dims):
        n = t.shape[d]
        idx.append(torch.randperm(n, generator=g)[: int(torch.randint(1, n + 1, (1,), generator=g))].to(device))
    return ts, idx, dims


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_pack_unpack_roundtrip(backend, device, dtype):
    if not backend_accepts("pack_rows", backend, dtype):
        pytest.skip(f"{backend} does not pack {dtype}")
    g = torch.Generator().manual_seed(7)
    ts, idx, dims = _case(device, dtype, g)
    flat = lk.pack_rows(ts, idx, dims)
    want = torch.cat([t.index_select(d, i).reshape(-1) for t, i, d in zip(ts, idx, dims)])
    assert flat.dtype == dtype and flat.is_contiguous()
    assert torch.equal(flat, want)
    # write back into zeroed copies: exactly the selected rows come back, the rest stay zero
    targets = [torch.zeros_like(t) for t in ts]
    lk.unpack_rows(flat, targets, idx, dims)
    for t, z, i, d in zip(ts, targets, idx, dims):
        expect = torch.zeros_like(t).index_copy_(d, i, t.index_select(d, i))
        assert torch.equal(z, expect)


def test_pack_default_dims_and_noncontiguous(backend, device):
    base = torch.randn(6, 8, device=device)
    t = base.t()  # non-contiguous [8, 6]
    i = torch.tensor([7, 0, 3], device=device)
    flat = lk.pack_rows([t], [i])
    assert torch.equal(flat, t[i].reshape(-1))
    lk.unpack_rows(flat * 2, [t], [i])
    assert torch.equal(base.t()[i], flat.view(3, 6) * 2)


def test_unpack_rows_leaves_other_rows_bit_identical(backend, device):
    t = torch.randn(10, 4, device=device)
    before = t.clone()
    i = torch.tensor([1, 5], device=device)
    lk.unpack_rows(torch.zeros(8, device=device), [t], [i])
    keep = torch.ones(10, dtype=torch.bool)
    keep[[1, 5]] = False
    assert torch.equal(t[keep.to(device)], before[keep.to(device)])
    assert bool((t[i] == 0).all())


def test_unpack_into_parameters_under_grad_mode(backend, device):
    p = torch.nn.Parameter(torch.randn(4, 3, device=device))
    lk.unpack_rows(torch.ones(3, device=device), [p], [torch.tensor([2], device=device)])
    assert bool((p.data[2] == 1).all())
