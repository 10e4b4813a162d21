"""Groups of today's CNN patterns (depthwise-separable, inverted residual, Linear MLPs, SE), written by hand in
module and functional form, with both tracers; the reason given for every layer that is not a group."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loft_kernels as lk

DW, BN, SE_IN, SE_OUT = "depthwise", "batchnorm", "se_reduce", "se_expand"


def group(producer, members, consumer, n, conv_groups=1):
    """members: list of (name, kind)."""
    return lk.FilterGroup(producer, producer, tuple(lk.Member(nm, kind) for nm, kind in members), consumer, n,
                          conv_groups)


def dw(c, stride=1):
    return nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False)


def pw(cin, cout):
    return nn.Conv2d(cin, cout, 1, bias=False)


class MobileNetV1(nn.Module):
    """stem -> [dw -> bn -> relu -> pw -> bn -> relu] x 2 -> pool -> head (nn.ReLU modules)."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act()
        self.dw1, self.bn1, self.act1 = dw(8), nn.BatchNorm2d(8), act()
        self.pw1, self.bn2, self.act2 = pw(8, 12), nn.BatchNorm2d(12), act()
        self.dw2, self.bn3, self.act3 = dw(12, 2), nn.BatchNorm2d(12), act()
        self.pw2, self.bn4, self.act4 = pw(12, 16), nn.BatchNorm2d(16), act()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        x = self.act2(self.bn2(self.pw1(self.act1(self.bn1(self.dw1(x))))))
        x = self.act4(self.bn4(self.pw2(self.act3(self.bn3(self.dw2(x))))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


MOBILENET_V1 = [group("stem", [("bn0", BN), ("dw1", DW), ("bn1", BN)], "pw1", 8),
                group("pw1", [("bn2", BN), ("dw2", DW), ("bn3", BN)], "pw2", 12)]


class InvertedResidual(nn.Module):
    """MobileNetV2/EfficientNet block in functional form: expand -> bn -> act -> dw -> bn -> act -> project."""

    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.act, self.residual = act, stride == 1 and cin == cout
        self.expand, self.bn1 = pw(cin, 4 * cin), nn.BatchNorm2d(4 * cin)
        self.dw, self.bn2 = dw(4 * cin, stride), nn.BatchNorm2d(4 * cin)
        self.project, self.bn3 = pw(4 * cin, cout), nn.BatchNorm2d(cout)

    def forward(self, x):
        out = self.act(self.bn1(self.expand(x)))
        out = self.act(self.bn2(self.dw(out)))
        out = self.bn3(self.project(out))
        return out + x if self.residual else out


def inverted(act):
    return nn.Sequential(InvertedResidual(3, 3, 1, act), InvertedResidual(3, 6, 2, act))


INVERTED = [group("0.expand", [("0.bn1", BN), ("0.dw", DW), ("0.bn2", BN)], "0.project", 12),
            group("1.expand", [("1.bn1", BN), ("1.dw", DW), ("1.bn2", BN)], "1.project", 12)]


class SepConv(nn.Module):
    """PNASNet separable conv: relu -> dw1 -> pw1 -> bn1 -> relu -> dw2 -> pw2 -> bn2."""

    def __init__(self, c):
        super().__init__()
        self.dw1, self.pw1, self.bn1 = dw(c), pw(c, c), nn.BatchNorm2d(c)
        self.dw2, self.pw2, self.bn2 = dw(c), pw(c, c), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.bn1(self.pw1(self.dw1(F.relu(x))))
        return self.bn2(self.pw2(self.dw2(F.relu(x))))


class TransformerMLP(nn.Module):
    """x + fc2(dropout(gelu(fc1(norm(x))))) over tokens [B, T, C]; `channels_last_conv` adds a conv stem."""

    def __init__(self, dim=6, hidden=10):
        super().__init__()
        self.norm, self.fc1, self.act = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU()
        self.drop, self.fc2 = nn.Dropout(0.1), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class MixerBlock(nn.Module):
    """MLP-Mixer: token mixing over dim 1 (transposed), channel mixing over the last dim, functional GELU."""

    def __init__(self, tokens=9, dim=6):
        super().__init__()
        self.norm1, self.tok1, self.tok2 = nn.LayerNorm(dim), nn.Linear(tokens, 7), nn.Linear(7, tokens)
        self.norm2, self.ch1, self.ch2 = nn.LayerNorm(dim), nn.Linear(dim, 11), nn.Linear(11, dim)

    def forward(self, x):
        x = x + self.tok2(F.gelu(self.tok1(self.norm1(x).transpose(1, 2)))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.norm2(x))))


