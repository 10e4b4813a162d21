"""LoftConv2d / LoftBatchNorm2d against nn.Conv2d / nn.BatchNorm2d and sliced references; activate / dense."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loft_kernels as lk

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]
CONV_CONFIGS = [  # (in, out, kernel, stride, padding, dilation, groups, bias)
    dict(in_channels=5, out_channels=7, kernel_size=3, stride=1, padding=1, dilation=1, groups=1, bias=True),
    dict(in_channels=6, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=1, groups=1,
         bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=1, padding=2, dilation=2, groups=2, bias=True),
    dict(in_channels=3, out_channels=5, kernel_size=4, stride=1, padding="same", dilation=1, groups=1, bias=True),
    dict(in_channels=3, out_channels=3, kernel_size=3, stride=2, padding="valid", dilation=1, groups=3, bias=True),
]


def _pair_of(cls_a, cls_b, **kw):
    a = cls_a(**kw)
    b = cls_b(**kw)
    b.load_state_dict(a.state_dict())
    return a, b


# ------------------------------------------------------------ LoftConv2d ----
def test_signatures_match_nn():
    assert inspect.signature(lk.LoftConv2d) == inspect.signature(nn.Conv2d)
    assert inspect.signature(lk.LoftBatchNorm2d) == inspect.signature(nn.BatchNorm2d)
    assert issubclass(lk.LoftConv2d, nn.Conv2d) and issubclass(lk.LoftBatchNorm2d, nn.BatchNorm2d)


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("cfg", range(len(CONV_CONFIGS)))
def test_conv_dense_is_nn_conv_bitwise(cfg, mode):
    kw = dict(CONV_CONFIGS[cfg], padding_mode=mode)
    if kw["padding"] == "valid" and mode != "zeros":
        kw["padding"] = 0
    ref, loft = _pair_of(nn.Conv2d, lk.LoftConv2d, **kw)
    x = torch.randn(2, kw["in_channels"], 9, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), loft(x2)
    assert torch.equal(y_ref, y)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(ref.weight.grad, loft.weight.grad)
    if kw["bias"]:
        assert torch.equal(ref.bias.grad, loft.bias.grad)


def test_conv_state_dict_loads_both_ways():
    ref = nn.Conv2d(3, 4, 3, bias=True)
    loft = lk.LoftConv2d(3, 4, 3, bias=True)
    assert list(ref.state_dict()) == list(loft.state_dict())
    loft.load_state_dict(ref.state_dict())
    assert torch.equal(loft.weight, ref.weight) and torch.equal(loft.bias, ref.bias)
    other = nn.Conv2d(3, 4, 3, bias=True)
    other.load_state_dict(loft.state_dict())
    assert torch.equal(other.weight, ref.weight)
    # The active set is runtime state, never saved.
    loft.set_active(out_index=torch.tensor([1]))
    assert list(loft.state_dict()) == ["weight", "bias"]


def _sliced_conv_reference(conv, x_sel, out_index, in_index):
    """F.conv2d over weight[o][:, i], written independently of the library (padding modes via F.pad)."""
    w = conv.weight.detach().clone()
    b = None if conv.bias is None else conv.bias.detach().clone()
    o = torch.arange(w.shape[0]) if out_index is None else out_index
    i = torch.arange(w.shape[1]) if in_index is None else in_index
    w_sel = w[o][:, i].clone().requires_grad_()
    b_sel = None if b is None else b[o].clone().requires_grad_()
    pad = conv.padding
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding
        x_sel = F.pad(x_sel, (pw, pw, ph, ph), mode=conv.padding_mode)
        pad = 0
    y = F.conv2d(x_sel, w_sel, b_sel, conv.stride, pad, conv.dilation)
    return y, w_sel, b_sel, o, i


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("which", ["out", "in", "both"])
def test_conv_subset_equals_sliced_reference(mode, which):
    conv = lk.LoftConv2d(7, 9, 3, stride=(1, 2), padding=(1, 2), dilation=(2, 1), bias=True, padding_mode=mode)
    out_index = torch.tensor([8, 0, 3, 4]) if which in ("out", "both") else None
    in_index = torch.tensor([6, 2, 5]) if which in ("in", "both") else None
    conv.set_active(out_index=out_index, in_index=in_index)
    assert conv.active_out is None if out_index is None else torch.equal(conv.active_out, out_index)
    assert conv.active_in is None if in_index is None else torch.equal(conv.active_in, in_index)
    x = torch.randn(3, 7 if in_index is None else 3, 11, 10)
    y = conv(x)
    y_ref, w_sel, b_sel, o, i = _sliced_conv_reference(conv, x, out_index, in_index)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    expected_w = torch.zeros_like(conv.weight)
    expected_w[o[:, None], i[None, :]] = w_sel.grad
    torch.testing.assert_close(conv.weight.grad, expected_w)
    expected_b = torch.zeros_like(conv.bias).index_copy_(0, o, b_sel.grad)
    torch.testing.assert_close(conv.bias.grad, expected_b)
    mask = torch.zeros_like(conv.weight, dtype=torch.bool)
    mask[o[:, None], i[None, :]] = True
    assert bool((conv.weight.grad[~mask] == 0).all())  # exactly zero outside the active rows/cols


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("cfg", [i for i, c in enumerate(CONV_CONFIGS) if c["groups"] == 1])
def test_conv_subset_equals_nn_conv_of_sliced_weight(cfg, mode):
    """Every constructor config: the subset forward is an nn.Conv2d built from weight[o][:, i]."""
    kw = dict(CONV_CONFIGS[cfg], padding_mode=mode)
    conv = lk.LoftConv2d(**kw)
    o = torch.tensor([kw["out_channels"] - 1, 0])
    i = torch.tensor([1, kw["in_channels"] - 1])
    ref = nn.Conv2d(**{**kw, "in_channels": 2, "out_channels": 2})
    with torch.no_grad():
        ref.weight.copy_(conv.weight[o][:, i])
        if kw["bias"]:
            ref.bias.copy_(conv.bias[o])
    conv.set_active(out_index=o, in_index=i)
    x = torch.randn(2, 2, 9, 8)
    torch.testing.assert_close(conv(x), ref(x))


def test_conv_clear_restores_dense():
    conv = lk.LoftConv2d(4, 6, 3, padding=1)
    ref = nn.Conv2d(4, 6, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    conv.set_active(out_index=torch.tensor([1, 2]), in_index=torch.tensor([0]))
    conv.set_active()
    assert conv.active_out is None and conv.active_in is None
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(conv(x), ref(x))


def test_conv_set_active_bad_input():
    conv = lk.LoftConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="out_index"):
        conv.set_active(out_index=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="out_index"):
        conv.set_active(out_index=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="in_index"):
        conv.set_active(in_index=torch.tensor([-1]))
    with pytest.raises(TypeError, match="in_index"):
        conv.set_active(in_index=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="out_index"):
        conv.set_active(out_index=[0, 1])
    with pytest.raises(ValueError, match="out_index"):
        conv.set_active(out_index=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="groups"):
        lk.LoftConv2d(4, 6, 3, groups=2).set_active(out_index=torch.tensor([0]))
    conv.set_active(in_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="x must have 2 channels"):
        conv(torch.randn(1, 4, 5, 5))


# -------------------------------------------------------- LoftBatchNorm2d ----
BN_CONFIGS = [
    dict(affine=True, track_running_stats=True, momentum=0.1),
    dict(affine=True, track_running_stats=True, momentum=None),
    dict(affine=False, track_running_stats=True, momentum=0.3),
    dict(affine=True, track_running_stats=False, momentum=0.1),
    dict(affine=False, track_running_stats=False, momentum=None),
]


def _randomise_bn(bn):
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        if bn.track_running_stats:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("cfg", range(len(BN_CONFIGS)))
def test_bn_dense_is_nn_bn_bitwise(cfg):
    ref = nn.BatchNorm2d(6, eps=1e-4, **BN_CONFIGS[cfg])
    _randomise_bn(ref)
    loft = lk.LoftBatchNorm2d(6, eps=1e-4, **BN_CONFIGS[cfg])
    loft.load_state_dict(ref.state_dict())
    for step in range(4):
        for m in (ref, loft):
            m.train(step < 3)
        x = torch.randn(5, 6, 4, 3)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y = ref(x1), loft(x2)
        assert torch.equal(y_ref, y)
        y_ref.sum().backward()
        y.sum().backward()
        assert torch.equal(x1.grad, x2.grad)
    for (k, v_ref), (k2, v) in zip(ref.state_dict().items(), loft.state_dict().items()):
        assert k == k2 and torch.equal(v_ref, v), k


def test_bn_state_dict_loads_both_ways():
    ref = nn.BatchNorm2d(5)
    _randomise_bn(ref)
    loft = lk.LoftBatchNorm2d(5)
    assert list(ref.state_dict()) == list(loft.state_dict())
    loft.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(loft.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def _sliced_bn(bn, index):
    """A plain nn.BatchNorm2d holding the selected channels' parameters and statistics."""
    ref = nn.BatchNorm2d(len(index), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats)
    with torch.no_grad():
        if bn.affine:
            ref.weight.copy_(bn.weight[index])
            ref.bias.copy_(bn.bias[index])
        if bn.track_running_stats:
            ref.running_mean.copy_(bn.running_mean[index])
            ref.running_var.copy_(bn.running_var[index])
            ref.num_batches_tracked.copy_(bn.num_batches_tracked)
    return ref


