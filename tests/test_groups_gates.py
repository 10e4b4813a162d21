"""Filter groups through squeeze-and-excitation gates and grouped convolutions: discovery, the aligned partition,
LoFT training (S = 1 == plain training; the simulator == the sliced-model reference of tests/loft_reference.py),
pruning (== the masked full model) and the refusals that remain."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from gate_models import MBConv, TinyEfficientNet, TinyInception, TinyResNeXt, tiny_mobilenet_v3
from loft_reference import (  # noqa: F401 (one_thread: fixture)
    OPTIMIZERS,
    assert_simulator_matches_reference,
    masked_model,
    max_diff,
    one_thread,
    run_plain,
    run_simulator,
)
from test_prune_kinds import _randomise as randomise
from torch import nn

import loft_kernels as lk
from loft_kernels.filter_group import resolve_groups
from loft_kernels.tickets import prune, slice_state_dict
from loft_kernels.training.partition import partition

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 3, 8, 8)
MODELS = {
    "efficientnet": TinyEfficientNet,
    "mobilenet_v3": tiny_mobilenet_v3,
    "resnext": TinyResNeXt,
    "regnet_y": lambda: TinyResNeXt(se=True),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]()


def _kinds(group):
    return [m.kind for m in group.members]


@pytest.mark.parametrize("tracer", ["fx", "autograd"])
def test_mbconv_channel_crosses_the_se_gate(tracer):
    report = lk.explain_groups(_model("efficientnet"), X, tracer=tracer)
    by_name = {g.name: g for g in report.groups}
    expand = by_name["blocks.1.block.0"]  # expand conv -> BN -> depthwise -> BN -> SE -> project
    assert _kinds(expand) == ["batchnorm", "depthwise", "batchnorm", "se_reduce", "se_expand"]
    assert [m.name for m in expand.members[3:]] == ["blocks.1.block.6.reduce", "blocks.1.block.6.expand"]
    assert expand.consumer == "blocks.1.block.7" and expand.n == 24
    # Without an expand conv (expand ratio 1) the stem's channels cross the depthwise conv and the gate.
    assert _kinds(by_name["stem.0"]) == ["batchnorm", "depthwise", "batchnorm", "se_reduce", "se_expand"]
    # The gate's own reduce -> expand pair stays a group of its own (the squeeze channels).
    assert by_name["blocks.1.block.6.reduce"].consumer == "blocks.1.block.6.expand"
    assert "SE gate expand layer" in report.reasons["blocks.1.block.6.expand"]
    convs = {n for n, m in _model("efficientnet").named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(report.reasons) | set(by_name) == convs


def test_hardsigmoid_gate_and_the_residual_refusal_stand():
    report = lk.explain_groups(_model("mobilenet_v3"), X)
    assert _kinds({g.name: g for g in report.groups}["blocks.2.block.0"])[-2:] == ["se_reduce", "se_expand"]
    assert "residual add" in report.reasons["blocks.2.block.7"]


def test_gate_shapes_that_are_not_se_are_refused():
    class TwoUses(nn.Module):  # the branch is a plain conv, not reduce -> act -> expand -> gate
        def __init__(self):
            super().__init__()
            self.a, self.g, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h * torch.sigmoid(self.g(h)))
    report = lk.explain_groups(TwoUses(), X)
    assert "a" not in {g.name for g in report.groups}
    assert "output used by 2 ops" in report.reasons["a"]


@pytest.mark.parametrize("tracer", ["fx", "autograd"])
def test_grouped_bottleneck_groups(tracer):
    report = lk.explain_groups(_model("regnet_y"), X, tracer=tracer)
    by_name = {g.name: g for g in report.groups}
    assert (by_name["layer1.conv1"].consumer, by_name["layer1.conv1"].conv_groups) == ("layer1.conv2", 4)
    conv2 = by_name["layer2.conv2"]  # grouped producer, BN, ReLU, SE gate, conv3
    assert conv2.conv_groups == 4 and _kinds(conv2) == ["batchnorm", "se_reduce", "se_expand"]
    assert "4 conv groups" in str(report)


def test_aligned_partition_deals_in_block_positions():
    g = lk.FilterGroup("g", "a", (), "b", 24, conv_groups=4)
    for rnd in range(3):
        parts = partition([g], 4, seed=1, round=rnd)["g"]
        assert sorted(torch.cat(parts).tolist()) == list(range(24))
        for owned in parts:
            local = owned.view(4, -1) - torch.arange(0, 24, 6)[:, None]
            assert (local == local[0]).all()  # the same positions in every conv group
    with pytest.raises(ValueError, match="conv groups"):
        partition([g], 7, seed=0, round=0)  # 24 filters, but 6 per conv group < 7 workers
    with pytest.raises(ValueError, match="conv_groups"):
        lk.FilterGroup("g", "a", (), "b", 10, conv_groups=4)
    plain = lk.FilterGroup("g", "a", (), "b", 10)
    assert lk.FilterGroup.from_dict(g.to_dict()) == g and "conv_groups" not in plain.to_dict()


def test_resolve_checks_grouped_convs_and_se_members():
    model = _model("resnext")
    groups = lk.find_filter_groups(model, X)
    bad = [dataclasses.replace(groups[0], conv_groups=1)]  # the consumer's 4 conv groups do not refine 1 block
    with pytest.raises(ValueError, match="grouped conv"):
        resolve_groups(model, bad)
    se = lk.FilterGroup("s", "layer1.conv1", (lk.Member("layer2.conv3", "se_reduce"),), "layer2.conv1", 16)
    with pytest.raises(ValueError, match="'layer2.conv3' has 24 input channels"):
        resolve_groups(model, [se])  # an SE reduce member is checked on its input side


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_worker_is_plain_training(name):
    model = _model(name)
    groups = lk.find_filter_groups(model, X)
    sim_snaps, _ = run_simulator(model, groups, OPTIMIZERS["sgd"], 1, 2, 0, "keep", 3)
    diff, where = max_diff(sim_snaps[-1], run_plain(model, groups, OPTIMIZERS["sgd"], 3))
    assert diff <= 1e-5, f"{where} differs by {diff}"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("opt_name,workers,state", [("sgd", 2, "keep"), ("adam", 3, "reset")])
def test_simulator_matches_reference(name, opt_name, workers, state):
    model = _model(name)
    groups = lk.find_filter_groups(model, X)
    assert_simulator_matches_reference(model, groups, OPTIMIZERS[opt_name], workers, 2, 4, state, 3)


def test_worker_blocks_of_se_and_grouped_layers():
    """Mid-round a worker's gate layers and grouped conv hold its block: reduce columns, expand rows (and bias),
    and the grouped conv keeps its conv groups with fewer channels each."""
    model = _model("regnet_y")
    groups = lk.find_filter_groups(model, X)
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, 3, seed=0)
    sim.step([(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(2)], F.cross_entropy)
    sub = sim.worker_models[0]
    conv2 = sub.get_submodule("layer2.conv2")
    assert conv2.groups == 4 and conv2.weight.shape[:2] == (12, 3)  # 24 channels / 2 workers, 6 per group / 2
    assert sub.get_submodule("layer2.se.reduce").weight.shape[1] == 12
    assert sub.get_submodule("layer2.se.expand").bias.shape == (12,)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pruned_equals_masked_full_model(name, ratio):
    model = randomise(_model(name))
    groups = lk.find_filter_groups(model, X)
    pruned, kept = prune(model, groups, ratio)
    for g in groups:
        per_block = torch.bincount(kept[g.name] // g.block_size, minlength=g.conv_groups)
        assert (per_block == g.block_size - int(ratio * g.block_size + 1e-9)).all()  # conv groups stay equal
        for member in g.members:
            layer = pruned.get_submodule(member.name)
            if member.kind == "se_reduce":
                assert layer.in_channels == len(kept[g.name])
            if member.kind == "se_expand":
                assert layer.out_channels == layer.bias.shape[0] == len(kept[g.name])
        consumer = pruned.get_submodule(g.consumer)
        assert consumer.groups == model.get_submodule(g.consumer).groups
    with torch.no_grad():
        want = masked_model(model, groups, {k: v.tolist() for k, v in kept.items()})(X)
        torch.testing.assert_close(pruned(X), want, rtol=1e-4, atol=1e-5)
        assert max_diff({"y": want}, {"y": model(X)})[0] > 1e-3  # the masking matters
    again = lk.find_filter_groups(pruned, X)
    assert [(g.name, g.n, g.conv_groups) for g in again] == \
        [(g.name, len(kept[g.name]), g.conv_groups) for g in groups]


def test_grouped_consumer_keeps_each_conv_groups_own_columns():
    model = randomise(_model("resnext"))
    g = next(g for g in lk.find_filter_groups(model, X) if g.name == "layer1.conv1")
    kept = {g.name: torch.tensor([0, 3, 5, 6, 8, 9, 12, 15])}  # different positions in each conv group of 4
    out = slice_state_dict(model.state_dict(), [g], kept)
    w = model.get_submodule("layer1.conv2").weight
    want = torch.cat([w[0:4][:, [0, 3]], w[4:8][:, [1, 2]], w[8:12][:, [0, 1]], w[12:16][:, [0, 3]]])
    assert torch.equal(out["layer1.conv2.weight"], want)
    with pytest.raises(ValueError, match="same count in each"):
        slice_state_dict(model.state_dict(), [g], {g.name: torch.tensor([0, 1, 2, 4])})


def test_parameter_share_counts_touched_and_partitioned_tensors():
    model = _model("efficientnet")
    report = lk.explain_groups(model, X)
    total = sum(p.numel() for p in model.parameters())
    touched = {n for g in report.groups for n in g.modules}
    cut = {k for g in report.groups for k, _ in g.filter_keys()}
    params = dict(model.named_parameters())
    assert report.share.total == total
    assert report.share.touched == sum(p.numel() for n, p in params.items() if n.rpartition(".")[0] in touched)
    assert report.share.partitioned == sum(params[k].numel() for k in cut if k in params)
    assert 0 < report.share.partitioned_share <= report.share.touched_share <= 1
    assert "partitioned by the groups" in str(report)
    assert lk.parameter_share(model, report.groups[:1]).touched < report.share.touched


# ------------------------------------------------------------------ the defects ----
class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.utils.weight_norm(nn.Conv2d(3, 4, 1))
        self.b, self.c, self.d = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.d(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates the hook-style weight_norm
def test_hook_style_weight_norm_is_refused_clearly():
    model = WeightNormed()
    nn.utils.weight_norm(model.c)
    report = lk.explain_groups(model, X)
    assert [g.name for g in report.groups] == []  # b's consumer c and c itself have derived weights
    assert "weight_norm" in report.reasons["a"] and "weight_norm" in report.reasons["b"]
    with pytest.raises(ValueError, match="weight_norm"):
        resolve_groups(model, [lk.FilterGroup("a", "a", (), "b", 4)])
    plain = WeightNormed()
    assert [g.name for g in lk.find_filter_groups(plain, X)] == ["b", "c"]


class InPlace(nn.Module):
    """relu_ as a statement, F.relu(inplace=True) and `out += x` (a residual add)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.b1(self.c1(x))
        out.relu_()
        out = self.b2(self.c2(out))
        out += x
        self.act(out)
        F.relu(out, True)  # inplace given by position
        return out


