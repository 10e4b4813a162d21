"""prune / rewind / count_params_flops / inference_speedup against masked originals and hand counts."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loft_kernels as lk
from loft_kernels.tickets import count_params_flops, inference_speedup, prune, rewind, select_filters

Group = lk.FilterGroup  # (name, producer, members, consumer, n)


class Net(nn.Module):
    """stem -> [c1 -> bn1 -> relu] -> block(c2 -> bn2 -> relu -> c3) -> pool -> head.

    Groups: c1 (conv_b = block.0) and block.0 (conv_b = block.3): a VGG-style
    chain, block.0 is conv_b of one group and conv_a of the next.
    """

    def __init__(self, c1=7, c2=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.c1 = nn.Conv2d(6, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.block = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
                                   nn.Conv2d(c2, 4, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn1(self.c1(x)))
        return self.head(self.block(x).mean((2, 3)))


GROUPS = [Group("c1", "c1", ("bn1",), "block.0", 7), Group("block.0", "block.0", ("block.1",), "block.3", 5)]


def _randomise(model):
    """Non-trivial BN statistics and affine parameters, so eval outputs depend on every channel."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def _net(**kw):
    return _randomise(Net(**kw)).eval()


def _expected_kept(weight, ratio):
    """Plain python: rank rows by L2 norm (descending, ties to lower index), keep n - floor(ratio n)."""
    n = weight.shape[0]
    norms = [float(weight[j].detach().double().pow(2).sum().sqrt()) for j in range(n)]
    order = sorted(range(n), key=lambda j: (-norms[j], j))
    keep = n - int(ratio * n + 1e-9)
    return sorted(order[:keep])