@pytest.mark.parametrize("cfg", range(len(BN_CONFIGS)))
def test_bn_subset_equals_sliced_reference(cfg):
    bn = lk.LoftBatchNorm2d(8, **BN_CONFIGS[cfg])
    _randomise_bn(bn)
    if bn.track_running_stats:
        bn.num_batches_tracked.fill_(3)
    index = torch.tensor([6, 1, 3])
    rest = torch.tensor([0, 2, 4, 5, 7])
    before = copy.deepcopy(bn.state_dict())
    ref = _sliced_bn(bn, index)
    bn.set_active(index)
    assert torch.equal(bn.active, index)
    for step in range(4):
        train = step < 3
        bn.train(train)
        ref.train(train)
        x = torch.randn(4, 3, 5, 5)
        y, y_ref = bn(x), ref(x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        if bn.affine:
            bn.weight.grad = None
            bn.bias.grad = None
            ref.zero_grad()
            g = torch.randn_like(y)
            y.backward(g)
            y_ref.backward(g)
            assert torch.equal(bn.weight.grad[index], ref.weight.grad)
            assert torch.equal(bn.bias.grad[index], ref.bias.grad)
            assert bool((bn.weight.grad[rest] == 0).all() and (bn.bias.grad[rest] == 0).all())
        if bn.track_running_stats:
            assert torch.equal(bn.running_mean[index], ref.running_mean)
            assert torch.equal(bn.running_var[index], ref.running_var)
            assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)
            assert torch.equal(bn.running_mean[rest], before["running_mean"][rest])
            assert torch.equal(bn.running_var[rest], before["running_var"][rest])
    if bn.track_running_stats:
        assert int(bn.num_batches_tracked) == 3 + 3