class SqueezeExcite(nn.Module):
    """conv -> bn -> relu -> SE (1x1 convs or Linear) -> scale -> conv."""

    def __init__(self, linear=False):
        super().__init__()
        self.linear = linear
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 4) if linear else nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Linear(4, 8) if linear else nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.linear:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1)))))
            s = s.view(x.shape[0], -1, 1, 1)
        else:
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.conv2(x * s)


class ConvThenChannelsLast(nn.Module):
    """conv -> bn -> silu -> permute to NHWC -> Linear -> permute back: a conv producer, a Linear consumer."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act, self.fc = nn.Conv2d(3, 7, 3, padding=1), nn.BatchNorm2d(7), nn.SiLU(), \
            nn.Linear(7, 4)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResNeXtBlock(nn.Module):
    """1x1 -> bn -> relu -> grouped 3x3 (cardinality 2) -> bn -> relu -> 1x1, residual add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = pw(4, 8), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.conv3 = pw(8, 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return x + self.conv3(F.relu(self.bn2(self.conv2(out))))


class ChannelShuffle(nn.Module):
    """conv -> relu -> shuffle (view, transpose, view) -> conv; int() of a size, as ShuffleNetV2 code does."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 6, 1), pw(6, 6), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        n, c, h, w = (int(s) for s in x.size())
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.d(F.relu(self.c(F.relu(self.b(x)))))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit as usually written: split, branch 1x1 -> bn -> relu -> dw -> bn -> 1x1 -> bn ->
    relu, concat, channel shuffle with int() of the traced sizes (so torch.fx cannot trace it)."""

    def __init__(self, c=8):
        super().__init__()
        h = c // 2
        self.stem = nn.Conv2d(3, c, 1)
        self.conv1, self.bn1 = pw(h, h), nn.BatchNorm2d(h)
        self.dw, self.bn2 = dw(h), nn.BatchNorm2d(h)
        self.conv2, self.bn3 = pw(h, h), nn.BatchNorm2d(h)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        b = F.relu(self.bn3(self.conv2(self.bn2(self.dw(F.relu(self.bn1(self.conv1(b))))))))
        x = torch.cat([a, b], 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, int(c) // 2, h, w).transpose(1, 2).reshape(n, int(c), h, w)
        return self.head(x)


class Shared(nn.Module):
    """The same conv applied twice (shared weights) between two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.shared, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.shared(F.relu(self.shared(F.relu(self.a(x)))))))


class Multiplier(nn.Module):
    """Depthwise conv with channel multiplier 2 between two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.dw, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.dw(F.relu(self.a(x)))))


