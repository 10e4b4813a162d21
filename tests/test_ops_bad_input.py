"""Every public kernel function rejects bad input with a message naming the argument."""
import pytest
import torch

import loft_kernels as lk
from loft_kernels import _checks

x, w, b = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(5)
i = torch.tensor


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(4, 6)), ValueError, "x must be 3-D or 4-D"),
    (dict(x=torch.randint(0, 3, (2, 4, 6, 6))), TypeError, "x must be a floating tensor"),
    (dict(weight=torch.randn(5, 4, 3)), ValueError, "weight must be 4-D"),
    (dict(weight=w.double()), TypeError, "weight has dtype torch.float64 but x has torch.float32"),
    (dict(weight=w.to("meta")), ValueError, "weight is on meta but x is on cpu"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have 5 entries"),
    (dict(bias=torch.randn(5, 1)), ValueError, "bias must be 1-D"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
    (dict(stride=2 ** 64), ValueError, r"stride must be <= 2\*\*63 - 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(padding="full"), ValueError, "padding must be an int, a pair of ints, 'same' or 'valid'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' requires stride 1"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(groups=0), ValueError, "groups must be >= 1"),
    (dict(groups=2, out_index=i([0])), ValueError, "groups > 1 together with out_index/in_index"),
    (dict(out_index=i([0, 5])), ValueError, "out_index has entry 5, out of range"),
    (dict(out_index=i([-1, 2])), ValueError, "out_index has a negative entry"),
    (dict(out_index=i([1, 1])), ValueError, "out_index has duplicate entries"),
    (dict(out_index=i([[1, 2]])), ValueError, "out_index must be 1-D"),
    (dict(out_index=i([1.0, 2.0])), TypeError, "out_index must have an integer dtype"),
    (dict(out_index=i([], dtype=torch.long)), ValueError, "out_index must not be empty"),
    (dict(out_index=[0, 1]), TypeError, "out_index must be a torch.Tensor"),
    (dict(out_index=i([0]).to("meta")), ValueError, "out_index is on meta but must be on cpu"),
    (dict(in_index=i([0, 1])), ValueError, r"x must have 2 channels \(len\(in_index\)\), got 4"),
    (dict(x=torch.randn(2, 3, 6, 6)), ValueError, r"x must have 4 channels"),
    (dict(x=torch.randn(2, 4, 1, 1)), ValueError, "smaller than the dilated kernel"),
])
def test_partial_conv2d_bad_input(kwargs, exc, match):
    args = dict(x=x, weight=w, bias=b)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lk.partial_conv2d(**args)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(2, 4, 6, 6)), ValueError, "x must be 5-D"),
    (dict(x=torch.randn(0, 2, 4, 6, 6)), ValueError, "at least one group"),
    (dict(out_index=i([0, 1])), ValueError, "out_index must be 2-D"),
    (dict(out_index=i([[0, 1], [1, 2], [0, 3]])), ValueError, r"out_index must have one row per group \(2\)"),
    (dict(out_index=i([[0, 0], [1, 2]])), ValueError, "out_index has duplicate entries; .* per row"),
    (dict(out_index=torch.zeros(0, 2, dtype=torch.long)), ValueError, r"out_index must not be empty, got shape \(0, 2\)"),
    (dict(in_index=i([[0, 9], [1, 2]])), ValueError, "in_index has entry 9, out of range"),
    (dict(in_index=i([[0, 1], [1, 2]])), ValueError, r"x must have 2 channels \(in_index.shape\[1\]\)"),
    (dict(bias=b.double()), TypeError, "bias has dtype"),
])
def test_grouped_partial_conv2d_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(2, 3, 4, 6, 6), weight=w, bias=b)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lk.grouped_partial_conv2d(**args)


@pytest.mark.parametrize("fn", [lk.filter_norms, lambda t: lk.filter_stats(t, t)])
@pytest.mark.parametrize("tensors,exc,match", [
    ([], ValueError, "must not be empty"),
    (torch.randn(3, 3), TypeError, "must be a list of tensors"),
    ([torch.randn(3), "w"], TypeError, r"\[1\] must be a torch.Tensor"),
    ([torch.tensor(1.0)], ValueError, r"\[0\] must have at least 1 dimension"),
    ([torch.randint(0, 2, (3, 3))], TypeError, r"\[0\] must be a floating tensor"),
    ([torch.randn(3), torch.randn(3).double()], TypeError, r"\[1\] has dtype torch.float64"),
    ([torch.randn(3), torch.randn(3, device="meta")], ValueError, r"\[1\] is on meta"),
])
def test_filter_statistics_bad_input(fn, tensors, exc, match):
    with pytest.raises(exc, match=match):
        fn(tensors)


def test_filter_stats_mismatched_lists():
    with pytest.raises(ValueError, match="a and b must have the same length"):
        lk.filter_stats([torch.randn(3)], [torch.randn(3), torch.randn(2)])
    with pytest.raises(ValueError, match=r"a\[0\] and b\[0\] must have the same shape"):
        lk.filter_stats([torch.randn(3, 2)], [torch.randn(3, 3)])
    with pytest.raises(TypeError, match=r"b\[0\] has dtype"):
        lk.filter_stats([torch.randn(3)], [torch.randn(3).double()])