def test_bn_bad_input():
    bn = lk.LoftBatchNorm2d(4)
    with pytest.raises(ValueError, match="index"):
        bn.set_active(torch.tensor([4]))
    with pytest.raises(ValueError, match="index"):
        bn.set_active(torch.tensor([2, 2]))
    with pytest.raises(TypeError, match="index"):
        bn.set_active((0, 1))
    bn.set_active(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="input must have 2 channels"):
        bn(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4D input"):
        bn(torch.randn(2, 2, 3))


# ----------------------------------------------------- activate and dense ----
class Chain(nn.Module):
    """conv0 -> bn0 -> relu -> conv1 -> bn1 -> relu -> conv2 -> pool -> head: conv1 is conv_b and conv_a."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        return self.head(F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1))


GROUPS = [lk.FilterGroup("conv0", "conv0", ("bn0",), "conv1", 6),
          lk.FilterGroup("conv1", "conv1", ["bn1"], "conv2", 5)]


def _converted_chain():
    model = Chain()
    for bn in (model.bn0, model.bn1):
        _randomise_bn(bn)
    model.eval()
    loft = copy.deepcopy(model)
    for name in ("conv0", "conv1", "conv2"):
        loft.get_submodule(name).__class__ = lk.LoftConv2d
    for name in ("bn0", "bn1"):
        loft.get_submodule(name).__class__ = lk.LoftBatchNorm2d
    return model, loft


def _sliced_chain(model, a, b):
    """The worker's sub-model built by physically slicing the plain model (independent reference)."""
    sub = copy.deepcopy(model)
    with torch.no_grad():
        sub.conv0 = nn.Conv2d(3, len(a), 3, padding=1)
        sub.conv0.weight.copy_(model.conv0.weight[a])
        sub.conv0.bias.copy_(model.conv0.bias[a])
        sub.bn0 = _sliced_bn(model.bn0, a)
        sub.conv1 = nn.Conv2d(len(a), len(b), 3, padding=1, bias=False)
        sub.conv1.weight.copy_(model.conv1.weight[b][:, a])
        sub.bn1 = _sliced_bn(model.bn1, b)
        sub.conv2 = nn.Conv2d(len(b), 4, 3, padding=1)
        sub.conv2.weight.copy_(model.conv2.weight[:, b])
        sub.conv2.bias.copy_(model.conv2.bias)
    return sub.eval()


def test_activate_sets_chained_subsets_and_matches_sliced_model():
    model, loft = _converted_chain()
    a, b = torch.tensor([0, 2, 5]), torch.tensor([1, 4])
    lk.activate(loft, GROUPS, {"conv0": a, "conv1": b})
    assert torch.equal(loft.conv0.active_out, a) and loft.conv0.active_in is None
    assert torch.equal(loft.conv1.active_out, b) and torch.equal(loft.conv1.active_in, a)
    assert loft.conv2.active_out is None and torch.equal(loft.conv2.active_in, b)
    assert torch.equal(loft.bn0.active, a) and torch.equal(loft.bn1.active, b)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loft(x), _sliced_chain(model, a, b)(x))
    with lk.dense(loft) as same:
        assert same is loft
        assert all(m.active_out is None and m.active_in is None for m in (loft.conv0, loft.conv1, loft.conv2))
        assert loft.bn0.active is None and loft.bn1.active is None
        assert torch.equal(loft(x), model(x))
    assert torch.equal(loft.conv1.active_in, a) and torch.equal(loft.bn1.active, b)  # restored
    lk.activate(loft, GROUPS, None)
    assert torch.equal(loft(x), model(x))
    assert loft.conv1.active_out is None and loft.bn0.active is None