def _masked(model, groups, kept):
    """The original with the removed filters zeroed: conv_a rows and bias, norm affine parameters."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for g in groups:
            drop = [j for j in range(g.n) if j not in set(kept[g.name])]
            conv = m.get_submodule(g.conv_a)
            conv.weight[drop] = 0
            if conv.bias is not None:
                conv.bias[drop] = 0
            for name in g.norms:
                m.get_submodule(name).weight[drop] = 0
                m.get_submodule(name).bias[drop] = 0
    return m


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.8])
def test_pruned_equals_masked_original(ratio):
    model, x = _net(), torch.randn(4, 3, 9, 9)
    before = copy.deepcopy(model.state_dict())
    pruned, kept = prune(model, GROUPS, ratio)
    for g in GROUPS:
        assert kept[g.name].tolist() == _expected_kept(model.get_submodule(g.conv_a).weight, ratio)
        assert kept[g.name].dtype == torch.int64
    k1, k2 = len(kept["c1"]), len(kept["block.0"])
    assert pruned.c1.weight.shape == (k1, 6, 3, 3) and pruned.c1.bias.shape == (k1,)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(pruned.bn1, name).shape == (k1,)
        assert torch.equal(getattr(pruned.bn1, name), getattr(model.bn1, name)[kept["c1"]])
    assert pruned.block[0].weight.shape == (k2, k1, 3, 3)
    assert torch.equal(pruned.block[0].weight, model.block[0].weight[kept["block.0"]][:, kept["c1"]])
    assert pruned.block[3].weight.shape == (4, k2, 1, 1)
    assert pruned.bn1.num_features == k1 and pruned.block[0].in_channels == k1 and pruned.block[3].in_channels == k2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _masked(model, GROUPS, {k: v.tolist() for k, v in kept.items()})(x),
                                   rtol=1e-5, atol=1e-5)
    # the input model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.c1.weight.shape[0] == 7 and model.block[0] is not pruned.block[0]


def test_ties_keep_lower_index_and_smallest_go():
    model = _net()
    with torch.no_grad():
        model.c1.weight.copy_(torch.ones_like(model.c1.weight))  # all 7 norms equal ...
        model.c1.weight[5] *= 3                                  # ... but filter 5 is the largest
        model.c1.weight[0] *= 0.5                                # and filter 0 the smallest
    _, kept = prune(model, GROUPS, 0.5)  # floor(3.5) = 3 pruned, 4 kept
    assert kept["c1"].tolist() == [1, 2, 3, 5]


def test_second_prune_of_pruned_model():
    model, x = _net(c1=10, c2=8), torch.randn(2, 3, 6, 6)
    groups = [dataclasses.replace(GROUPS[0], n=10), dataclasses.replace(GROUPS[1], n=8)]
    once, kept1 = prune(model, groups, 0.5)
    regrouped = [dataclasses.replace(g, n=len(kept1[g.name])) for g in groups]
    twice, kept2 = prune(once, regrouped, 0.4)
    assert twice.c1.out_channels == 5 - 2 and twice.block[0].out_channels == 4 - 1
    # kept2 indexes the once-pruned filters; map them back to the original's indices
    composite = {g.name: kept1[g.name][kept2[g.name]].tolist() for g in groups}
    with torch.no_grad():
        torch.testing.assert_close(twice(x), _masked(model, groups, composite)(x), rtol=1e-5, atol=1e-5)


def test_zoo_model_with_found_groups_and_loft_layers():
    model = lk.get_model("preact_resnet", depths=(1, 1), num_classes=5, in_channels=1, width=0.25)
    _randomise(model).eval()
    x = torch.randn(2, 1, 8, 8)
    model, groups = lk.convert(model, x, policy="all", loft_layers=True)
    assert any(isinstance(m, lk.LoftConv2d) for m in model.modules())
    lk.activate(model, groups, {g.name: torch.arange(0, g.n, 2) for g in groups})  # a worker's state
    pruned, kept = prune(model, groups, 0.5)
    assert not any(isinstance(m, (lk.LoftConv2d, lk.LoftBatchNorm2d)) for m in pruned.modules())
    lk.activate(model, groups, None)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _masked(model, groups, {k: v.tolist() for k, v in kept.items()})(x),
                                   rtol=1e-5, atol=1e-5)
    # groups re-derived from the pruned model: a second prune works
    again, _ = prune(pruned, lk.find_filter_groups(pruned, x), 0.5)
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in pruned.parameters())


def test_criterion_scores_dict():
    model = _net()
    scores = {"c1": torch.arange(7.0), "block.0": -torch.arange(5.0)}  # prefer high / low indices
    _, kept = prune(model, GROUPS, 0.5, criterion=scores)
    assert kept["c1"].tolist() == [3, 4, 5, 6] and kept["block.0"].tolist() == [0, 1, 2]
    assert select_filters(scores, GROUPS, 0.5)["c1"].tolist() == [3, 4, 5, 6]


def test_rewind_takes_weights_from_source():
    x = torch.randn(3, 3, 7, 7)
    initial = _net()
    trained = _randomise(copy.deepcopy(initial))
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.5).add_(0.1)
    pruned, kept = prune(trained, GROUPS, 0.5)
    re = rewind(pruned, kept, GROUPS, initial.state_dict())
    assert torch.equal(re.c1.weight, initial.c1.weight[kept["c1"]])
    assert torch.equal(re.block[0].weight, initial.block[0].weight[kept["block.0"]][:, kept["c1"]])
    assert torch.equal(re.block[1].running_var, initial.block[1].running_var[kept["block.0"]])
    assert torch.equal(re.stem.weight, initial.stem.weight) and torch.equal(re.head.bias, initial.head.bias)
    assert torch.equal(pruned.c1.weight, trained.c1.weight[kept["c1"]])  # pruned_model untouched
    with torch.no_grad():
        torch.testing.assert_close(re.eval()(x), _masked(initial, GROUPS, {k: v.tolist() for k, v in kept.items()})(x),
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(rewind(pruned, kept, GROUPS, initial).c1.weight, re.c1.weight)  # a module works too


def test_count_params_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(100, 2))
    model.train()
    stats = model[1].running_mean.clone()
    got = count_params_flops(model, torch.randn(1, 3, 5, 5))
    # conv: 100 outputs x 27 MACs x 2 + 100 bias; BN: 2 x 100; linear: 2 outputs x 100 MACs x 2 + 2 bias
    assert got == {"params": 4 * 27 + 4 + 8 + 2 * 100 + 2, "flops": 2 * 100 * 27 + 100 + 200 + 2 * 2 * 100 + 2}
    assert model.training and model[1].training and torch.equal(model[1].running_mean, stats)
    assert count_params_flops(model, torch.randn(3, 3, 5, 5))["flops"] == 3 * got["flops"]
    assert count_params_flops(model[:1], torch.randn(3, 5, 5))["flops"] == 2 * 100 * 27 + 100  # unbatched


def test_count_flops_of_other_convolutions_and_attention_by_hand():
    """1-D, 3-D and transposed convolutions and nn.MultiheadAttention (whose projections run as functions, not
    through its out_proj module) are counted too, by the module docstring's rules."""
    conv1d = nn.Conv1d(4, 6, 3, groups=2)  # in [2, 4, 10] -> out [2, 6, 8]: (4 / 2) * 3 MACs per output
    assert count_params_flops(conv1d, torch.randn(2, 4, 10))["flops"] == 2 * 96 * 6 + 96
    conv3d = nn.Conv3d(2, 3, 2, bias=False)  # in [1, 2, 3, 3, 3] -> out [1, 3, 2, 2, 2]: 2 * 8 MACs per output
    assert count_params_flops(conv3d, torch.randn(1, 2, 3, 3, 3))["flops"] == 2 * 24 * 16
    up = nn.ConvTranspose2d(4, 6, 3, stride=2)  # every input element meets 6 x 9 weights; out [1, 6, 9, 9]
    assert count_params_flops(up, torch.randn(1, 4, 4, 4))["flops"] == 2 * 64 * 6 * 9 + 6 * 81

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=4, vdim=6)

        def forward(self, q, kv):
            return self.attn(q, kv[..., :4], kv, need_weights=False)[0]
    n, length, keys = 3, 5, 7  # queries of embedding 8, keys of 4 and values of 6 features
    got = count_params_flops(Attend(), (torch.randn(n, length, 8), torch.randn(n, keys, 6)))["flops"]
    q_tokens, k_tokens = n * length, n * keys
    projections = 2 * q_tokens * 8 * 8 + 2 * k_tokens * 4 * 8 + 2 * k_tokens * 6 * 8 + (q_tokens + 2 * k_tokens) * 8
    products = 2 * 2 * n * length * keys * 8
    output = 2 * q_tokens * 8 * 8 + q_tokens * 8
    assert got == projections + products + output


