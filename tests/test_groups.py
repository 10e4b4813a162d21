"""Filter-group discovery, selection policies and convert: exact expected groups, negative cases, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loft_kernels as lk
from loft_kernels.training.groups import select_groups

X32 = torch.randn(2, 3, 32, 32)
X8 = torch.randn(2, 3, 8, 8)  # enough for the ResNets (three stride-2 stages); VGG11/16 need 32 (five pools)


def G(conv_a, norms, conv_b, n):
    return lk.FilterGroup(conv_a, conv_a, tuple(norms), conv_b, n)


def block_groups(depths, planes, convs):
    """Per block `layer{s}.{b}`: the groups (conv_a, norm, conv_b) of `convs`, n = planes[s]."""
    return [G(f"layer{s + 1}.{b}.{a}", [f"layer{s + 1}.{b}.{nm}"], f"layer{s + 1}.{b}.{cb}", planes[s])
            for s, depth in enumerate(depths) for b in range(depth) for a, nm, cb in convs]


def _as_tuples(groups):
    return [(g.name, g.producer, g.members, g.consumer, g.n) for g in groups]


def mobilenet_groups(width):
    """MobileNetV2 (32x32 table): one group per block, expand conv1 -> bn1, depthwise conv2, bn2 -> project conv3."""
    table = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    out, cin, i = [], max(1, round(32 * width)), 0
    for t, c, count in table:
        for _ in range(count):
            p = f"layers.{i}"
            members = (lk.Member(f"{p}.bn1"), lk.Member(f"{p}.conv2", "depthwise"), lk.Member(f"{p}.bn2"))
            out.append(lk.FilterGroup(f"{p}.conv1", f"{p}.conv1", members, f"{p}.conv3", t * cin))
            cin, i = max(1, round(c * width)), i + 1
    return out


# ------------------------------------------------------------ model zoo ----
ZOO_EXPECTED = {
    "preact_resnet18": (dict(width=0.125),
                        block_groups((2, 2, 2, 2), (8, 16, 32, 64), [("conv1", "bn2", "conv2")])),
    "preact_resnet34": (dict(width=0.125),
                        block_groups((3, 4, 6, 3), (8, 16, 32, 64), [("conv1", "bn2", "conv2")])),
    "resnet18": (dict(width=0.125), block_groups((2, 2, 2, 2), (8, 16, 32, 64), [("conv1", "bn1", "conv2")])),
    "resnet34": (dict(width=0.125), block_groups((3, 4, 6, 3), (8, 16, 32, 64), [("conv1", "bn1", "conv2")])),
    "resnet50": (dict(width=0.125), block_groups((3, 4, 6, 3), (8, 16, 32, 64),
                                                 [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")])),
    "wide_resnet": (dict(depth=16, widen_factor=4, width=0.25),
                    block_groups((2, 2, 2), (16, 32, 64), [("conv1", "bn2", "conv2")])),
    # features: conv, bn, relu (, maxpool) ...; the last conv feeds the pool/head and is no conv_a.
    "vgg11": (dict(width=0.125), [G("features.0", ["features.1"], "features.4", 8),
                                  G("features.4", ["features.5"], "features.8", 16),
                                  G("features.8", ["features.9"], "features.11", 32),
                                  G("features.11", ["features.12"], "features.15", 32),
                                  G("features.15", ["features.16"], "features.18", 64),
                                  G("features.18", ["features.19"], "features.22", 64),
                                  G("features.22", ["features.23"], "features.25", 64)]),
    "vgg16": (dict(width=0.125), [G("features.0", ["features.1"], "features.3", 8),
                                  G("features.3", ["features.4"], "features.7", 8),
                                  G("features.7", ["features.8"], "features.10", 16),
                                  G("features.10", ["features.11"], "features.14", 16),
                                  G("features.14", ["features.15"], "features.17", 32),
                                  G("features.17", ["features.18"], "features.20", 32),
                                  G("features.20", ["features.21"], "features.24", 32),
                                  G("features.24", ["features.25"], "features.27", 64),
                                  G("features.27", ["features.28"], "features.30", 64),
                                  G("features.30", ["features.31"], "features.34", 64),
                                  G("features.34", ["features.35"], "features.37", 64),
                                  G("features.37", ["features.38"], "features.40", 64)]),
    "mobilenet_v2": (dict(width=0.125), mobilenet_groups(0.125)),
    # Each block's channels-last MLP; the depthwise conv is followed by LayerNorm (mixes channels).
    "convnext_cifar": (dict(width=0.125), [lk.FilterGroup(f"stages.{s}.{b}.pwconv1", f"stages.{s}.{b}.pwconv1", (),
                                                          f"stages.{s}.{b}.pwconv2", 4 * d)
                                           for s, d in enumerate((8, 16, 32)) for b in range(2)]),
}


@pytest.mark.parametrize("name", sorted(ZOO_EXPECTED))
def test_zoo_groups_exact(name):
    kw, expected = ZOO_EXPECTED[name]
    model = lk.get_model(name, **kw)
    x = X8 if "resnet" in name else X32
    groups = lk.find_filter_groups(model, x)
    assert _as_tuples(groups) == _as_tuples(expected)
    assert groups == expected
    assert lk.find_filter_groups(model, x, tracer="autograd") == expected
    # After convert (Loft layers are leaves of the trace too) discovery finds the same groups.
    _, converted = lk.convert(model, x, loft_layers=True)
    assert converted == expected
    assert lk.find_filter_groups(model, x) == expected


def test_preact_resnet18_literal():
    groups = lk.find_filter_groups(lk.preact_resnet18(width=0.125), X8)
    assert [(g.conv_a, g.norms, g.conv_b, g.n) for g in groups] == [
        ("layer1.0.conv1", ("layer1.0.bn2",), "layer1.0.conv2", 8),
        ("layer1.1.conv1", ("layer1.1.bn2",), "layer1.1.conv2", 8),
        ("layer2.0.conv1", ("layer2.0.bn2",), "layer2.0.conv2", 16),
        ("layer2.1.conv1", ("layer2.1.bn2",), "layer2.1.conv2", 16),
        ("layer3.0.conv1", ("layer3.0.bn2",), "layer3.0.conv2", 32),
        ("layer3.1.conv1", ("layer3.1.bn2",), "layer3.1.conv2", 32),
        ("layer4.0.conv1", ("layer4.0.bn2",), "layer4.0.conv2", 64),
        ("layer4.1.conv1", ("layer4.1.bn2",), "layer4.1.conv2", 64)]


def test_discovery_leaves_model_unchanged():
    model = lk.resnet(depths=(1, 1), width=0.125)
    model.train()
    before = copy.deepcopy(model.state_dict())
    lk.find_filter_groups(model, X8)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    _, groups = lk.convert(model, X8, loft_layers=True)
    lk.activate(model, groups, {g.name: torch.tensor([0]) for g in groups})
    lk.find_filter_groups(model, X8)  # runs dense internally, keeps the active sets
    assert torch.equal(model.get_submodule(groups[0].conv_a).active_out, torch.tensor([0]))


# ---------------------------------------------- user models, positive/negative ----
class Net(nn.Module):
    """A user model: the given submodules and a forward function `fn(self, x)`."""

    def __init__(self, fn, **modules):
        super().__init__()
        for k, v in modules.items():
            setattr(self, k, v)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def conv(cin, cout, k=3, **kw):
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


def _functional_forward(m, x):
    x = m.drop(m.act(m.bn1(m.c1(x))))
    x = (F.gelu(x) * 2.0).tanh() / 3.0  # zero-preserving: f(0) = 0, a scalar scale
    x = m.c2(m.idn(x))
    x = F.max_pool2d(F.leaky_relu(x, 0.1), 2)
    x = F.dropout(F.avg_pool2d(F.relu6(x), 1), 0.1, m.training)
    x = m.bn3(torch.relu(m.c3(x)))  # relu before the norm
    x = m.pool(F.elu(F.hardswish(x)).relu())
    x = m.c4(F.silu(x))
    return x.mean((2, 3))


class SubConv(nn.Conv2d):
    """A user Conv2d subclass: its forward might differ, so it is never partitioned."""


CASES = {
    "functional_and_modules": (
        _functional_forward,
        dict(c1=conv(3, 6), bn1=nn.BatchNorm2d(6), act=nn.SiLU(), drop=nn.Dropout2d(0.1), idn=nn.Identity(),
             c2=conv(6, 6, bias=False), c3=conv(6, 5, 1), bn3=nn.BatchNorm2d(5), pool=nn.MaxPool2d(2),
             c4=conv(5, 4, 1)),
        [G("c1", ["bn1"], "c2", 6), G("c2", [], "c3", 6), G("c3", ["bn3"], "c4", 5)]),
    "concat": (lambda m, x: m.b(torch.cat([F.relu(m.a(x)), x], 1)),
               dict(a=conv(3, 4), b=conv(7, 2)), []),
    "add": (lambda m, x: m.b(F.relu(m.a(x)) + x), dict(a=conv(3, 3), b=conv(3, 2)), []),
    "residual_second_consumer": (lambda m, x: m.c(m.b(F.relu(m.a(x))) + m.a(x)),
                                 dict(a=conv(3, 4), b=conv(4, 4), c=conv(4, 2)), []),
    "residual_around_pair": (lambda m, x: m.c(F.relu(m.b(F.relu(m.a(x)))) + x),
                             dict(a=conv(3, 5), b=conv(5, 3), c=conv(3, 2)), [G("a", [], "b", 5)]),
    "head": (lambda m, x: m.fc(torch.flatten(F.relu(m.a(x)), 1)),
             dict(a=conv(3, 4), fc=nn.Linear(4 * 36, 2)), []),
    "head_after_adaptive_pool": (lambda m, x: m.fc(F.adaptive_avg_pool2d(F.relu(m.a(x)), 1).flatten(1)),
                                 dict(a=conv(3, 4), fc=nn.Linear(4, 2)), []),
    "two_consumers": (lambda m, x: m.b(F.relu(m.a(x))) + m.c(F.relu(m.a2(x))) + m.d(F.relu(m.a2(x))),
                      dict(a=conv(3, 4), a2=conv(3, 4), b=conv(4, 2), c=conv(4, 2), d=conv(4, 2)),
                      [G("a", [], "b", 4)]),
    "shared_activation_output": (lambda m, x: (lambda h: m.b(h) * m.c(h))(F.relu(m.a(x))),
                                 dict(a=conv(3, 4), b=conv(4, 2), c=conv(4, 2)), []),
    "depthwise_member": (lambda m, x: m.c(F.relu(m.dw(F.relu(m.a(x))))),
                         dict(a=conv(3, 4), dw=conv(4, 4, groups=4), c=conv(4, 2)),
                         [lk.FilterGroup("a", "a", (lk.Member("dw", "depthwise"),), "c", 4)]),
    "grouped_conv_a": (lambda m, x: m.b(F.relu(m.a(x))), dict(a=conv(4, 4, groups=2), b=conv(4, 2)),
                       [lk.FilterGroup("a", "a", (), "b", 4, conv_groups=2)]),
    "softmax_over_channels": (lambda m, x: m.b(F.softmax(m.a(x), dim=1)), dict(a=conv(3, 4), b=conv(4, 2)), []),
    "reshape": (lambda m, x: m.b(m.a(x).reshape(x.shape[0], 4, 6, 6)), dict(a=conv(3, 4), b=conv(4, 2)), []),
    # A size query is no data flow: the group stands.
    "size_query": (lambda m, x: (lambda h: m.b(F.relu(h)) * h.size(1))(m.a(x)),
                   dict(a=conv(3, 4), b=conv(4, 2)), [G("a", [], "b", 4)]),
    "reused_conv_b": (lambda m, x: m.b(F.relu(m.b(F.relu(m.a(x))))), dict(a=conv(3, 4), b=conv(4, 4)),
                      []),
    "shared_norm": (lambda m, x: m.c(m.bn(m.a(x))) + m.d(m.bn(m.b(x))),
                    dict(a=conv(3, 4), b=conv(3, 4), bn=nn.BatchNorm2d(4), c=conv(4, 2), d=conv(4, 2)), []),
    "subclass_conv": (lambda m, x: m.b(F.relu(m.a(x))) + m.d(F.relu(m.c(x))),
                      dict(a=SubConv(3, 4, 3, padding=1), b=conv(4, 2), c=conv(3, 5), d=SubConv(5, 2, 3, padding=1)),
                      []),
    "layernorm_via_permute": (
        lambda m, x: m.b(m.ln(m.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)),
        dict(a=conv(3, 4), ln=nn.LayerNorm(4), b=conv(4, 2)), []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_models(case):
    fn, modules, expected = CASES[case]
    model = Net(fn, **copy.deepcopy(modules))
    x = torch.randn(2, 3, 6, 6) if case != "grouped_conv_a" else torch.randn(2, 4, 6, 6)
    for tracer in ("fx", "autograd"):
        assert lk.find_filter_groups(model, x, tracer=tracer) == expected, tracer


def test_reasons_name_user_subclasses():
    fn, modules, _ = CASES["subclass_conv"]
    reasons = lk.explain_groups(Net(fn, **copy.deepcopy(modules)), torch.randn(2, 3, 6, 6)).reasons
    assert "SubConv is a subclass of nn.Conv2d" in reasons["a"]
    assert "SubConv is a user subclass of an nn layer" in reasons["c"]


def test_tied_weights_are_not_partitioned():
    a, b, c = conv(3, 4), conv(4, 4), conv(4, 2)
    model = Net(lambda m, x: m.c(F.relu(m.b(F.relu(m.a(x))))), a=a, b=b, c=c)
    assert [g.name for g in lk.find_filter_groups(model, torch.randn(1, 3, 5, 5))] == ["a", "b"]
    c2 = conv(4, 4)
    c2.weight = b.weight  # tied with b
    model = Net(lambda m, x: m.c(F.relu(m.c2(F.relu(m.b(F.relu(m.a(x))))))), a=a, b=b, c2=c2, c=c)
    assert lk.find_filter_groups(model, torch.randn(1, 3, 5, 5)) == []


# ------------------------------------------------------------- bad input ----
def test_find_filter_groups_bad_input():
    model = lk.vgg(width=0.125)
    with pytest.raises(TypeError, match="model"):
        lk.find_filter_groups("vgg", X32)
    with pytest.raises(TypeError, match="example_input"):
        lk.find_filter_groups(model, [[1.0]])
    with pytest.raises(TypeError, match="example_input"):
        lk.find_filter_groups(model, None)
    with pytest.raises(ValueError, match="example_input"):
        lk.find_filter_groups(model, torch.randn(2, 5, 32, 32))  # wrong channel count
    data_dependent = Net(lambda m, x: m.b(F.relu(m.a(x))) if x.sum() > 0 else m.b(m.a(x)),
                         a=conv(3, 4), b=conv(4, 2))
    with pytest.raises(ValueError, match="traced with torch.fx"):
        lk.find_filter_groups(data_dependent, torch.randn(1, 3, 4, 4), tracer="fx")
    # Neither tracer: the forward cuts the autograd graph.
    detached = Net(lambda m, x: m.b(F.relu(m.a(x))).detach() if x.sum() > 0 else x, a=conv(3, 4), b=conv(4, 2))
    with pytest.raises(ValueError, match="torch.fx failed .* autograd"):
        lk.find_filter_groups(detached, torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="tracer must be one of"):
        lk.find_filter_groups(model, X32, tracer="export")


def test_filter_group_validation_and_tensors():
    with pytest.raises(TypeError, match="name"):
        lk.FilterGroup(1, "a", (), "b", 3)
    with pytest.raises(TypeError, match="conv_b"):
        lk.FilterGroup("a", "a", (), ["b"], 3)
    with pytest.raises(TypeError, match="norms"):
        lk.FilterGroup("a", "a", "bn", "b", 3)
    with pytest.raises(ValueError, match="n must"):
        lk.FilterGroup("a", "a", (), "b", 0)
    g = lk.FilterGroup("a", "a", ["bn"], "b", 3)
    assert g.norms == ("bn",) and g.modules == ("a", "bn", "b")
    with pytest.raises(Exception):
        g.n = 4  # frozen
    model = Net(lambda m, x: m.b(m.bn(m.a(x))), a=conv(2, 3), bn=nn.BatchNorm2d(3), b=conv(3, 2))
    got = [(name, t.data_ptr(), dim) for name, t, dim in g.filter_tensors(model)]
    want = [("a.weight", model.a.weight, 0), ("a.bias", model.a.bias, 0), ("bn.weight", model.bn.weight, 0),
            ("bn.bias", model.bn.bias, 0), ("bn.running_mean", model.bn.running_mean, 0),
            ("bn.running_var", model.bn.running_var, 0), ("b.weight", model.b.weight, 1)]
    assert got == [(name, t.data_ptr(), dim) for name, t, dim in want]


# --------------------------------------------------- policies and convert ----
def _paper_names(model):
    _, groups = lk.convert(model, X8, policy="paper")
    return [g.name for g in groups]


def test_paper_policy():
    assert _paper_names(lk.resnet18(width=0.125)) == ["layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]
    assert _paper_names(lk.preact_resnet34(width=0.125)) == (
        [f"layer2.{b}.conv1" for b in (1, 2, 3)] + [f"layer3.{b}.conv1" for b in (1, 2, 3, 4, 5)] +
        [f"layer4.{b}.conv1" for b in (1, 2)])
    assert _paper_names(lk.resnet50(width=0.125)) == [
        f"layer{s}.{b}.{c}" for s, n in ((2, 4), (3, 6), (4, 3)) for b in range(1, n) for c in ("conv1", "conv2")]
    assert _paper_names(lk.wide_resnet(width=0.25)) == ["layer2.1.conv1", "layer3.1.conv1"]
    with pytest.raises(ValueError, match="paper"):
        lk.convert(lk.vgg11(width=0.125), X32, policy="paper")
    with pytest.raises(ValueError, match="paper"):
        lk.convert(lk.resnet(depths=(2, 1, 1, 1), width=0.125), X8, policy="paper")


def test_paper_policy_leaves_other_layers_plain():
    model = lk.resnet18(width=0.125)
    lk.convert(model, X8, policy="paper", loft_layers=True)
    loft = {n for n, m in model.named_modules() if isinstance(m, (lk.LoftConv2d, lk.LoftBatchNorm2d))}
    assert loft == {f"layer{s}.1.{m}" for s in (2, 3, 4) for m in ("conv1", "bn1", "conv2")}


def test_include_exclude():
    model = lk.resnet18(width=0.125)
    groups = lk.find_filter_groups(model, X8)
    names = lambda gs: [g.name for g in gs]  # noqa: E731
    assert names(select_groups(groups, include="layer3.*")) == ["layer3.0.conv1", "layer3.1.conv1"]
    assert names(select_groups(groups, include=["layer1.0.*", "*.1.bn1"])) == [
        "layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"]
    assert names(select_groups(groups, exclude=("layer1.*", "layer4.1.conv2"))) == [
        "layer2.0.conv1", "layer2.1.conv1", "layer3.0.conv1", "layer3.1.conv1", "layer4.0.conv1"]
    assert names(select_groups(groups, "paper", exclude="layer3.*")) == ["layer2.1.conv1", "layer4.1.conv1"]
    _, got = lk.convert(model, X8, include="layer2.*", exclude="layer2.0.*", loft_layers=True)
    assert names(got) == ["layer2.1.conv1"]
    assert type(model.layer2[0].conv1) is nn.Conv2d and type(model.layer2[1].conv1) is lk.LoftConv2d


def test_convert_is_in_place_and_preserves_everything():
    model = lk.vgg(width=0.125)
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 16, 16))  # move the running statistics off their init
    model.eval()
    params = {n: p for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    y = model(x)
    out, groups = lk.convert(model, x, loft_layers=True)
    assert out is model
    assert [g.name for g in groups] == ["features.0", "features.4"]
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizers stay valid
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [type(model.features[i]).__name__ for i in (0, 1, 4, 5, 8, 9)] == [
        "LoftConv2d", "LoftBatchNorm2d", "LoftConv2d", "LoftBatchNorm2d", "LoftConv2d", "BatchNorm2d"]
    assert torch.equal(model(x), y)
    plain = lk.vgg(width=0.125)
    plain.load_state_dict(model.state_dict())  # and back into plain nn layers
    assert torch.equal(plain.eval()(x), y)


def test_convert_bad_input():
    model = lk.resnet18(width=0.125)
    with pytest.raises(TypeError, match="model"):
        lk.convert(42, X8)
    with pytest.raises(ValueError, match="policy"):
        lk.convert(model, X8, policy="most")
    with pytest.raises(TypeError, match="policy"):
        lk.convert(model, X8, policy=None)
    with pytest.raises(TypeError, match="include"):
        lk.convert(model, X8, include=3)
    with pytest.raises(TypeError, match="exclude"):
        lk.convert(model, X8, exclude=["layer1.*", None])
    with pytest.raises(ValueError, match="include"):
        lk.convert(model, X8, include=[])
    with pytest.raises(ValueError, match="exclude"):
        lk.convert(model, X8, exclude="")
    with pytest.raises(ValueError, match="include pattern 'layr3.*' matches no filter group"):
        lk.convert(model, X8, include="layr3.*")
    with pytest.raises(ValueError, match="selected none"):
        lk.convert(model, X8, exclude="*")
    with pytest.raises(ValueError, match="no partitionable filter group"):
        lk.convert(nn.Sequential(conv(3, 4), nn.Flatten(), nn.Linear(4 * 32 * 32, 2)), X32)
    with pytest.raises(TypeError, match="groups"):
        select_groups("layer1.0.conv1")
    assert not any(isinstance(m, (lk.LoftConv2d, lk.LoftBatchNorm2d)) for m in model.modules())  # nothing converted


# ------------------------------- convert + activate == physically sliced model ----
def _sliced_copy(model, groups, assignment):
    """Build the worker's sub-model by physically slicing plain nn layers (independent of Loft layers)."""
    sub = copy.deepcopy(model)
    outs, ins = {}, {}
    norms = {}
    for g in groups:
        idx = assignment[g.name]
        outs[g.conv_a], ins[g.conv_b] = idx, idx
        norms.update({nm: idx for nm in g.norms})
    with torch.no_grad():
        for name in set(outs) | set(ins):
            old = model.get_submodule(name)
            o = outs.get(name, torch.arange(old.out_channels))
            i = ins.get(name, torch.arange(old.in_channels))
            new = nn.Conv2d(len(i), len(o), old.kernel_size, old.stride, old.padding, old.dilation,
                            bias=old.bias is not None)
            new.weight.copy_(old.weight[o][:, i])
            if old.bias is not None:
                new.bias.copy_(old.bias[o])
            sub.set_submodule(name, new)
        for name, idx in norms.items():
            old = model.get_submodule(name)
            new = nn.BatchNorm2d(len(idx), eps=old.eps, momentum=old.momentum)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, attr).copy_(getattr(old, attr)[idx])
            new.num_batches_tracked.copy_(old.num_batches_tracked)
            sub.set_submodule(name, new)
    return sub