def test_activate_replaces_previous_assignment():
    _, loft = _converted_chain()
    lk.activate(loft, GROUPS, {"conv0": torch.tensor([0]), "conv1": torch.tensor([1])})
    lk.activate(loft, GROUPS[1:], {"conv1": torch.tensor([2, 3])})
    assert loft.conv0.active_out is None and loft.bn0.active is None and loft.conv1.active_in is None
    assert torch.equal(loft.conv1.active_out, torch.tensor([2, 3]))


def test_dense_restores_after_exception():
    _, loft = _converted_chain()
    a = torch.tensor([1, 3])
    lk.activate(loft, GROUPS[:1], {"conv0": a})
    with pytest.raises(RuntimeError, match="boom"):
        with lk.dense(loft):
            raise RuntimeError("boom")
    assert torch.equal(loft.conv0.active_out, a) and torch.equal(loft.bn0.active, a)


def test_activate_bad_input():
    model, loft = _converted_chain()
    good = {"conv0": torch.tensor([0, 1]), "conv1": torch.tensor([2])}
    with pytest.raises(TypeError, match="model"):
        lk.activate("net", GROUPS, good)
    with pytest.raises(TypeError, match="groups"):
        lk.activate(loft, GROUPS[0], good)
    with pytest.raises(TypeError, match=r"groups\[1\]"):
        lk.activate(loft, [GROUPS[0], "conv1"], good)
    with pytest.raises(TypeError, match="assignment"):
        lk.activate(loft, GROUPS, [torch.tensor([0])])
    with pytest.raises(ValueError, match="assignment has no entry"):
        lk.activate(loft, GROUPS, {"conv0": torch.tensor([0])})
    with pytest.raises(ValueError, match="not group names"):
        lk.activate(loft, GROUPS, {**good, "conv9": torch.tensor([0])})
    with pytest.raises(ValueError, match=r"assignment\['conv1'\]"):
        lk.activate(loft, GROUPS, {"conv0": torch.tensor([0]), "conv1": torch.tensor([5])})
    with pytest.raises(ValueError, match=r"assignment\['conv0'\]"):
        lk.activate(loft, GROUPS, {"conv0": torch.tensor([1, 1]), "conv1": torch.tensor([0])})
    with pytest.raises(TypeError, match="lk.convert"):
        lk.activate(model, GROUPS, good)  # plain nn layers
    with pytest.raises(ValueError, match="does not have"):
        lk.activate(loft, [lk.FilterGroup("x", "nope", (), "conv1", 6)], {"x": torch.tensor([0])})
    with pytest.raises(ValueError, match="has n=5 filters but its producer 'conv0' has 6"):
        lk.activate(loft, [lk.FilterGroup("conv0", "conv0", ("bn0",), "conv1", 5)], {"conv0": torch.tensor([0])})
    with pytest.raises(TypeError, match="model"):
        with lk.dense(None):
            pass
    # A failed call leaves the previous active sets untouched.
    lk.activate(loft, GROUPS, good)
    with pytest.raises(ValueError):
        lk.activate(loft, GROUPS, {"conv0": torch.tensor([0]), "conv1": torch.tensor([9])})
    assert torch.equal(loft.conv0.active_out, good["conv0"])


