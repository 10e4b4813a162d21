"""detect_emergence on hand-made distance matrices and hand-made score sequences with known answers."""
import pytest
import torch
from torch import nn

import loft_kernels as lk
from loft_kernels.tickets import FilterTracker, detect_emergence


def _consecutive(d):
    """A [T, T] matrix whose consecutive distances M[t, t-1] are d[t-1]; other entries large."""
    T = len(d) + 1
    m = torch.full((T, T), 99.0)
    m.fill_diagonal_(0.0)
    for t in range(1, T):
        m[t, t - 1] = d[t - 1]
    return m


def test_footrule_relative_threshold_and_window():
    d = [10.0, 5.0, 3.0, 0.9, 0.8, 1.0, 0.5]  # limit 0.1 * 10 = 1.0 (inclusive)
    m = _consecutive(d)
    assert detect_emergence(m) == 6                  # d4, d5, d6 (t = 4, 5, 6) all <= 1.0
    assert detect_emergence(m, window=2) == 5
    assert detect_emergence(m, window=1) == 4
    assert detect_emergence(m, window=4) == 7
    assert detect_emergence(m, window=5) is None
    assert detect_emergence(m, threshold=0.05) is None  # limit 0.5: only d7 qualifies
    assert detect_emergence(m, threshold=0.05, window=1) == 7


def test_footrule_absolute_threshold():
    m = _consecutive([10.0, 5.0, 3.0, 2.0, 2.5, 1.0, 0.5])
    # consecutive distances at t = 1..7: 10, 5, 3, 2, 2.5, 1, 0.5
    assert detect_emergence(m, threshold=3.0, relative=False) == 5   # t = 3, 4, 5 (3 <= 3 counts)
    assert detect_emergence(m, threshold=2.0, relative=False) is None
    assert detect_emergence(m, threshold=2.0, relative=False, window=2) == 7


def test_single_quiet_snapshot_does_not_fire():
    m = _consecutive([10.0, 0.1, 8.0, 0.2, 0.3, 7.0, 0.1, 0.2, 0.3])
    assert detect_emergence(m, window=3) == 9
    assert detect_emergence(m, window=2) == 5


def test_online_calls_fire_at_the_same_snapshot():
    m = _consecutive([10.0, 5.0, 3.0, 0.9, 0.8, 1.0, 0.5, 4.0])
    fired = [detect_emergence(m[:t + 1, :t + 1]) for t in range(m.shape[0])]
    assert fired == [None] * 6 + [6, 6, 6]


def test_mask_criterion_previous_four():
    T = 8
    m = torch.full((T, T), 0.5)
    m.fill_diagonal_(0.0)
    # snapshot 5 is within 0.1 of 4, 3, 2 but not of 1; snapshot 6 is within 0.1 (inclusive) of 5, 4, 3, 2
    m[5, 4], m[5, 3], m[5, 2], m[5, 1] = 0.0, 0.05, 0.1, 0.2
    m[6, 5], m[6, 4], m[6, 3], m[6, 2] = 0.1, 0.1, 0.0, 0.1
    assert detect_emergence(m, "mask") == 6
    assert detect_emergence(m, "mask", lookback=3) == 5
    assert detect_emergence(m, "mask", mask_threshold=0.09) is None


Group = lk.FilterGroup  # (name, producer, members, consumer, n)