@pytest.mark.parametrize("tracer", ["fx", "autograd"])
def test_in_place_ops_are_followed_like_their_out_of_place_versions(tracer):
    model = nn.Sequential(InPlace(), InPlace())
    report = lk.explain_groups(model, torch.randn(2, 4, 6, 6), tracer=tracer)
    assert [(g.producer, g.consumer) for g in report.groups] == [("0.c1", "0.c2"), ("1.c1", "1.c2")]
    assert "residual add" in report.reasons["0.c2"]
    assert "add" in report.reasons["1.c2"]


# ------------------------------------------------------------ prune carries ----
class Versioned(nn.Module):
    """Like a model whose load hook reads its state-dict version (refuses None) and whose layer has a flag."""
    _version = 2

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
        self.net[0].scale_from_stats = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x):
        return self.net(x)


def test_prune_keeps_state_dict_versions_and_layer_attributes():
    model = Versioned()
    calls = []
    model.net[3].register_forward_hook(lambda m, i, o: calls.append(o.shape))
    groups = lk.find_filter_groups(model, X)
    pruned, kept = prune(model, groups, 0.5)
    assert pruned.net[0].scale_from_stats is True and pruned.net[0].out_channels == 3
    calls.clear()
    pruned(X)
    assert calls == [torch.Size([2, 2, 8, 8])]  # the consumer's hook came along