def test_a_refused_set_active_changes_nothing_and_the_active_sets_handed_out_are_copies():
    torch.manual_seed(0)
    for layer, x in ((lk.LoftConv2d(4, 8, 3), torch.randn(1, 4, 5, 5)), (lk.LoftLinear(4, 8), torch.randn(3, 4))):
        before = layer(x)
        with pytest.raises(ValueError, match="in_index has entry 9"):
            layer.set_active(out_index=torch.tensor([0, 1]), in_index=torch.tensor([9]))
        assert layer.active_out is None and torch.equal(layer(x), before)
        layer.set_active(out_index=torch.tensor([5, 0, 3]))
        layer.active_out[1] = 5  # edits a copy: the layer keeps its checked set
        assert layer.active_out.tolist() == [5, 0, 3]
    bn = lk.LoftBatchNorm2d(6)
    bn.set_active(torch.tensor([4, 1]))
    bn.active[0] = 1
    assert bn.active.tolist() == [4, 1]


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_symbolic_trace_of_an_active_layer_matches_eager(kind):
    torch.manual_seed(0)
    layer, x = ((lk.LoftConv2d(4, 6, 3), torch.randn(2, 4, 5, 5)) if kind == "conv" else
                (lk.LoftLinear(4, 6), torch.randn(3, 4)))
    layer.set_active(out_index=torch.tensor([0, 2, 5]))
    traced = torch.fx.symbolic_trace(layer)
    assert torch.equal(traced(x), layer(x))