def _set_norms(conv, norms):
    """Give row j of conv.weight the L2 norm norms[j] (a hand-made score sequence)."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 0, 0] = torch.tensor(norms, dtype=conv.weight.dtype)


def test_tracker_footrule_fires_when_the_ranking_settles():
    model = nn.Sequential(nn.Conv2d(1, 6, 1), nn.ReLU(), nn.Conv2d(6, 1, 1))
    tracker = FilterTracker(model, [Group("g", "0", (), "2", 6)])
    sequence = [[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [6, 5, 1, 2, 3, 4],  # the ranking moves ...
                [6, 5, 1, 2, 3, 4.5], [6, 5, 1, 2, 3, 4.2], [6.5, 5, 1, 2, 3, 4], [7, 5, 1, 2, 3, 4]]  # ... then holds
    for epoch, norms in enumerate(sequence):
        _set_norms(model[0], norms)
        tracker.snapshot(epoch + 1)
    # consecutive distances: F(2,1) > 0, F(3,2) > 0, then exactly 0 from snapshot 4 on: window 3 ends at the 6th
    assert detect_emergence(tracker) == 6
    assert detect_emergence(tracker, window=1) == 4
    assert detect_emergence(tracker.footrule_matrix(reduce=True)) == 5  # a matrix gives the index


def test_tracker_mask_criterion():
    model = nn.Sequential(nn.Conv2d(1, 10, 1), nn.ReLU(), nn.Conv2d(10, 1, 1))
    tracker = FilterTracker(model, [Group("g", "0", (), "2", 10)])
    top5 = [[10, 9, 8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]  # keep {0..4} vs keep {5..9}
    swap = [10, 9, 8, 7, 5, 6, 4, 3, 2, 1]  # keep {0..3, 5}: distance 0.2 to the first
    sequence = [top5[1], top5[0], swap, top5[0], top5[0], top5[0], top5[0], top5[0]]
    for t, norms in enumerate(sequence):
        _set_norms(model[0], norms)
        tracker.snapshot(f"e{t}")
    # snapshots 4, 5, 6 each have snapshot 2 (0.2 away) among their 4 predecessors; 7 is the first without
    assert detect_emergence(tracker, "mask", ratio=0.5) == "e7"
    assert detect_emergence(tracker, "mask", ratio=0.5, mask_threshold=0.2) == "e5"


def test_bad_input():
    m = _consecutive([1.0, 0.5])
    with pytest.raises(ValueError, match="criterion must be one of"):
        detect_emergence(m, "hamming")
    with pytest.raises(ValueError, match="threshold"):
        detect_emergence(m, threshold=-1)
    with pytest.raises(TypeError, match="threshold"):
        detect_emergence(m, threshold="0.1")
    with pytest.raises(ValueError, match="window"):
        detect_emergence(m, window=0)
    with pytest.raises(ValueError, match="source must be a square"):
        detect_emergence(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="source must be 2-D"):
        detect_emergence(torch.zeros(2, 3, 3))
    with pytest.raises(TypeError, match="source must be a torch.Tensor"):
        detect_emergence([[0.0]])
    with pytest.raises(ValueError, match="NaN"):
        detect_emergence(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="ratio applies only"):
        detect_emergence(m, "mask", ratio=0.5)
    tracker = FilterTracker(nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 1, 1)), [Group("g", "0", (), "1", 4)])
    tracker.snapshot(0)
    with pytest.raises(ValueError, match="ratio is required"):
        detect_emergence(tracker, "mask")


def test_engine_judges_every_kth_snapshot_like_a_tracker_of_those_snapshots():
    """emergence_epochs(..., every=k) on epochs 0..T equals both criteria on a tracker that holds only the
    snapshots of epochs 0, k, 2k, ... (a run of k times the epochs, judged on the grid of the shorter one)."""
    from loft_kernels.engine.pretrain import emergence_epochs
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 10, 1), nn.ReLU(), nn.Conv2d(10, 1, 1))
    groups = [Group("g", "0", (), "2", 10)]
    every, sparse = FilterTracker(model, groups), FilterTracker(model, groups)
    norms = torch.rand(10, generator=gen)
    for epoch in range(25):  # the ranking moves less and less
        norms = norms + torch.rand(10, generator=gen) / (1 + epoch) ** 2
        _set_norms(model[0], norms.tolist())
        every.snapshot(epoch)
        if epoch % 3 == 0:
            sparse.snapshot(epoch)
    opts = {"mask_ratio": 0.5, "footrule_threshold": 0.3, "footrule_window": 2}
    want = {"footrule": detect_emergence(sparse, "footrule", threshold=0.3, window=2),
            "mask": detect_emergence(sparse, "mask", ratio=0.5)}
    assert want["footrule"] is not None and want["footrule"] % 3 == 0
    assert emergence_epochs(every, {**opts, "every": 3}) == want
    assert emergence_epochs(every, opts) == emergence_epochs(every, {**opts, "every": 1})