@pytest.mark.parametrize("name", ["preact_resnet", "vgg", "resnet"])
def test_worker_forward_backward_equals_sliced_model(name):
    kw = dict(width=0.125) if name == "vgg" else dict(depths=(1, 2), width=0.125)
    if name == "resnet":
        kw["block"] = "bottleneck"
    model = lk.get_model(name, **kw)
    x = torch.randn(3, 3, 16, 16)
    plain = copy.deepcopy(model)
    _, groups = lk.convert(model, x, loft_layers=True)
    gen = torch.Generator().manual_seed(1)
    assignment = {g.name: torch.randperm(g.n, generator=gen)[: max(1, g.n // 3)].sort().values for g in groups}
    sub = _sliced_copy(plain, groups, assignment)
    lk.activate(model, groups, assignment)
    model.train()
    sub.train()
    y, y_ref = model(x), sub(x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for gr in groups:
        idx = assignment[gr.name]
        a_full, a_sub = model.get_submodule(gr.conv_a), sub.get_submodule(gr.conv_a)
        torch.testing.assert_close(a_full.weight.grad[idx][:, ins_of(gr, groups, assignment, a_full)],
                                   a_sub.weight.grad)
        rest = torch.ones(gr.n, dtype=torch.bool)
        rest[idx] = False
        assert bool((a_full.weight.grad[rest] == 0).all())
        for nm in gr.norms:
            bn_full, bn_sub = model.get_submodule(nm), sub.get_submodule(nm)
            torch.testing.assert_close(bn_full.weight.grad[idx], bn_sub.weight.grad)
            torch.testing.assert_close(bn_full.running_mean[idx], bn_sub.running_mean)
            torch.testing.assert_close(bn_full.running_var[idx], bn_sub.running_var)
            assert torch.equal(bn_full.running_mean[rest], plain.get_submodule(nm).running_mean[rest])
    # Shared (unpartitioned) parameters get the same gradient as in the sliced model.
    shared = set(dict(plain.named_parameters())) - {n for gr in groups for n, _, _ in gr.filter_tensors(model)}
    subp = dict(sub.named_parameters())
    for n, p in model.named_parameters():
        if n in shared:
            torch.testing.assert_close(p.grad, subp[n].grad, msg=n)
    with lk.dense(model):
        model.eval()
        plain.eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), plain(x))


def ins_of(group, groups, assignment, conv):
    """The input channels conv_a sees: the owned set of the group whose conv_b it is, else all."""
    for g in groups:
        if g.conv_b == group.conv_a:
            return assignment[g.name]
    return torch.arange(conv.in_channels)