def test_mbconv_without_se_is_unchanged():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = MBConv(4, 6, 2)
            self.m.block[6] = nn.Identity()  # drop the gate

        def forward(self, x):
            return self.m(x)
    g = lk.find_filter_groups(Block(), torch.randn(2, 4, 6, 6))
    assert [_kinds(x) for x in g] == [["batchnorm", "depthwise", "batchnorm"]]


# ------------------------------------------------------- Inception tickets ----
def _main_logits_loss(out, y):
    logits, aux = out if isinstance(out, tuple) else (out, None)
    return F.cross_entropy(logits, y) + (0.4 * F.cross_entropy(aux, y) if aux is not None else 0)


def test_inception_ticket_after_a_loft2_step_is_finite_and_faithful():
    """After a LoFT-2 step the ticket's outputs are finite [N, 10] in both modes and equal to the masked full model.

    (torchvision's Inception-v3 with its truncated-normal init gives NaN in eval mode after one step with the
    full, unpruned model too: one step of BatchNorm running statistics cannot tame its activations. That is the
    training, not the ticket; `prune` refuses a model whose state itself is not finite.)"""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 24, 24)
    model = TinyInception()
    groups = lk.find_filter_groups(model, x)
    assert {g.producer for g in groups} >= {"mixed1.b33.0.0", "mixed1.b33.1.0", "mixed2.b3.0.0"}
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, 2, seed=0)
    sim.model.train()
    for t in range(2):
        sim.step([(torch.randn(4, 3, 24, 24), torch.randint(0, 10, (4,))) for _ in range(2)], _main_logits_loss)
    pruned, kept = prune(sim.model, groups, 0.5)
    with torch.no_grad():
        y = pruned.eval()(x)
        assert y.shape == (4, 10) and torch.isfinite(y).all()
        want = masked_model(sim.model.eval(), groups, {k: v.tolist() for k, v in kept.items()})(x)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
        logits, aux = pruned.train()(x)  # (moves the ticket's BatchNorm statistics: last)
        assert logits.shape == aux.shape == (4, 10) and torch.isfinite(logits).all() and torch.isfinite(aux).all()
    with torch.no_grad():
        sim.model.get_submodule("mixed2.b1.1").running_var[0] = float("nan")
    with pytest.raises(ValueError, match="'mixed2.b1.1.running_var' holds NaN"):
        prune(sim.model, groups, 0.5)
