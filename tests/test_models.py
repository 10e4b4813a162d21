"""The model zoo: architecture facts (parameter counts of the standard CIFAR models), shapes, registry, bad input."""
import pytest
import torch
from torch import nn

import loft_kernels as lk

# Parameter counts of the standard CIFAR-10 models as published with kuangliu/pytorch-cifar (ResNet, VGG)
# and xternalz/WideResNet-pytorch (WRN-16-4). Our PreActResNet adds the final bn (He et al. 2016) that
# kuangliu's omits: its 11,171,146 + 2 * 512 (PreActResNet-34 is counted by hand below).
PARAM_COUNTS = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "preact_resnet18": 11_171_146 + 1024,
    "vgg11": 9_231_114,
    "vgg16": 14_728_266,
    "wide_resnet": 2_748_890,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_full_size_parameter_counts(name):
    with torch.device("meta"):  # no memory, no init cost
        model = lk.get_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_preact_resnet34_parameter_count_by_hand():
    # Independent count: stem 3*64*9; per block bn1 + conv1 + bn2 + conv2 (+ 1x1 shortcut); final bn; linear.
    total, cin = 3 * 64 * 9, 64
    for s, depth in enumerate((3, 4, 6, 3)):
        planes = 64 * 2 ** s
        for b in range(depth):
            total += 2 * cin + cin * planes * 9 + 2 * planes + planes * planes * 9
            if cin != planes:
                total += cin * planes
            cin = planes
    total += 2 * 512 + 512 * 10 + 10
    with torch.device("meta"):
        model = lk.preact_resnet34()
    assert sum(p.numel() for p in model.parameters()) == total


@pytest.mark.parametrize("name", lk.available_models())
def test_every_model_runs_forward_backward(name):
    kw = dict(width=0.125, num_classes=7, in_channels=2)
    if name == "wide_resnet":
        kw.update(depth=10, widen_factor=2, width=0.5)
    model = lk.get_model(name, **kw)
    x = torch.randn(2, 2, 32, 32, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 7)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_cifar_stem_and_stage_strides():
    model = lk.resnet18(width=0.25)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    shapes = []
    model.layer1.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model.layer4.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 16, 32, 32), (1, 128, 4, 4)]


def test_width_and_generic_constructors():
    m = lk.preact_resnet(depths=(1, 1), width=0.5, in_channels=1, num_classes=3)
    assert [type(b).__name__ for b in (m.layer1[0], m.layer2[0])] == ["PreActBlock", "PreActBlock"]
    assert m.conv1.in_channels == 1 and m.conv1.out_channels == 32
    assert m.layer2[0].conv2.out_channels == 64 and m.linear.out_features == 3
    assert not hasattr(m, "layer3")
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 3)  # sklearn digits size
    r = lk.resnet(depths=(1,), block="bottleneck", width=0.25)
    assert r.layer1[0].conv3.out_channels == 64 and r.linear.in_features == 64
    v = lk.vgg([16, "M", 32], width=0.5)
    assert [m.out_channels for m in v.modules() if isinstance(m, nn.Conv2d)] == [8, 16]
    assert v(torch.randn(1, 3, 8, 8)).shape == (1, 10)
    w = lk.wide_resnet(depth=22, widen_factor=2)
    assert len(w.layer1) == 3 and w.layer3[0].conv1.out_channels == 128
    assert w.layer1[0].dropout.p == 0.3


def test_dropout_active_only_in_training():
    w = lk.wide_resnet(depth=10, widen_factor=1, dropout=0.5, width=0.5).eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(w(x), w(x))


