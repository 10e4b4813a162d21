"""lk.partition: the per-round filter ownership every worker computes without communication."""
import pytest
import torch

import loft_kernels as lk
from loft_kernels.training.partition import check_groups, owned_count


def groups_of(*sizes):
    return [lk.FilterGroup(f"g{i}", f"g{i}", (), f"h{i}", n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("n,workers", [(8, 4), (13, 4), (6, 4), (7, 3), (5, 5), (9, 1), (64, 2)])
def test_disjoint_cover_sizes_sorted(n, workers):
    (g,) = groups_of(n)
    for rnd in range(3):
        parts = lk.partition([g], workers, seed=3, round=rnd)[g.name]
        assert len(parts) == workers
        for s, p in enumerate(parts):
            assert p.dtype == torch.int64 and p.dim() == 1
            assert torch.equal(p, p.sort().values)
            # round-robin dealing: worker s gets n//S or n//S + 1, the first n % S workers the extra one
            assert p.numel() == n // workers + (1 if s < n % workers else 0) == owned_count(n, workers, s)
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))


def test_deterministic_and_varies_with_seed_and_round():
    gs = groups_of(40, 50)
    a = lk.partition(gs, 4, seed=1, round=2)
    b = lk.partition(gs, 4, seed=1, round=2)
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name]))
    for other in (lk.partition(gs, 4, seed=2, round=2), lk.partition(gs, 4, seed=1, round=3)):
        # 40! / (10!)^4 possible splits: equal by chance essentially never
        assert any(not torch.equal(x, y) for name in a for x, y in zip(a[name], other[name]))


def test_group_partition_independent_of_other_groups_and_order():
    g0, g1 = groups_of(12, 20)
    both = lk.partition([g0, g1], 3, seed=5, round=1)
    alone = lk.partition([g1], 3, seed=5, round=1)
    reordered = lk.partition([g1, g0], 3, seed=5, round=1)
    for x, y, z in zip(both[g1.name], alone[g1.name], reordered[g1.name]):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_ownership_is_uniform_over_rounds():
    # each filter lands on each worker with probability 1/S; 400 rounds of n=8, S=4: expected 100 per cell
    (g,) = groups_of(8)
    counts = torch.zeros(8, 4)
    for rnd in range(400):
        for s, p in enumerate(lk.partition([g], 4, seed=0, round=rnd)[g.name]):
            counts[p, s] += 1
    assert counts.sum() == 400 * 8
    assert counts.min() > 60 and counts.max() < 140  # ~4 standard deviations either side


def test_bad_input():
    gs = groups_of(4, 3)
    with pytest.raises(ValueError, match="fewer filters than workers"):
        lk.partition(gs, 4, 0, 0)
    with pytest.raises(ValueError, match="workers"):
        lk.partition(gs, 0, 0, 0)
    with pytest.raises(TypeError, match="workers"):
        lk.partition(gs, 2.0, 0, 0)
    with pytest.raises(ValueError, match="round"):
        lk.partition(gs, 2, 0, -1)
    with pytest.raises(TypeError, match="seed"):
        lk.partition(gs, 2, "0", 0)
    with pytest.raises(TypeError, match="groups"):
        lk.partition(gs[0], 2, 0, 0)
    with pytest.raises(TypeError, match="groups"):
        lk.partition(["g0"], 2, 0, 0)
    with pytest.raises(ValueError, match="groups"):
        lk.partition([], 2, 0, 0)
    with pytest.raises(ValueError, match="duplicate"):
        lk.partition([gs[0], gs[0]], 2, 0, 0)


def test_check_groups_is_the_group_record_validation():
    a = lk.FilterGroup("a", "conv1", (lk.Member("dw", "depthwise"), "bn"), "conv2", 4)
    b = lk.FilterGroup("b", "conv2", (), "conv3", 4)
    assert check_groups([a, b], 4) == [a, b]  # conv2 is a's consumer and b's producer: different sides
    with pytest.raises(ValueError, match="output channels in both group"):
        check_groups([a, lk.FilterGroup("c", "x", ("bn",), "y", 4)], 2)
    with pytest.raises(ValueError, match="fewer filters than workers=5"):
        check_groups([a], 5)
    with pytest.raises(TypeError, match=r"groups\[0\] must be a FilterGroup"):
        check_groups([("a", "conv1")], 2)
