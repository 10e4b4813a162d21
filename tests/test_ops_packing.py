"""pack_rows / unpack_rows on every backend against index_select + cat."""
import itertools

import pytest
import torch
from conftest import backend_accepts

import loft_kernels as lk


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


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "views"])
def test_unpack_rows_into_one_tensor_twice_writes_as_a_loop_over_the_entries(backend, device, layout):
    base = torch.zeros(4, 3, 2, 2, device=device)
    if layout == "channels_last":  # dim 0 cannot be strided through in this layout: a copy, written back
        base = base.contiguous(memory_format=torch.channels_last)
    targets = [base, base] if layout != "views" else [base, base[1:]]
    rows = [torch.tensor([1, 3], device=device), torch.tensor([2, 0], device=device)]
    dims = [0, 1]
    flat = torch.randn(2 * 12 + targets[1].shape[0] * 2 * 4, device=device)
    expected = base.clone()
    expected_targets = [expected, expected] if layout != "views" else [expected, expected[1:]]
    start = 0
    for t, r, d in zip(expected_targets, rows, dims):  # the reference: one entry after another
        block = t.index_select(d, r)
        t.index_copy_(d, r, flat[start:start + block.numel()].view_as(block))
        start += block.numel()
    lk.unpack_rows(flat, targets, rows, dims)
    assert torch.equal(base, expected)


def test_unpack_into_parameters_under_grad_mode(backend, device):
    p = torch.nn.Parameter(torch.randn(4, 3, device=device))
    lk.unpack_rows(torch.ones(3, device=device), [p], [torch.tensor([2], device=device)])
    assert bool((p.data[2] == 1).all())


def _self_overlapping(device):
    return torch.zeros(1, 3, device=device).expand(8, 3)  # 8 rows, one row of memory


def test_unpack_rows_rejects_self_overlapping_destination(backend, device):
    t = _self_overlapping(device)
    with pytest.raises(ValueError, match=r"tensors\[1\] has elements that share memory"):
        lk.unpack_rows(torch.ones(9, device=device), [torch.zeros(4, 3, device=device), t],
                       [torch.tensor([0], device=device), torch.tensor([1, 2], device=device)])
    assert bool((t == 0).all())


def test_unpack_rows_kernel_rejects_self_overlapping_destination_without_the_python_checks(backend, device):
    """The registered op itself (what a compiled graph calls) refuses the write on every backend."""
    t = _self_overlapping(device)
    with pytest.raises((RuntimeError, ValueError), match="(share memory|more than one element)"):
        torch.ops.loft_kernels.unpack_rows(torch.ones(6, device=device), [t],
                                           [torch.tensor([1, 2], device=device)], [0])
    assert bool((t == 0).all())


def test_pack_rows_reads_a_self_overlapping_source(backend, device):
    t = torch.arange(3.0, device=device).expand(8, 3)
    i = torch.tensor([6, 1], device=device)
    assert torch.equal(lk.pack_rows([t], [i]), t.index_select(0, i).reshape(-1))


@pytest.mark.parametrize("shape,strides", [((8, 3), (0, 1)), ((4, 3), (1, 4)), ((3, 3), (1, 1)), ((2, 3), (3, 2)),
                                           ((2, 2, 2), (4, 1, 2)), ((3, 2), (2, 3)), ((5,), (2,)), ((0, 4), (0, 1))])
def test_internal_overlap_matches_counting_offsets(shape, strides):
    from loft_kernels._checks import has_internal_overlap
    t = torch.zeros(64).as_strided(shape, strides)
    offsets = [sum(i * s for i, s in zip(ix, strides)) for ix in itertools.product(*map(range, shape))]
    assert has_internal_overlap(t) == (len(set(offsets)) < len(offsets))


def test_unpack_rows_refuses_a_flat_or_an_index_that_shares_memory_with_a_destination(backend, device):
    """The kernels would read what they have already written (an index read while its own storage is written
    crashed the cpu backend; a flat overlapping its destination wrote already-overwritten rows)."""
    t = torch.zeros(4, dtype=torch.int64, device=device)
    t[0], t[1] = 1, 2
    with pytest.raises(ValueError, match=r"indices\[0\] shares memory with tensors\[0\]"):
        lk.unpack_rows(torch.tensor([10 ** 12, 7], device=device), [t], [t[:2]], [0])
    dst = torch.arange(12.0, device=device).view(4, 3)
    with pytest.raises(ValueError, match=r"flat shares memory with tensors\[0\]"):
        lk.unpack_rows(dst.view(-1)[0:6], [dst], [torch.tensor([1, 2], device=device)], [0])


def test_unpack_rows_into_overlapping_tensors_of_different_storages_writes_as_a_loop(backend, device):
    """Two tensors over one numpy array have different storages but share memory: written one after another."""
    np = pytest.importorskip("numpy")
    if device.type != "cpu":
        pytest.skip("numpy arrays live on the CPU")
    arr = np.zeros((4, 3, 4))
    a, b = torch.from_numpy(arr), torch.from_numpy(arr[:, :, 1:3])
    flat = torch.arange(1.0, 19.0, dtype=torch.float64)
    lk.unpack_rows(flat, [a, b], [torch.tensor([0]), torch.tensor([1])], [0, 0])
    expected = torch.zeros(4, 3, 4, dtype=torch.float64)
    expected[0] = flat[:12].view(3, 4)
    expected[1, :, 1:3] = flat[12:].view(3, 2)
    assert torch.equal(a, expected)


def test_unpack_rows_runs_on_fake_tensors():
    """Fake tensors have no memory to compare (they report a null data pointer)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        t = torch.zeros(4, 3)
        lk.unpack_rows(torch.zeros(3), [t], [torch.tensor([1])])