@pytest.mark.parametrize("fn", [lk.footrule_matrix, lambda s: lk.mask_distance_matrix(s, 0.5)])
@pytest.mark.parametrize("scores,exc,match", [
    ([], ValueError, "scores must not be empty"),
    (torch.randn(3, 3), TypeError, "scores must be a list of tensors"),
    ([torch.randn(3)], ValueError, r"scores\[0\] must be 2-D"),
    ([torch.randn(0, 3)], ValueError, r"scores\[0\] must have at least one snapshot"),
    ([torch.randn(3, 4), torch.randn(2, 4)], ValueError, "same number of snapshots"),
    ([torch.tensor([[1.0, float("nan")]])], ValueError, r"scores\[0\] contains NaN"),
    ([torch.randint(0, 3, (2, 3))], TypeError, r"scores\[0\] must be a floating tensor"),
])
def test_ranking_bad_input(fn, scores, exc, match):
    with pytest.raises(exc, match=match):
        fn(scores)


@pytest.mark.parametrize("ratio,exc", [(1.0, ValueError), (-0.1, ValueError), ("0.5", TypeError),
                                       (True, TypeError), (float("nan"), ValueError)])
def test_mask_distance_bad_ratio(ratio, exc):
    with pytest.raises(exc, match="ratio"):
        lk.mask_distance_matrix([torch.randn(2, 4)], ratio)


@pytest.mark.parametrize("args,exc,match", [
    (([], []), ValueError, "tensors must not be empty"),
    (([torch.randn(3)], [i([0]), i([1])]), ValueError, r"indices must have one entry per tensor \(1\)"),
    (([torch.randn(3)], i([0])), TypeError, "indices must be a list"),
    (([torch.randn(3)], [i([3])]), ValueError, r"indices\[0\] has entry 3, out of range"),
    (([torch.randn(3)], [i([1, 1])]), ValueError, r"indices\[0\] has duplicate"),
    (([torch.randn(3)], [i([[1]])]), ValueError, r"indices\[0\] must be 1-D"),
    (([torch.randn(3)], [i([0])], [1]), ValueError, r"dims\[0\] = 1 is out of range"),
    (([torch.randn(3)], [i([0])], [0, 0]), ValueError, "dims must have one entry per tensor"),
    (([torch.randn(3)], [i([0])], 0), TypeError, "dims must be None or a list"),
    (([torch.randn(3), torch.randn(3).double()], [i([0]), i([0])]), TypeError, r"tensors\[1\] has dtype"),
    (([torch.tensor(2.0)], [i([0])]), ValueError, r"tensors\[0\] must have at least 1 dimension"),
])
def test_pack_rows_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        lk.pack_rows(*args)


def test_unpack_rows_bad_input():
    t = [torch.randn(4, 2)]
    with pytest.raises(ValueError, match="flat must have 4 elements"):
        lk.unpack_rows(torch.randn(5), t, [i([0, 1])])
    with pytest.raises(TypeError, match="flat has dtype"):
        lk.unpack_rows(torch.randn(4).double(), t, [i([0, 1])])
    with pytest.raises(ValueError, match="flat must be 1-D"):
        lk.unpack_rows(torch.randn(2, 2), t, [i([0, 1])])
    with pytest.raises(TypeError, match="flat must be a torch.Tensor"):
        lk.unpack_rows([0.0] * 4, t, [i([0, 1])])


def test_pruned_count_is_total():
    assert [lk.pruned_count(10, r) for r in (0.0, 0.1, 0.55, 0.99)] == [0, 1, 5, 9]


def test_pruned_count_bad_input():
    with pytest.raises(ValueError, match="n must be >= 0"):
        lk.pruned_count(-1, 0.5)
    with pytest.raises(TypeError, match="n must be an int"):
        lk.pruned_count(3.0, 0.5)
    with pytest.raises(ValueError, match="ratio must lie in"):
        lk.pruned_count(3, 1.5)


@pytest.mark.parametrize("size", [8, 3 * _checks._SMALL_INDEX])  # checked as Python ints / with tensor ops
@pytest.mark.parametrize("ndim", [1, 2])
def test_index_check_small_and_large_sets_agree(size, ndim):
    good = torch.stack([torch.randperm(size)[: size // 2] for _ in range(2)])  # rows distinct, overlapping
    good = good if ndim == 2 else good[0]
    cpu = torch.device("cpu")
    assert torch.equal(_checks.index(good.int(), "idx", size, cpu, ndim=ndim), good)

    def broken(fn):
        t = good.clone()
        fn(t.view(-1, t.shape[-1]))
        return t

    def dup(f):
        f[-1, 1] = f[-1, 0]
    per_row = " per row" if ndim == 2 else ""
    with pytest.raises(ValueError, match=f"idx has duplicate entries; each index must appear at most once{per_row}$"):
        _checks.index(broken(dup), "idx", size, cpu, ndim=ndim)
    assert torch.equal(_checks.index(broken(dup), "idx", size, cpu, ndim=ndim, distinct=False), broken(dup))
    with pytest.raises(ValueError, match=r"idx has a negative entry \(-1\)"):
        _checks.index(broken(lambda f: f[0].__setitem__(-1, -1)), "idx", size, cpu, ndim=ndim)
    with pytest.raises(ValueError, match=f"idx has entry {size}, out of range for size {size}"):
        _checks.index(broken(lambda f: f[-1].__setitem__(-1, size)), "idx", size, cpu, ndim=ndim)
