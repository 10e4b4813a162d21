"""FilterTracker against plainly computed norms, footrules and mask distances (tests/naive.py)."""
import dataclasses
import math

import pytest
import torch
from naive import footrule
from naive import mask_distance_matrix as naive_mask_matrix
from torch import nn

import loft_kernels as lk
from loft_kernels.tickets import FilterTracker

Group = lk.FilterGroup  # (name, producer, members, consumer, n)


def _model():
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 9, 3), nn.ReLU(),
                         nn.Conv2d(9, 2, 1))


GROUPS = [Group("a", "0", ("1",), "3", 6), Group("b", "3", (), "5", 9)]


def _plain_norms(w):
    return [math.sqrt(sum(v * v for v in w[j].detach().double().flatten().tolist())) for j in range(w.shape[0])]


def _tracked(T=5, seed=0):
    """A tracker with T snapshots of randomly perturbed weights, plus the per-group score history."""
    model = _model()
    tracker = FilterTracker(model, GROUPS)
    g = torch.Generator().manual_seed(seed)
    history = {"a": [], "b": []}
    for t in range(T):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        tracker.snapshot(t * 10)
        history["a"].append(_plain_norms(model[0].weight))
        history["b"].append(_plain_norms(model[3].weight))
    return tracker, history


def test_snapshot_records_row_norms_only():
    tracker, history = _tracked(T=3)
    assert tracker.tags == [0, 10, 20] and len(tracker) == 3
    for t, tag in enumerate(tracker.tags):
        s = tracker.scores(tag)
        assert set(s) == {"a", "b"} and s["a"].dtype == torch.float32 and s["a"].device.type == "cpu"
        torch.testing.assert_close(s["a"].double(), torch.tensor(history["a"][t], dtype=torch.float64))
        torch.testing.assert_close(s["b"].double(), torch.tensor(history["b"][t], dtype=torch.float64))
    # only [T, n] score tensors are stored, never weights
    state = tracker.state_dict()
    assert [tuple(s.shape) for s in state["scores"]] == [(3, 6), (3, 9)]


def test_scores_are_copies_not_views():
    model = _model()
    tracker = FilterTracker(model, GROUPS)
    tracker.snapshot("init")
    before = tracker.scores("init")["a"].clone()
    with torch.no_grad():
        model[0].weight.mul_(2)
    tracker.scores("init")["a"].zero_()  # mutating the returned copy changes nothing
    assert torch.equal(tracker.scores("init")["a"], before)