def test_pruning_reduces_params_flops_and_speedup_is_measured():
    model, x = _net(c1=16, c2=16), torch.randn(2, 3, 8, 8)
    groups = [dataclasses.replace(GROUPS[0], n=16), dataclasses.replace(GROUPS[1], n=16)]
    pruned, _ = prune(model, groups, 0.5)
    dense, small = count_params_flops(model, x), count_params_flops(pruned, x)
    # c1 loses 8 rows (8*54 + 8), bn1 16, block.0 keeps 8x8 of 16x16 (192*9), bn 16, block.3 loses 4*8
    assert dense["params"] - small["params"] == 8 * 54 + 8 + 16 + (256 - 64) * 9 + 16 + 4 * 8
    assert small["flops"] < dense["flops"]
    model.train()
    out = inference_speedup(model, pruned, x, repeats=3, warmup=1)
    assert set(out) == {"baseline_s", "candidate_s", "speedup"} and all(v > 0 for v in out.values())
    assert model.training and not pruned.training  # modes restored


def test_bad_input():
    model = _net()
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            prune(model, GROUPS, ratio)
    with pytest.raises(TypeError, match="ratio"):
        prune(model, GROUPS, "0.5")
    with pytest.raises(ValueError, match="criterion"):
        prune(model, GROUPS, 0.5, criterion="l1")
    with pytest.raises(TypeError, match="model"):
        prune("net", GROUPS, 0.5)
    with pytest.raises(ValueError, match="groups must not be empty"):
        prune(model, [], 0.5)
    with pytest.raises(ValueError, match="group 'c1' has n=8 filters but its producer 'c1' has 7"):
        prune(model, [dataclasses.replace(GROUPS[0], n=8)], 0.5)
    with pytest.raises(ValueError, match="does not have"):
        prune(model, [dataclasses.replace(GROUPS[0], producer="nope")], 0.5)
    with pytest.raises(TypeError, match="groups\\[0\\] must be a FilterGroup"):
        prune(model, [("c1", "c1")], 0.5)
    with pytest.raises(ValueError, match="scores has no entry"):
        prune(model, GROUPS, 0.5, criterion={"c1": torch.ones(7)})
    pruned, kept = prune(model, GROUPS, 0.5)
    with pytest.raises(ValueError, match="kept has no entry"):
        rewind(pruned, {"c1": kept["c1"]}, GROUPS, model.state_dict())
    with pytest.raises(ValueError, match="source"):
        rewind(pruned, kept, GROUPS, _net(c1=9, c2=5).state_dict() | {"c1.weight": torch.zeros(7, 6, 3, 3)})
    with pytest.raises(TypeError, match="source"):
        rewind(pruned, kept, GROUPS, [1, 2])
    with pytest.raises(TypeError, match="example_input"):
        count_params_flops(model, [1, 2])