class HeadAfterMean(nn.Module):
    """conv -> relu -> x.mean((2, 3)) -> classifier: the head stays shared (as after pool + flatten)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


IMG, TOK = torch.randn(2, 3, 8, 8), torch.randn(2, 9, 6)
# pattern -> (model factory, input, expected groups, {module: fragment of the reason it is not a group})
PATTERNS = {
    "mobilenet_v1_modules": (MobileNetV1, IMG, MOBILENET_V1, {"pw2": "reshape", "head": "head",
                                                              "dw1": "depthwise"}),
    "mobilenet_v1_relu6_modules": (lambda: MobileNetV1(nn.ReLU6), IMG, MOBILENET_V1, {"pw2": "reshape"}),
    "inverted_residual_relu6": (lambda: inverted(F.relu6), IMG, INVERTED, {"0.project": "residual add"}),
    "inverted_residual_silu": (lambda: inverted(nn.SiLU()), IMG, INVERTED, {"1.project": "head"}),
    "separable_conv": (lambda: SepConv(5), torch.randn(2, 5, 6, 6),
                       [group("pw1", [("bn1", BN), ("dw2", DW)], "pw2", 5)], {"pw2": "head"}),
    "transformer_mlp": (TransformerMLP, TOK, [group("fc1", [], "fc2", 10)], {"fc2": "residual add"}),
    "mixer": (MixerBlock, TOK, [group("tok1", [], "tok2", 7), group("ch1", [], "ch2", 11)],
              {"tok2": "residual add"}),
    # The SE gate's layers are members of conv1's group (reduce columns, expand rows) and a group of their own.
    "se_conv": (SqueezeExcite, IMG, [group("conv1", [("bn1", BN), ("fc1", SE_IN), ("fc2", SE_OUT)], "conv2", 8),
                                     group("fc1", [], "fc2", 4)], {"fc2": "SE gate expand layer"}),
    "conv_to_channels_last_linear": (ConvThenChannelsLast, IMG, [group("conv", [("bn", BN)], "fc", 7)], {}),
    # Grouped convs: the channels are dealt by in-block position (conv_groups), the conv groups stay aligned.
    "resnext_grouped_conv": (ResNeXtBlock, torch.randn(2, 4, 6, 6),
                             [group("conv1", [("bn1", BN)], "conv2", 8, 2), group("conv2", [("bn2", BN)], "conv3", 8, 2)],
                             {"conv3": "residual add"}),
    "channel_shuffle": (ChannelShuffle, IMG, [group("b", [], "c", 6), group("c", [], "d", 6)],
                        {"a": "reshape", "d": "head"}),
    "shufflenet_v2_unit": (ShuffleUnit, IMG, [group("conv1", [("bn1", BN), ("dw", DW), ("bn2", BN)], "conv2", 4)],
                           {"stem": "split", "conv2": "concat", "dw": "depthwise"}),
    "shared_weights": (Shared, IMG, [], {"a": "called more than once", "shared": "called more than once"}),
    "depthwise_multiplier_2": (Multiplier, IMG, [], {"a": "channel multiplier 2", "dw": "channel multiplier 2"}),
    "head_after_spatial_mean": (lambda: HeadAfterMean(), IMG, [], {"conv": "global pooling into a head"}),
    "layernorm_over_channels": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1)),
                                IMG, [], {"0": "GroupNorm"}),
}


@pytest.mark.parametrize("tracer", ["fx", "autograd"])
def test_linear_se_gate(tracer):
    """A Linear gate (pool -> flatten -> Linear -> ReLU -> Linear -> sigmoid -> view) joins conv1's group: both
    tracers see that the views go between the pooled one-pixel map and [N, C]."""
    report = lk.explain_groups(SqueezeExcite(linear=True), IMG, tracer=tracer)
    gate = group("fc1", [], "fc2", 4)
    assert report.groups == [group("conv1", [("bn1", BN), ("fc1", SE_IN), ("fc2", SE_OUT)], "conv2", 8), gate]


@pytest.mark.parametrize("tracer", ["fx", "autograd"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_groups_and_reasons(pattern, tracer):
    factory, x, expected, reasons = PATTERNS[pattern]
    model = factory()
    if pattern in ("channel_shuffle", "shufflenet_v2_unit") and tracer == "fx":
        with pytest.raises(ValueError, match="traced with torch.fx"):
            lk.explain_groups(model, x, tracer="fx")
        return
    report = lk.explain_groups(model, x, tracer=tracer)
    assert report.groups == expected
    for name, fragment in reasons.items():
        assert fragment in report.reasons[name], (name, report.reasons[name])
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(report.reasons) | {g.producer for g in report.groups} == convs  # every layer is accounted for
    assert not set(report.reasons) & {g.producer for g in report.groups}


def test_untraceable_by_fx_falls_back_to_autograd():
    model = ChannelShuffle()
    report = lk.explain_groups(model, IMG)
    assert report.tracer == "autograd" and report.groups == [group("b", [], "c", 6), group("c", [], "d", 6)]
    assert "traced with autograd" in str(report) and "b: b -> c" in str(report)


def test_convert_makes_loft_layers_of_every_kind(capsys):
    model = MobileNetV1()
    _, groups = lk.convert(model, IMG, explain=True, loft_layers=True)
    printed = capsys.readouterr().out
    assert "2 filter group(s)" in printed and "pw2: pw2 -> bn4 -> relu" in printed and "selected 2 of 2" in printed
    assert groups == MOBILENET_V1
    assert type(model.stem) is lk.LoftConv2d and type(model.pw1) is lk.LoftConv2d
    assert type(model.bn1) is lk.LoftBatchNorm2d and type(model.dw1) is nn.Conv2d  # depthwise stays plain
    mlp = TransformerMLP()
    _, groups = lk.convert(mlp, TOK, loft_layers=True)
    assert type(mlp.fc1) is lk.LoftLinear and type(mlp.fc2) is lk.LoftLinear
    assert lk.find_filter_groups(mlp, TOK) == groups  # Loft layers are found again
    with pytest.raises(TypeError, match="explain"):
        lk.convert(MobileNetV1(), IMG, explain="yes")


def test_filter_tensors_of_new_kinds():
    model = MobileNetV1()
    g = MOBILENET_V1[1]
    got = [(name, t.data_ptr(), dim) for name, t, dim in g.filter_tensors(model)]
    want = [("pw1.weight", model.pw1.weight, 0)]
    want += [(f"bn2.{a}", getattr(model.bn2, a), 0) for a in ("weight", "bias", "running_mean", "running_var")]
    want += [("dw2.weight", model.dw2.weight, 0)]
    want += [(f"bn3.{a}", getattr(model.bn3, a), 0) for a in ("weight", "bias", "running_mean", "running_var")]
    want += [("pw2.weight", model.pw2.weight, 1)]
    assert got == [(name, t.data_ptr(), dim) for name, t, dim in want]
    mlp = TransformerMLP()
    got = [(name, tuple(t.shape), dim) for name, t, dim in group("fc1", [], "fc2", 10).filter_tensors(mlp)]
    assert got == [("fc1.weight", (10, 6), 0), ("fc1.bias", (10,), 0), ("fc2.weight", (6, 10), 1)]
    assert g.norms == ("bn2", "bn3") and g.depthwise == ("dw2",) and g.conv_a == "pw1" and g.conv_b == "pw2"
    assert lk.FilterGroup.from_dict(g.to_dict()) == g
    old = {"name": "c", "conv_a": "c", "norms": ["bn"], "conv_b": "d", "n": 3}
    assert lk.FilterGroup.from_dict(old) == lk.FilterGroup("c", "c", ("bn",), "d", 3)


def test_resolve_groups_checks_every_member():
    from loft_kernels.filter_group import resolve_groups
    model = MobileNetV1()
    assert [r.members for r in resolve_groups(model, MOBILENET_V1)][0] == (model.bn0, model.dw1, model.bn1)
    bad_kind = group("stem", [("bn0", DW)], "pw1", 8)
    with pytest.raises(TypeError, match="depthwise"):
        resolve_groups(model, [bad_kind])
    not_dw = group("stem", [("pw1", DW)], "pw2", 8)
    with pytest.raises(ValueError, match="not depthwise"):
        resolve_groups(model, [not_dw])
    with pytest.raises(ValueError, match="has 12 output channels"):
        resolve_groups(model, [group("pw1", [], "pw2", 8)])
    with pytest.raises(TypeError, match="expected an nn.Conv2d or nn.Linear"):
        resolve_groups(model, [group("bn0", [], "pw1", 8)])
    with pytest.raises(ValueError, match="both group"):
        resolve_groups(model, [MOBILENET_V1[0], group("x", [("bn1", BN)], "pw2", 8)])
    with pytest.raises(ValueError, match="fewer filters than workers=9"):
        resolve_groups(model, MOBILENET_V1, workers=9)
    with pytest.raises(ValueError, match="Member kind"):
        lk.Member("a", "layernorm")
    with pytest.raises(ValueError, match="names a module twice"):
        group("a", [("a", BN)], "b", 3)


class TwoInputs(nn.Module):
    """forward(x, y) returning a dict, with a data-dependent branch: only the autograd trace follows it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x, y):
        out = self.b(F.relu(self.a(x)))
        if float(y.sum()) > -1e9:
            out = out + self.c(y)
        return {"out": out, "aux": [out.mean()]}


def test_autograd_trace_takes_tuple_inputs_and_nested_outputs():
    report = lk.explain_groups(TwoInputs(), (IMG, IMG))
    assert report.tracer == "autograd" and report.groups == [group("a", [], "b", 4)]
    assert "residual add" in report.reasons["b"] and "residual add" in report.reasons["c"]
    with pytest.raises(ValueError, match="example_input: the model failed"):
        lk.explain_groups(TwoInputs(), IMG)  # forward needs two inputs