def test_footrule_to_matches_naive():
    tracker, history = _tracked(T=5)
    series = tracker.footrule_to(40)
    assert series.tags == [0, 10, 20, 30, 40]
    for name in ("a", "b"):
        want = [footrule(history[name][t], history[name][4]) for t in range(5)]
        torch.testing.assert_close(series.per_group[name].double(), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(series.total, series.per_group["a"] + series.per_group["b"])
    assert float(series.total[4]) == 0.0


def test_footrule_matrix_matches_naive():
    tracker, history = _tracked(T=4)
    m = tracker.footrule_matrix()
    assert m.shape == (2, 4, 4)
    for gi, name in enumerate(("a", "b")):
        for a in range(4):
            for b in range(4):
                assert float(m[gi, a, b]) == pytest.approx(footrule(history[name][a], history[name][b]), abs=1e-5)
    torch.testing.assert_close(tracker.footrule_matrix(reduce=True), m.sum(0))


def test_mask_distance_matrix_matches_naive():
    tracker, history = _tracked(T=4, seed=3)
    m = tracker.mask_distance_matrix(0.5)
    want = naive_mask_matrix([torch.tensor(history["a"]), torch.tensor(history["b"])], 0.5)
    torch.testing.assert_close(m.double(), want, rtol=0, atol=1e-6)
    # model level: fraction of all 6 + 9 filters whose keep bit differs
    torch.testing.assert_close(tracker.mask_distance_matrix(0.5, reduce=True).double(),
                               (6 * want[0] + 9 * want[1]) / 15, rtol=0, atol=1e-6)


def test_mask_distance_of_a_grouped_conv_group_compares_the_tickets_masks():
    """A group feeding a grouped conv keeps its top filters per conv group: the mask compared is the ticket's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2))
    groups = lk.find_filter_groups(model, torch.randn(1, 3, 5, 5))
    assert [(g.n, g.conv_groups) for g in groups] == [(8, 2)]
    tracker = FilterTracker(model, groups)
    masks = []
    for t in range(4):
        with torch.no_grad():
            model[0].weight.normal_()
        tracker.snapshot(t)
        keep = torch.zeros(8, dtype=torch.bool)
        keep[lk.tickets.select_filters(tracker.scores(t), groups, 0.5)[groups[0].name]] = True
        masks.append(keep)
    want = torch.tensor([[float((a != b).float().mean()) for b in masks] for a in masks])
    torch.testing.assert_close(tracker.mask_distance_matrix(0.5)[0].double(), want.double(), rtol=0, atol=1e-6)


def test_state_dict_roundtrip_through_checkpoint(tmp_path):
    tracker, _ = _tracked(T=3)
    lk.atomic_save(tracker.state_dict(), tmp_path / "tracker.pt")
    fresh = FilterTracker(_model(), GROUPS)
    fresh.load_state_dict(lk.load_checkpoint(tmp_path / "tracker.pt"))  # weights_only=True
    assert fresh.tags == tracker.tags
    assert torch.equal(fresh.footrule_matrix(), tracker.footrule_matrix())
    fresh.snapshot(30)  # and it keeps recording
    assert fresh.tags == [0, 10, 20, 30]
    other = FilterTracker(_model(), GROUPS[:1])
    with pytest.raises(ValueError, match="saved for groups"):
        other.load_state_dict(tracker.state_dict())


def test_works_with_found_groups_after_convert():
    model = lk.get_model("preact_resnet", depths=(1, 1), num_classes=3, in_channels=1, width=0.25)
    x = torch.randn(2, 1, 8, 8)
    model, groups = lk.convert(model, x)
    tracker = FilterTracker(model, groups)
    tracker.snapshot(0)
    for g in groups:
        w = model.get_submodule(g.conv_a).weight
        torch.testing.assert_close(tracker.scores(0)[g.name].double(), torch.tensor(_plain_norms(w),
                                                                                    dtype=torch.float64))


def test_bad_input():
    model = _model()
    tracker = FilterTracker(model, GROUPS)
    tracker.snapshot(1)
    with pytest.raises(ValueError, match="tag 1 was already recorded"):
        tracker.snapshot(1)
    with pytest.raises(TypeError, match="tag must be an int or a str"):
        tracker.snapshot(1.5)
    with pytest.raises(ValueError, match="tag 7 is not a recorded snapshot"):
        tracker.scores(7)
    with pytest.raises(ValueError, match="ratio"):
        tracker.mask_distance_matrix(1.0)
    with pytest.raises(TypeError, match="reduce"):
        tracker.footrule_matrix(reduce="yes")
    with pytest.raises(TypeError, match="model"):
        FilterTracker("model", GROUPS)
    with pytest.raises(ValueError, match="groups must not be empty"):
        FilterTracker(model, [])
    with pytest.raises(ValueError, match="has 6 output channels"):
        FilterTracker(model, [dataclasses.replace(GROUPS[0], n=5)])
    with pytest.raises(ValueError, match="duplicate group name 'a'"):
        FilterTracker(model, [GROUPS[0], dataclasses.replace(GROUPS[1], name="a")])
    with pytest.raises(TypeError, match="state must be a dict"):
        tracker.load_state_dict([1])


def _two_groups():
    """Groups of 5 and 15 filters (conv a -> b -> c)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 5, 1), nn.ReLU(), nn.Conv2d(5, 15, 1), nn.ReLU(), nn.Conv2d(15, 2, 1))
    return model, lk.find_filter_groups(model, torch.randn(1, 1, 2, 2))


def test_a_model_level_mask_distance_of_exactly_one_tenth_fires_a_one_tenth_criterion():
    """2 of 20 filters differing is float32(0.1) exactly (it was summed from rounded per-group distances)."""
    model, groups = _two_groups()
    tracker = FilterTracker(model, groups)
    with torch.no_grad():
        model[2].weight.copy_(torch.arange(1.0, 16.0).view(15, 1, 1, 1))  # distinct norms: a clear ranking
        for tag in range(4):
            tracker.snapshot(tag)
        model[2].weight[[6, 7]] = model[2].weight[[7, 6]].clone()  # filters 6 and 7 swap across the cut
        tracker.snapshot(4)
    m = tracker.mask_distance_matrix(0.5, reduce=True)
    per_group = tracker.mask_distance_matrix(0.5)
    assert per_group[1, 4, 3] == torch.tensor(2 / 15, dtype=torch.float32)
    assert m[4, 3] == torch.tensor(0.1, dtype=torch.float32)
    assert lk.detect_emergence(tracker, "mask", ratio=0.5) == 4


def test_a_diverged_snapshot_is_refused_by_name():
    model, groups = _two_groups()
    tracker = FilterTracker(model, groups)
    tracker.snapshot(0)
    with torch.no_grad():
        model[2].weight[3] = float("nan")
    with pytest.raises(lk.tickets.TrainingDiverged, match="snapshot 1: the weights of group '2' hold NaN"):
        tracker.snapshot(1)
    assert tracker.tags == [0]  # the tracker stays usable
    assert tracker.footrule_matrix(reduce=True).shape == (1, 1)


@pytest.mark.parametrize("n, ratio, pruned", [(100, 0.29, 29), (10, 0.3, 3), (1, 0.999, 0), (1, 1 - 1e-9, 0),
                                              (7, 1 - 1e-10, 6), (10, 0.29999999995, 2), (96, 0.93, 89),
                                              (3, 1 / 3, 1), (3, 2 / 3, 2), (7, 3 / 7, 3), (6, 1 / 6, 1)])
def test_pruned_count_is_the_floor_of_ratio_times_n(n, ratio, pruned):
    assert lk.pruned_count(n, ratio) == pruned