def test_get_model_and_bad_input():
    assert set(lk.available_models()) >= {"preact_resnet18", "preact_resnet34", "resnet18", "resnet34", "resnet50",
                                          "vgg11", "vgg16", "wide_resnet", "preact_resnet", "resnet", "vgg"}
    assert isinstance(lk.get_model("resnet18", width=0.125), nn.Module)
    with pytest.raises(ValueError, match="name: unknown model 'resnet19'"):
        lk.get_model("resnet19")
    with pytest.raises(TypeError, match="name"):
        lk.get_model(18)
    with pytest.raises(ValueError, match="width"):
        lk.get_model("vgg11", width=0)
    with pytest.raises(TypeError, match="width"):
        lk.resnet18(width="1")
    with pytest.raises(ValueError, match="num_classes"):
        lk.vgg16(num_classes=0)
    with pytest.raises(TypeError, match="in_channels"):
        lk.preact_resnet18(in_channels=3.0)
    with pytest.raises(TypeError, match="depths"):
        lk.preact_resnet(depths=2)
    with pytest.raises(ValueError, match=r"depths\[1\]"):
        lk.resnet(depths=(1, 0))
    with pytest.raises(ValueError, match="block"):
        lk.resnet(block="basicblock")
    with pytest.raises(ValueError, match="depth must be 6k"):
        lk.wide_resnet(depth=15)
    with pytest.raises(ValueError, match="dropout"):
        lk.wide_resnet(dropout=1.0)
    with pytest.raises(TypeError, match="widen_factor"):
        lk.wide_resnet(widen_factor=2.5)
    with pytest.raises(TypeError, match="cfg"):
        lk.vgg(cfg=["M"])
    with pytest.raises(TypeError, match=r"cfg\[1\]"):
        lk.vgg(cfg=[8, "X"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        lk.get_model("resnet18", depth=3)


def test_mobilenet_v2_parameter_count_by_hand():
    # stem 3x3 conv + bn; per block: expand 1x1, bn, depthwise 3x3, bn, project 1x1, bn (+ 1x1 conv/bn shortcut
    # when stride 1 and the width changes); last 1x1 to 1280 + bn; linear.
    table = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    total, cin = 3 * 32 * 9 + 2 * 32, 32
    for t, c, count, stride in table:
        for b in range(count):
            planes = t * cin
            total += cin * planes + 2 * planes + planes * 9 + 2 * planes + planes * c + 2 * c
            if (stride if b == 0 else 1) == 1 and cin != c:
                total += cin * c + 2 * c
            cin = c
    total += 320 * 1280 + 2 * 1280 + 1280 * 10 + 10
    with torch.device("meta"):
        model = lk.mobilenet_v2()
    assert sum(p.numel() for p in model.parameters()) == total == 2_296_922


def test_convnext_cifar_parameter_count_by_hand():
    dims, depths = (64, 128, 256), (2, 2, 2)
    total = 3 * 64 * 4 + 64 + 2 * 64  # patchify stem conv (bias) + channels-first LayerNorm
    for s, (d, depth) in enumerate(zip(dims, depths)):
        if s:
            total += 2 * dims[s - 1] + dims[s - 1] * d * 4 + d  # LayerNorm + 2x2 stride-2 conv
        # depthwise 7x7 (bias), LayerNorm, Linear d -> 4d, Linear 4d -> d, layer scale
        total += depth * (49 * d + d + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d + d)
    total += 2 * 256 + 256 * 10 + 10
    with torch.device("meta"):
        model = lk.get_model("convnext_cifar")
    assert sum(p.numel() for p in model.parameters()) == total


def test_new_zoo_models_shapes_and_width():
    m = lk.get_model("mobilenet_v2", width=0.5, num_classes=3, in_channels=1)
    assert m.conv1.out_channels == 16 and m.layers[1].conv2.groups == m.layers[1].conv2.in_channels == 48
    assert m.linear.in_features == 640 and m(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    c = lk.get_model("convnext_cifar", width=0.25, num_classes=4)
    assert c.stages[0][0].pwconv1.out_features == 64 and c.stages[2][1].dwconv.groups == 64
    assert c(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="dims must give one width per stage"):
        lk.convnext_cifar(depths=(1, 1), dims=(8,))


@pytest.mark.parametrize("width", [float("inf"), float("nan"), -1.0])
def test_width_must_be_finite_and_positive(width):
    for name in ("resnet18", "mobilenet_v2", "convnext_cifar"):
        with pytest.raises(ValueError, match="width must be a finite number > 0"):
            lk.get_model(name, width=width)
